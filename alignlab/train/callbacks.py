"""Trainer callbacks: in-step behaviour that plugs into every trainer (modelled on TRL's ``TrainerCallback``).

Both trainers (``trainer=torch`` in one process, ``trainer=deepspeed_*`` on R ranks) run the same loop over the
same batch plan and call the same events, so a callback written once works on both:

    draw_size(batch_size) -> int    candidates to draw per global micro-batch (a filter draws more than it keeps)
    on_train_begin(state)           once, with the round's starting weights
    on_step_begin(state)            before each optimiser step
    on_batch(state, idx) -> idx     each global micro-batch of candidate pair indices; returns the pairs to train
    on_backward_end(state, idx)     after the micro-batch's backward (``state.grad_vector()`` is the accumulated
                                    gradient of the step so far, the same on every rank)
    on_step_end(state) -> metrics   before the optimiser step (and its clipping); metrics join the history
    on_train_end(state, history) -> summary scalars for the round's ``train`` record

``state.token_logps(idx)`` gives per-token response log-probs of pairs under the *current* policy, computed where
the weights live (sharded over the ranks and gathered), so a filter sees the same values on every rank and keeps
the same pairs. Only rank 0 should write files (``state.rank == 0``). Callbacks reach the ranks as JSON specs (alignlab.spec), so they
hold settings, not models.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignlab.records import Pair, atomic_write_text


@dataclass
class TrainState:
    """What a callback sees; the trainer fills it and keeps ``step`` / ``epoch`` current."""

    pairs: list[Pair]
    enc: list
    ref_logps: dict[str, list[float]]
    round_dir: Path
    seed: int
    batch_size: int  # pairs trained per global micro-batch (all ranks together)
    epochs: int
    token_logps: Callable[[Sequence[int]], list[tuple[torch.Tensor, torch.Tensor]]]
    grad_vector: Callable[[], torch.Tensor]
    rank: int = 0
    world: int = 1
    draw_size: int = 0  # candidates drawn per global micro-batch (CallbackList.draw_size)
    step: int = 0
    epoch: int = 0
    log: dict[str, Any] = field(default_factory=dict)  # written to <round>/train_steps.json next to the steps


class TrainerCallback:
    """No-op base: override the events you need. Attributes named in ``transient`` are not saved with a
    DeepSpeed checkpoint (``on_train_begin`` rebuilds them when a killed round resumes)."""

    transient: tuple[str, ...] = ()

    def draw_size(self, batch_size: int) -> int:
        return batch_size

    def on_train_begin(self, state: TrainState) -> None:
        pass

    def on_step_begin(self, state: TrainState) -> None:
        pass

    def on_batch(self, state: TrainState, idx: list[int]) -> list[int]:
        return idx

    def on_backward_end(self, state: TrainState, idx: list[int]) -> None:
        pass

    def on_step_end(self, state: TrainState) -> dict[str, float]:
        return {}

    def on_train_end(self, state: TrainState, history: list[dict[str, float]]) -> dict[str, float]:
        return {}


class CallbackList:
    """Dispatches each event to every callback in order (a filter sees the previous filter's output)."""

    def __init__(self, callbacks: Sequence[TrainerCallback] | None) -> None:
        self.callbacks = list(callbacks or [])

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def draw_size(self, batch_size: int) -> int:
        return max([batch_size, *(c.draw_size(batch_size) for c in self.callbacks)])

    def train_begin(self, state: TrainState) -> None:
        for c in self.callbacks:
            c.on_train_begin(state)

    def step_begin(self, state: TrainState) -> None:
        for c in self.callbacks:
            c.on_step_begin(state)

    def batch(self, state: TrainState, idx: list[int]) -> list[int]:
        for c in self.callbacks:
            idx = list(c.on_batch(state, idx))
        return idx

    def backward_end(self, state: TrainState, idx: list[int]) -> None:
        for c in self.callbacks:
            c.on_backward_end(state, idx)

    def step_end(self, state: TrainState) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.callbacks:
            out.update(c.on_step_end(state) or {})
        return out

    def train_end(self, state: TrainState, history: list[dict[str, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.callbacks:
            out.update(c.on_train_end(state, history) or {})
        return out


def write_step_log(state: TrainState, history: list[dict[str, float]]) -> None:
    """``<round>/train_steps.json``: every step's metrics plus what callbacks put in ``state.log`` (rank 0)."""
    if state.rank == 0:
        atomic_write_text(state.round_dir / "train_steps.json", json.dumps({"steps": history, **state.log}, indent=1))


class GradStats(TrainerCallback):
    """Gradient norm per micro-batch and its variance across the micro-batches of a step (the SNR check).

    Micro-batch gradients are recovered as differences of the accumulated gradient (one flat copy of the
    parameters' size, so it is off by default: ``trainer.grad_stats=true``). With grad_accum=1 there is one
    micro-batch and no variance to report.
    """

    def on_train_begin(self, state: TrainState) -> None:
        self.prev: torch.Tensor | None = None
        self.sizes: list[int] = []
        self.micro: list[torch.Tensor] = []

    def on_backward_end(self, state: TrainState, idx: list[int]) -> None:
        cur = state.grad_vector()
        self.micro.append(cur - self.prev if self.prev is not None else cur)
        self.sizes.append(len(idx))
        self.prev = cur

    def on_step_end(self, state: TrainState) -> dict[str, float]:
        n = sum(self.sizes)
        g = [m * (n / k) for m, k in zip(self.micro, self.sizes) if k]  # per-pair-mean gradient of each micro-batch
        out = {"grad_norm_micro": float(np.mean([sq_norm(x) ** 0.5 for x in g]))} if g else {}
        if len(g) > 1:
            mean = sum(g[1:], g[0]) / len(g)
            var = sum(sq_norm(x - mean) for x in g) / (len(g) - 1)  # trace of the micro-batch gradient covariance
            out.update(grad_var_micro=var, grad_snr=sq_norm(mean) / max(var / len(g), 1e-30))
        self.prev, self.sizes, self.micro = None, [], []
        return out


def sq_norm(x: torch.Tensor) -> float:
    """Squared norm in float64 (a float32 sum over millions of entries drifts by ~1e-4)."""
    return float(x.double().pow(2).sum())
