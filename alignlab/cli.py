"""The ``alignlab`` console script.

``alignlab [overrides]`` runs an experiment (Hydra app over conf/config.yaml);
``alignlab eval model=<hf dir> eval=math_suite [eval.limit=k]`` evaluates one checkpoint;
``alignlab report <dir>...`` turns runs and sweeps into tables and plots;
``alignlab dynamics ...`` runs the tabular IPO/DPO dynamics simulator.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import NoReturn

from alignlab.config import CONF_DIR
from alignlab.hub import is_hub_id

os.environ.setdefault("WANDB_MODE", "offline")  # never online unless logger.mode=online is asked for
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

log = logging.getLogger("alignlab")
EXIT_DISK_FULL = 74  # EX_IOERR (sysexits.h): a write failed for lack of space; free space, then rerun


def quiet_third_party() -> None:
    from alignlab.logging import quiet_third_party as quiet

    quiet()


def _hydra_app(config_name: str, fn):
    import hydra

    import alignlab.config  # noqa: F401 - registers the structured schemas in Hydra's ConfigStore

    return hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)(fn)


def _run(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from alignlab import config as C
    from alignlab import runner
    from alignlab.checks import check_run_dir
    from alignlab.preempt import EXIT_PREEMPTED, Preempted, ignore
    from alignlab.records import is_disk_full

    hc = HydraConfig.get()
    choices = C.choices_of(hc)
    quiet_third_party()
    explicit = any(o.split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for o in hc.overrides.hydra)
    try:
        if cfg.get("stage") == "sft_base":
            from alignlab.sft_base import train_sft_base

            train_sft_base(**cfg.sft_base)
            return
        C.validate_top(cfg)
        out = runner.resolve_out_dir(cfg, hc.runtime.output_dir, explicit=explicit)
        check_run_dir(cfg, out, explicit or bool(cfg.out_dir))
        runner.run(cfg, out, choices)
        ignore()  # done: a signal during the exit (a requeue would find nothing to do) must not turn 0 into -15
    except C.ConfigError as e:  # RunLocked too: another live process writes this run dir
        config_error_exit(e)
    except Preempted as e:
        log.error("preempted: %s; every finished stage is kept; rerun the same command (resume=true) to continue "
                  "(exit code %d)", e, EXIT_PREEMPTED)
        logging.shutdown()
        sys.exit(EXIT_PREEMPTED)
    except Exception as e:
        if not is_disk_full(e):
            raise
        log.error("disk full: %s", " ".join(str(e).splitlines()))
        sys.exit(EXIT_DISK_FULL)


def _eval(cfg) -> None:
    import json

    from hydra.core.hydra_config import HydraConfig

    from alignlab import config as C
    from alignlab.eval import write_sample_logs
    from alignlab.models import load_tokenizer
    from alignlab.models.checks import check_model_dir
    from alignlab.records import atomic_write_text

    choices = C.choices_of(HydraConfig.get())
    quiet_third_party()
    try:
        for g in ("model", "generation", "eval"):
            C.validate_node(g, cfg[g], choices)
        spec, gen, evaluator = (C.build(g, cfg[g], choices) for g in ("model", "generation", "eval"))
        spec.check_exists()
        check_model_dir(spec.directory)
    except (C.ConfigError, FileNotFoundError) as e:
        config_error_exit(e)
    out = Path(cfg.out_dir or HydraConfig.get().runtime.output_dir)
    tok = load_tokenizer(spec.directory)
    res = write_sample_logs(evaluator.evaluate(str(spec.directory), gen, spec, tok, None), out)
    table = res.get("benchmarks") or {"heldout": {k: v for k, v in res.items() if k in (
        "accuracy", "n", "se", "finished_rate", "max_new_tokens", "prompts_sha1", "samples", "temperature", "top_p")
        or k.split("@")[0] in ("avg", "pass", "maj")}}
    atomic_write_text(out / "eval.json", json.dumps(table, indent=1))
    fmt = getattr(evaluator, "format_table", None)
    print(fmt(res) if fmt else json.dumps(table, indent=1))


def model_dir_override(arg: str) -> str:
    """``model=<hf dir>`` -> ``model=<its config choice> model.path=<dir>``; ``model=<org/name>`` (no such local
    path) -> ``model=hf_dir model.path=<org/name>``, a hub id as in the model config, not a directory under cwd.

    A checkpoint written by alignlab carries ``alignlab_model.json`` naming the model config it
    was trained with (its prompt conventions); any other directory uses ``model=hf_dir``.
    """
    import json

    if not arg.startswith("model=") or "/" not in arg and not Path(arg[6:]).is_dir():
        return arg
    if is_hub_id(arg[6:]):  # org/name and no such local path: a hub id, fetched (or refused offline) by the model
        return f"model=hf_dir\nmodel.path={arg[6:]}"
    path = Path(arg[6:])
    choice = "hf_dir"
    meta = path / "alignlab_model.json"
    if meta.exists():
        try:
            choice = json.loads(meta.read_text()).get("config", "hf_dir")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            config_error_exit(f"model: {meta}: unreadable ({type(e).__name__}: {e}); delete it to evaluate the "
                              f"directory with model=hf_dir")
    return f"model={choice}\nmodel.path={path.resolve()}"


def config_error_exit(err: Exception | str) -> NoReturn:
    """Bad input ends the program with one line and exit code 2 (a traceback only with HYDRA_FULL_ERROR=1)."""
    from alignlab.runlock import RunLocked

    if os.environ.get("HYDRA_FULL_ERROR") == "1" and isinstance(err, Exception):
        raise err
    kind = "run locked" if isinstance(err, RunLocked) else "config error"
    log.error("%s: %s", kind, " ".join(str(err).splitlines()))
    sys.exit(2)


def precheck(config_name: str, args: list[str], groups: tuple[str, ...] = ()) -> None:
    """Run every input check before Hydra starts the job (which would first write into the run dir). The
    checks' own log lines are held back and shown only when a check fails (the job logs them again)."""
    from alignlab.config import ConfigError
    from alignlab.precheck import check_all

    root, held = logging.getLogger(), logging.handlers.BufferingHandler(capacity=10_000)
    saved, root.handlers = root.handlers[:], [held]
    try:
        check_all(config_name, args, groups)
    except ConfigError as e:
        root.handlers = saved
        for record in held.buffer:
            root.handle(record)
        config_error_exit(e)
    finally:
        root.handlers = saved


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    logging.raiseExceptions = False  # a log file on a full disk must not bury the one error line in tracebacks
    for noisy in ("httpx", "urllib3", "datasets", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A run owns its W&B service: attached to a parent's (inherited WANDB_SERVICE), a killed run's stream stays
    # open there and its resumption is refused with "run ID ... is in use".
    os.environ.pop("WANDB_SERVICE", None)
    sub = sys.argv[1] if len(sys.argv) > 1 else ""
    if sub == "report":
        from alignlab.report import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    if sub == "dynamics":
        from alignlab.dynamics.cli import main as dyn_main

        sys.argv = [sys.argv[0] + " dynamics"] + sys.argv[2:]
        dyn_main()
        return
    if sub == "eval":
        args = [x for a in sys.argv[2:] for x in model_dir_override(a).split("\n")]
        sys.argv = [sys.argv[0] + " eval"] + args
        precheck("eval", args, ("model", "generation", "eval"))
        _hydra_app("eval", _eval)()
        return
    from alignlab import preempt

    preempt.install()  # a SIGTERM during start-up also ends with "resume me" (the run re-installs it)
    try:
        precheck("config", sys.argv[1:])
        _hydra_app("config", _run)()
    except preempt.Preempted as e:
        log.error("preempted: %s during start-up; nothing was lost; rerun the same command (exit code %d)", e,
                  preempt.EXIT_PREEMPTED)
        sys.exit(preempt.EXIT_PREEMPTED)


if __name__ == "__main__":
    main()
