"""Tabular MRS-IPO / MRS-DPO dynamics over K responses, exact (population) and finite-sample.

One round, as stated for MRS-IPO in "How Sampling Shapes LLM Alignment: From One-Shot Optima to Iterative Dynamics"
(arXiv 2602.12180) [S]: the reference follows the model, ``log ref_t = alpha log pi_t + (1 - alpha) log pi_ref``;
pairs come from ``mu_t = lam pi_t + (1 - lam) pi_0``; the next policy is the one-shot optimum for (ref_t, mu_t):
``log pi_{t+1} = log ref_t + signal_t + c`` with signal ``beta P mu_t`` (IPO) or ``scale(beta) u_t`` (DPO). The DPO
step (u_t solving the DPO population first-order condition) and the finite-sample estimators are our
reconstruction [I].
Every function broadcasts over leading "batch" axes so a whole (alpha, beta, lam) grid runs as one array.
The state is log pi, which stays finite during collapse (pi itself underflows to 0).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from alignlab.dynamics.oneshot import dpo_scale_factor, dpo_solve, log_normalize

Array = np.ndarray


def sample_pairs(rng: np.random.Generator, mu: Array, P: Array, n: int) -> tuple[Array, Array]:
    """Draw n ordered pairs from mu x mu with Bernoulli(P) labels: (counts C[y, y'], first-wins W[y, y'])."""
    K = mu.shape[-1]
    probs = mu[..., :, None] * mu[..., None, :]
    probs = probs / probs.sum(axis=(-2, -1), keepdims=True)
    C = rng.multinomial(n, probs.reshape(*mu.shape[:-1], K * K)).reshape(*mu.shape[:-1], K, K)
    W = rng.binomial(C, np.broadcast_to(P, C.shape))
    return C, W


def pair_tables(C: Array, W: Array) -> tuple[Array, Array]:
    """Symmetrised tables: comparisons comp[y, y'] (either order) and wins of y over y' (either order)."""
    Ct = np.swapaxes(C, -1, -2)
    Wt = np.swapaxes(W, -1, -2)
    return C + Ct, W + (Ct - Wt)


def winrate_signal(comp: Array, wins: Array, fill: float = 0.5) -> Array:
    """Empirical win rate of each response against sampled opponents, the finite-sample stand-in for P mu.

    Responses never sampled get ``fill`` (default 1/2 = no information; an inferred choice, see README).
    """
    n = comp.sum(axis=-1)
    return np.where(n > 0, wins.sum(axis=-1) / np.maximum(n, 1), fill)


def erm_signal(comp: Array, wins: Array, beta: Array | float) -> Array:
    """Minimiser g of the empirical IPO loss: weighted-Laplacian solve on the sampled pair graph (min-norm)."""
    K = comp.shape[-1]
    w = comp * (1.0 - np.eye(K))
    L = np.eye(K) * w.sum(axis=-1)[..., None] - w
    rhs = np.sum(wins - comp / 2.0, axis=-1)
    return np.asarray(beta) * (np.linalg.pinv(L) @ rhs[..., None])[..., 0]


def empirical_p(comp: Array, wins: Array) -> Array:
    """Empirical preference matrix P-hat = wins / comparisons (1/2 where a pair was never compared)."""
    return np.where(comp > 0, wins / np.maximum(comp, 1), 0.5)


def _col(x: Array | float) -> Array:
    """Parameters broadcast against (..., K) states: append a trailing axis."""
    return np.asarray(x, dtype=float)[..., None]


def mrs_step(logp: Array, P: Array, alpha: Array | float, beta: Array | float, lam: Array | float, logref: Array,
             pi0: Array, method: str = "ipo", variant: str = "exact", rng: np.random.Generator | None = None,
             samples: int = 256, estimator: str = "winrate", fill: float = 0.5, dpo_scale: str = "inverse",
             ridge: float = 0.0) -> Array:
    """One MRS round: log pi_t -> log pi_{t+1}.

    The DPO solve starts cold at u = 0 every round: warm starts from the previous round's u sit in saturated
    sigmoid regions when the policy rotates, where Newton stalls; from 0 it converges in <= ~12 steps.
    """
    a, b, lm = _col(alpha), _col(beta), _col(lam)
    mu = lm * np.exp(logp) + (1.0 - lm) * pi0
    if variant == "exact":
        if method == "ipo":
            signal = b * (mu @ P.T)
        elif method == "dpo":
            u = dpo_solve(P, mu[..., :, None] * mu[..., None, :], ridge=ridge)
            signal = _col(dpo_scale_factor(beta, dpo_scale)) * u
        else:
            raise ValueError(f"unknown method {method!r}")
    elif variant == "finite":
        if rng is None:
            raise ValueError("finite variant needs an rng")
        comp, wins = pair_tables(*sample_pairs(rng, mu, P, samples))
        if method == "ipo" and estimator == "winrate":
            signal = b * winrate_signal(comp, wins, fill)
        elif method == "ipo" and estimator == "erm":
            signal = erm_signal(comp, wins, b)
        elif method == "dpo":
            u = dpo_solve(empirical_p(comp, wins), comp.astype(float), ridge=ridge)
            signal = _col(dpo_scale_factor(beta, dpo_scale)) * u
        else:
            raise ValueError(f"unknown method/estimator {method!r}/{estimator!r}")
    else:
        raise ValueError(f"variant must be 'exact' or 'finite', got {variant!r}")
    return log_normalize(a * logp + (1.0 - a) * logref + signal)


def simulate(P: Array, alpha: Array | float, beta: Array | float, lam: Array | float, *, init: Array,
             pref: Array | None = None, pi0: Array | None = None, steps: int = 3000, method: str = "ipo",
             variant: str = "exact", seed: int = 0, samples: int = 256, estimator: str = "winrate",
             fill: float = 0.5, dpo_scale: str = "inverse", ridge: float = 0.0) -> Array:
    """Run MRS-IPO/DPO for ``steps`` rounds; returns log pi of shape (steps + 1, *batch, K).

    alpha, beta, lam may be arrays of a common batch shape; pi_ref and pi_0 default to uniform.
    """
    P = np.asarray(P, dtype=float)
    K = P.shape[0]
    pref = np.full(K, 1.0 / K) if pref is None else np.asarray(pref, dtype=float)
    pi0 = np.full(K, 1.0 / K) if pi0 is None else np.asarray(pi0, dtype=float)
    batch = np.broadcast_shapes(np.shape(alpha), np.shape(beta), np.shape(lam))
    logp = np.broadcast_to(log_normalize(np.log(np.asarray(init, dtype=float))), (*batch, K)).copy()
    logref = np.log(pref)
    rng = np.random.default_rng(seed)
    out = np.empty((steps + 1, *batch, K))
    out[0] = logp
    for t in range(steps):
        logp = mrs_step(logp, P, alpha, beta, lam, logref, pi0, method, variant, rng, samples, estimator, fill,
                        dpo_scale, ridge)
        out[t + 1] = logp
    return out


def exact_map(P: Array, alpha: float, beta: float, lam: float, pref: Array, pi0: Array, method: str = "ipo",
              dpo_scale: str = "inverse", ridge: float = 0.0) -> Callable[[Array], Array]:
    """The deterministic round log pi_t -> log pi_{t+1} as a closure (for fixed points and Jacobians)."""
    logref = np.log(pref)
    P = np.asarray(P, dtype=float)

    def f(logp: Array) -> Array:
        return mrs_step(log_normalize(logp), P, alpha, beta, lam, logref, pi0, method, "exact",
                        dpo_scale=dpo_scale, ridge=ridge)

    return f


def tangent_basis(K: int) -> Array:
    """Orthonormal basis (K, K-1) of sum-zero vectors: logits are defined only up to a constant."""
    q, _ = np.linalg.qr(np.eye(K)[:, :-1] - 1.0 / K)
    return q


def tangent_jacobian(f: Callable[[Array], Array], logp: Array, h: float = 1e-6) -> Array:
    """(K-1)x(K-1) Jacobian of a round in tangent coordinates, by central differences."""
    K = logp.shape[-1]
    B = tangent_basis(K)
    cols = [B.T @ (f(logp + h * B[:, j]) - f(logp - h * B[:, j])) / (2 * h) for j in range(K - 1)]
    return np.stack(cols, axis=1)


def spectral_radius(J: Array) -> float:
    """Largest |eigenvalue|: > 1 means a fixed point is linearly unstable."""
    return float(np.max(np.abs(np.linalg.eigvals(J)))) if J.size else 0.0


def fixed_point(f: Callable[[Array], Array], logp0: Array, tol: float = 1e-11, max_iter: int = 200,
                min_logp: float = -60.0) -> Array | None:
    """Interior fixed point of a round by damped Newton in tangent coordinates, started at logp0.

    Returns None when Newton leaves the interior (e.g. alpha = 1 with transitive P: the only limits are vertices).
    """
    K = logp0.shape[-1]
    B = tangent_basis(K)
    x = B.T @ logp0

    def F(x: Array) -> Array:
        return B.T @ f(log_normalize(B @ x)) - x

    Fx = F(x)
    for _ in range(max_iter):
        err = np.max(np.abs(Fx))
        if err < tol:
            return log_normalize(B @ x)
        J = tangent_jacobian(f, log_normalize(B @ x)) - np.eye(K - 1)
        dx = np.linalg.lstsq(J, -Fx, rcond=None)[0]
        t = 1.0
        while t > 1e-6:
            xn = x + t * dx
            Fn = F(xn)
            if np.max(np.abs(Fn)) < (1 - 1e-4 * t) * err:
                break
            t /= 2
        x, Fx = xn, Fn
        if log_normalize(B @ x).min() < min_logp:
            return None
    return None
