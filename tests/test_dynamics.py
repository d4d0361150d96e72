"""Tabular MRS-IPO / MRS-DPO simulator (alignlab.dynamics): one-shot optima, axioms, stated thresholds, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alignlab.dynamics import axioms, matrices, metrics, oneshot, theory
from alignlab.dynamics.mrs import exact_map, fixed_point, simulate, spectral_radius, tangent_jacobian
from alignlab.dynamics.run import run_grid, run_one

ROOT = Path(__file__).resolve().parents[1]


def _random_P(rng: np.random.Generator, K: int) -> np.ndarray:
    """A generic (non-BT, usually intransitive) preference matrix."""
    U = rng.uniform(0.02, 0.98, size=(K, K))
    P = np.triu(U, 1) + np.tril(1 - U.T, -1)
    np.fill_diagonal(P, 0.5)
    return matrices.validate(P)


torch.set_num_threads(1)


def _gd(loss_fn, K: int, steps: int = 800, lr: float = 0.2) -> np.ndarray:
    """Minimise a loss of logits by (heavy-ball) gradient descent with torch autograd, independent of the closed forms."""
    z = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([z], lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(z).backward()
        opt.step()
    return torch.softmax(z.detach(), 0).numpy()


# --- one-shot optima -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ipo_closed_form_matches_gradient_descent(seed: int) -> None:
    rng = np.random.default_rng(seed)
    K, beta = 5, [0.5, 2.0, 6.0][seed]
    P = _random_P(rng, K)
    mu = rng.dirichlet(np.full(K, 3.0))
    pref = rng.dirichlet(np.full(K, 3.0))
    Pt, mut, lref = (torch.tensor(x) for x in (P, mu, np.log(pref)))

    def loss(z: torch.Tensor) -> torch.Tensor:
        g = torch.log_softmax(z, 0) - lref
        h = g[:, None] - g[None, :]
        return (mut[:, None] * mut[None, :] * (h - beta * (Pt - 0.5)) ** 2).sum()

    pi_gd = _gd(loss, K)
    pi_cf = oneshot.ipo_optimum(P, mu, pref, beta)
    np.testing.assert_allclose(pi_gd, pi_cf, atol=1e-6)
    assert oneshot.ipo_population_loss(np.log(pi_cf), P, mu, pref, beta) <= loss(torch.log(torch.tensor(pi_gd))).item() + 1e-9
    # the sampler moves the optimum itself (not just the variance): another mu, another pi*
    assert np.abs(oneshot.ipo_optimum(P, rng.dirichlet(np.ones(K)), pref, beta) - pi_cf).max() > 1e-3


def test_ipo_general_pair_distribution_matches_gradient_descent() -> None:
    rng = np.random.default_rng(3)
    K, beta = 4, 3.0
    P = _random_P(rng, K)
    W = rng.dirichlet(np.ones(K * K)).reshape(K, K)  # non-product pair distribution
    pref = np.full(K, 1 / K)
    Pt, Wt = torch.tensor(P), torch.tensor(W)

    def loss(z: torch.Tensor) -> torch.Tensor:
        g = torch.log_softmax(z, 0)
        return (Wt * (g[:, None] - g[None, :] - beta * (Pt - 0.5)) ** 2).sum()

    np.testing.assert_allclose(_gd(loss, K, lr=0.5), oneshot.ipo_optimum_pairs(P, W, pref, beta), atol=1e-6)
    mu = rng.dirichlet(np.ones(K))  # product case reduces to the closed form
    np.testing.assert_allclose(oneshot.ipo_optimum_pairs(P, np.outer(mu, mu), pref, beta),
                               oneshot.ipo_optimum(P, mu, pref, beta), atol=1e-10)


def test_dpo_optimum_is_stationary_and_sampling_invariant_iff_bt() -> None:
    rng = np.random.default_rng(4)
    K, beta = 4, 0.5
    pref = rng.dirichlet(np.full(K, 3.0))
    P = _random_P(rng, K)
    mu = rng.dirichlet(np.full(K, 3.0))
    Pt, mut, lref = torch.tensor(P), torch.tensor(mu), torch.tensor(np.log(pref))

    def loss(z: torch.Tensor) -> torch.Tensor:
        u = beta * (torch.log_softmax(z, 0) - lref)
        d = u[:, None] - u[None, :]
        return -(mut[:, None] * mut[None, :] * (Pt * torch.nn.functional.logsigmoid(d))).sum()

    z = torch.tensor(np.log(oneshot.dpo_optimum(P, mu, pref, beta)), requires_grad=True)
    loss(z).backward()  # autograd gradient of the population DPO loss vanishes at the Newton solution...
    assert z.grad.abs().max().item() < 1e-10
    with torch.no_grad():  # ...which is the global minimum (convex in u)
        assert all(loss(z + 0.05 * torch.randn(K, dtype=torch.float64)) > loss(z) for _ in range(20))
    mus = rng.dirichlet(np.ones(K), size=3)
    bt = matrices.bradley_terry([1.0, 0.3, -0.2, -1.5])
    outs = [oneshot.dpo_optimum(bt, m, pref, beta) for m in mus]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-9)
    np.testing.assert_allclose(outs[0], pref * np.exp(np.array([1.0, 0.3, -0.2, -1.5]) / beta) /
                               (pref * np.exp(np.array([1.0, 0.3, -0.2, -1.5]) / beta)).sum(), atol=1e-9)
    non_bt = [oneshot.dpo_optimum(P, m, pref, beta) for m in mus]
    assert np.abs(non_bt[0] - non_bt[1]).max() > 1e-3
    ipo_bt = [oneshot.ipo_optimum(bt, m, pref, 2.0) for m in mus]  # IPO stays sampler-dependent even under BT
    assert np.abs(ipo_bt[0] - ipo_bt[1]).max() > 1e-3


# --- ranking axioms --------------------------------------------------------------------------------------------


def test_axiom_primitives() -> None:
    cyc = matrices.cyclic_matrix(0.4)
    assert axioms.condorcet_winner(cyc) is None and axioms.smith_set(cyc) == [0, 1, 2]
    assert axioms.majority_order(cyc) is None and matrices.is_cyclic(cyc)
    np.testing.assert_allclose(oneshot.maximal_lottery(cyc), np.full(3, 1 / 3), atol=1e-12)
    tr = matrices.transitive_matrix(4, 0.8)
    assert axioms.condorcet_winner(tr) == 0 and axioms.smith_set(tr) == [0]
    assert axioms.majority_order(tr) == [0, 1, 2, 3] and matrices.is_strongly_transitive(tr)
    np.testing.assert_allclose(oneshot.maximal_lottery(tr), [1, 0, 0, 0], atol=1e-12)
    # 3-cycle on top of a dominated 4th response: Smith set is the cycle
    P = np.full((4, 4), 0.5)
    P[:3, :3] = cyc
    P[:3, 3], P[3, :3] = 0.7, 0.3
    assert axioms.smith_set(P) == [0, 1, 2] and axioms.condorcet_winner(P) is None
    assert axioms.check_axioms(P, [0.3, 0.3, 0.3, 0.1]) == {"condorcet_top": None, "smith_top": True,
                                                          "order_preserving": None}


def test_no_fixed_sampler_satisfies_the_axioms() -> None:
    rng = np.random.default_rng(5)
    for K in (3, 4, 6):
        for _ in range(10):
            mu = rng.dirichlet(np.ones(K))
            P = axioms.axiom_counterexample(mu, eps=0.05)
            assert axioms.majority_order(P) is not None  # transitive, so all three axioms apply
            res = axioms.check_axioms(P, oneshot.ipo_optimum(P, mu, np.full(K, 1 / K), 1.0))
            assert res == {"condorcet_top": False, "smith_top": False, "order_preserving": False}


def test_instance_dependent_samplers_and_strong_transitivity() -> None:
    rng = np.random.default_rng(6)
    n_smith = 0
    for _ in range(150):
        P = matrices.helpsteer_like(rng, K=4)
        u = np.full(4, 1 / 4)
        mu_c = oneshot.condorcet_sampler(P)
        if mu_c is not None:
            assert axioms.condorcet_top(P, oneshot.ipo_optimum(P, mu_c, u, 1.0))
        S = axioms.smith_set(P)
        if len(S) < 4:
            mu, margin = oneshot.top_set_sampler(P, S)
            assert margin > 0 and axioms.smith_top(P, oneshot.ipo_optimum(P, mu, u, 1.0))
            n_smith += 1
        if matrices.is_strongly_transitive(P) and axioms.majority_order(P) is not None:
            for mu in rng.dirichlet(np.ones(4), size=5):  # any full-support sampler preserves the order
                assert axioms.order_preserving(P, oneshot.ipo_optimum(P, mu, u, 2.0))
    assert n_smith > 20


# --- iterative dynamics: acceptance checks ---------------------------------------------------------------------


@pytest.mark.parametrize("a,lam", [(0.4, 1.0), (0.4, 0.5), (0.25, 1.0)])
def test_three_cycle_threshold_from_both_sides(a: float, lam: float) -> None:
    P = matrices.cyclic_matrix(a)
    alphas = np.array([0.0, 0.3, 0.6, 0.9])
    bstar = theory.cycle_beta_threshold(alphas, lam, a)
    np.testing.assert_allclose(theory.cycle_rho(alphas, bstar, lam, a), 1.0)
    below = simulate(P, alphas, 0.95 * bstar, lam, init=[0.36, 0.33, 0.31])
    above = simulate(P, alphas, 1.05 * bstar, lam, init=[0.36, 0.33, 0.31])
    u = np.full(3, 1 / 3)
    d_below = metrics.tv_distance(np.exp(below[-1]), u)
    d_above = metrics.tv_distance(np.exp(above[1000:]), u).min(axis=0)
    assert np.all(d_below < 1e-8), d_below
    assert np.all(metrics.oscillation_strength(below) < 1e-12)
    assert np.all(d_above > 1e-3), d_above  # stays away from the (unstable) uniform fixed point...
    assert np.all(metrics.oscillation_strength(above) > 1e-6)  # ...and keeps rotating
    assert np.all(metrics.tail_movement(above) > 1e-4)
    # linearisation: numeric Jacobian at the uniform point has the stated spectral radius
    for al, b in [(0.3, 1.05 * bstar[1]), (0.9, 0.95 * bstar[3])]:
        f = exact_map(P, al, b, lam, u, u)
        assert spectral_radius(tangent_jacobian(f, np.log(u))) == pytest.approx(theory.cycle_rho(al, b, lam, a), 1e-6)


def test_entropy_decreases_monotonically_to_zero_at_alpha_one() -> None:
    rng = np.random.default_rng(7)
    mats = [matrices.transitive_matrix(4, 0.95), matrices.bradley_terry([1.5, 1.0, 0.5, 0.0]),
            matrices.sample_helpsteer(rng, "strict_strongly_transitive")]
    betas, lams = np.meshgrid([0.5, 1.0, 4.0], [0.0, 0.5, 1.0])
    for P in mats:
        assert matrices.is_strongly_transitive(P)
        top = int(np.argmax(P.sum(1)))
        traj = simulate(P, 1.0, betas, lams, init=np.full(4, 0.25), steps=2000)
        H = metrics.entropy(traj)
        assert np.all(np.diff(H, axis=0) <= 1e-12)  # monotone from the first round (uniform start)
        assert np.all(H[-1] < 1e-6), H[-1]
        assert np.all(np.argmax(traj[-1], axis=-1) == top)
        # from random interior starts the decrease is eventually monotone
        for init in rng.dirichlet(np.ones(4), size=3):
            h = metrics.entropy(simulate(P, 1.0, 1.0, 1.0, init=init, steps=2000))
            assert metrics.monotone_from(h) < 500 and h[-1] < 1e-6


def test_alpha_below_one_limits_entropy_but_feedback_sharpens() -> None:
    P = matrices.transitive_matrix(4, 0.95)
    H = metrics.entropy(simulate(P, np.array([0.5, 0.8]), 4.0, np.array([[0.0], [0.5], [1.0]]), init=np.full(4, 0.25))[-1])
    assert np.all(H > 0) and np.all(np.diff(H, axis=0) < 0)  # more on-policy sampling -> lower entropy
    np.testing.assert_allclose(H[:, 0], [0.531, 0.393, 0.348], atol=2e-3)  # our numerical check [N], not the paper's
    # only beta / (1 - alpha) matters for the limit: (0, 4) and (0.5, 2) agree
    tr = simulate(P, np.array([0.0, 0.5]), np.array([4.0, 2.0]), 0.5, init=np.full(4, 0.25))
    np.testing.assert_allclose(np.exp(tr[-1, 0]), np.exp(tr[-1, 1]), atol=1e-10)


def test_convergence_whenever_contraction_condition_holds() -> None:
    rng = np.random.default_rng(8)
    makers = [lambda: _random_P(rng, 5), lambda: matrices.helpsteer_like(rng, K=4),
              lambda: matrices.cyclic_matrix(rng.uniform(0.1, 0.5)), lambda: matrices.transitive_matrix(4, 0.99)]
    for case in range(16):
        P = makers[case % 4]()
        K = len(P)
        alpha, lam = rng.uniform(0, 0.95), rng.uniform(0.05, 1)
        target = rng.uniform(alpha + 0.01, 0.97)  # bound in (alpha, 0.97]
        beta = 2 * (target - alpha) / (lam * matrices.skew_norm(P))
        assert theory.contraction_bound(P, alpha, beta, lam) < 1
        pref, pi0 = rng.dirichlet(np.ones(K)), rng.dirichlet(np.ones(K))
        inits = rng.dirichlet(np.full(K, 0.5), size=2)
        ends = [np.exp(simulate(P, alpha, beta, lam, init=i, pref=pref, pi0=pi0, steps=1200)[-1]) for i in inits]
        fp = fixed_point(exact_map(P, alpha, beta, lam, pref, pi0), np.log(pref))
        assert fp is not None
        for e in ends:
            assert metrics.tv_distance(e, np.exp(fp)) < 1e-9, (case, alpha, beta, lam)
        assert spectral_radius(tangent_jacobian(exact_map(P, alpha, beta, lam, pref, pi0), fp)) < 1


def test_dpo_three_cycle_matches_derived_threshold() -> None:
    a, lam, alpha = 0.4, 1.0, 0.5
    bstar_ipo = theory.cycle_beta_threshold(alpha, lam, a)  # IPO beta_eff at the threshold
    P = matrices.cyclic_matrix(a)
    b_inv = 4.0 / bstar_ipo  # DPO(u = beta log ratio) is unstable for beta < 4 / beta*_IPO
    tr = simulate(P, alpha, np.array([1.08 * b_inv, 0.92 * b_inv]), lam, init=[0.36, 0.33, 0.31], method="dpo",
                  steps=800)
    osc = metrics.oscillation_strength(tr, 300)
    assert osc[0] < 1e-12 and osc[1] > 1e-6


def test_finite_sample_variant_tracks_exact_with_many_samples() -> None:
    P = matrices.transitive_matrix(4, 0.9)
    exact = np.exp(simulate(P, 0.5, 2.0, 1.0, init=np.full(4, 0.25), steps=40)[-1])
    for est in ("winrate", "erm"):
        fin = np.exp(simulate(P, 0.5, 2.0, 1.0, init=np.full(4, 0.25), steps=40, variant="finite", samples=200_000,
                              estimator=est, seed=1)[-1])
        assert metrics.tv_distance(fin, exact) < 0.01
    few = simulate(P, 0.5, 2.0, 1.0, init=np.full(4, 0.25), steps=40, variant="finite", samples=16, seed=1)
    assert metrics.tv_distance(np.exp(few[-1]), exact) > 1e-3
    dpo = simulate(P, 0.5, 0.5, 1.0, init=np.full(4, 0.25), steps=20, method="dpo", variant="finite", samples=64,
                   seed=2, ridge=1e-3)
    assert np.all(np.isfinite(dpo))


# --- config, CLI, phase diagrams -------------------------------------------------------------------------------


def test_grid_and_single_run_agree() -> None:
    from alignlab.dynamics.phase import compose_config

    cfg = compose_config(["steps=400", "burn_in=100"])
    grid = run_grid(cfg, [0.5, 0.9], [1.0, 4.0], [1.0])
    one = run_one(cfg | {"alpha": 0.9, "beta": 4.0, "lam": 1.0})
    assert one["metrics"]["oscillation"] == pytest.approx(grid["oscillation"][1, 1, 0], rel=1e-12)
    assert one["metrics"]["final_entropy"] == pytest.approx(grid["final_entropy"][1, 1, 0], rel=1e-12)
    assert one["theory"]["cycle_rho"] == pytest.approx(theory.cycle_rho(0.9, 4.0, 1.0, 0.4))
    assert one["fixed_point"]["found"]


def test_cli_multirun_and_phase_pngs(tmp_path: Path) -> None:
    sweep = tmp_path / "mr"
    cmd = [sys.executable, "-m", "alignlab.dynamics.cli", "-m", "alpha=0.5,1", "beta=1,5", "lam=1", "steps=300",
           "burn_in=100", f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=120)
    results = sorted(sweep.rglob("result.json"))
    assert len(results) == 4
    r = json.loads(results[0].read_text())
    assert {"params", "metrics", "fixed_point", "theory", "oneshot", "P"} <= set(r)
    from alignlab.dynamics import phase

    paths = phase.main([str(sweep), "--out", str(tmp_path / "figs"), "--name", "t"])
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert paths[0].read_bytes()[:4] == b"\x89PNG"
