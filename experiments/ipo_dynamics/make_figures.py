"""Regenerate every figure and number in experiments/ipo_dynamics/README.md (CPU, ~3-5 min on 2 cores).

    python experiments/ipo_dynamics/make_figures.py [--hydra-dir multirun/dynamics/cycle_ipo]

Writes figures/*.png and results.json next to this file. --hydra-dir (the Hydra multirun of the README) is only
used to cross-check the multirun numbers against the in-process grid.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from alignlab.dynamics import axioms, matrices, metrics, oneshot, theory  # noqa: E402
from alignlab.dynamics.mrs import exact_map, fixed_point, simulate  # noqa: E402
from alignlab.dynamics.phase import compose_config, grid_from_results, load_results, plot_phase  # noqa: E402
from alignlab.dynamics.run import run_grid  # noqa: E402

FIG = HERE / "figures"
INIT3 = [0.36, 0.33, 0.31]
OSC_TOL = 1e-6  # "oscillates" = oscillation strength above this (the paper gives no cut-off)


def r4(x):
    """Round floats (recursively) for a compact, diff-friendly JSON."""
    if isinstance(x, dict):
        return {k: r4(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [r4(v) for v in x]
    if isinstance(x, np.ndarray):
        return r4(x.tolist())
    if isinstance(x, float | np.floating):
        return float(f"{float(x):.4g}") if np.isfinite(x) else None
    if isinstance(x, np.integer | np.bool_):
        return x.item()
    return x


def grid_payload(g: dict, name: str) -> str:
    """Write a grid's numbers to figures/<name>_grid.json (kept out of results.json to keep it small)."""
    keys = ("oscillation", "final_entropy", "mean_entropy_tail")
    data = {"alphas": g["alphas"], "betas": g["betas"], "lams": g["lams"]} | {k: g[k] for k in keys if k in g}
    path = FIG / f"{name}_grid.json"
    path.write_text(json.dumps(r4(data)))
    return str(path.relative_to(HERE))


# --- 1. 3-cycle, MRS-IPO exact: phase diagram and the stated threshold ----------------------------------------


def cycle_ipo_phase() -> dict:
    cfg = compose_config([])
    g = run_grid(cfg, np.linspace(0, 1, 21), np.linspace(0, 10, 41), [0.25, 0.5, 1.0])
    for m in ("oscillation", "final_entropy"):
        plot_phase(g, m, FIG / f"cycle_ipo_{m}.png", "MRS-IPO exact · 3-cycle a=0.4 · T=3000", cfg)
    osc = g["oscillation"] > OSC_TOL
    unstable = g["cycle_rho"] > 1
    dis = np.argwhere(osc != unstable)
    return {
        "grid": grid_payload(g, "cycle_ipo"),
        "cells": int(osc.size),
        "cells_disagreeing_with_stated_threshold": int(len(dis)),
        "disagreeing_cells_rho": sorted(float(g["cycle_rho"][tuple(i)]) for i in dis),
        "cells_oscillating_inside_contraction_region": int(np.sum(osc & (g["contraction_bound"] < 1))),
    }


def threshold_table() -> dict:
    rows = []
    rel = np.linspace(-0.05, 0.05, 101)  # beta / beta* - 1, resolution 0.1 %
    for a in (0.4, 0.25):
        P = matrices.cyclic_matrix(a)
        for lam in (1.0, 0.5):
            alphas = np.array([0.0, 0.3, 0.5, 0.7, 0.9, 0.95])
            bstar = theory.cycle_beta_threshold(alphas, lam, a)
            B = bstar[:, None] * (1 + rel[None, :])
            A = np.broadcast_to(alphas[:, None], B.shape)
            row = {"a": a, "lam": lam, "alpha": alphas, "beta_star_stated": bstar,
                   "beta_contraction": 2 * (1 - alphas) / (lam * matrices.skew_norm(P))}
            for T in (3000, 20000):
                tr = simulate(P, A, B, lam, init=INIT3, steps=T)
                osc = metrics.oscillation_strength(tr, T // 3) > OSC_TOL
                away = metrics.tv_distance(np.exp(tr[-1]), 1 / 3) > 1e-6  # has not converged to the uniform point
                first = lambda mask: np.array([rel[np.argmax(m)] if m.any() else np.nan for m in mask])  # noqa: E731
                row[f"rel_err_osc_T{T}"] = first(osc)
                row[f"rel_err_notconverged_T{T}"] = first(away)
                del tr
            rows.append(row)
    return {"rows": rows, "note": "rel_err = (first beta with the property) / stated beta* - 1, 0.1 % grid over +-5 %; "
            "osc: oscillation strength (t >= T/3) > 1e-6; notconverged: TV(pi_T, uniform) > 1e-6"}


# --- 2. contraction condition -----------------------------------------------------------------------------------


def contraction_check(n: int = 300) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for label, lo, hi in (("bound_below_1", 0.05, 0.99), ("bound_1_to_3", 1.0, 3.0)):
        conv, dist, moves = [], [], []
        for case in range(n):
            K = int(rng.integers(3, 7))
            if case % 3 == 0:
                P = matrices.helpsteer_like(rng, K=K, scale=float(rng.uniform(0.5, 3)))
            elif case % 3 == 1:
                U = rng.uniform(0, 1, size=(K, K))
                P = np.triu(U, 1) + np.tril(1 - U.T, -1)
                np.fill_diagonal(P, 0.5)
            else:
                P = matrices.cyclic_matrix(float(rng.uniform(0.05, 0.5)), K=K)
            if matrices.skew_norm(P) < 1e-9:  # all ties: nothing to contract
                continue
            alpha, lam = rng.uniform(0, min(0.95, lo)), rng.uniform(0.05, 1)
            target = rng.uniform(max(lo, alpha + 0.01), hi)
            beta = 2 * (target - alpha) / (lam * matrices.skew_norm(P))
            pref, pi0 = rng.dirichlet(np.ones(K)), rng.dirichlet(np.ones(K))
            tr = simulate(P, alpha, beta, lam, init=rng.dirichlet(np.ones(K)), pref=pref, pi0=pi0, steps=3000)
            mv = float(metrics.tail_movement(tr))
            fp = fixed_point(exact_map(P, alpha, beta, lam, pref, pi0), np.log(pref))
            d = np.nan if fp is None else float(metrics.tv_distance(np.exp(tr[-1]), np.exp(fp)))
            conv.append(mv < 1e-9)
            dist.append(d)
            moves.append(mv)
        out[label] = {"cases": len(conv), "converged": int(np.sum(conv)), "max_dist_to_fixed_point_if_converged":
                      float(np.nanmax(np.where(conv, dist, np.nan))) if any(conv) else None,
                      "max_tail_movement": float(np.max(moves))}
    return out


# --- 3. entropy collapse (strongly transitive P) ------------------------------------------------------------------


def collapse() -> dict:
    res: dict = {}
    Pd = matrices.transitive_matrix(4, 0.95)
    Pb = matrices.bradley_terry([1.5, 1.0, 0.5, 0.0])
    al = np.array([0.0, 0.5, 0.8, 0.9, 0.99, 1.0])
    be = np.array([1.0, 2.0, 4.0, 5.0, 20.0])
    lm = np.array([0.0, 0.5, 1.0])
    A, B, L = np.meshgrid(al, be, lm, indexing="ij")
    for name, P in (("near_deterministic_0.95", Pd), ("bradley_terry_1.5_1_0.5_0", Pb)):
        H = metrics.entropy(simulate(P, A, B, L, init=np.full(4, 0.25))[-1])
        res[f"final_entropy_{name}"] = {"alpha": al, "beta": be, "lam": lm, "H[alpha][beta][lam]": H}
    # alpha = 1: monotone decrease to 0 (uniform start), several P, beta, lam
    rng = np.random.default_rng(1)
    mats = {"near_det": Pd, "bt": Pb, "helpsteer_strict": matrices.sample_helpsteer(rng, "strict_strongly_transitive"),
            "helpsteer_top_tie": matrices.sample_helpsteer(np.random.default_rng(0), "strongly_transitive")}
    bb, ll = np.meshgrid([0.5, 1.0, 4.0], [0.0, 0.5, 1.0])
    mono = {}
    fig, axs = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    for name, P in mats.items():
        tr = simulate(P, 1.0, bb, ll, init=np.full(4, 0.25), steps=3000)
        H = metrics.entropy(tr)
        mono[name] = {"strict_top": matrices.strict_top(P), "max_entropy_increase": float(np.diff(H, axis=0).max()),
                      "final_entropy_max": float(H[-1].max()), "final_entropy_min": float(H[-1].min())}
        for (i, j), ls in zip([(2, 1), (0, 1)], ["-", ":"]):
            axs[0].semilogy(np.maximum(H[:300, i, j], 1e-300), ls, label=f"{name} β={bb[i, j]:g} λ={ll[i, j]:g}")
    axs[0].set_ylim(1e-12, 2)
    axs[0].set_xlabel("round t")
    axs[0].set_ylabel("H(π_t) (nats)")
    axs[0].set_title("α = 1, strongly transitive P, uniform start")
    axs[0].legend(fontsize=6)
    res["alpha_one"] = mono
    # alpha < 1: the limit depends on beta / (1 - alpha) (and lam) only
    ratio = np.geomspace(0.5, 200, 40)
    for lam, c in zip([0.0, 0.5, 1.0], ["C0", "C1", "C2"]):
        for alpha, mk in zip([0.0, 0.5, 0.9], ["o", "x", "+"]):
            H = metrics.entropy(simulate(Pd, alpha, ratio * (1 - alpha), lam, init=np.full(4, 0.25), steps=3000)[-1])
            axs[1].semilogx(ratio, H, mk, color=c, ms=4, label=f"λ={lam:g}, α={alpha:g}")
    axs[1].set_xlabel("β / (1 − α)")
    axs[1].set_ylabel("final entropy")
    axs[1].set_title("α < 1: limit set by β/(1−α) and λ (P_ij=0.95)")
    axs[1].legend(fontsize=6, ncol=3)
    fig.savefig(FIG / "collapse_entropy.png", dpi=110)
    plt.close(fig)
    cfg = compose_config(["dynamics/matrix=transitive", "init=uniform"])
    g = run_grid(cfg, np.linspace(0, 1, 21), np.linspace(0, 20, 41), [0.0, 0.5, 1.0])
    plot_phase(g, "final_entropy", FIG / "transitive_ipo_final_entropy.png",
               "MRS-IPO exact · strongly transitive P_ij=0.95 (K=4) · T=3000", cfg)
    res["transitive_grid"] = grid_payload(g, "transitive_ipo")
    return res


# --- 4. Fig. 1 analogue: trajectories -----------------------------------------------------------------------------


def trajectories() -> dict:
    P = matrices.cyclic_matrix(0.4)
    cases = [("baseline α=0.5, β=2, λ=1", 0.5, 2.0), ("larger α=0.95, β=2", 0.95, 2.0), ("larger βλ: α=0.5, β=6", 0.5, 6.0)]
    fig, axs = plt.subplots(1, 3, figsize=(12, 3.2), sharey=True, constrained_layout=True)
    out = {}
    for ax, (name, a, b) in zip(axs, cases):
        pi = np.exp(simulate(P, a, b, 1.0, init=INIT3, steps=100))
        for k in range(3):
            ax.plot(pi[:, k], label=f"π(y{k + 1})")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round t")
        out[name] = {"rho_stated": float(theory.cycle_rho(a, b, 1.0, 0.4)), "pi_100": pi[-1]}
    axs[0].legend(fontsize=7)
    axs[0].set_ylabel("probability")
    fig.savefig(FIG / "trajectories_cycle.png", dpi=110)
    plt.close(fig)
    return out


# --- 5. MRS-DPO ----------------------------------------------------------------------------------------------------


def dpo() -> dict:
    cfg = compose_config(["method=dpo"])
    g = run_grid(cfg, np.linspace(0, 1, 21), np.linspace(0.2, 4, 39), [0.5, 1.0])
    for m in ("oscillation", "final_entropy"):
        plot_phase(g, m, FIG / f"cycle_dpo_{m}.png", "MRS-DPO exact (u = β log π/π_ref) · 3-cycle a=0.4", cfg)
    osc = g["oscillation"] > OSC_TOL
    unstable = g["cycle_rho_dpo_derived"] > 1
    dis = np.argwhere(osc != unstable)
    Pd = matrices.transitive_matrix(4, 0.95)
    H = metrics.entropy(simulate(Pd, 1.0, np.array([0.25, 1.0, 4.0]), 1.0, init=np.full(4, 0.25), method="dpo",
                                 steps=3000)[-1])
    Hb = metrics.entropy(simulate(Pd, 0.5, np.array([0.25, 1.0, 4.0]), np.array([[0.0], [1.0]]),
                                  init=np.full(4, 0.25), method="dpo")[-1])
    # "direct" convention (log ratio = beta u): derived threshold beta* = beta*_IPO / 4; check +-5 % at alpha = 0.5
    bd = float(theory.cycle_beta_threshold(0.5, 1.0, 0.4)) / 4
    od = metrics.oscillation_strength(simulate(matrices.cyclic_matrix(0.4), 0.5, np.array([0.95 * bd, 1.05 * bd]), 1.0,
                                               init=INIT3, method="dpo", dpo_scale="direct"))
    return {"direct_scale_alpha0.5_beta*": bd, "direct_scale_oscillation_at_0.95_1.05_beta*": od,
            "grid": grid_payload(g, "cycle_dpo"), "cells": int(osc.size), "cells_disagreeing_with_derived_threshold": int(len(dis)),
            "disagreeing_cells_rho": sorted(float(g["cycle_rho_dpo_derived"][tuple(i)]) for i in dis),
            "transitive_alpha1_lam1_final_entropy_beta_0.25_1_4": H,
            "transitive_alpha0.5_final_entropy_[lam0,lam1]x[beta_0.25_1_4]": Hb}


# --- 6. finite samples -----------------------------------------------------------------------------------------


def finite_samples() -> dict:
    P = matrices.cyclic_matrix(0.4)
    betas = np.linspace(2.0, 6.0, 17)
    res = {"alpha": 0.5, "lam": 1.0, "betas": betas, "beta_star_stated": float(theory.cycle_beta_threshold(0.5, 1, 0.4))}
    fig, axs = plt.subplots(1, 2, figsize=(10, 3.5), constrained_layout=True)
    ex = metrics.oscillation_strength(simulate(P, 0.5, betas, 1.0, init=INIT3))
    axs[0].semilogy(betas, np.maximum(ex, 1e-12), "k-o", ms=3, label="exact")
    res["exact"] = ex
    for n in (32, 128, 512, 2048):
        osc = np.mean([metrics.oscillation_strength(simulate(P, 0.5, betas, 1.0, init=INIT3, variant="finite",
                                                             samples=n, seed=s)) for s in range(4)], axis=0)
        res[f"samples_{n}"] = osc
        axs[0].semilogy(betas, osc, "-o", ms=3, label=f"finite n={n} (winrate)")
    axs[0].axvline(res["beta_star_stated"], color="grey", ls="--", lw=1)
    axs[0].set_xlabel("β")
    axs[0].set_ylabel("oscillation strength")
    axs[0].set_title("3-cycle, α=0.5, λ=1: sampling noise vs threshold")
    axs[0].legend(fontsize=7)
    # averaging over seeds hides the cycle: random phases cancel
    runs = np.exp(np.stack([simulate(P, 0.5, 5.0, 1.0, init=INIT3, variant="finite", samples=512, seed=s,
                                     steps=400)[:, 0] for s in range(20)]))
    for r in runs[:3]:
        axs[1].plot(r, lw=0.7, alpha=0.7)
    axs[1].plot(runs.mean(0), "k", lw=2, label="mean of 20 seeds")
    axs[1].set_xlabel("round t")
    axs[1].set_ylabel("π_t(y1)")
    axs[1].set_title("finite n=512, β=5: individual runs vs seed average")
    axs[1].legend(fontsize=7)
    fig.savefig(FIG / "finite_samples.png", dpi=110)
    plt.close(fig)
    tail = runs[:, 200:]
    res["seed_average_hides_oscillation"] = {"mean_individual_tail_variance": float(tail.var(axis=1).mean()),
                                             "tail_variance_of_seed_mean": float(runs.mean(0)[200:].var())}
    return res


# --- 7. HelpSteer-like ensembles ------------------------------------------------------------------------------


def helpsteer(n_draw: int = 20000, n_mat: int = 40) -> dict:
    rng = np.random.default_rng(2)
    draws = [matrices.helpsteer_like(rng, K=4) for _ in range(n_draw)]
    cyc = [P for P in draws if matrices.is_cyclic(P)]
    st = [P for P in draws if matrices.is_strongly_transitive(P)]
    res = {"draws": n_draw, "cyclic": len(cyc), "strongly_transitive": len(st),
           "strongly_transitive_strict_top": sum(matrices.strict_top(P) for P in st)}
    al = np.array([0.0, 0.25, 0.5, 0.75, 0.9, 0.97, 1.0])
    be = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    A, B = np.meshgrid(al, be, indexing="ij")
    start = np.array([0.28, 0.26, 0.24, 0.22])
    osc = np.mean([metrics.oscillation_strength(simulate(P, A, B, 1.0, init=start)) for P in cyc[:n_mat]], 0)
    strict = [P for P in st if matrices.strict_top(P)][:n_mat]
    tied = [P for P in st if not matrices.strict_top(P)][:n_mat]
    H = np.mean([metrics.entropy(simulate(P, A, B, 1.0, init=np.full(4, 0.25))[-1]) for P in strict], 0)
    Ht = np.mean([metrics.entropy(simulate(P, A, B, 1.0, init=np.full(4, 0.25))[-1]) for P in tied], 0)
    res.update(alpha=al, beta=be, lam=1.0, mean_oscillation_cyclic=osc, mean_final_entropy_strict_top=H,
               mean_final_entropy_top_tie=Ht)
    fig, axs = plt.subplots(1, 2, figsize=(10, 3.5), constrained_layout=True)
    for j, b in enumerate(be):
        axs[0].semilogy(al, np.maximum(osc[:, j], 1e-12), "-o", ms=3, label=f"β={b:g}")
        axs[1].plot(al, H[:, j], "-o", ms=3, color=f"C{j}", label=f"β={b:g}")
        axs[1].plot(al, Ht[:, j], ":", color=f"C{j}")
    axs[0].set_title(f"cyclic HelpSteer-like P (mean of {min(n_mat, len(cyc))}), λ=1")
    axs[0].set_ylabel("oscillation strength")
    axs[1].set_title(f"strongly transitive HelpSteer-like P, λ=1\nsolid: strict top ({len(strict)}), dotted: tie at top "
                     f"({len(tied)})", fontsize=9)
    axs[1].set_ylabel("final entropy")
    for ax in axs:
        ax.set_xlabel("α")
        ax.legend(fontsize=7)
    fig.savefig(FIG / "helpsteer_aggregate.png", dpi=110)
    plt.close(fig)
    return res


# --- 8. one-shot ranking axioms -----------------------------------------------------------------------------------


def axiom_stats(n: int = 3000) -> dict:
    rng = np.random.default_rng(3)
    K = 4
    u = np.full(K, 1 / K)
    c = {k: 0 for k in ("condorcet", "uniform_condorcet_fail", "condorcet_sampler_ok", "nontrivial_smith",
                        "uniform_smith_fail", "ml_smith_fail", "lp_smith_ok", "transitive_not_strong",
                        "uniform_order_fail_not_strong", "strongly_transitive", "random_mu_order_fail_strong")}
    for _ in range(n):
        P = matrices.helpsteer_like(rng, K=K)
        pi_u = oneshot.ipo_optimum(P, u, u, 1.0)
        if axioms.condorcet_winner(P) is not None:
            c["condorcet"] += 1
            c["uniform_condorcet_fail"] += not axioms.condorcet_top(P, pi_u)
            c["condorcet_sampler_ok"] += bool(axioms.condorcet_top(P, oneshot.ipo_optimum(P, oneshot.condorcet_sampler(P), u, 1.0)))
        S = axioms.smith_set(P)
        if len(S) < K:
            c["nontrivial_smith"] += 1
            c["uniform_smith_fail"] += not axioms.smith_top(P, pi_u)
            c["ml_smith_fail"] += not axioms.smith_top(P, oneshot.ipo_optimum(P, oneshot.maximal_lottery(P), u, 1.0))
            mu, margin = oneshot.top_set_sampler(P, S)
            c["lp_smith_ok"] += bool(margin > 0 and axioms.smith_top(P, oneshot.ipo_optimum(P, mu, u, 1.0)))
        if axioms.majority_order(P) is not None:
            if matrices.is_strongly_transitive(P):
                c["strongly_transitive"] += 1
                c["random_mu_order_fail_strong"] += not all(
                    axioms.order_preserving(P, oneshot.ipo_optimum(P, m, u, 2.0)) for m in rng.dirichlet(np.ones(K), 5))
            else:
                c["transitive_not_strong"] += 1
                c["uniform_order_fail_not_strong"] += not axioms.order_preserving(P, pi_u)
    counter = 0
    for _ in range(200):
        mu = rng.dirichlet(np.ones(5))
        P = axioms.axiom_counterexample(mu)
        counter += set(axioms.check_axioms(P, oneshot.ipo_optimum(P, mu, np.full(5, 0.2), 1.0)).values()) == {False}
    return {"helpsteer_K4_draws": n, **c, "counterexample_all_three_violated": f"{counter}/200"}


def hydra_crosscheck(hydra_dir: Path | None) -> dict:
    if hydra_dir is None or not hydra_dir.exists():
        return {"skipped": "no --hydra-dir"}
    hg = grid_from_results(load_results(hydra_dir))
    cfg = compose_config([])
    g = run_grid(cfg, hg["alphas"], hg["betas"], hg["lams"])
    return {"jobs": int(np.isfinite(hg["oscillation"]).sum()),
            "max_abs_diff_oscillation": float(np.nanmax(np.abs(hg["oscillation"] - g["oscillation"]))),
            "max_abs_diff_final_entropy": float(np.nanmax(np.abs(hg["final_entropy"] - g["final_entropy"])))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hydra-dir", type=Path, default=None)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    FIG.mkdir(parents=True, exist_ok=True)
    path = HERE / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    steps = {"cycle_ipo_phase": cycle_ipo_phase, "threshold_table": threshold_table,
             "contraction_check": contraction_check, "collapse": collapse, "trajectories": trajectories, "dpo": dpo,
             "finite_samples": finite_samples, "helpsteer": helpsteer, "axioms": axiom_stats,
             "hydra_crosscheck": lambda: hydra_crosscheck(args.hydra_dir)}
    for name, fn in steps.items():
        if args.only and name not in args.only:
            continue
        t = time.time()
        results[name] = r4(fn())
        print(f"{name}: {time.time() - t:.1f}s", flush=True)
        path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
