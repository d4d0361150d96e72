"""Selectors (the ``selector`` config group): which built pairs the round trains on."""

from __future__ import annotations

from typing import Protocol

from alignlab.records import Pair, Selected


class PairScorer(Protocol):
    def __call__(self, pairs: list[Pair]) -> dict[str, list[float]]:
        """Summed log-probs ``policy_chosen``, ``policy_rejected``, ``ref_chosen``, ``ref_rejected`` and token
        counts ``chosen_tokens``, ``rejected_tokens`` of each pair (no-grad forward passes)."""
        ...


class Selector(Protocol):
    def select(self, pairs: list[Pair], seed: int, scorer: PairScorer | None = None) -> list[Selected]:
        """``scorer`` gives per-pair policy/reference log-probs for score-based selectors."""
        ...


class FullSelector:
    """``selector=full`` ("DPO Full"): every pair."""

    def select(self, pairs: list[Pair], seed: int, scorer=None) -> list[Selected]:
        return [Selected(pair=p, score=0.0) for p in pairs]
