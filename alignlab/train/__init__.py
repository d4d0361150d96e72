"""Trainers (the ``trainer`` config group): one round of preference optimisation on selected pairs.

A trainer loads the round's starting policy from a HF directory, trains on the selected pairs
with precomputed reference log-probs, and saves the result as a HF directory (safetensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from alignlab.records import Pair


@dataclass
class TrainResult:
    steps: int
    trained_tokens: int
    history: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)


class Trainer(Protocol):
    def train(self, policy_dir: str | Path, pairs: list[Pair], ref_logps: dict[str, list[float]], loss,
              out_dir: str | Path, seed: int, logger=None, callbacks: list | None = None) -> TrainResult:
        """``ref_logps`` holds summed reference log-probs ``chosen`` / ``rejected`` aligned with ``pairs``;
        ``callbacks`` (:class:`alignlab.train.callbacks.TrainerCallback`) run inside the step loop."""
        ...

    def logps(self, model_dir: str | Path, pairs: list[Pair], workdir: str | Path | None = None) -> dict:
        """Summed chosen/rejected log-probs under ``model_dir``, computed where this trainer keeps weights."""
        ...

    def world_size(self) -> int: ...

    def generator(self, gen, workdir: str | Path):
        """``gen`` as it runs for this trainer (on its ranks, or as it is)."""
        ...


class NonFiniteLossError(RuntimeError):
    """Raised when a step produces a NaN/inf loss or an exploding gradient; the round stops."""
