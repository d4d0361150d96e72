"""The compute ledger: every stage of a round adds its cost (README.md, "Compute ledger").

``ledger.json`` in a round's directory holds one entry per stage; a round's ``ledger`` entry in ``summary.json``
carries their totals (``flops`` and ``wall_s`` as floats, the rest as counts). The report sums
:data:`REPORTED_KEYS` over rounds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignlab.records import atomic_write_text

REPORTED_KEYS = ("prompts", "samples", "generated_tokens", "trained_tokens", "flops", "wall_s")
# forward_tokens: every token through a model (prompts included); trained_pairs: pair instances trained on
LEDGER_KEYS = (*REPORTED_KEYS, "forward_tokens", "trained_pairs")
# the order a round runs its stages in (proximity: the sampler's gate; reference: the frozen model's log-probs)
STAGE_ORDER = ("prompts", "proximity", "sample", "verify", "pairs", "select", "reference", "train", "eval")


class Ledger:
    """Per-round compute ledger, one entry per stage, persisted next to the round's artifacts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stages: dict[str, dict[str, float]] = json.loads(path.read_text()) if path.exists() else {}

    def record(self, stage: str, **cost: float) -> None:
        self.stages[stage] = cost
        # entries in the round's stage order, not the order they were recorded: a resumed round that reruns
        # one stage writes the same ledger as the uninterrupted run
        order = {s: i for i, s in enumerate(STAGE_ORDER)}
        self.stages = dict(sorted(self.stages.items(), key=lambda kv: order.get(kv[0], len(order))))
        atomic_write_text(self.path, json.dumps(self.stages, indent=1))

    def totals(self) -> dict[str, float]:
        tot = {k: 0.0 for k in LEDGER_KEYS}
        for cost in self.stages.values():
            for k in LEDGER_KEYS:
                tot[k] += cost.get(k, 0.0)
        out: dict[str, Any] = {k: (int(v) if k not in ("flops", "wall_s") else float(v)) for k, v in tot.items()}
        out["ranks"] = {s: int(c["ranks"]) for s, c in self.stages.items() if "ranks" in c}
        out["stage_wall_s"] = {s: round(c.get("wall_s", 0.0), 3) for s, c in self.stages.items()}
        return out
