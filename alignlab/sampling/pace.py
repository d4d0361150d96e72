"""``sampler=pace``: PACE's proximal exploration + hindsight refinement + quality gating.

PACE is "PACE: Defying the Scaling Hypothesis of Exploration in Iterative Alignment for Mathematical Reasoning"
(arXiv 2602.05370); the three phases are STATED, their details INFERRED.

Per prompt: ``n`` policy samples (STATED: N=2), verified at once; then, only for prompts with a failed sample,
ONE refinement generation by the policy itself, prompted with the problem, the failed attempt and the gold
answer (``ModelSpec.render_refine``; INFERRED: who refines and with what hint). Refinements then pass the
quality gates (alignlab.sampling.gates). Every generation is returned, so the runner's ledger counts it:
samples / prompts = n + P(prompt has a failure), the effective N in (2, 3) for n=2.

What the records carry (the corrective pair builder and the reports read these):
- policy rollouts: ``verdict`` from ``ctx.verifier`` (the runner does not verify them again), ``meta["true_verdict"]``
  when the verifier is a noisy/hackable wrapper;
- refined rollouts: ``source="refined"``, ``sample_index = n``, ``meta["refines"]`` = sample_index of the failed
  rollout, ``meta["verified"]`` = the verifier's verdict, ``meta["gate"]`` = first failing gate or ``"pass"``, and
  ``verdict`` = passed every gate. Rejected refinements stay in rollouts.jsonl so that they are counted.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any

from alignlab.pairs import group_by_problem
from alignlab.records import Problem, Rollout
from alignlab.sampling import SampleContext, SamplerBase
from alignlab.sampling.gates import PASS, Candidate, apply_gates, build_gates

log = logging.getLogger("alignlab")

REFINE_SEED_OFFSET = 7_777_777  # refinement noise is independent of the policy samples' noise


def set_verdicts(rollouts: list[Rollout], golds: list[str], verifier) -> None:
    """Verify in place, as the runner's verify stage would (including the wrapper's hidden truth)."""
    if not rollouts:
        return
    for r, v in zip(rollouts, verifier.check([r.text for r in rollouts], golds)):
        r.verdict, r.extracted = v.correct, v.extracted
        if v.true_correct is not None:
            r.meta["true_verdict"] = v.true_correct


class PaceSampler(SamplerBase):
    """PACE exploration at 2 < N_eff < 3: n policy samples, one gated hindsight refinement per failing prompt.

    Args:
        n: policy samples per prompt (STATED: 2).
        gates: gate objects in order (a list, or a name -> gate mapping where null disables one); null = the
            task-agnostic defaults (verified, no_hint_leak, format).
        refine_if: ``any_failed`` (INFERRED default: every prompt with a failed sample) or ``all_failed`` (only
            prompts that yield no natural pair, the cheaper variant).
        pick: which failed sample to refine when several failed: ``random`` (seeded), ``first``, or
            ``likely`` (the highest policy log-prob per token: the most on-policy error).
        greedy_refine: decode the refinement greedily instead of at the generator's temperature (INFERRED: off).
    """

    def __init__(self, n: int = 2, gates: Any = None, refine_if: str = "any_failed", pick: str = "random",
                 greedy_refine: bool = False) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if refine_if not in ("any_failed", "all_failed"):
            raise ValueError(f"refine_if must be any_failed or all_failed, got {refine_if!r}")
        if pick not in ("random", "first", "likely"):
            raise ValueError(f"pick must be random, first or likely, got {pick!r}")
        self.n, self.refine_if, self.pick, self.greedy_refine = n, refine_if, pick, greedy_refine
        self.gates = build_gates(gates)
        self.last_gate_counts: dict[str, int] = {}

    def sample(self, problems: list[Problem], ctx: SampleContext) -> list[Rollout]:
        policy = ctx.sample(problems, self.n)
        gold = {p.id: p.answer for p in problems}
        set_verdicts(policy, [gold[r.problem_id] for r in policy], ctx.verifier)
        todo = self.to_refine(problems, policy, ctx.seed)
        refined = self.refine(todo, ctx)
        counts = Counter(r.meta["gate"] for r in refined)
        self.last_gate_counts = {PASS: counts.get(PASS, 0), **{g.name: counts.get(g.name, 0) for g in self.gates}}
        log.info("pace: %d prompts, %d policy samples, %d refinements, gates %s (effective N %.2f)", len(problems),
                 len(policy), len(refined), self.last_gate_counts,
                 (len(policy) + len(refined)) / max(1, len(problems)))
        return policy + refined

    def policy_rollouts(self, rollouts: list[Rollout]) -> list[Rollout]:
        """Without the refinements: they are not the policy's own samples."""
        return [r for r in rollouts if r.source != "refined"]

    def to_refine(self, problems: list[Problem], policy: list[Rollout], seed: int) -> list[tuple[Problem, Rollout]]:
        """(problem, failed rollout) for each prompt that gets its one refinement."""
        groups = group_by_problem(policy)
        out = []
        for p in problems:
            rs = groups.get(p.id, [])
            failed = [r for r in rs if r.verdict is False]
            if not failed or (self.refine_if == "all_failed" and len(failed) < len(rs)):
                continue
            if self.pick == "first":
                f = failed[0]
            elif self.pick == "likely":
                f = max(failed, key=lambda r: r.logprob_sum / max(1, r.tokens))
            else:
                f = random.Random(f"{seed}|refine|{p.id}").choice(failed)
            out.append((p, f))
        return out

    def refine(self, todo: list[tuple[Problem, Rollout]], ctx: SampleContext) -> list[Rollout]:
        """One refinement generation per (problem, failed) pair, verified and gated."""
        if not todo:
            return []
        prompts = [ctx.spec.render_refine(ctx.tokenizer, p.prompt, f.text, p.answer, p.messages) for p, f in todo]
        outs = ctx.generator.generate(ctx.model_dir, prompts, 1, seed=ctx.seed + REFINE_SEED_OFFSET,
                                      greedy=self.greedy_refine)
        refined = [Rollout(problem_id=p.id, text=s.text, tokens=s.tokens, logprob_sum=s.logprob_sum,
                           source="refined", sample_index=self.n,
                           meta={"refines": f.sample_index, "entropy": s.entropy, "finished": s.finished})
                   for (p, f), (s,) in zip(todo, outs)]
        set_verdicts(refined, [p.answer for p, _ in todo], ctx.verifier)
        for r in refined:
            r.meta["verified"] = bool(r.verdict)
        outcome = apply_gates(self.gates, [Candidate(p, r, f) for (p, f), r in zip(todo, refined)], ctx)
        for r, o in zip(refined, outcome):
            r.meta["gate"] = o
            r.verdict = o == PASS
        return refined

    def __repr__(self) -> str:
        return f"PaceSampler(n={self.n}, gates={[g.name for g in self.gates]}, refine_if={self.refine_if!r})"
