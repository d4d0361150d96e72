"""Metrics over k sampled answers per problem: avg@k, pass@k (unbiased) and maj@k.

Small math benchmarks (AIME: 30 problems, AMC: 40) have a standard error of 5-9 points at greedy pass@1, so
current math-reasoning papers report accuracy over k samples per problem as well:

- **avg@k**: the mean accuracy of the k samples (the expected pass@1 under sampling), averaged over problems.
- **pass@k**: the chance that at least one of k samples is correct, by the unbiased estimator of
  "Evaluating Large Language Models Trained on Code" (Chen et al. 2021, arXiv 2107.03374): from n >= k samples of
  which c are correct, ``1 - C(n-c, k) / C(n, k)``, averaged over problems.
- **maj@k**: the answer most of the k samples end with (self-consistency, "Self-Consistency Improves Chain of
  Thought Reasoning in Language Models", Wang et al. 2022, arXiv 2203.11171) is graded. Answers are grouped by
  their normalized extracted string; samples without an answer do not vote; among equally common answers the one
  that appears first wins; a problem where no sample has an answer counts as wrong.

Standard errors are over problems: the population standard deviation of the per-problem values over sqrt(#problems)
(for 0/1 values that is the binomial ``sqrt(p(1-p)/n)`` the greedy accuracy reports).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from alignlab.pairs import group_by_problem
from alignlab.records import Problem, Rollout
from alignlab.verify.extract import answer_key, normalize_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct (Chen et al. 2021, arXiv 2107.03374, eq. 1), in the
    paper's numerically stable product form ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def answer_vote_key(extracted: str | None) -> str | None:
    """The string majority voting groups answers by (None: the sample gave no answer, it does not vote)."""
    if extracted is None or not str(extracted).strip():
        return None
    return answer_key(normalize_answer(str(extracted)))


def majority_index(keys: Sequence[str | None]) -> int | None:
    """Index of the first sample carrying the most common non-None key; None when no sample has one."""
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[k] == top)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean over problems and its standard error (population std / sqrt(n))."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    m = sum(values) / n
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / n / n)


def sampled_metrics(correct: Sequence[Sequence[bool]], extracted: Sequence[Sequence[str | None]],
                    pass_ks: Sequence[int]) -> dict[str, float]:
    """avg@k, pass@j for each j in ``pass_ks`` and maj@k (each with ``_se``) from ``correct[problem][sample]`` and
    the answers the samples ended with; k is the number of samples per problem (the same for every problem)."""
    if not correct:
        return {}
    k = len(correct[0])
    if k < 1 or any(len(c) != k for c in correct) or [len(e) for e in extracted] != [len(c) for c in correct]:
        raise ValueError("every problem needs the same number k >= 1 of samples, verdicts and extracted answers")
    out: dict[str, float] = {}
    out[f"avg@{k}"], out[f"avg@{k}_se"] = mean_se([sum(c) / k for c in correct])
    for j in pass_ks:
        out[f"pass@{j}"], out[f"pass@{j}_se"] = mean_se([pass_at_k(k, sum(c), j) for c in correct])
    maj = []
    for c, e in zip(correct, extracted):
        i = majority_index([answer_vote_key(x) for x in e])
        maj.append(float(i is not None and bool(c[i])))
    out[f"maj@{k}"], out[f"maj@{k}_se"] = mean_se(maj)
    return out


def rollout_diagnostics(problems: list[Problem], rollouts: list[Rollout]) -> dict[str, float]:
    """Entropy / collapse diagnostics from the policy's samples (pass@k, distinct answers, entropy)."""
    groups = group_by_problem(rollouts)
    pass_k, rate, distinct, ent, finished = [], [], [], [], []
    for p in problems:
        rs = groups.get(p.id, [])
        if not rs:
            continue
        v = [bool(r.verdict) for r in rs]
        pass_k.append(any(v))
        rate.append(sum(v) / len(v))
        distinct.append(len({r.extracted for r in rs}))
        ent += [r.meta.get("entropy", 0.0) for r in rs]
        finished += [bool(r.meta.get("finished", True)) for r in rs]
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0  # noqa: E731
    mixed = [r for r in rate if 0 < r < 1]  # the prompts that can give a (correct, incorrect) pair: the pool
    return {"pass_at_k": mean(pass_k), "mean_pass_rate": mean(rate), "distinct_answers": mean(distinct),
            "pool_pass_rate": mean(mixed),
            "token_entropy": mean(ent), "finished_rate": mean(finished),
            "all_correct": mean([r == 1.0 for r in rate]), "all_wrong": mean([r == 0.0 for r in rate])}
