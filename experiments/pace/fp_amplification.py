"""Check the false-positive amplification formulas for PACE against a Monte-Carlo simulation.

PACE ("PACE: Defying the Scaling Hypothesis of Exploration in Iterative Alignment for Mathematical Reasoning",
arXiv 2602.05370) STATES only qualitatively that "scaling N amplifies verifier noise"; the formulas below are our
reconstruction of it.

Model (INFERRED): a prompt's samples are truly correct with probability p; the verifier accepts a
wrong sample with probability eps (one-sided defect) and every correct one. Best-of-N keeps a prompt when some
sample is verified, and its chosen sample is a false positive (FP) when the verified set holds no truly correct
sample ("oracle tie-break", the formula's assumption). Formulas checked:

    P[>=1 FP among N]          = 1 - (1 - (1-p) eps)^N
    P[chosen is FP | kept]     = (1-p)^N (1 - (1-eps)^N) / (1 - (1-q)^N),   q = p + (1-p) eps

and, for the realistic pick the formula does not cover (the chosen sample drawn at random among the verified
ones, since the verifier cannot tell a true positive from a false one; with or without DPO-R1's max_min filter,
which also needs a verified-wrong sample to reject), our own closed forms:

    P[chosen is FP | kept]     = (1-p) eps / q                      (each verified sample is FP independently)
    corrupted pairs per prompt = (1 - q^N - (1-q)^N) (1-p) eps / q  (max_min: a mixed prompt, then a FP chosen)

Usage: python experiments/pace/fp_amplification.py [trials]
"""

from __future__ import annotations

import sys

import numpy as np


def p_any_fp(p: float, eps: float, n: int) -> float:
    return 1.0 - (1.0 - (1.0 - p) * eps) ** n


def fp_share_formula(p: float, eps: float, n: int) -> float:
    q = p + (1.0 - p) * eps
    kept = 1.0 - (1.0 - q) ** n
    return (1.0 - p) ** n * (1.0 - (1.0 - eps) ** n) / kept if kept > 0 else float("nan")


def fp_share_random(p: float, eps: float) -> float:
    q = p + (1.0 - p) * eps
    return (1.0 - p) * eps / q if q > 0 else float("nan")


def corrupted_pairs(p: float, eps: float, n: int) -> float:
    q = p + (1.0 - p) * eps
    return (1.0 - q**n - (1.0 - q) ** n) * fp_share_random(p, eps)


def simulate(p: float, eps: float, n: int, trials: int, rng: np.random.Generator) -> dict[str, float]:
    """Monte-Carlo over ``trials`` prompts with ``n`` samples each."""
    true = rng.random((trials, n)) < p
    fp = ~true & (rng.random((trials, n)) < eps)
    verified = true | fp
    n_ver, n_true, n_fp = verified.sum(1), true.sum(1), fp.sum(1)
    kept = n_ver > 0
    oracle_fp = kept & (n_true == 0)
    random_fp = rng.random(trials) * np.maximum(n_ver, 1) < n_fp  # uniform pick among the verified
    mixed = kept & (n_ver < n)  # max_min: a verified chosen and a rejected exist
    with np.errstate(invalid="ignore"):
        return {
            "any_fp": float((n_fp > 0).mean()),
            "share_oracle": float(oracle_fp.sum() / max(1, kept.sum())),
            "share_random": float((random_fp & kept).sum() / max(1, kept.sum())),
            "share_maxmin": float((random_fp & mixed).sum() / max(1, mixed.sum())),
            "fp_pairs_per_prompt": float((random_fp & mixed).mean()),
            "kept": int(kept.sum()),
            "mixed": int(mixed.sum()),
        }


def _z(formula: float, mc: float, n: int) -> float:
    """|formula - MC| in binomial standard errors of the MC rate over ``n`` trials."""
    se = np.sqrt(max(formula * (1 - formula), 1e-12) / max(n, 1))
    return abs(formula - mc) / se if n else 0.0


def main(trials: int = 200_000, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    rows = ["| p | eps | N | P[>=1 FP] formula / MC | FP share, oracle pick: formula / MC "
            "| FP share, random pick: (1-p)eps/q / MC / MC max_min | corrupted pairs per prompt: formula / MC |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    worst = 0.0
    for p in (0.0, 0.05, 0.2, 0.5):
        for eps in (0.1, 0.2):
            for n in (2, 4, 8, 16):
                s = simulate(p, eps, n, trials, rng)
                f1, f2, f3, f4 = p_any_fp(p, eps, n), fp_share_formula(p, eps, n), fp_share_random(p, eps), \
                    corrupted_pairs(p, eps, n)
                worst = max(worst, _z(f1, s["any_fp"], trials), _z(f2, s["share_oracle"], s["kept"]),
                            _z(f3, s["share_random"], s["kept"]), _z(f3, s["share_maxmin"], s["mixed"]),
                            _z(f4, s["fp_pairs_per_prompt"], trials))
                rows.append(f"| {p} | {eps} | {n} | {f1:.4f} / {s['any_fp']:.4f} | {f2:.4f} / {s['share_oracle']:.4f} "
                            f"| {f3:.4f} / {s['share_random']:.4f} / {s['share_maxmin']:.4f} "
                            f"| {f4:.4f} / {s['fp_pairs_per_prompt']:.4f} |")
    rows.append("")
    rows.append(f"{trials} simulated prompts per cell (seed {seed}); largest |formula - MC| = {worst:.2f} binomial "
                f"standard errors over {len(rows) - 3} cells x 5 checks")
    return "\n".join(rows)


if __name__ == "__main__":
    print(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000))
