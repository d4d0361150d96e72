"""LoRA against full fine-tuning on the same pairs: trainable parameters and the train stage's peak RSS, each in a
fresh process (a run's own peak_rss_mib is the whole runner's, earlier stages included).

    python experiments/real_model/lora_memory.py <run dir>        # a finished round: its pairs, reference, config

Reads <run>/round_1/{selected.jsonl, ref_logps.*.json} and <run>/.hydra/config.yaml (trainer and loss), trains
once with trainer.lora.enabled=false and once with true, and prints one JSON line per arm.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def arm(run: Path, lora: bool) -> dict:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from alignlab.records import Pair, read_jsonl
    from alignlab.train.core import peak_rss_mib
    from alignlab.train.torch_trainer import TorchTrainer

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    rd = run / "round_1"
    pairs = [Pair(**{k: r[k] for k in Pair.__dataclass_fields__ if k in r}) for r in read_jsonl(rd / "selected.jsonl")]
    ref = json.loads(next(rd.glob("ref_logps.*.json")).read_text())
    kw = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if k != "_target_"}
    kw["lora"] = {**kw.get("lora", {}), "enabled": lora}
    trainer = TorchTrainer(**kw)
    loss = instantiate(cfg.loss)
    before = peak_rss_mib()
    with tempfile.TemporaryDirectory() as out:
        res = trainer.train(cfg.model.path, pairs, ref, loss, Path(out) / "checkpoint", seed=cfg.seed)
    return {"lora": lora, "pairs": len(pairs), "steps": res.steps, "trainable_params": res.summary["trainable_params"],
            "peak_rss_mib_before_train": round(before), "peak_rss_mib": round(peak_rss_mib()),
            "train_seconds": round(res.summary["train_seconds"], 1)}


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(json.dumps(arm(Path(sys.argv[1]), sys.argv[2] == "lora")))
    else:
        for a in ("full", "lora"):
            subprocess.run([sys.executable, __file__, sys.argv[1], a], check=True)
