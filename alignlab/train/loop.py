"""The one DPO-family training loop, for ``trainer=torch`` and for every DeepSpeed rank.

After OpenRLHF's strategy object: :func:`train_loop` owns the batch plan, the callbacks, the loss, the
non-finite checks and the history; a :class:`TrainEngine` owns where the weights live and how a gradient
becomes an update (:class:`alignlab.train.torch_trainer.TorchEngine` in one process,
:class:`alignlab.train.ds_worker.DeepSpeedEngine` on ZeRO ranks). Only the engines know DeepSpeed, so the two
trainers cannot drift apart: same plan, same events, same records, same error.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from alignlab.logging import progress
from alignlab.losses import PairLogps
from alignlab.records import Pair
from alignlab.train import NonFiniteLossError, TrainResult
from alignlab.train.callbacks import CallbackList, GradStats, TrainerCallback, TrainState, write_step_log
from alignlab.train.core import LoraSettings, batch_plan, epoch_of, summarize


@dataclass
class TrainJob:
    """The trainer settings both trainers share, from config to the loop (on DeepSpeed ranks: through
    ``job.json`` as ``dataclasses.asdict``, rebuilt with :meth:`of`; never a pickle)."""

    lr: float = 1e-4
    epochs: int = 2
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_length: int = 1024
    max_grad_norm_abort: float = 1e6
    log_every: int = 10
    max_steps: int | None = None  # the plan's first max_steps steps (a step budget, e.g. another arm's FLOPs)
    grad_stats: bool = False  # adds the GradStats callback
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        for k in ("lr", "epochs", "grad_accum", "max_length"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)}")
        if self.max_steps is not None:
            if int(self.max_steps) < 1:
                raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
            self.max_steps = int(self.max_steps)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        self.lora = LoraSettings.of(self.lora)

    @classmethod
    def of(cls, d: dict[str, Any]) -> TrainJob:
        """The job from its JSON form (a ``job.json`` may hold other keys beside it)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


class JobSettings:
    """For the trainers holding a ``job``: settings read as attributes (``trainer.lr``) are the :class:`TrainJob`'s
    (how :mod:`alignlab.spec` and the callers read a trainer's knobs)."""

    def __getattr__(self, name: str) -> Any:
        job = self.__dict__.get("job")
        if job is None or name not in job.__dataclass_fields__:
            raise AttributeError(name)
        return getattr(job, name)


class TrainEngine(Protocol):
    """Where the weights live: the loop's only view of a process (torch) or of ZeRO ranks (DeepSpeed)."""

    rank: int
    world: int
    device: torch.device
    batch_size: int  # pairs per global micro-batch (all ranks together)
    metric_dtype: torch.dtype  # what per-pair metrics are summed in
    show_progress: bool

    def setup(self, total_steps: int, warmup: int) -> None:
        """Build the optimiser and its schedule over ``total_steps``."""
        ...

    def shard(self, batch: list[int]) -> list[int]:
        """This rank's share of a global micro-batch."""
        ...

    def forward(self, items: list) -> tuple[torch.Tensor, ...]:
        """Summed chosen/rejected response log-probs and token counts, with grad."""
        ...

    def backward(self, loss_sum: torch.Tensor, n_pairs: int, idx: list[int]) -> None:
        """Accumulate the gradient of ``loss_sum / n_pairs`` (the step's per-pair mean, over all ranks)."""
        ...

    def idle(self) -> None:
        """This rank has no pairs in the micro-batch (others may: ZeRO needs the same collectives)."""
        ...

    def all_reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The step's metric sums over the ranks."""
        ...

    def step(self, n_pairs: int) -> float:
        """Clip, update, advance the schedule, zero the gradient; the gradient norm before clipping."""
        ...

    def lr(self) -> float: ...

    def token_logps(self, idx) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-token log-probs of pairs under the current weights, the same on every rank (callbacks)."""
        ...

    def grad_vector(self) -> torch.Tensor:
        """The step's accumulated gradient so far, flat (GradStats)."""
        ...

    def resume(self, cbs: CallbackList, state: TrainState) -> tuple[int, list[dict[str, float]], dict[str, int]]:
        """(first step, history, totals) of a killed run to continue; ``(0, [], {})`` for a fresh one."""
        ...

    def end_step(self, step: int, total_steps: int, history: list[dict[str, float]], totals: dict[str, int],
                 cbs: CallbackList, state: TrainState) -> bool:
        """After a step is recorded: persist what a resume needs; True to stop now (preemption)."""
        ...

    def save(self, out: Path) -> None:
        """Write the Hugging Face checkpoint (LoRA merged)."""
        ...

    def summary(self) -> dict[str, Any]:
        """Engine facts for the round's ``train`` record (trainable parameters, peak memory after the save)."""
        ...


def nonfinite_check(step: int, vals: dict[str, float], abort: float) -> None:
    """Stop the round on a NaN/inf loss or an exploding gradient, before anything is saved."""
    if not math.isfinite(vals.get("loss", 0.0)) or not math.isfinite(vals["grad_norm"]) or vals["grad_norm"] > abort:
        raise NonFiniteLossError(
            f"step {step}: loss={vals.get('loss')}, grad_norm={vals['grad_norm']} (non-finite or above "
            f"trainer.max_grad_norm_abort={abort}). The round was stopped before saving; "
            f"the previous checkpoint is intact. Lower trainer.lr or loss.beta, then rerun with resume=true.")


def train_loop(engine: TrainEngine, job: TrainJob, pairs: list[Pair], enc: list, ref_logps: dict[str, Any], loss,
               out_dir: str | Path, seed: int, callbacks: list[TrainerCallback] | None = None,
               logger=None) -> TrainResult | None:
    """Train one round on ``engine``; the result, or None when a stop was requested (a checkpoint to resume)."""
    ga = job.grad_accum
    cbs = CallbackList([*(callbacks or []), *([GradStats()] if job.grad_stats else [])])
    state = TrainState(pairs=pairs, enc=enc, ref_logps=ref_logps, round_dir=Path(out_dir).parent, seed=seed,
                       batch_size=engine.batch_size, epochs=job.epochs, token_logps=engine.token_logps,
                       grad_vector=engine.grad_vector, rank=engine.rank, world=engine.world)
    state.draw_size = cbs.draw_size(state.batch_size)
    plan = batch_plan(enc, state.draw_size, job.epochs, seed)  # the same global micro-batches on every engine
    if job.max_steps is not None:  # the plan's first max_steps steps; the schedule spans them
        plan = plan[: job.max_steps * ga]
    total_steps = max(1, math.ceil(len(plan) / ga))
    engine.setup(total_steps, int(job.warmup_ratio * total_steps))
    cbs.train_begin(state)  # before a resume: callbacks see the round's starting weights
    start, history, totals = engine.resume(cbs, state)
    ref_c = torch.tensor(ref_logps["chosen"], dtype=torch.float32, device=engine.device)
    ref_r = torch.tensor(ref_logps["rejected"], dtype=torch.float32, device=engine.device)
    trained_pairs, trained_tokens, t0 = int(totals.get("pairs", 0)), int(totals.get("tokens", 0)), time.time()
    steps = range(start, total_steps)
    for step in progress(steps, desc="train", unit="step") if engine.show_progress else steps:
        state.step = step
        cbs.step_begin(state)
        group = []
        for m in range(step * ga, min(len(plan), (step + 1) * ga)):
            state.epoch = epoch_of(m, len(enc), state.draw_size)
            group.append(cbs.batch(state, plan[m]))
        n_pairs = sum(len(b) for b in group)
        sums: dict[str, torch.Tensor] = {}
        # a step where a filter kept nothing (every rank sees the same n_pairs) has no gradient: no update, not
        # even momentum or weight decay; the schedule still advances, and the step's record has no loss
        for m in range(ga if n_pairs else 0):
            batch = group[m] if m < len(group) else []
            idx = engine.shard(batch)
            if idx:
                pc, pr, nc, nr = engine.forward([enc[i] for i in idx])
                ix = torch.tensor(idx, device=engine.device)
                losses, metrics = loss(PairLogps(pc, pr, ref_c[ix], ref_r[ix], nc, nr))
                engine.backward(losses.sum(), n_pairs, idx)
                for k, v in {"loss": losses.detach(), **metrics}.items():
                    sums[k] = sums.get(k, 0) + v.detach().to(engine.metric_dtype).sum()
            else:
                engine.idle()
            if batch:
                cbs.backward_end(state, batch)
                trained_tokens += sum(len(enc[i][0].ids) + len(enc[i][1].ids) for i in batch)
        vals = {k: float(v) / n_pairs for k, v in engine.all_reduce(sums).items()} if n_pairs else {}
        extra = cbs.step_end(state)  # before the optimiser step
        vals["grad_norm"] = engine.step(n_pairs)
        vals.update(extra)
        nonfinite_check(step, vals, job.max_grad_norm_abort)
        vals.update(step=step, lr=engine.lr())
        history.append(vals)
        trained_pairs += n_pairs
        if logger is not None and (step % job.log_every == 0 or step == total_steps - 1):
            logger.log({f"train/{k}": v for k, v in vals.items()})
        if engine.end_step(step, total_steps, history, {"pairs": trained_pairs, "tokens": trained_tokens}, cbs, state):
            return None
    extra = cbs.train_end(state, history)  # run totals, e.g. SAGE's scoring forward tokens
    write_step_log(state, history)
    engine.save(Path(out_dir))
    summary = summarize(history)
    summary.update(extra, trained_pairs=trained_pairs, pairs_per_epoch=trained_pairs / job.epochs,
                   train_seconds=time.time() - t0, **engine.summary())
    return TrainResult(steps=total_steps, trained_tokens=trained_tokens, history=history, summary=summary)
