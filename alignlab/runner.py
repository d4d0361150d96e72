"""The iterative-round runner: build the components, then run each round's stages in order.

A round is :data:`alignlab.stages.ROUND_STAGES`: prompts -> sample -> verify -> pairs -> select -> train -> eval ->
metrics, each taking the artifacts the earlier stages left and writing its own atomically (see
:mod:`alignlab.stages`), so a restarted run (``resume=true`` or the same output dir) skips every complete stage.
The runner knows the components only through their config groups' protocols.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from alignlab import config as C
from alignlab import preempt
from alignlab.eval import eval_log_keys, write_sample_logs
from alignlab.generation import MeteredGenerator
from alignlab.models import ModelSpec, checkpoint_params, load_tokenizer
from alignlab.models.checks import check_model_dir
from alignlab.records import RESUMED_IN, atomic_write_text
from alignlab.report.render import format_table
from alignlab.runlock import RunLock
from alignlab.stages import ROUND_STAGES, Round, Run, json_stage

log = logging.getLogger("alignlab")


def build_components(cfg: DictConfig, choices: dict[str, str]) -> dict[str, Any]:
    """Validate and build every group's component; cheap, so a bad config fails before any work."""
    C.validate_top(cfg)
    for g in C.GROUPS:
        C.validate_node(g, cfg[g], choices)
    comps = {g: C.build(g, cfg[g], choices) for g in C.GROUPS}
    spec: ModelSpec = comps["model"]
    try:
        spec.check_exists()  # config.json and safetensors weights (a cache:// model says how to fetch it)
    except FileNotFoundError as e:
        msg = str(e) if str(e).startswith("model.path") else f"model.path: {e}"
        raise C.ConfigError(f"{msg}{C._where('model', choices)}") from None
    check_inputs(comps)  # weights vs config.json, the held-out set the evaluator needs
    return comps


def check_inputs(comps: dict[str, Any]) -> None:
    """Checks that need more than one component: the model directory, and the held-out set the evaluator
    reads from the data group (``data=gsm8k`` with your own ``data.path`` must name one)."""
    check_model_dir(comps["model"].directory)
    if comps["eval"].uses_data_heldout:
        comps["data"].check_heldout()


def resolve_out_dir(cfg: DictConfig, hydra_out: str | None, explicit: bool = False) -> Path:
    """The run's directory; ``resume=true`` without an explicit dir continues the latest unfinished run (and
    leaves ``resumed_in.txt`` in the new Hydra job dir, so ``alignlab report`` does not count it as a run)."""
    out = Path(cfg.out_dir or hydra_out or f"outputs/{cfg.experiment_name}/run")
    explicit = explicit or bool(cfg.out_dir)
    if cfg.resume and not explicit and not any(out.glob("round_*")) and not (out / "base_eval.json").exists():
        runs = sorted((p.parent for p in out.parent.parent.glob("*/*/.hydra")), key=lambda p: p.stat().st_mtime)
        unfinished = [p for p in runs if p != out and not (p / "summary.json").exists()
                      and ((p / "base_eval.json").exists() or any(p.glob("round_*")))]
        if unfinished:
            log.info("resume=true: continuing %s", unfinished[-1])
            if out.is_dir():  # Hydra made this dir for the new job: say where the run went (report skips it)
                atomic_write_text(out / RESUMED_IN, f"{unfinished[-1].resolve()}\n")
            return unfinished[-1]
    return out


def run(cfg: DictConfig, out_dir: Path, choices: dict[str, str] | None = None) -> dict[str, Any]:
    """Run (or resume) an experiment in ``out_dir``; returns the summary dict (also summary.json).

    The run holds ``out_dir``'s lock (:class:`alignlab.runlock.RunLock`; a second writer raises ``RunLocked``) and
    handles SIGTERM/SIGUSR1 by stopping at a safe point (raises :class:`alignlab.preempt.Preempted`)."""
    comps = build_components(cfg, choices or {})
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    with RunLock(out_dir, force=cfg.resume == "force"), preempt.handled():
        return _run_locked(cfg, out_dir, comps)


def _run_locked(cfg: DictConfig, out_dir: Path, comps: dict[str, Any]) -> dict[str, Any]:
    logger = comps["logger"]
    logger.start(out_dir, OmegaConf.to_container(cfg, resolve=True), name=f"{cfg.experiment_name}-s{cfg.seed}")
    try:
        with comps["verifier"]:  # its worker processes stop with the run, however it ends
            return rounds(make_run(cfg, out_dir, comps))
    finally:
        logger.finish()


def make_run(cfg: DictConfig, out_dir: Path, comps: dict[str, Any]) -> Run:
    """The components by group name, plus what every round shares."""
    base_dir = str(comps["model"].directory)
    tok = load_tokenizer(base_dir)
    # generation runs where the trainer keeps the weights (its ranks under DeepSpeed), metered for the ledger
    gen = MeteredGenerator(comps["trainer"].generator(comps["generation"], out_dir / ".generate"), tok)
    return Run(cfg=cfg, out_dir=out_dir, **{**comps, "generation": gen}, tok=tok, heldout=comps["data"].heldout(),
               n_params=checkpoint_params(base_dir))  # from the safetensors headers: the runner loads no weights


def rounds(run: Run) -> dict[str, Any]:
    """The base evaluation, then each round's stages in order; summary.json at the end."""
    cfg, base_dir = run.cfg, run.base_dir
    summary: dict[str, Any] = {"experiment": cfg.experiment_name, "seed": int(cfg.seed), "params": run.n_params,
                               "model": base_dir, "rounds": []}
    if cfg.base_eval:
        base = json_stage(run.out_dir / "base_eval.json",
                          lambda: write_sample_logs(run.eval.evaluate(base_dir, run.generation, run.model, run.tok,
                                                                           run.heldout), run.out_dir))
        summary["base"] = base
        log.info("base accuracy %.3f ± %.3f (n=%d)", base["accuracy"], base["se"], base["n"])
        run.logger.log({"eval/accuracy": base["accuracy"], **eval_log_keys(base), "round": 0})
    start_dir = base_dir
    for k in range(1, cfg.rounds + 1):
        rnd = Round(run, k, start_dir)
        for stage in ROUND_STAGES:
            preempt.check()  # a signal that arrived while a stage waited for its ranks stops here
            stage(rnd)
        summary["rounds"].append(rnd.entry)
        start_dir = str(rnd.ckpt)
    summary["final_accuracy"] = summary["rounds"][-1]["eval"]["accuracy"] if summary["rounds"] else None
    atomic_write_text(run.out_dir / "summary.json", json.dumps(summary, indent=1))
    run.logger.summary({"final_accuracy": summary["final_accuracy"]})
    print(format_table(summary))
    return summary
