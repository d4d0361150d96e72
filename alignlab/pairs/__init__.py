"""Pair builders (the ``pair_builder`` config group): verified rollouts -> (chosen, rejected)."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Protocol

from alignlab.records import Pair, Problem, Rollout


class PairBuilder(Protocol):
    def build(self, problems: list[Problem], rollouts: list[Rollout], prompts: dict[str, str], seed: int) -> list[Pair]:
        """``prompts`` maps problem id -> chat-rendered prompt text (the TRL ``prompt`` column)."""
        ...


def group_by_problem(rollouts: list[Rollout]) -> dict[str, list[Rollout]]:
    groups: dict[str, list[Rollout]] = defaultdict(list)
    for r in rollouts:
        groups[r.problem_id].append(r)
    return groups


def make_pair(prompt: str, chosen: Rollout, rejected: Rollout, kind: str, pass_rate: float | None = None) -> Pair:
    """A pair with the provenance selectors and reports need (kind, sources, log-probs, pass rate)."""
    return Pair(problem_id=chosen.problem_id, prompt=prompt, chosen=chosen.text, rejected=rejected.text,
                meta={"kind": kind, "chosen_source": chosen.source, "rejected_source": rejected.source,
                      "chosen_logprob": chosen.logprob_sum, "rejected_logprob": rejected.logprob_sum,
                      "chosen_tokens": chosen.tokens, "rejected_tokens": rejected.tokens,
                      "chosen_true": chosen.meta.get("true_verdict", chosen.verdict), "pass_rate": pass_rate})


class BestWorstPairBuilder:
    """DPO-R1 ``max_min``: one (correct, incorrect) pair per prompt; ties give no pair.

    With binary rewards every correct sample is a "max" and every wrong one a "min"; which one
    is taken is a knob: ``pick="random"`` (seeded) or ``"first"``, or ``"likely"`` (chosen with the
    highest, rejected with the lowest policy log-prob per token).
    """

    def __init__(self, pick: str = "random") -> None:
        if pick not in ("random", "first", "likely"):
            raise ValueError(f"pick must be random, first or likely, got {pick!r}")
        self.pick = pick

    def build(self, problems: list[Problem], rollouts: list[Rollout], prompts: dict[str, str], seed: int) -> list[Pair]:
        groups = group_by_problem(rollouts)
        pairs = []
        for p in problems:
            rs = groups.get(p.id, [])
            good = [r for r in rs if r.verdict]
            bad = [r for r in rs if r.verdict is False]
            if not good or not bad:
                continue
            if self.pick == "first":
                c, r = good[0], bad[0]
            elif self.pick == "likely":
                c = max(good, key=lambda x: x.logprob_sum / max(1, x.tokens))
                r = min(bad, key=lambda x: x.logprob_sum / max(1, x.tokens))
            else:
                rng = random.Random(f"{seed}|{p.id}")
                c, r = rng.choice(good), rng.choice(bad)
            pairs.append(make_pair(prompts[p.id], c, r, "natural", pass_rate=len(good) / len(rs)))
        return pairs


class MaxMinRewardPairBuilder:
    """Scalar rewards (``verifier=reward_fn``): per prompt, chosen = the highest ``meta.reward``, rejected = the
    lowest, as RLHFlow's iterative DPO and DPO-R1's ``max_min`` take them from a reward model's scores.

    A prompt gives no pair when it has fewer than two scored rollouts or its top and bottom rewards differ by
    ``min_margin`` or less (equal rewards: no preference). Ties at the top or bottom go to the earliest rollout
    (``numpy.argmax`` order). A reward of None (the function gave none, or NaN) is left out. ``require_correct``
    also skips prompts whose chosen rollout is not a correct verdict (reward >= ``verifier.threshold``); the
    peers pair on reward alone, so it is off by default.
    """

    def __init__(self, min_margin: float = 0.0, require_correct: bool = False) -> None:
        if not min_margin >= 0.0:
            raise ValueError(f"pair_builder.min_margin must be >= 0, got {min_margin!r}")
        self.min_margin, self.require_correct = float(min_margin), bool(require_correct)

    def build(self, problems: list[Problem], rollouts: list[Rollout], prompts: dict[str, str], seed: int) -> list[Pair]:
        """One (max reward, min reward) pair per prompt that has a reward gap; ``seed`` is unused (no sampling)."""
        if rollouts and not any("reward" in r.meta for r in rollouts):
            raise ValueError("pair_builder=max_min_reward needs scalar rewards (meta.reward in verdicts): "
                             "use verifier=reward_fn")
        groups = group_by_problem(rollouts)
        pairs = []
        for p in problems:
            rs = groups.get(p.id, [])
            scored = [r for r in rs if r.meta.get("reward") is not None]
            if len(scored) < 2:
                continue
            c = max(scored, key=lambda x: x.meta["reward"])  # max/min keep the first of equal rewards
            r = min(scored, key=lambda x: x.meta["reward"])
            if c.meta["reward"] - r.meta["reward"] <= self.min_margin or (self.require_correct and not c.verdict):
                continue
            pass_rate = sum(bool(x.verdict) for x in rs) / len(rs)
            pair = make_pair(prompts[p.id], c, r, "max_min_reward", pass_rate=pass_rate)
            pair.meta.update(chosen_reward=c.meta["reward"], rejected_reward=r.meta["reward"])
            pairs.append(pair)
        return pairs
