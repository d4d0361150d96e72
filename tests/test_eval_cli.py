"""`alignlab eval model=<hf dir> eval=... hydra.run.dir=<D>` writes <D>/eval.json (DESIGN.md contract)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SHARED, alignlab


def test_eval_heldout_on_a_model_directory(tiny_dir, tmp_path):
    alignlab("eval", f"model={tiny_dir}", "eval.limit=12", "generation.max_new_tokens=48",
             f"hydra.run.dir={tmp_path}", timeout=300)
    res = json.loads((tmp_path / "eval.json").read_text())
    assert set(res["heldout"]) >= {"accuracy", "n", "se", "finished_rate", "max_new_tokens"}
    assert res["heldout"]["n"] == 12 and res["heldout"]["max_new_tokens"] == 48
    assert 0.0 <= res["heldout"]["finished_rate"] <= 1.0


@pytest.mark.skipif(not (SHARED / "benchmarks").exists(), reason="../shared/data/benchmarks not present")
def test_eval_math_suite_writes_every_benchmark(tiny_dir, tmp_path):
    alignlab("eval", f"model={tiny_dir}", "eval=math_suite", "eval.limit=2", "generation.max_new_tokens=16",
             f"eval.root={SHARED / 'benchmarks'}", f"hydra.run.dir={tmp_path}", timeout=300)
    res = json.loads((tmp_path / "eval.json").read_text())
    assert sorted(res) == sorted(["gsm8k", "math500", "minerva_math", "gaokao2023en", "olympiadbench",
                                  "college_math", "amc23", "aime24"])
    for v in res.values():
        assert v["n"] == 2 and 0.0 <= v["accuracy"] <= 1.0 and "se" in v
        assert v["max_new_tokens"] == 16 and 0.0 <= v["finished_rate"] <= 1.0  # DESIGN: beside every accuracy
