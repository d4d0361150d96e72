"""Hydra entry point: one MRS-IPO/DPO simulation per job, written to <hydra output dir>/result.json.

    python -m alignlab.dynamics.cli alpha=0.5 beta=3.8 lam=1
    python -m alignlab.dynamics.cli -m alpha=0,0.5,0.9 beta=1,2,4 lam=0.5,1   # then: python -m alignlab.dynamics.phase <dir>
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from alignlab.dynamics.run import run_one

log = logging.getLogger(__name__)
# Absolute, like alignlab/cli.py: a relative "../../conf" is resolved as the python package "conf" whenever this
# function is called from another module (the ``alignlab dynamics`` dispatcher), and that fails.
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(config_path=CONF_DIR, config_name="dynamics", version_base=None)
def main(cfg: DictConfig) -> float:
    """Run one simulation; returns the oscillation strength (handy for sweepers)."""
    plain = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))  # a DictConfig becomes a dict
    result = run_one(plain)
    out = Path(HydraConfig.get().runtime.output_dir) / "result.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    m = result["metrics"]
    log.info("alpha=%g beta=%g lam=%g  oscillation=%.3g  final_entropy=%.3g  converged=%s  -> %s", cfg.alpha, cfg.beta,
             cfg.lam, m["oscillation"], m["final_entropy"], m["converged"], out)
    return float(m["oscillation"])


if __name__ == "__main__":
    main()
