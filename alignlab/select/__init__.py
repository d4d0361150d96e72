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


class FullSelector(SelectorHooks):
    """``selector=full`` ("DPO Full"): every pair."""

    def select(self, pairs: list[Pair], seed: int, scorer=None) -> list[Selected]:
        return [Selected(pair=p, score=0.0) for p in pairs]
