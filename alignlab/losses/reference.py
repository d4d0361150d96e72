"""Reference policies (the ``reference`` config group).

A reference turns "which checkpoints exist" into the reference log-probs of a round's pairs.
``logps_of(dir)`` computes summed (chosen, rejected) log-probs under a checkpoint; the runner
caches it on disk, keyed by a hash of (checkpoint, pairs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Logps = dict[str, list[float]]


class Reference(Protocol):
    def logps(self, base_dir: str, start_dir: str, logps_of: Callable[[str], Logps]) -> Logps:
        """``base_dir``: the initial policy pi_0; ``start_dir``: this round's starting policy pi_t."""
        ...


class FixedReference:
    """pi_ref = pi_0 in every round (the theoretical choice; Online-RLHF maintainers)."""

    def logps(self, base_dir: str, start_dir: str, logps_of: Callable[[str], Logps]) -> Logps:
        return logps_of(base_dir)


class PreviousRoundReference:
    """pi_ref = pi_t, the round's starting policy (RLHFlow DPO-R1, PACE's proximal reference)."""

    def logps(self, base_dir: str, start_dir: str, logps_of: Callable[[str], Logps]) -> Logps:
        return logps_of(start_dir)
