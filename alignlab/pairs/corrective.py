"""``pair_builder=corrective``: PACE's contrastive pair construction.

PACE is "PACE: Defying the Scaling Hypothesis of Exploration in Iterative Alignment for Mathematical Reasoning"
(arXiv 2602.05370); its step "Contrastive Pair Construction" is STATED, how it pairs is INFERRED.

Two kinds of pairs per prompt, both on the *plain* problem prompt (the refine prompt and its hint never reach
training):
- corrective: (refinement that passed every gate, the failed policy sample it refines): a minimal-edit contrast,
  and the only source of pairs for prompts whose samples all failed;
- natural: (correct, wrong) among the policy samples, as Best-of-N would mine them.
Refinements rejected by a gate (``verdict`` False, ``meta["gate"]`` != "pass") are never used.
"""

from __future__ import annotations

import random

from alignlab.pairs import group_by_problem, make_pair
from alignlab.records import Pair, Problem, Rollout


class CorrectivePairBuilder:
    """Corrective and natural pairs in a configurable mix, at most ``max_pairs_per_prompt`` per prompt.

    Args:
        corrective: build (refined, failed) pairs.
        natural: build (correct, wrong) pairs among the policy samples.
        corrective_weight: in [0, 1]; when a prompt has more candidates than its cap, each slot is filled from
            the corrective candidates with this probability (seeded), else from the natural ones (an empty kind
            yields to the other). 1 = corrective first, 0 = natural first. With n=2 and the default cap of 2
            both kinds always fit, so the weight only matters for smaller caps or larger n.
        max_pairs_per_prompt: cap per prompt (INFERRED default 2: one corrective + one natural at n=2).
        against: ``source`` pairs a refinement against the failed sample it refines (INFERRED default);
            ``all_failed`` against every failed policy sample of the prompt.
    """

    def __init__(self, corrective: bool = True, natural: bool = True, corrective_weight: float = 1.0,
                 max_pairs_per_prompt: int = 2, against: str = "source") -> None:
        if not (corrective or natural):
            raise ValueError("corrective and natural are both false: the builder would make no pairs")
        if not 0.0 <= corrective_weight <= 1.0:
            raise ValueError(f"corrective_weight must be in [0, 1], got {corrective_weight}")
        if max_pairs_per_prompt < 1:
            raise ValueError(f"max_pairs_per_prompt must be >= 1, got {max_pairs_per_prompt}")
        if against not in ("source", "all_failed"):
            raise ValueError(f"against must be source or all_failed, got {against!r}")
        self.corrective, self.natural, self.corrective_weight = corrective, natural, corrective_weight
        self.max_pairs_per_prompt, self.against = max_pairs_per_prompt, against

    def build(self, problems: list[Problem], rollouts: list[Rollout], prompts: dict[str, str], seed: int) -> list[Pair]:
        groups = group_by_problem(rollouts)
        pairs: list[Pair] = []
        for p in problems:
            rs = groups.get(p.id, [])
            policy = [r for r in rs if r.source == "policy"]
            rate = sum(bool(r.verdict) for r in policy) / len(policy) if policy else None
            rng = random.Random(f"{seed}|corrective|{p.id}")
            corr = self._corrective(rs, policy) if self.corrective else []
            nat = self._natural(policy, rng) if self.natural else []
            for kind, (c, r) in self._mix(corr, nat, rng):
                pair = make_pair(prompts[p.id], c, r, kind, pass_rate=rate)
                if kind == "corrective":
                    pair.meta["refines"] = c.meta.get("refines")
                    pair.meta["rejected_index"] = r.sample_index
                pairs.append(pair)
        return pairs

    def _corrective(self, rs: list[Rollout], policy: list[Rollout]) -> list[tuple[Rollout, Rollout]]:
        failed = [r for r in policy if r.verdict is False]
        out = []
        for fix in (r for r in rs if r.source == "refined" and r.verdict):
            if self.against == "source":
                out += [(fix, f) for f in failed if f.sample_index == fix.meta.get("refines")]
            else:
                out += [(fix, f) for f in failed]
        return out

    @staticmethod
    def _natural(policy: list[Rollout], rng: random.Random) -> list[tuple[Rollout, Rollout]]:
        good = [r for r in policy if r.verdict]
        bad = [r for r in policy if r.verdict is False]
        out = [(g, b) for g in good for b in bad]
        rng.shuffle(out)
        return out

    def _mix(self, corr: list, nat: list, rng: random.Random) -> list[tuple[str, tuple[Rollout, Rollout]]]:
        corr, nat = list(corr), list(nat)
        out: list[tuple[str, tuple[Rollout, Rollout]]] = []
        while (corr or nat) and len(out) < self.max_pairs_per_prompt:
            take_corr = bool(corr) and (not nat or rng.random() < self.corrective_weight)
            out.append(("corrective", corr.pop(0)) if take_corr else ("natural", nat.pop(0)))
        return out

    def __repr__(self) -> str:
        return (f"CorrectivePairBuilder(corrective={self.corrective}, natural={self.natural}, "
                f"corrective_weight={self.corrective_weight}, max_pairs_per_prompt={self.max_pairs_per_prompt})")
