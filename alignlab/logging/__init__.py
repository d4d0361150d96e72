"""Loggers (the ``logger`` config group): console always, W&B offline by default; progress bars and quiet
third-party libraries for the console."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from wandb import Run

log = logging.getLogger("alignlab")


class Logger(Protocol):
    """The ``logger`` config group: a run's metrics, keyed by name (``eval/accuracy``, ``train/loss``, ...)."""

    def start(self, run_dir: Path, config: dict, name: str) -> None: ...

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class ConsoleLogger:
    """``logger=none``: metrics go to the Python log only."""

    def start(self, run_dir: Path, config: dict, name: str) -> None:
        self.run_dir = run_dir

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        log.debug("metrics %s", metrics)

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


ROUND_METRICS = ("eval/*", "diag/*", "ledger/*", "train_round/*", "pairs", "selected")


def run_id(run_dir: str | Path) -> str:
    """The W&B run id of a run directory: a resumed run (same directory) continues the same W&B run."""
    return "alignlab-" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


WANDB_DEFAULTS = {"project": "alignlab", "mode": "offline", "entity": None}
WANDB_MODES: dict[str, Literal["offline", "online", "disabled"]] = {"offline": "offline", "online": "online", "disabled": "disabled", "dryrun": "offline", "run": "online"}


def wandb_setting(key: str, explicit: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """``logger.<key>``: the config's value when given, else ``$WANDB_<KEY>`` (as wandb's own tools read it), else
    alignlab's default (project ``alignlab``, mode ``offline``, no entity)."""
    env = os.environ if env is None else env
    if explicit is not None:
        return explicit
    return env.get(f"WANDB_{key.upper()}") or WANDB_DEFAULTS[key]


class WandbLogger(ConsoleLogger):
    """Real W&B; never goes online unless asked for (``logger.mode=online`` or ``WANDB_MODE=online``).

    ``project``, ``mode`` and ``entity``: explicit config > ``WANDB_PROJECT`` / ``WANDB_MODE`` / ``WANDB_ENTITY`` >
    defaults (:func:`wandb_setting`), read when the logger is built."""

    def __init__(self, project: str | None = None, mode: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, entity: str | None = None) -> None:
        resolved = wandb_setting("mode", mode)
        if resolved not in WANDB_MODES:
            where = "" if mode is not None else " (from WANDB_MODE)"
            raise ValueError(f"mode must be offline, online or disabled, got {resolved!r}{where}")
        self.project, self.mode = wandb_setting("project", project), WANDB_MODES[resolved]
        self.group, self.tags, self.entity = group, list(tags or []), wandb_setting("entity", entity)
        self._run: Run | None = None
        self._step = 0

    def start(self, run_dir: Path, config: dict, name: str) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ["WANDB_MODE"] = self.mode  # the resolved mode: an inherited WANDB_MODE never overrides the config
        self._run = wandb.init(project=self.project, mode=self.mode, group=self.group, tags=self.tags,
                               entity=self.entity, dir=str(run_dir), config=config, name=name, reinit="finish_previous",
                               id=run_id(run_dir), resume="allow",
                               settings=wandb.Settings(console="off", x_disable_stats=True))
        # per-round metrics plot against the round; training metrics (TRL's names) against a global step
        self._run.define_metric("round")
        for key in ROUND_METRICS:
            self._run.define_metric(key, step_metric="round")
        self._run.define_metric("train/global_step")
        self._run.define_metric("train/*", step_metric="train/global_step")

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._run is None:
            return
        if any(k.startswith("train/") for k in metrics):
            self._step += 1
            metrics = {**metrics, "train/global_step": self._step}
        self._run.log(metrics)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            for k, v in values.items():
                self._run.summary[k] = v

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


LOG_INTERVAL_S = 10.0  # a progress line at least this often in a log file while a stage runs


def is_main_process() -> bool:
    """Rank 0 (or no launcher): the one process that draws progress bars on the console."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("", "0")


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             interval_s: float | None = None):
    """A tqdm bar for loops that last more than a few seconds; rank 0 only. On a terminal it redraws every 0.5 s,
    into a log file every 10 s (``LOG_INTERVAL_S``), also while nothing finishes, so a log has no silent gap much
    longer than that and no flood either. ``ALIGNLAB_PROGRESS=0`` turns bars off."""
    from tqdm.auto import tqdm

    class Bar(tqdm):
        last_print_t: float  # tqdm's; declared here because tqdm ships no types

        def update(self, n: float | None = 1) -> bool | None:
            """Also redraws when nothing finished for ``mininterval`` (a long batch still shows it is alive)."""
            shown = super().update(n)
            if not shown and not self.disable and self._time() - self.last_print_t >= self.mininterval:
                self.refresh()
                self.last_print_t = self._time()
                return True
            return shown

    tty = sys.stderr.isatty()
    return Bar(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
               disable=not is_main_process() or os.environ.get("ALIGNLAB_PROGRESS", "1") == "0",
               mininterval=interval_s or (0.5 if tty else LOG_INTERVAL_S))


_BAR = re.compile(r".*\[[^\]]*(?:/s|s/)\w*\]")  # a tqdm line: "... 3/8 [00:10<00:20, 2.1s/batch]"


class RankBars:
    """Mirrors the progress bars that rank 0 draws into a launcher log (DeepSpeed / torchrun ranks write there,
    not to this console) onto this process's console, at the same pace as :func:`progress`."""

    def __init__(self, log_path: str | Path) -> None:
        self.path = Path(log_path)
        self.pos = self.path.stat().st_size if self.path.exists() else 0  # earlier launches appended above
        self.tty = sys.stderr.isatty()
        self.interval = 0.5 if self.tty else LOG_INTERVAL_S
        self.last_t, self.drawn = 0.0, False
        self.enabled = is_main_process() and os.environ.get("ALIGNLAB_PROGRESS", "1") != "0"

    def poll(self) -> None:
        """Show the newest bar line written since the last poll (at most once per interval)."""
        if not self.enabled or time.monotonic() - self.last_t < self.interval:
            return
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size <= self.pos:
            return
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read(size - self.pos).decode("utf-8", errors="replace")
        self.pos = size
        bars = [x.strip() for x in re.split(r"[\r\n]", data)
                if _BAR.fullmatch(x.strip()) and not x.strip().startswith(QUIET_BARS)]
        if bars:
            sys.stderr.write(f"\r{bars[-1][:160]}\x1b[K" if self.tty else f"[rank 0] {bars[-1][:160]}\n")
            sys.stderr.flush()
            self.last_t, self.drawn = time.monotonic(), True

    def close(self) -> None:
        if self.drawn and self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


QUIET_BARS = ("Loading weights", "Writing model shards")  # transformers' per-load bars: noise, twice a stage
QUIET_MESSAGES = ("Setting accelerator to CPU",)  # DeepSpeed's warning on every CPU-only import


def quiet_third_party() -> None:
    """Silence third-party console noise that says nothing about the run (bars of every weight load, DeepSpeed's
    accelerator warning); their real warnings and errors still show."""
    logging.getLogger("DeepSpeed").addFilter(lambda r: not any(m in r.getMessage() for m in QUIET_MESSAGES))
    from transformers.utils import logging as hf_logging

    if hasattr(hf_logging, "set_tqdm_hook"):
        def hook(factory, args, kwargs):
            if kwargs.get("desc") in QUIET_BARS:
                kwargs = {**kwargs, "disable": True}
            return factory(*args, **kwargs)

        hf_logging.set_tqdm_hook(hook)
