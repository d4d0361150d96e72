"""Ranking axioms for IPO viewed as an aggregation rule P -> pi: Condorcet-top, Smith-top, order preservation.

Each check returns None when the axiom does not apply to P (no Condorcet winner; majority relation not
transitive), so a caller can tell "violated" from "vacuous".
"""

from __future__ import annotations

import numpy as np

Array = np.ndarray


def condorcet_winner(P: Array) -> int | None:
    """The response that strictly beats every other one pairwise (P_cj > 1/2 for all j != c), if any."""
    B = np.asarray(P) > 0.5
    wins = B.sum(axis=1)
    K = len(wins)
    top = np.flatnonzero(wins == K - 1)
    return int(top[0]) if len(top) else None


def smith_set(P: Array) -> list[int]:
    """Smallest non-empty set whose members all strictly beat every non-member.

    A response is in it iff it reaches every other response along "does not lose" edges (P_ij >= 1/2).
    """
    R = np.asarray(P) >= 0.5
    K = len(R)
    R = R | np.eye(K, dtype=bool)
    for k in range(K):  # Warshall transitive closure
        R = R | (R[:, [k]] & R[[k], :])
    return [i for i in range(K) if R[i].all()]


def majority_order(P: Array) -> list[int] | None:
    """Ranking (best first) if the strict majority relation is a transitive tournament (no ties), else None."""
    P = np.asarray(P)
    K = len(P)
    B = P > 0.5
    off = ~np.eye(K, dtype=bool)
    if np.any((B | B.T)[off] == 0):
        return None
    order = list(np.argsort(-B.sum(axis=1), kind="stable"))
    ok = all(B[order[i], order[j]] for i in range(K) for j in range(i + 1, K))
    return [int(i) for i in order] if ok else None


def condorcet_top(P: Array, pi: Array, tol: float = 0.0) -> bool | None:
    """Does the Condorcet winner get strictly the largest probability (margin > tol)? None if there is none."""
    c = condorcet_winner(P)
    if c is None:
        return None
    others = np.delete(np.asarray(pi), c)
    return bool(pi[c] > others.max() + tol)


def smith_top(P: Array, pi: Array, tol: float = 0.0) -> bool | None:
    """Does every Smith-set member get strictly more probability than every non-member? None if Smith = all."""
    S = smith_set(P)
    if len(S) == len(P):
        return None
    pi = np.asarray(pi)
    rest = np.setdiff1d(np.arange(len(P)), S)
    return bool(pi[S].min() > pi[rest].max() + tol)


def order_preserving(P: Array, pi: Array, tol: float = 0.0) -> bool | None:
    """If P's majority relation is a total order, is pi strictly decreasing along it? None if not transitive."""
    order = majority_order(P)
    if order is None:
        return None
    p = np.asarray(pi)[order]
    return bool(np.all(p[:-1] > p[1:] + tol))


def check_axioms(P: Array, pi: Array, tol: float = 0.0) -> dict[str, bool | None]:
    """All three axioms at once: {condorcet_top, smith_top, order_preserving} -> True / False / None (n/a)."""
    return {
        "condorcet_top": condorcet_top(P, pi, tol),
        "smith_top": smith_top(P, pi, tol),
        "order_preserving": order_preserving(P, pi, tol),
    }


def axiom_counterexample(mu: Array, eps: float = 0.05) -> Array:
    """A transitive P on which IPO with sampler mu (and a uniform reference) violates all three axioms.

    Construction (inferred; the paper's own is not known): let c and s be the two least-sampled responses; c beats
    everyone by only eps, s beats every other response surely. Then (P mu)_s - (P mu)_c = r/2 - eps, where r >= 1/3
    is the mass on the rest, so s outranks the Condorcet winner c whenever eps < 1/6 (K >= 3).
    """
    mu = np.asarray(mu, dtype=float)
    K = len(mu)
    if K < 3:
        raise ValueError("needs K >= 3")
    if not 0 < eps < 1 / 6:
        raise ValueError("eps must be in (0, 1/6)")
    order = list(np.argsort(mu, kind="stable"))  # least sampled first
    c, s, rest = order[0], order[1], order[2:]
    rank = [c, s] + rest  # total order c > s > rest (rest in arbitrary fixed order)
    P = np.full((K, K), 0.5)
    for i, x in enumerate(rank):
        for y in rank[i + 1:]:
            P[x, y] = 0.5 + eps if x == c else 1.0 if x == s else 0.75
            P[y, x] = 1.0 - P[x, y]
    return P
