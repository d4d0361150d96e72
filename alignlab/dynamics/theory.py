"""Stated (and derived) stability thresholds, to draw on phase diagrams and to test against.

Tags: the 3-cycle threshold and the contraction bound are stated for "How Sampling Shapes LLM Alignment: From
One-Shot Optima to Iterative Dynamics" (arXiv 2602.12180) [S]; the MRS-DPO 3-cycle threshold is our own
linearisation [I] (we found no DPO thresholds stated for the paper).
"""

from __future__ import annotations

import numpy as np

from alignlab.dynamics.matrices import skew_norm

Array = np.ndarray


def cycle_rho(alpha: Array | float, beta: Array | float, lam: Array | float, a: float) -> Array:
    """|eigenvalue| of MRS-IPO at the uniform fixed point of the 3-cycle: sqrt(alpha^2 + a^2 beta^2 lam^2 / 3)."""
    return np.sqrt(np.asarray(alpha) ** 2 + (a * np.asarray(beta) * np.asarray(lam)) ** 2 / 3.0)


def cycle_beta_threshold(alpha: Array | float, lam: Array | float, a: float) -> Array:
    """beta at which the 3-cycle's uniform point loses stability (inf when lam = 0; 0 when alpha >= 1)."""
    alpha = np.asarray(alpha, dtype=float)
    lam = np.asarray(lam, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(alpha >= 1, 0.0, np.sqrt(np.clip(3.0 * (1 - alpha**2), 0, None)) / (a * lam))


def contraction_bound(P: Array, alpha: Array | float, beta: Array | float, lam: Array | float) -> Array:
    """alpha + (beta lam / 2) ||P - 11^T/2||_2; below 1 the IPO round is a contraction (sufficient, not necessary)."""
    return np.asarray(alpha) + 0.5 * np.asarray(beta) * np.asarray(lam) * skew_norm(P)


def dpo_cycle_effective_beta(beta: Array | float, dpo_scale: str = "inverse") -> Array:
    """IPO-equivalent beta of MRS-DPO near the 3-cycle's uniform point [I].

    Linearising sum_y' mu_y' (sigmoid(u_y - u_y') - P_yy') = 0 at u = 0, mu uniform gives du = 4 a S dmu, versus
    beta a S dmu for IPO; so DPO behaves like IPO with beta_eff = 4/beta (u = beta log ratio) or 4 beta ("direct").
    """
    beta = np.asarray(beta, dtype=float)
    return 4.0 / beta if dpo_scale == "inverse" else 4.0 * beta


def dpo_cycle_rho(alpha: Array | float, beta: Array | float, lam: Array | float, a: float,
                  dpo_scale: str = "inverse") -> Array:
    """Derived [I] linear growth factor of MRS-DPO at the 3-cycle's uniform point."""
    return cycle_rho(alpha, dpo_cycle_effective_beta(beta, dpo_scale), lam, a)
