"""``selector=random`` ("DPO Random"): a seeded uniform subset of the same size SAGE keeps.

The baseline that tells whether SAGE's *choice* of pairs matters, not just training on fewer of them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from alignlab.records import Pair, Selected
from alignlab.select import SelectorHooks
from alignlab.select.curriculum import Curriculum
from alignlab.select.sage import keep_count


class RandomSelector(SelectorHooks):
    """Keep exactly ceil(keep_ratio * n) pairs chosen uniformly at random (seeded by the round's seed)."""

    def __init__(self, keep_ratio: float = 0.5) -> None:
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.keep_ratio = float(keep_ratio)

    def select(self, pairs: list[Pair], seed: int, scorer=None) -> list[Selected]:
        rng = np.random.default_rng(seed)
        kept = sorted(rng.choice(len(pairs), size=keep_count(self.keep_ratio, len(pairs)), replace=False).tolist())
        buckets = Curriculum().buckets(pairs)  # for the kept-per-bucket log only
        avail = {b: buckets.count(b) for b in sorted(set(buckets))}
        took = {b: [buckets[i] for i in kept].count(b) for b in avail}
        info = {"granularity": "pool", "n": len(pairs), "kept": len(kept),
                "buckets": {b: {"available": n, "kept": took[b], "kept_fraction": took[b] / n}
                            for b, n in avail.items()}}
        return [Selected(pair=dataclasses.replace(pairs[i], meta={**pairs[i].meta, **({"sage_round": info}
                                                                                     if j == 0 else {})}), score=0.0)
                for j, i in enumerate(kept)]
