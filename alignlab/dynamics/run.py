"""Config (a plain dict, as resolved from conf/dynamics.yaml) -> simulation -> JSON-ready result.

Shared by the Hydra CLI (one run per job) and by phase.py (a whole grid in one vectorised call), so both paths
compute identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from alignlab.dynamics import axioms, matrices, metrics, theory
from alignlab.dynamics.mrs import exact_map, fixed_point, simulate, spectral_radius, tangent_jacobian
from alignlab.dynamics.oneshot import dpo_optimum, ipo_optimum

Array = np.ndarray
NOTES_INIT_K3 = (0.36, 0.33, 0.31)


@dataclass
class Setup:
    """Everything a run needs besides (alpha, beta, lam)."""

    P: Array
    pref: Array
    pi0: Array
    init: Array


def _dist(spec: Any, K: int, rng: np.random.Generator, name: str) -> Array:
    if spec == "uniform":
        return np.full(K, 1.0 / K)
    if spec == "random":
        return rng.dirichlet(np.ones(K))
    if spec == "perturbed":
        if K == 3:
            return np.array(NOTES_INIT_K3)
        v = 1.0 + 0.1 * np.linspace(0.8, -0.6, K)
        return v / v.sum()
    x = np.asarray(spec, dtype=float)
    if x.shape != (K,) or x.min() <= 0:
        raise ValueError(f"{name} must be uniform|random|perturbed or {K} positive numbers, got {spec!r}")
    return x / x.sum()


def build(cfg: dict[str, Any]) -> Setup:
    """Preference matrix, reference, offline sampler and start policy from a config dict."""
    K = int(cfg["K"])
    m = dict(cfg["matrix"])
    kind = m.pop("kind")
    P = matrices.validate(matrices.make_matrix(kind, K, **m))
    rng = np.random.default_rng(int(cfg.get("seed", 0)) + 7919)
    return Setup(P=P, pref=_dist(cfg.get("ref", "uniform"), K, rng, "ref"),
                 pi0=_dist(cfg.get("pi0", "uniform"), K, rng, "pi0"),
                 init=_dist(cfg.get("init", "perturbed"), K, rng, "init"))


def _sim_kwargs(cfg: dict[str, Any], s: Setup) -> dict[str, Any]:
    return dict(init=s.init, pref=s.pref, pi0=s.pi0, steps=int(cfg["steps"]), method=cfg.get("method", "ipo"),
                variant=cfg.get("variant", "exact"), seed=int(cfg.get("seed", 0)), samples=int(cfg.get("samples", 256)),
                estimator=cfg.get("estimator", "winrate"), fill=float(cfg.get("fill", 0.5)),
                dpo_scale=cfg.get("dpo_scale", "inverse"), ridge=float(cfg.get("dpo_ridge", 0.0)))


def theory_numbers(cfg: dict[str, Any], P: Array, alpha: Any, beta: Any, lam: Any) -> dict[str, Any]:
    """Stated/derived thresholds for these parameters (3-cycle numbers only for the K = 3 cyclic matrix)."""
    out: dict[str, Any] = {"contraction_bound": theory.contraction_bound(P, alpha, beta, lam), "skew_norm": matrices.skew_norm(P)}
    if cfg["matrix"]["kind"] == "cyclic" and int(cfg["K"]) == 3:
        a = float(cfg["matrix"]["a"])
        if cfg.get("method", "ipo") == "ipo":
            out["cycle_rho"] = theory.cycle_rho(alpha, beta, lam, a)
        else:
            out["cycle_rho_dpo_derived"] = theory.dpo_cycle_rho(alpha, beta, lam, a, cfg.get("dpo_scale", "inverse"))
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """Simulate one (alpha, beta, lam) and return the result.json payload."""
    s = build(cfg)
    alpha, beta, lam = float(cfg["alpha"]), float(cfg["beta"]), float(cfg["lam"])
    method = cfg.get("method", "ipo")
    traj = simulate(s.P, alpha, beta, lam, **_sim_kwargs(cfg, s))
    m = metrics.summarize(traj, int(cfg["burn_in"]))
    final = np.exp(traj[-1])
    f = exact_map(s.P, alpha, beta, lam, s.pref, s.pi0, method, cfg.get("dpo_scale", "inverse"),
                  float(cfg.get("dpo_ridge", 0.0)))
    fp = fixed_point(f, np.log(s.pref))
    fixed: dict[str, Any] = {"found": fp is not None}
    if fp is not None:
        pstar = np.exp(fp)
        tail = np.exp(traj[int(cfg["burn_in"]):])
        fixed.update(pi=pstar, dist_tv_final=metrics.tv_distance(final, pstar),
                     dist_tv_tail_mean=metrics.tv_distance(tail, pstar).mean(),
                     spectral_radius=spectral_radius(tangent_jacobian(f, fp)))
    H = metrics.entropy(traj)
    mu0 = lam * s.init + (1 - lam) * s.pi0
    if method == "ipo":
        one = ipo_optimum(s.P, mu0, s.pref, beta)
    else:
        one = dpo_optimum(s.P, mu0, s.pref, beta, cfg.get("dpo_scale", "inverse"), float(cfg.get("dpo_ridge", 0.0)))
    every = int(cfg.get("save_every", 0))
    result = {
        "params": {"alpha": alpha, "beta": beta, "lam": lam, "K": int(cfg["K"]), "method": method,
                   "variant": cfg.get("variant", "exact"), "matrix": cfg["matrix"]["kind"]},
        "config": cfg,
        "P": s.P,
        "matrix_class": {"cyclic": matrices.is_cyclic(s.P), "strongly_transitive": matrices.is_strongly_transitive(s.P),
                         "condorcet_winner": axioms.condorcet_winner(s.P), "smith_set": axioms.smith_set(s.P)},
        "metrics": {k: float(v) for k, v in m.items()} | {
            "converged": bool(m["tail_movement"] < 1e-9),
            "final_pi": final,
            "entropy_monotone_from": metrics.monotone_from(H),
        },
        "fixed_point": fixed,
        "theory": theory_numbers(cfg, s.P, alpha, beta, lam),
        "oneshot": {"mu": mu0, "pi": one, "axioms": axioms.check_axioms(s.P, one)},
        "axioms_final": axioms.check_axioms(s.P, final),
    }
    if every > 0:
        result["trajectory"] = {"every": every, "pi": np.exp(traj[::every]), "entropy": H[::every]}
    return _jsonable(result)


def run_grid(cfg: dict[str, Any], alphas: Array, betas: Array, lams: Array, max_cells: int = 512,
             with_fixed_points: bool = False) -> dict[str, Any]:
    """All (alpha, beta, lam) cells of a grid in vectorised chunks; arrays have shape (len(alphas), len(betas), len(lams))."""
    s = build(cfg)
    A, B, L = np.meshgrid(np.asarray(alphas, float), np.asarray(betas, float), np.asarray(lams, float), indexing="ij")
    flat = [x.ravel() for x in (A, B, L)]
    n = flat[0].size
    out: dict[str, list[Array]] = {}
    kw = _sim_kwargs(cfg, s)
    for i in range(0, n, max_cells):
        sl = slice(i, i + max_cells)
        traj = simulate(s.P, flat[0][sl], flat[1][sl], flat[2][sl], **kw)
        for k, v in metrics.summarize(traj, int(cfg["burn_in"])).items():
            out.setdefault(k, []).append(v)
        if with_fixed_points:
            d = []
            for j, (a, b, lm) in enumerate(zip(flat[0][sl], flat[1][sl], flat[2][sl])):
                f = exact_map(s.P, a, b, lm, s.pref, s.pi0, kw["method"], kw["dpo_scale"], kw["ridge"])
                fp = fixed_point(f, np.log(s.pref))
                d.append(np.nan if fp is None else metrics.tv_distance(np.exp(traj[-1, j]), np.exp(fp)))
            out.setdefault("dist_fixed_point", []).append(np.array(d))
    res: dict[str, Any] = {k: np.concatenate(v).reshape(A.shape) for k, v in out.items()}
    res.update(alphas=np.asarray(alphas, float), betas=np.asarray(betas, float), lams=np.asarray(lams, float), P=s.P)
    res.update({k: np.broadcast_to(v, A.shape) for k, v in theory_numbers(cfg, s.P, A, B, L).items() if np.ndim(v)})
    return res


__all__ = ["Setup", "build", "run_one", "run_grid", "theory_numbers"]
