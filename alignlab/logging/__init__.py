"""Loggers (the ``logger`` config group): console always, W&B offline by default."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("alignlab")


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


class WandbLogger(ConsoleLogger):
    """Real W&B; never goes online unless ``mode=online`` is asked for explicitly."""

    def __init__(self, project: str = "alignlab", mode: str = "offline", group: str | None = None,
                 tags: list[str] | None = None, entity: str | None = None) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"mode must be offline, online or disabled, got {mode!r}")
        self.project, self.mode, self.group, self.tags, self.entity = project, mode, group, list(tags or []), entity
        self._run = None
        self._step = 0

    def start(self, run_dir: Path, config: dict, name: str) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        if self.mode != "online":
            os.environ["WANDB_MODE"] = self.mode  # an inherited WANDB_MODE=online must not win
        self._run = wandb.init(project=self.project, mode=self.mode, group=self.group, tags=self.tags,
                               entity=self.entity, dir=str(run_dir), config=config, name=name, reinit="finish_previous",
                               settings=wandb.Settings(console="off", x_disable_stats=True))

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._run is not None:
            self._run.log(metrics)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            for k, v in values.items():
                self._run.summary[k] = v

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
