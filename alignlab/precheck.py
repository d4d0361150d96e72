"""The checks run before Hydra starts a job: compose the config as Hydra will, build every component (cheap:
constructors validate, nothing loads), and check every path a user names, so a rejected start writes nothing.
Hydra would otherwise rewrite ``.hydra/*.yaml`` and append to the log of an existing run directory first.

It sits beside the CLI, at the top: it builds components as the runner does (``runner.build_components``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from alignlab import config as C
from alignlab.checks import check_run_dir
from alignlab.config import CONF_DIR, ConfigError
from alignlab.models.checks import check_model_dir
from alignlab.runlock import probe
from alignlab.runner import build_components, resolve_out_dir

log = logging.getLogger("alignlab")


def check_all(config_name: str, overrides: list[str], groups: Sequence[str] = ()) -> None:
    """Compose the config as Hydra will and run every check, before Hydra writes anything.

    Raises ConfigError for bad input; returns quietly when the arguments are for Hydra itself (flags,
    ``--multirun``) or do not compose (Hydra then reports that in its own words). ``groups``: the groups an
    ``alignlab eval`` job builds; empty for a run (all of them, as ``runner.build_components``).
    """
    if any(a.startswith("-") for a in overrides):
        return
    GlobalHydra.instance().clear()
    try:
        with (initialize_config_module(CONF_DIR[len("pkg://"):], version_base=None) if CONF_DIR.startswith("pkg://")
              else initialize_config_dir(config_dir=CONF_DIR, version_base=None)):
            full = compose(config_name, overrides=overrides, return_hydra_config=True)
    except Exception:  # noqa: BLE001 - composition errors are Hydra's to report
        return
    finally:
        GlobalHydra.instance().clear()
    if str(full.hydra.mode).endswith("MULTIRUN"):
        return  # each job of a sweep is checked when it starts
    HydraConfig.instance().set_config(full)  # ${hydra:runtime.cwd} in data/eval paths
    try:
        _check_composed(full, overrides, groups)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - not bad input: the job meets it again and reports it with context
        log.debug("precheck: %s: %s", type(e).__name__, e)


def _check_composed(full: DictConfig, overrides: list[str], groups: Sequence[str]) -> None:
    choices = C.choices_of(full.hydra)
    cfg = OmegaConf.masked_copy(full, [str(k) for k in full if k != "hydra"])
    if groups:
        for g in groups:
            C.validate_node(g, cfg[g], choices)
        comps = {g: C.build(g, cfg[g], choices) for g in groups}
        try:
            comps["model"].check_exists()  # a hub id: its cached copy, a download, or the offline error saying how
        except FileNotFoundError as e:
            raise ConfigError(str(e) if str(e).startswith("model.path") else f"model.path: {e}") from None
        check_model_dir(comps["model"].directory)
        return
    if cfg.get("stage") is not None:
        return
    build_components(cfg, choices)
    explicit = any(o.split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for o in overrides) or bool(cfg.out_dir)
    run_dir = Path(str(full.hydra.run.dir))
    if not explicit and run_dir.exists():
        return  # Hydra's timestamped dir exists already (same second): the job checks where it resumes itself
    out = resolve_out_dir(cfg, str(run_dir), explicit=explicit)
    check_run_dir(cfg, out, explicit)
    probe(out, force=cfg.resume == "force")  # another live writer: refused before Hydra writes its log there
