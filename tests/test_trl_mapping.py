"""docs/losses.md's DPOConfig table names real fields on both sides (issue 33)."""

from __future__ import annotations

import dataclasses
import re

from omegaconf import OmegaConf

from tests.conftest import ROOT


def _rows() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "losses.md").read_text().split("## Porting a TRL `DPOConfig`", 1)[1]
    rows = [line.split("|")[1:3] for line in text.splitlines() if line.startswith("| `")]
    return [(re.findall(r"`([^`]+)`", trl)[0], alg.strip()) for trl, alg in rows]


def test_every_trl_name_is_a_dpoconfig_field_and_every_alignlab_key_exists():
    from trl import DPOConfig

    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    trainer = OmegaConf.load(ROOT / "conf" / "trainer" / "torch.yaml")
    losses = {f.stem: OmegaConf.load(f) for f in (ROOT / "conf" / "loss").glob("*.yaml")}
    rows = _rows()
    assert {t for t, _ in rows} >= {"learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                                    "beta", "loss_type", "label_smoothing", "max_length"}
    for trl_name, alignlab_key in rows:
        assert trl_name in fields, trl_name
        key = re.findall(r"`([^`]+)`", alignlab_key)
        if not key or key[0] in ("loss", "seed"):
            continue
        group, name = key[0].split(".", 1)
        if group == "trainer":
            assert name in trainer, key[0]
        else:
            assert any(name in node for node in losses.values()), key[0]
