"""Preference matrices P (P_ij = Pr(i beats j)) for the tabular simulators, and their classification.

Generators follow the paper's experiments (arXiv 2602.12180, "How Sampling Shapes LLM Alignment"): the 3-cycle ``P = 1/2 + aS`` (the
parametrisation that reproduces the stated oscillation threshold), near-deterministic strongly
transitive matrices, Bradley-Terry, and HelpSteer-like random matrices built from integer scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Array = np.ndarray


def _sigmoid(x: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def validate(P: Array, atol: float = 1e-9) -> Array:
    """Return P as float array after checking P + P^T = 1 and entries in [0, 1]; every simulator assumes it."""
    P = np.asarray(P, dtype=float)
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise ValueError(f"P must be square, got shape {P.shape}")
    if not np.allclose(P + P.T, 1.0, atol=atol):
        raise ValueError("P must satisfy P_ij + P_ji = 1 (hence P_ii = 1/2)")
    if P.min() < -atol or P.max() > 1 + atol:
        raise ValueError("P entries must lie in [0, 1]")
    return P


def cyclic_matrix(a: float = 0.4, K: int = 3) -> Array:
    """Rock-paper-scissors style cycle ``P = 1/2 + aS`` with S_{i,i+1} = 1 (mod K), S = -S^T.

    For K = 3 this is the matrix behind the threshold alpha^2 + a^2 beta^2 lam^2 / 3 = 1; for K > 3 it is the
    directed K-cycle with ties (1/2) between non-neighbours.
    """
    if not 0.0 < a <= 0.5:
        raise ValueError(f"a must be in (0, 1/2], got {a}")
    if K < 3:
        raise ValueError("a cycle needs K >= 3")
    S = np.zeros((K, K))
    for i in range(K):
        S[i, (i + 1) % K] += 1.0
        S[(i + 1) % K, i] -= 1.0
    return 0.5 + a * S


def transitive_matrix(K: int = 4, p: float = 0.95) -> Array:
    """Near-deterministic order 0 > 1 > ... > K-1 with P_ij = p for i < j: strongly transitive for p >= 1/2."""
    if not 0.5 <= p <= 1.0:
        raise ValueError(f"p must be in [1/2, 1], got {p}")
    P = np.full((K, K), 0.5)
    iu = np.triu_indices(K, 1)
    P[iu] = p
    P[iu[1], iu[0]] = 1.0 - p
    return P


def bradley_terry(rewards: Sequence[float] | Array, scale: float = 1.0) -> Array:
    """BT matrix P_ij = sigmoid(scale (r_i - r_j)); BT is strongly transitive and is the case where DPO is sampling-invariant."""
    r = np.asarray(rewards, dtype=float)
    return _sigmoid(scale * (r[:, None] - r[None, :]))


def helpsteer_like(rng: np.random.Generator, K: int = 4, n_attr: int = 5, levels: int = 5, scale: float = 1.0) -> Array:
    """One HelpSteer-like matrix: scores in {0..levels-1}^{K x n_attr}, one random attribute per pair.

    Mimics the paper's construction (P_ij = sigmoid(s_i - s_j) on a randomly chosen attribute); the scale inside
    the sigmoid is unknown in the source, hence the ``scale`` knob (default 1, inferred).
    """
    s = rng.integers(0, levels, size=(K, n_attr)).astype(float)
    P = np.full((K, K), 0.5)
    for i in range(K):
        for j in range(i + 1, K):
            m = rng.integers(n_attr)
            P[i, j] = _sigmoid(scale * (s[i, m] - s[j, m]))
            P[j, i] = 1.0 - P[i, j]
    return P


def sample_helpsteer(
    rng: np.random.Generator, kind: str = "any", K: int = 4, scale: float = 1.0, max_tries: int = 100_000
) -> Array:
    """Rejection-sample a HelpSteer-like matrix of a class (the paper filters cyclic / strongly transitive ones).

    kind: "any", "cyclic", "strongly_transitive" or "strict_strongly_transitive" (strongly transitive, no top tie).
    """
    test = {"any": lambda P: True, "cyclic": is_cyclic, "strongly_transitive": is_strongly_transitive,
            "strict_strongly_transitive": lambda P: is_strongly_transitive(P) and strict_top(P)}[kind]
    for _ in range(max_tries):
        P = helpsteer_like(rng, K=K, scale=scale)
        if test(P):
            return P
    raise RuntimeError(f"no {kind} matrix in {max_tries} draws")


def is_cyclic(P: Array) -> bool:
    """True if the strict majority relation (P_ij > 1/2) contains a 3-cycle; the paper's 'cyclic' filter."""
    B = np.asarray(P) > 0.5
    # trace(B^3) counts directed 3-cycles (times 3).
    Bi = B.astype(np.int64)
    return bool(np.trace(Bi @ Bi @ Bi) > 0)


def is_strongly_transitive(P: Array, atol: float = 1e-12) -> bool:
    """True if a total order exists with row dominance P_ik >= P_jk for all k whenever i ranks above j.

    Row dominance is transitive and implies a larger row sum, so sorting by row sum and checking neighbours suffices.
    """
    P = np.asarray(P, dtype=float)
    order = np.argsort(-P.sum(axis=1), kind="stable")
    return bool(all(np.all(P[order[t]] >= P[order[t + 1]] - atol) for t in range(len(order) - 1)))


def strict_top(P: Array) -> bool:
    """True if the best response by row sum strictly beats every other one (a Condorcet winner exists).

    Strong transitivity alone allows a tie at the top (common in HelpSteer-like matrices); then alpha = 1 dynamics
    with lam > 0 end on the tied face instead of a vertex.
    """
    P = np.asarray(P)
    top = int(np.argmax(P.sum(axis=1)))
    return bool(np.all(np.delete(P[top], top) > 0.5))


def skew_norm(P: Array) -> float:
    """Spectral norm of P - 11^T/2, the quantity in the contraction condition (softmax ignores the 11^T/2 part)."""
    return float(np.linalg.norm(np.asarray(P) - 0.5, 2))


def make_matrix(kind: str, K: int, *, a: float = 0.4, p: float = 0.95, rewards: Sequence[float] | None = None,
                scale: float = 1.0, helpsteer_class: str = "any", seed: int = 0) -> Array:
    """Config-facing factory: kind in {cyclic, transitive, bradley_terry, helpsteer}."""
    if kind == "cyclic":
        return cyclic_matrix(a=a, K=K)
    if kind == "transitive":
        return transitive_matrix(K=K, p=p)
    if kind == "bradley_terry":
        r = np.linspace(1.5, 0.0, K) if rewards is None else np.asarray(rewards, dtype=float)
        if len(r) != K:
            raise ValueError(f"need K={K} rewards, got {len(r)}")
        return bradley_terry(r, scale=scale)
    if kind == "helpsteer":
        return sample_helpsteer(np.random.default_rng(seed), kind=helpsteer_class, K=K, scale=scale)
    raise ValueError(f"unknown matrix kind {kind!r}")
