"""Coarse-grained SAGE curriculum: difficulty buckets from pass rates, stage proportions, competence.

Pools are refreshed on-policy every round (each round samples fresh), so the curriculum only has to
decide *how the kept pairs are spread over difficulty*. Defaults (SAGE, "Not All Preferences Are Created Equal:
Stability-Aware and Gradient-Efficient Alignment for Reasoning Models", arXiv 2602.01207; inferred, the paper's values
are not public): easy p >= 0.75, medium 0.25 <= p < 0.75, hard p < 0.25; stages 0.5/0.4/0.1 -> 0.2/0.5/0.3 ->
0.1/0.4/0.5.

When the stage advances is ``advance_by`` (a knob; SAGE's own rule is not public):

* ``rounds`` (default): stage k in round 1 + (k - 1) * rounds_per_stage, so a 3-round study runs stages 1, 2, 3.
  The competence rules below never left stage 1 in our studies (pool competence 0.27-0.37 against 0.5), so the
  curriculum ablation tested nothing; this rule makes every stage act within the study.
* ``pass_rate_gain``: competence = the round's all-prompt mean pass rate (every prompt, paired or not, from the
  runner's rollout diagnostics) minus round 1's, i.e. the gain over the base policy; stage k once it reaches
  ``advance_at[k-1]``.
* ``pool``: competence = the mean pass rate of the round's pool (each paired prompt counted once; prompts solved
  always or never give no pair), "policy accuracy on the current pool" (an INFERRED reading of SAGE); stage k once
  >= ``advance_at[k-1]``.
* ``competence``: the same pool competence, against thresholds an on-policy pool can reach (``competence_at``), and
  one-way: the stage is set by the highest pool competence of rounds 1..k, so a stage once entered is kept ("when
  it passes a threshold, shift the pool toward harder buckets", our INFERRED reading of SAGE's competence-based
  pool refresh). RECONSTRUCTED, SAGE's measure and thresholds are not public: the inferred threshold 0.7 presumes an
  offline pool whose accuracy rises while the policy trains on it; here the pool is rebuilt from fresh on-policy
  samples every round, so its competence is taken *before* training on it and, with N = 8 samples, only prompts
  with pass rate 1/8..7/8 are in it. On the embedded task it was 0.27-0.37 in every run and round, so ``pool`` with
  0.5 / 0.7 never left stage 1. Default ``competence_at`` = 0.30 / 0.35 sits inside that range; a real model's pool
  should be measured and the thresholds set from it.

Each is a pure function of the round index and saved artifacts (the runner passes the round and the all-prompt and
pool pass rates of rounds 1..k, from each round's metrics.json, through ``SageSelector.observe_round``), so a resumed
run re-derives the stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from alignlab.records import Pair

BUCKETS = ("easy", "medium", "hard")
STAGES = ((0.5, 0.4, 0.1), (0.2, 0.5, 0.3), (0.1, 0.4, 0.5))  # easy/medium/hard; INFERRED (SAGE's are not public)
ADVANCE_BY = ("rounds", "pass_rate_gain", "pool", "competence")
COMPETENCE_AT = (0.30, 0.35)  # advance_by=competence: reconstructed (see the module docstring)
UNKNOWN = "unknown"  # pairs without a pass rate (builders that do not record it): proportion 0


def _check_props(props: Sequence[float], where: str) -> list[float]:
    vals = [float(x) for x in props]
    if len(vals) != len(BUCKETS) or any(not math.isfinite(v) or v < 0 for v in vals) or abs(sum(vals) - 1) > 1e-6:
        raise ValueError(f"{where} must be 3 non-negative proportions (easy, medium, hard) summing to 1, got {props}")
    return vals


class Curriculum:
    """Difficulty buckets + competence-driven stage proportions for the kept pairs."""

    def __init__(self, stages: Sequence[Sequence[float]] = STAGES, advance_at: Sequence[float] = (0.5, 0.7),
                 easy_at: float = 0.75, hard_below: float = 0.25, advance_by: str = "rounds",
                 rounds_per_stage: int = 1, competence_at: Sequence[float] = COMPETENCE_AT) -> None:
        self.stages = [_check_props(s, f"stages[{i}]") for i, s in enumerate(stages)]
        if not self.stages:
            raise ValueError("stages must list at least one (easy, medium, hard) proportion triple")
        self.advance_at = self._thresholds(advance_at, "advance_at")
        self.competence_at = self._thresholds(competence_at, "competence_at")
        if not 0 < hard_below < easy_at <= 1:
            raise ValueError(f"need 0 < hard_below < easy_at <= 1, got hard_below={hard_below}, easy_at={easy_at}")
        self.easy_at, self.hard_below = float(easy_at), float(hard_below)
        if advance_by not in ADVANCE_BY:
            raise ValueError(f"advance_by must be one of {list(ADVANCE_BY)}, got {advance_by!r}")
        if int(rounds_per_stage) < 1:
            raise ValueError(f"rounds_per_stage must be >= 1, got {rounds_per_stage}")
        self.advance_by, self.rounds_per_stage = advance_by, int(rounds_per_stage)

    def _thresholds(self, values: Sequence[float], name: str) -> list[float]:
        out = [float(t) for t in values]
        if len(out) != len(self.stages) - 1:
            raise ValueError(f"{name} needs len(stages) - 1 = {len(self.stages) - 1} thresholds, got {list(values)}")
        if any(not 0 <= t <= 1 for t in out) or out != sorted(out):
            raise ValueError(f"{name} must be ascending competences in [0, 1], got {list(values)}")
        return out

    def bucket(self, pass_rate: float | None) -> str:
        if pass_rate is None:
            return UNKNOWN
        return "easy" if pass_rate >= self.easy_at else "hard" if pass_rate < self.hard_below else "medium"

    def buckets(self, pairs: Sequence[Pair]) -> list[str]:
        return [self.bucket(p.meta.get("pass_rate")) for p in pairs]

    @staticmethod
    def competence(pairs: Sequence[Pair]) -> float | None:
        """Mean pass rate over the pool's prompts (one value per prompt); None when no pair records one."""
        rates = {p.problem_id: p.meta["pass_rate"] for p in pairs if p.meta.get("pass_rate") is not None}
        return float(np.mean(list(rates.values()))) if rates else None

    def decide(self, pairs: Sequence[Pair], round_info: dict | None = None) -> tuple[float | None, int]:
        """(competence, 0-based stage) for this round by ``advance_by``; ``round_info`` = {"round": k,
        "pass_rates": [all-prompt mean pass rate of rounds 1..k], "pool_rates": [pool competence of rounds 1..k]}
        from the runner (stage 1 without it; ``competence`` then uses this pool alone)."""
        if self.advance_by == "pool":
            comp = self.competence(pairs)
            return comp, self.stage(comp)
        if self.advance_by == "competence":
            comp = self.competence(pairs)
            rates = list((round_info or {}).get("pool_rates") or [])  # rounds 1..k; k's is this pool's own
            seen = [float(c) for c in [*rates[:-1], comp if comp is not None else (rates or [None])[-1]]
                    if c is not None]
            return comp, self.stage(max(seen, default=None), self.competence_at)
        if not round_info:
            return None, 0
        if self.advance_by == "rounds":
            stage = min((int(round_info["round"]) - 1) // self.rounds_per_stage, len(self.stages) - 1)
            return self.competence(pairs), stage
        rates = [float(r) for r in round_info.get("pass_rates") or []]
        comp = rates[-1] - rates[0] if rates else None
        return comp, self.stage(comp)

    def stage(self, competence: float | None, thresholds: Sequence[float] | None = None) -> int:
        """0-based stage: the number of thresholds (``advance_at`` unless given) the competence has reached."""
        at = self.advance_at if thresholds is None else thresholds
        return 0 if competence is None else sum(competence >= t for t in at)

    def proportions(self, stage: int) -> dict[str, float]:
        return dict(zip(BUCKETS, self.stages[stage]))


def quotas(k: int, available: dict[str, int], props: dict[str, float]) -> dict[str, int]:
    """Split ``k`` kept pairs over buckets by ``props`` (largest remainder), never more than ``available``.

    A bucket that runs short gives its unmet quota to the others in proportion to their stage shares,
    repeatedly, so exactly min(k, total available) pairs are kept. Buckets with share 0 (and pairs with no
    pass rate) are used only once every bucket with a share is exhausted.
    """
    q = {b: 0 for b in available}
    left = min(k, sum(available.values()))
    active = [b for b in available if props.get(b, 0) > 0 and available[b] > 0]
    while left > 0 and active:
        total = sum(props[b] for b in active)
        raw = {b: left * props[b] / total for b in active}
        alloc = {b: math.floor(raw[b] + 1e-9) for b in active}
        for b in sorted(active, key=lambda b: alloc[b] - raw[b])[: left - sum(alloc.values())]:
            alloc[b] += 1
        for b in active:
            take = min(alloc[b], available[b] - q[b])
            q[b] += take
            left -= take
        active = [b for b in active if q[b] < available[b]]
    for b in sorted(available, key=lambda b: -(available[b] - q[b])):  # zero-share buckets, largest first
        take = min(left, available[b] - q[b])
        q[b] += take
        left -= take
    return q


def top_k(scores: np.ndarray, k: int, rng: np.random.Generator, buckets: Sequence[str] | None = None,
          props: dict[str, float] | None = None, want: dict[str, int] | None = None) -> list[int]:
    """Indices of the ``k`` highest scores (ties broken by ``rng``), spread over buckets by ``props`` if given, or
    by exact per-bucket counts ``want`` (a :class:`KeepSchedule`'s quotas, carried over the epoch)."""
    scores = np.asarray(scores, dtype=float)
    order = np.lexsort((rng.random(len(scores)), -scores))  # best first; random among equal scores
    if buckets is None or (props is None and want is None):
        return sorted(order[:k].tolist())
    if want is None:
        avail: dict[str, int] = {}
        for b in buckets:
            avail[b] = avail.get(b, 0) + 1
        want = quotas(k, avail, props or {})
    want = dict(want)
    kept = []
    for i in order:
        b = buckets[i]
        if want.get(b, 0) > 0:
            kept.append(int(i))
            want[b] -= 1
    return sorted(kept)


def exact_count(keep_ratio: float, candidates: int) -> int:
    """round(keep_ratio * candidates), halves up, robust to float error: the kept total a schedule aims at."""
    return math.floor(keep_ratio * candidates + 0.5 + 1e-9)


class KeepSchedule:
    """How many of each candidate batch to keep, and from which bucket, so that over an epoch the kept total is
    round(keep_ratio * candidates) and each bucket's kept count is within one pair of its stage share.

    Rounding per batch loses the remainder every time: with 6 candidates at keep_ratio 0.6 a batch keeps 4
    (ceil 3.6), a realised ratio of 0.67; with 4 kept per batch, shares 0.5/0.4/0.1 round to 2/2/0 and the 10 %
    bucket is never served. Here the remainders are carried: batch t keeps round(gamma * C_t) - K_{t-1} pairs
    (C, K: candidates seen and pairs kept so far this epoch), and each kept slot goes to the bucket furthest below
    its share of the kept total so far (a deterministic quota schedule, largest deficit first). A bucket missing
    from a batch keeps its deficit for the next batch that has it. ``reset`` at each epoch start.
    """

    def __init__(self, keep_ratio: float, props: dict[str, float] | None = None) -> None:
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.keep_ratio, self.props = float(keep_ratio), dict(props) if props else None
        self.reset()

    def reset(self) -> None:
        self.candidates, self.kept = 0, 0
        self.took: dict[str, int] = {}

    def plan(self, buckets: Sequence[str]) -> tuple[int, dict[str, int] | None]:
        """(pairs to keep of this batch, per-bucket counts or None without shares); changes nothing (``commit``)."""
        n = len(buckets)
        k = min(n, max(0, exact_count(self.keep_ratio, self.candidates + n) - self.kept))
        props = self.props
        if props is None:
            return k, None
        avail: dict[str, int] = {}
        for b in buckets:
            avail[b] = avail.get(b, 0) + 1
        want = {b: 0 for b in avail}
        order = {b: i for i, b in enumerate(BUCKETS)}
        for j in range(k):
            total = self.kept + j + 1
            open_ = [b for b in avail if props.get(b, 0) > 0 and want[b] < avail[b]]
            if open_:
                b = max(open_, key=lambda b: (props[b] * total - self.took.get(b, 0) - want[b],
                                              props[b], -order.get(b, len(order))))
            else:  # every bucket with a share is used up: zero-share buckets (and unknown), fullest first
                b = max((b for b in avail if want[b] < avail[b]), key=lambda b: (avail[b] - want[b], b))
            want[b] += 1
        return k, want

    def commit(self, n_candidates: int, kept_buckets: Sequence[str]) -> None:
        """Record a batch: its candidate count and the buckets of the pairs kept from it."""
        self.candidates += n_candidates
        self.kept += len(kept_buckets)
        for b in kept_buckets:
            self.took[b] = self.took.get(b, 0) + 1
