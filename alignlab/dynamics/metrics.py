"""Trajectory metrics: oscillation strength, final entropy, distance to the fixed point.

The first two are the metrics reported for the experiments of "How Sampling Shapes LLM Alignment: From One-Shot
Optima to Iterative Dynamics" (arXiv 2602.12180) [S]: time-averaged variance of the policy and Shannon entropy at the
final iteration. Distance to the fixed point is ours.

Trajectories are log-probabilities of shape (T + 1, *batch, K); every metric reduces time (and K) only.
"""

from __future__ import annotations

import numpy as np

Array = np.ndarray


def entropy(logp: Array) -> Array:
    """Shannon entropy in nats; computed from log pi so collapsed coordinates (pi = 0) contribute exactly 0."""
    p = np.exp(logp)
    return 0.0 - np.sum(np.where(p > 0, p * logp, 0.0), axis=-1)


def oscillation_strength(logp_traj: Array, burn_in: int = 1000) -> Array:
    """Time-averaged variance of the policy: var over t >= burn_in of pi_t(y), averaged over y.

    Averaging over y is our choice. It matches our numerical check [N] (e.g. 3-cycle, a = 0.4, alpha = 0.5,
    beta = 3.8: ~4e-3).
    """
    tail = np.exp(logp_traj[burn_in:])
    return tail.var(axis=0).mean(axis=-1)


def tv_distance(p: Array, q: Array) -> Array:
    """Total-variation distance, the scale-free distance used for 'distance to the fixed point'."""
    return 0.5 * np.sum(np.abs(np.asarray(p) - np.asarray(q)), axis=-1)


def tail_movement(logp_traj: Array, window: int = 50) -> Array:
    """Largest per-round TV move over the last ``window`` rounds: ~0 iff the run has settled on a point."""
    tail = np.exp(logp_traj[-window - 1:])
    return np.max(tv_distance(tail[1:], tail[:-1]), axis=0)


def monotone_from(values: Array, tol: float = 1e-12) -> int:
    """First index after which a 1-D series never increases by more than tol (len(values) if it never settles)."""
    v = np.asarray(values)
    ups = np.flatnonzero(np.diff(v) > tol)
    return int(ups[-1] + 1) if len(ups) else 0


def summarize(logp_traj: Array, burn_in: int = 1000, window: int = 50) -> dict[str, Array]:
    """The per-run (or per-grid-cell) numbers the CLI and the phase diagrams report."""
    last = logp_traj[-1]
    return {
        "oscillation": oscillation_strength(logp_traj, burn_in),
        "final_entropy": entropy(last),
        "mean_entropy_tail": entropy(logp_traj[burn_in:]).mean(axis=0),
        "min_prob_tail": np.exp(logp_traj[burn_in:]).min(axis=(0, -1)),
        "tail_movement": tail_movement(logp_traj, window),
    }
