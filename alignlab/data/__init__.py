"""Datasets (the ``data`` config group): training prompts per round and the held-out evaluation set."""

from __future__ import annotations

from typing import Protocol

from alignlab.records import Problem


class Dataset(Protocol):
    def train(self, round_index: int) -> list[Problem]:
        """Round ``round_index``'s training prompts (1-based; a fresh shard per round where the source allows)."""
        ...

    def heldout(self) -> list[Problem]:
        """The held-out problems the ``eval`` group scores (never trained on)."""
        ...

    def check_heldout(self) -> None:
        """Raise a ConfigError naming the key and file when the held-out set the evaluator reads is unusable;
        called before any work when the evaluator reads this group's held-out set."""
        ...
