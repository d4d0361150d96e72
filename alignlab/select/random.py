"""``selector=random`` ("DPO Random"): the same number of pairs SAGE keeps, chosen uniformly at random.

The control that tells whether SAGE's *choice* of pairs matters, not just training on fewer of them. Two modes:

* ``step`` (default, *the* Random control): SAGE's protocol with a uniform score. The trainer draws the same
  floor(B / keep_ratio) candidates per micro-batch as ``selector=sage`` (granularity=step) and keeps the same
  number (round(keep_ratio * candidates) per epoch, the :class:`KeepSchedule`), chosen uniformly and drawn afresh
  every step and epoch. Only the score differs from SAGE, so re-selection (more distinct pairs over the epochs) is
  not confounded with the score.
* ``fixed``: one seeded subset of ceil(keep_ratio * n) pairs of the round's pool, trained for every epoch (the
  older control; it sees fewer distinct pairs than a per-step filter).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from alignlab.records import Pair, Selected, write_jsonl
from alignlab.select import SelectorHooks, StepFilter
from alignlab.select.curriculum import Curriculum, KeepSchedule
from alignlab.select.sage import candidate_draw, keep_count
from alignlab.train.callbacks import TrainerCallback, TrainState

MODES = ("step", "fixed")


def _bucket_counts(pairs: list[Pair], kept: list[int]) -> dict[str, dict[str, float]]:
    buckets = Curriculum().buckets(pairs)  # for the kept-per-bucket log only
    avail = {b: buckets.count(b) for b in sorted(set(buckets))}
    took = {b: [buckets[i] for i in kept].count(b) for b in avail}
    return {b: {"available": n, "kept": took[b], "kept_fraction": took[b] / n} for b, n in avail.items()}


class RandomSelector(SelectorHooks):
    """Keep the pairs SAGE's budget allows, uniformly at random: per step (``mode=step``) or once (``mode=fixed``)."""

    def __init__(self, keep_ratio: float = 0.5, mode: str = "step") -> None:
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        self.keep_ratio, self.mode = float(keep_ratio), mode

    def select(self, pairs: list[Pair], seed: int, scorer=None) -> list[Selected]:
        if self.mode == "step":  # the trainer's filter chooses; pass the pool on
            kept = list(range(len(pairs)))
            info: dict[str, Any] = {"granularity": "step", "mode": "step", "n": len(pairs)}
        else:
            rng = np.random.default_rng(seed)
            kept = sorted(rng.choice(len(pairs), size=keep_count(self.keep_ratio, len(pairs)), replace=False).tolist())
            info = {"granularity": "pool", "mode": "fixed", "n": len(pairs), "kept": len(kept),
                    "buckets": _bucket_counts(pairs, kept)}
        return [Selected(pair=dataclasses.replace(pairs[i], meta={**pairs[i].meta, **({"sage_round": info}
                                                                                     if j == 0 else {})}), score=0.0)
                for j, i in enumerate(kept)]

    def callbacks(self) -> list[TrainerCallback]:
        """The per-step random filter with ``mode=step``, else nothing."""
        return [RandomStepFilter(self.keep_ratio)] if self.mode == "step" else []


class RandomStepFilter(StepFilter):
    """Per step: keep a uniformly random subset of each candidate batch, as many as SAGE's filter would keep."""

    def __init__(self, keep_ratio: float) -> None:
        self.keep_ratio = float(keep_ratio)

    def draw_size(self, batch_size: int) -> int:
        return candidate_draw(batch_size, self.keep_ratio)

    def on_train_begin(self, state: TrainState) -> None:
        self.rng = np.random.default_rng(state.seed)
        self.schedule, self.schedule_epoch = KeepSchedule(self.keep_ratio), 0
        self.rows: list[dict[str, Any]] = []
        self.candidates = self.step_cands = self.step_kept = 0

    def on_batch(self, state: TrainState, idx: list[int]) -> list[int]:
        if state.epoch != self.schedule_epoch:
            self.schedule.reset()
            self.schedule_epoch = state.epoch
        k, _ = self.schedule.plan(["all"] * len(idx))
        kept = sorted(self.rng.choice(len(idx), size=k, replace=False).tolist())
        self.schedule.commit(len(idx), ["all"] * k)
        self.candidates += len(idx)
        self.step_cands += len(idx)
        self.step_kept += k
        self.rows += [{"step": state.step, "epoch": state.epoch, "pair": int(idx[j]),
                       "problem_id": state.pairs[idx[j]].problem_id} for j in kept]
        return [idx[j] for j in kept]

    def on_train_end(self, state: TrainState, history: list[dict[str, float]]) -> dict[str, float]:
        if state.rank == 0:
            write_jsonl(state.round_dir / "kept_pairs.jsonl", self.rows)
        state.log.update({"granularity": "step", "mode": "step", "keep_ratio": self.keep_ratio,
                          "candidates": self.candidates, "kept": len(self.rows)})
        return {"candidate_pairs": self.candidates, "kept_pairs": len(self.rows)}
