"""One-shot population optima of IPO and DPO under a general sampler mu, and instance-dependent samplers.

IPO has a closed form, ``log pi* = log pi_ref + beta P mu + c``, so the sampler moves the optimum itself. DPO
has only an implicit first-order condition; it is sampling-invariant exactly when P is Bradley-Terry.
Conventions: beta multiplies the preference signal in IPO (larger beta = sharper); in DPO,
``u = beta log(pi/pi_ref)`` (standard DPO, larger beta = flatter) unless ``dpo_scale="direct"``.
"""

from __future__ import annotations

import itertools

import numpy as np

from alignlab.dynamics.axioms import condorcet_winner

Array = np.ndarray


def log_normalize(z: Array) -> Array:
    """Log-softmax along the last axis; the simulators keep log-probabilities so collapse never hits log(0)."""
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def ipo_optimum(P: Array, mu: Array, pref: Array, beta: float) -> Array:
    """Closed-form population IPO optimum pi* ∝ pi_ref * exp(beta P mu) (unique when mu has full support)."""
    mu = np.asarray(mu, dtype=float)
    return np.exp(log_normalize(np.log(pref) + beta * mu @ np.asarray(P).T))


def ipo_optimum_pairs(P: Array, W: Array, pref: Array, beta: float) -> Array:
    """IPO optimum for a general (non-product) pair distribution W(y, y'): a weighted-Laplacian solve.

    With w = W + W^T the first-order condition is sum_y' w (g_y - g_y') = beta sum_y' w (P_yy' - 1/2) for
    g = log(pi/pi_ref). Directions the pair graph does not connect are unidentified; we take the min-norm g
    (inferred form: not in any source).
    """
    P = np.asarray(P, dtype=float)
    w = np.asarray(W, dtype=float)
    w = w + w.T
    L = np.diag(w.sum(axis=1)) - w
    g = np.linalg.pinv(L) @ (beta * np.sum(w * (P - 0.5), axis=1))
    return np.exp(log_normalize(np.log(pref) + g))


def ipo_population_loss(logp: Array, P: Array, mu: Array, pref: Array, beta: float) -> float:
    """Population IPO loss sum_{y,y'} mu_y mu_y' (h(y, y') - beta (P_yy' - 1/2))^2 with h the log-ratio margin."""
    g = np.asarray(logp) - np.log(pref)
    h = g[:, None] - g[None, :]
    return float(np.sum(np.outer(mu, mu) * (h - beta * (np.asarray(P) - 0.5)) ** 2))


def _sigmoid(x: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _rows(C: Array) -> tuple[Array, Array]:
    """Row weights r and row-normalised opponent distribution Q = C / r (zero rows for unsampled responses)."""
    r = C.sum(axis=-1)
    Q = np.where(r[..., None] > 0, C / np.where(r > 0, r, 1.0)[..., None], 0.0)
    return r, Q


def dpo_residual(u: Array, P: Array, C: Array, ridge: float = 0.0) -> Array:
    """G_y(u) = sum_y' Q_yy' (sigmoid(u_y - u_y') - P_yy') + ridge u_y, zero at the DPO population optimum.

    C is the symmetric pair-weight table (mu mu^T for exact sampling, pair counts for finite samples) and Q its
    row-normalised form, so rarely sampled responses stay well scaled. ``ridge`` keeps u finite when P (or an
    empirical P) has 0/1 entries.
    """
    _, Q = _rows(np.asarray(C, dtype=float))
    s = _sigmoid(u[..., :, None] - u[..., None, :])
    return np.sum(Q * (s - P), axis=-1) + ridge * u


def dpo_population_loss(u: Array, P: Array, C: Array, ridge: float = 0.0) -> Array:
    """Convex population DPO loss sum C_yy' l(u_y - u_y'; P_yy') + ridge sum_y r_y u_y^2 (its gradient is 2 r G)."""
    d = u[..., :, None] - u[..., None, :]
    loss = P * np.logaddexp(0.0, -d) + (1.0 - P) * np.logaddexp(0.0, d)
    r = np.asarray(C).sum(axis=-1)
    return np.sum(C * loss, axis=(-2, -1)) + ridge * np.sum(r * u * u, axis=-1)


def dpo_solve(P: Array, C: Array, u0: Array | None = None, ridge: float = 0.0, tol: float = 1e-10,
              max_iter: int = 50) -> Array:
    """Solve the DPO first-order condition for u (batched over leading axes) by Newton with Armijo backtracking.

    The step solves J d = -G with the row-normalised Jacobian; it is also the Newton step of the convex loss
    (Hessian = 2 diag(r) J), so backtracking on that loss makes the iteration globally convergent.
    """
    P = np.asarray(P, dtype=float)
    C = np.asarray(C, dtype=float)
    shape = np.broadcast_shapes(P.shape, C.shape)[:-1]
    K = shape[-1]
    C = np.broadcast_to(C, (*shape, K))
    r, Q = _rows(C)
    u = np.zeros(shape) if u0 is None else np.array(np.broadcast_to(u0, shape), dtype=float)
    eye = np.eye(K)
    reg = ridge if ridge > 0 else 1e-12
    for _ in range(max_iter):
        G = dpo_residual(u, P, C, ridge)
        todo = np.max(np.abs(G), axis=-1) >= tol
        if not np.any(todo):
            break
        s = _sigmoid(u[..., :, None] - u[..., None, :])
        M = Q * s * (1.0 - s) * (1.0 - eye)
        J = eye * (M.sum(axis=-1)[..., None] + reg) - M
        d = np.linalg.solve(J, -G[..., None])[..., 0] * todo[..., None]
        f0 = dpo_population_loss(u, P, C, ridge)
        slope = 2.0 * np.sum(r * G * d, axis=-1)
        t = np.ones(todo.shape)
        for _ in range(40):
            bad = dpo_population_loss(u + t[..., None] * d, P, C, ridge) > f0 + 1e-4 * t * slope + 1e-15 * np.abs(f0)
            if not np.any(bad):
                break
            t = np.where(bad, t / 2, t)
        u = u + t[..., None] * d
        if ridge == 0:
            u = u - u.mean(axis=-1, keepdims=True)
    return u


def dpo_scale_factor(beta: Array | float, dpo_scale: str = "inverse") -> Array | float:
    """Map from u to log(pi/pi_ref): 1/beta for standard DPO (u = beta log ratio), beta for the IPO-like reading."""
    if dpo_scale == "inverse":
        return 1.0 / np.asarray(beta, dtype=float)
    if dpo_scale == "direct":
        return np.asarray(beta, dtype=float)
    raise ValueError(f"dpo_scale must be 'inverse' or 'direct', got {dpo_scale!r}")


def dpo_optimum(P: Array, mu: Array, pref: Array, beta: float, dpo_scale: str = "inverse",
                ridge: float = 0.0) -> Array:
    """Population DPO optimum under sampler mu (implicit; solved by Newton)."""
    mu = np.asarray(mu, dtype=float)
    u = dpo_solve(np.asarray(P, dtype=float), np.outer(mu, mu), ridge=ridge)
    return np.exp(log_normalize(np.log(pref) + dpo_scale_factor(beta, dpo_scale) * u))


def condorcet_sampler(P: Array) -> Array | None:
    """Point mass on the Condorcet winner c (if any): (P delta_c)_c = 1/2 > P_yc, so IPO ranks c first."""
    c = condorcet_winner(P)
    if c is None:
        return None
    mu = np.zeros(len(P))
    mu[c] = 1.0
    return mu


def maximal_lottery(P: Array, tol: float = 1e-10) -> Array:
    """A maximal lottery: mu with (P mu)_j <= 1/2 for all j (Nash equilibrium of the skew game P - 1/2).

    Found by support enumeration (fine for the K <= ~12 used here); equals delta_c when a Condorcet winner exists.
    """
    P = np.asarray(P, dtype=float)
    K = len(P)
    M = P - 0.5
    for size in range(1, K + 1):
        for combo in itertools.combinations(range(K), size):
            S = list(combo)
            A = np.vstack([M[np.ix_(S, S)], np.ones((1, size))])
            b = np.zeros(size + 1)
            b[-1] = 1.0
            pS, *_ = np.linalg.lstsq(A, b, rcond=None)
            if np.max(np.abs(A @ pS - b)) > 1e-8 or pS.min() < -tol:
                continue
            mu = np.zeros(K)
            mu[S] = np.clip(pS, 0.0, None)
            mu /= mu.sum()
            if np.max(M @ mu) <= 1e-8:
                return mu
    raise RuntimeError("no maximal lottery found (should not happen for a valid P)")


def max_margin_sampler(A: Array, b: Array | None = None, tol: float = 1e-10) -> tuple[Array, float]:
    """Solve max_t,mu t s.t. A mu + b >= t, mu in the simplex, by enumerating LP vertices (tiny K only).

    numpy-only stand-in for an LP solver: a vertex fixes K of the m + K inequalities (plus sum mu = 1).
    """
    A = np.atleast_2d(np.asarray(A, dtype=float))
    m, K = A.shape
    b = np.zeros(m) if b is None else np.asarray(b, dtype=float)
    # Inequalities G x >= h for x = (mu, t): rows A mu - t >= -b, then mu_k >= 0.
    G = np.vstack([np.hstack([A, -np.ones((m, 1))]), np.hstack([np.eye(K), np.zeros((K, 1))])])
    h = np.concatenate([-b, np.zeros(K)])
    eq = np.append(np.ones(K), 0.0)
    best_t, best_mu = -np.inf, None
    for act in itertools.combinations(range(m + K), K):
        M = np.vstack([G[list(act)], eq])
        if abs(np.linalg.det(M)) < 1e-12:
            continue
        x = np.linalg.solve(M, np.append(h[list(act)], 1.0))
        if np.all(G @ x >= h - tol) and x[-1] > best_t:
            best_t, best_mu = x[-1], x[:K]
    if best_mu is None:
        raise RuntimeError("LP has no vertex (should not happen)")
    return np.clip(best_mu, 0.0, None) / np.clip(best_mu, 0.0, None).sum(), float(best_t)


def top_set_sampler(P: Array, top: list[int], pref: Array | None = None, beta: float = 1.0) -> tuple[Array, float]:
    """Instance-dependent sampler that best separates ``top`` from the rest in the IPO optimum.

    Maximises min over i in top, j not in top of log pi*_i - log pi*_j = beta ((P mu)_i - (P mu)_j) + log ref_i/ref_j;
    a positive margin means this mu makes IPO rank the whole set first (top = Smith set: Smith-top; top = {c}:
    Condorcet-top). The paper proves such samplers exist but gives no construction; this is an LP search [I].
    """
    P = np.asarray(P, dtype=float)
    K = len(P)
    rest = [j for j in range(K) if j not in top]
    if not rest:
        raise ValueError("top must be a proper subset")
    lr = np.zeros(K) if pref is None else np.log(np.asarray(pref, dtype=float))
    A = np.array([beta * (P[i] - P[j]) for i in top for j in rest])
    b = np.array([lr[i] - lr[j] for i in top for j in rest])
    return max_margin_sampler(A, b)
