"""Selectors (the ``selector`` config group): which built pairs the round trains on."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from alignlab.records import Pair, Selected
from alignlab.train.callbacks import TrainerCallback, TrainState


class PairScorer(Protocol):
    def __call__(self, pairs: list[Pair]) -> dict[str, list[float]]:
        """Summed log-probs ``policy_chosen``, ``policy_rejected``, ``ref_chosen``, ``ref_rejected`` and token
        counts ``chosen_tokens``, ``rejected_tokens`` of each pair (no-grad forward passes)."""
        ...


class Selector(Protocol):
    def select(self, pairs: list[Pair], seed: int, scorer: PairScorer | None = None) -> list[Selected]:
        """``scorer`` gives per-pair policy/reference log-probs for score-based selectors."""
        ...

    def observe_round(self, round_index: int, pass_rates: list[float],
                      pool_rates: list[float | None] | None = None) -> None: ...  # SelectorHooks gives both

    def callbacks(self) -> list: ...


class SelectorHooks:
    """What the runner asks of every selector besides ``select``; most have nothing to add."""

    def observe_round(self, round_index: int, pass_rates: list[float],
                      pool_rates: list[float | None] | None = None) -> None:
        """The round index, the all-prompt mean pass rates and the pool's (prompts with a pair: 0 < rate < 1) of rounds
        1..k (a curriculum advances on them)."""

    def callbacks(self) -> list:
        """Trainer callbacks this selector runs in-step (SAGE's per-step filter); none by default."""
        return []


class StepFilter(TrainerCallback):
    """An in-step filter (SAGE's, the Random control's): each step's record carries how many candidate pairs it
    drew and how many it kept, counted in ``step_cands`` / ``step_kept`` as it filters."""

    step_cands = 0
    step_kept = 0

    def on_step_end(self, state: TrainState) -> dict[str, float]:
        out = {"candidates": float(self.step_cands), "kept": float(self.step_kept)}
        self.step_cands = self.step_kept = 0
        return out


class FullSelector(SelectorHooks):
    """``selector=full`` ("DPO Full"): every pair."""

    def select(self, pairs: list[Pair], seed: int, scorer=None) -> list[Selected]:
        return [Selected(pair=p, score=0.0) for p in pairs]


class LogpsScorer:
    """The :class:`PairScorer` the select stage hands to score-based selectors: per-pair policy (this round's
    start) and reference log-probs, computed by the trainer (on its ranks under DeepSpeed). ``forward_tokens``
    counts every token it ran through a model, for the ledger."""

    def __init__(self, reference: Any, chain: list[str], rd: Path, trainer: Any) -> None:
        self.reference, self.chain, self.rd, self.trainer = reference, chain, rd, trainer
        self.forward_tokens = 0

    def _logps(self, model_dir: str, pairs: list[Pair]) -> dict[str, Any]:
        res = self.trainer.logps(model_dir, pairs, workdir=self.rd)
        self.forward_tokens += int(res.get("forward_tokens", 0))
        return res

    def __call__(self, pairs: list[Pair]) -> dict[str, list[float]]:
        pol = self._logps(self.chain[-1], pairs)
        ref = self.reference.logps(self.chain, lambda d: pol if d == self.chain[-1] else self._logps(d, pairs), self.rd)
        return {"policy_chosen": pol["chosen"], "policy_rejected": pol["rejected"], "ref_chosen": ref["chosen"],
                "ref_rejected": ref["rejected"], "chosen_tokens": pol["chosen_tokens"],
                "rejected_tokens": pol["rejected_tokens"]}
