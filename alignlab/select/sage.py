"""``selector=sage``: stability-aware pair selection (SAGE, arXiv 2602.01207, "Not All
Preferences Are Created Equal: Stability-Aware and Gradient-Efficient Alignment for Reasoning Models").

Each pair gets a forward-pass score from its DPO margin z = beta * h (h = chosen minus rejected
log-ratio, summed or length-normalised) and, for the stability-aware form, from how uncertain that
margin is. Hard filtering keeps the top ceil(keep_ratio * n) pairs of the round's pool (``granularity=pool``, informative
when the reference is fixed), or, per optimiser step, the top pairs of an over-sampled candidate batch scored with
the *current* policy (``granularity=step``; needed with reference=previous_round, where every margin is 0 when the
round starts). Per step, a :class:`~alignlab.select.curriculum.KeepSchedule` carries the rounding over the epoch:
round(keep_ratio * candidates) pairs kept per epoch, each curriculum bucket within one pair of its stage share.

Score forms (g = sigmoid(-z) is the gradient signal, c = sigmoid(z) sigmoid(-z) the curvature):

* ``newton``   g^2 / (c + lam): the Newton decrement in the margin. Monotone in z (= ranking by margin).
* ``stable``   the same decrement with z ~ N(mu, s^2): E[g]^2 / (E[c] + Var[g] + lam); with s = 0 it equals
               ``newton``. s^2 is set by ``stability``:
               - ``token``: s^2 is the token-level variance of the margin (per-token log-ratio against the round's
                 start). Measured inert on the embedded task: ``stable`` ranked as ``newton``. Any variance fed into
                 this Gaussian form is: at z = 0 its value does not depend on s^2, and in-round margins stay near 0.
               - ``checkpoints`` (default, step granularity): the pool's margins are recorded every ``snapshot_every``
                 optimiser steps and at the start (an all-zero record, the start under reference=previous_round, is
                 not kept); over the last ``stability_window`` records plus the current margin each pair has a mean m
                 and variance v, and the score is newton(z) * rho, rho = (m^2 + eps^2) / (m^2 + eps^2 + w * v): the
                 squared signal-to-noise ratio of the margin as a weight in [0, 1]. It filters pairs whose margin sits
                 near 0 or changes sign across the records and leaves steady margins (rho = 1) at newton's rank, so
                 with no variance anywhere the ranking is newton's (``checkpoint_stable_score`` says why). Costs one
                 scoring pass over the pool per record (in the ledger as scoring tokens); any trainer.
* ``signal``   g only (ablation: no curvature, no stability).
* ``boundary`` c only (ablation: prefer pairs nearest the decision boundary, the opposite bet).

``curvature=false`` drops the curvature term from ``newton``/``stable`` (ablation "no curvature").
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from alignlab.records import Pair, Selected, write_jsonl
from alignlab.select import SelectorHooks, StepFilter
from alignlab.select.curriculum import Curriculum, KeepSchedule, top_k
from alignlab.train.callbacks import TrainerCallback, TrainState

log = logging.getLogger("alignlab")

_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(24)
_GH_W = _GH_W / _GH_W.sum()  # E[f(Z)], Z ~ N(0, 1)
SCORE_EDGES = [float(x) for x in np.arange(-6.0, 4.01, 0.5)]  # histogram bins of log10(score)
MARGIN_EDGES = [float(x) for x in np.arange(-8.0, 8.01, 0.5)]  # histogram bins of z


def keep_count(keep_ratio: float, n: int) -> int:
    """ceil(keep_ratio * n), robust to float error (0.6 * 5 is 3.0000000000000004, not 4)."""
    return min(n, math.ceil(keep_ratio * n - 1e-9))


def candidate_draw(batch_size: int, keep_ratio: float) -> int:
    """Candidates a per-step filter draws for a micro-batch of ``batch_size``: floor(batch_size / keep_ratio), so the
    kept pairs (round(keep_ratio * candidates) per epoch, :class:`KeepSchedule`) fill about one micro-batch."""
    return max(batch_size, math.floor(batch_size / keep_ratio + 1e-9))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=float)))


def newton_score(mu: np.ndarray, s2: np.ndarray, lam: float, curvature: bool = True) -> np.ndarray:
    g, c = sigmoid(-mu), sigmoid(mu) * sigmoid(-mu)
    return g**2 / (c * curvature + lam)


def stable_score(mu: np.ndarray, s2: np.ndarray, lam: float, curvature: bool = True) -> np.ndarray:
    z = np.asarray(mu, dtype=float)[:, None] + np.sqrt(np.maximum(s2, 0.0))[:, None] * _GH_X[None, :]
    g = sigmoid(-z)
    eg, eg2, ec = g @ _GH_W, (g**2) @ _GH_W, (g * sigmoid(z)) @ _GH_W
    return eg**2 / (ec * curvature + np.maximum(eg2 - eg**2, 0.0) + lam)


def margin_stability(history: np.ndarray, eps: float = 1e-6, weight: float = 1.0) -> np.ndarray:
    """Per pair, the share of its margin's second moment that its mean explains: m^2 / (m^2 + weight * v) over the
    recorded margins (rows: records, columns: pairs), with ``eps`` (a margin too small to tell from 0, in z
    units) added to m^2 so a margin that has not moved at all scores 1. Equal to snr^2 / (snr^2 + 1) with
    snr = |mean z| / sd z: 1 for a steady margin whatever its size, near 0 for a margin that sits near 0 or
    changes sign across the records. Dimensionless, so it is the same for margins of 0.01 and of 10."""
    h = np.atleast_2d(np.asarray(history, dtype=float))
    m2, v = h.mean(axis=0) ** 2 + eps**2, h.var(axis=0)
    return m2 / (m2 + weight * v)


def checkpoint_stable_score(mu: np.ndarray, history: np.ndarray, lam: float, curvature: bool = True,
                            weight: float = 1.0, eps: float = 1e-6) -> np.ndarray:
    """SAGE's stability-aware score: the Newton decrement of the current margin times the margin's stability
    over recent checkpoints, ``newton(mu) * rho``, rho = (m^2 + eps^2) / (m^2 + eps^2 + weight * v) from the
    records ``history`` (records x pairs; m, v: each pair's mean and variance over them).

    Why this form (SAGE, "Not All Preferences Are Created Equal: Stability-Aware and Gradient-Efficient Alignment
    for Reasoning Models", arXiv 2602.01207): the abstract says the score "prioritizes informative, confident errors
    while filtering out unstable samples" to raise the signal-to-noise ratio of the updates. The Newton decrement
    g^2 / (c + lam) ranks confident errors (z << 0) first and solved pairs (z >> 0) last, but it is a function of
    the current margin alone. rho is the squared SNR of the margin, snr^2 / (snr^2 + 1/weight): a pair whose
    margin sits near 0 or flips sign between checkpoints (the "uncertain decision boundary" of the abstract) has
    snr near 0 and is filtered; a steady margin has rho = 1 and keeps its decrement. Being a ratio of the margin's
    own moments it is scale-aware without a batch normaliser: when no pair's margin varies, every rho is 1 and the
    ranking is exactly newton's (an earlier form divided v by its batch mean, which reordered pairs however small
    the variances were). ``weight`` = 0 gives newton.
    """
    rho = margin_stability(history, eps, weight)
    return newton_score(mu, np.zeros(np.shape(mu)), lam, curvature) * rho


def signal_score(mu: np.ndarray, s2: np.ndarray, lam: float, curvature: bool = True) -> np.ndarray:
    return sigmoid(-mu)


def boundary_score(mu: np.ndarray, s2: np.ndarray, lam: float, curvature: bool = True) -> np.ndarray:
    return sigmoid(mu) * sigmoid(-mu)


STABILITY = ("checkpoints", "token")
# a pool record where every pair's summed log-probs equal the reference's to this relative tolerance is the start under
# reference=previous_round (policy = reference, margins 0 up to float noise: 9e-8 in z between the batched policy forward
# and the reference's on the embedded model in fp32, which a 1e-9 test in z took for a real record; bf16 differs ~1e-3)
REF_RTOL = 1e-2
STABILITY_LOG = ("spearman_stable_newton", "spearman_score_neg_abs_z", "kept_differ_from_newton", "kept_differ_pairs",
                 "removed_unstable", "removed_sign_change", "removed_near_zero", "mean_s2", "mean_rho")
SCORES: dict[str, Callable[..., np.ndarray]] = {"newton": newton_score, "stable": stable_score,
                                                "signal": signal_score, "boundary": boundary_score}


def histogram(values: Sequence[float] | np.ndarray, edges: Sequence[float]) -> list[int]:
    """Counts per bin, with under/overflow folded into the first/last bin (JSON-friendly)."""
    v = np.clip(np.asarray(values, dtype=float), edges[0], edges[-1])
    return np.histogram(v, bins=np.asarray(edges))[0].tolist()


class SageSelector(SelectorHooks):
    """Top-``keep_ratio`` pairs by a SAGE score, optionally spread over difficulty by a curriculum."""

    def __init__(self, keep_ratio: float = 0.5, score: str = "stable", granularity: str = "step", beta: float = 0.1,
                 lam: float = 1e-3, length_normalized: bool = True, length_scale: float = 32.0,
                 stability_weight: float = 1.0, curvature: bool = True, curriculum: Curriculum | None = None,
                 stability: str = "checkpoints", snapshot_every: int = 4, stability_window: int = 3,
                 stability_eps: float = 1e-6) -> None:
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {sorted(SCORES)}, got {score!r}")
        if granularity not in ("pool", "step"):
            raise ValueError(f"granularity must be pool or step, got {granularity!r}")
        for k, v in {"beta": beta, "length_scale": length_scale}.items():
            if not v > 0:
                raise ValueError(f"{k} must be > 0, got {v}")
        for k, v in {"lam": lam, "stability_weight": stability_weight}.items():
            if not v >= 0:
                raise ValueError(f"{k} must be >= 0, got {v}")
        if stability not in STABILITY:
            raise ValueError(f"stability must be one of {list(STABILITY)}, got {stability!r}")
        for k, v in {"snapshot_every": snapshot_every, "stability_window": stability_window}.items():
            if int(v) < 1:
                raise ValueError(f"{k} must be >= 1, got {v}")
        if not stability_eps > 0:
            raise ValueError(f"stability_eps must be > 0, got {stability_eps}")
        if lam == 0 and not curvature and score in ("newton", "stable"):
            raise ValueError("lam must be > 0 when curvature=false (the score would divide by zero)")
        self.keep_ratio, self.score_name, self.granularity = float(keep_ratio), score, granularity
        self.beta, self.lam, self.length_normalized = float(beta), float(lam), bool(length_normalized)
        self.length_scale, self.stability_weight, self.curvature = float(length_scale), float(stability_weight), \
            bool(curvature)
        self.curriculum = curriculum
        self.stability, self.snapshot_every, self.stability_window = stability, int(snapshot_every), \
            int(stability_window)
        self.stability_eps = float(stability_eps)
        self.round_info: dict | None = None  # set by the runner before each round (observe_round)

    def observe_round(self, round_index: int, pass_rates: Sequence[float],
                      pool_rates: Sequence[float | None] | None = None) -> None:
        """The runner's round index and the all-prompt and pool mean pass rates of rounds 1..k: what the curriculum
        advances on (``pool_rates`` for ``advance_by=competence``, which keeps the highest stage reached)."""
        self.round_info = {"round": int(round_index), "pass_rates": [float(r) for r in pass_rates],
                           "pool_rates": [None if r is None else float(r) for r in pool_rates or []]}

    @property
    def uses_token_stats(self) -> bool:
        return self.score_name == "stable" and self.stability_weight > 0 and self.stability == "token"

    @property
    def uses_checkpoints(self) -> bool:
        return self.score_name == "stable" and self.stability_weight > 0 and self.stability == "checkpoints"

    def features(self, pc, pr, rc, rr, nc, nr, var_c=None, var_r=None) -> tuple[np.ndarray, np.ndarray]:
        """Margin mu = beta*h and its token-level variance s^2 (``var_*``: per-token log-ratio variances)."""
        pc, pr, rc, rr = (np.asarray(x, dtype=float) for x in (pc, pr, rc, rr))
        nc, nr = (np.maximum(np.asarray(x, dtype=float), 1.0) for x in (nc, nr))
        var_c = np.zeros_like(pc) if var_c is None else np.asarray(var_c, dtype=float)
        var_r = np.zeros_like(pr) if var_r is None else np.asarray(var_r, dtype=float)
        if self.length_normalized:  # mean token log-ratios, rescaled to a typical length so z stays O(1)
            scale = self.beta * self.length_scale
            h, v = (pc - rc) / nc - (pr - rr) / nr, var_c / nc + var_r / nr
        else:
            scale = self.beta
            h, v = (pc - rc) - (pr - rr), var_c * nc + var_r * nr
        return scale * h, self.stability_weight * scale**2 * v

    def score(self, mu: np.ndarray, s2: np.ndarray) -> np.ndarray:
        return SCORES[self.score_name](mu, s2, self.lam, self.curvature)

    def keep(self, scores: np.ndarray, buckets: Sequence[str] | None, stage: int | None,
             rng: np.random.Generator) -> list[int]:
        """Indices of the ceil(keep_ratio * n) kept pairs (stage proportions when a curriculum is set)."""
        props = self.curriculum.proportions(stage) if self.curriculum is not None and stage is not None else None
        return top_k(scores, keep_count(self.keep_ratio, len(scores)), rng, buckets if props else None, props)

    def plan(self, pairs: Sequence[Pair]) -> dict[str, Any]:
        """The round's curriculum decision (competence, stage, per-pair buckets) from the pool and ``round_info``.

        Buckets are always computed (for the kept-per-bucket log); ``stage`` is None without a curriculum.
        """
        cur = self.curriculum or Curriculum()
        if cur.competence(pairs) is None:
            if self.curriculum is not None:
                log.warning("sage: no pair records a pass_rate; the curriculum is off this round")
            return {"competence": None, "stage": None, "buckets": None}
        stage: int | None
        comp, stage = cur.decide(pairs, self.round_info)
        if self.curriculum is None:
            stage = None
        elif self.round_info is None and cur.advance_by not in ("pool", "competence"):
            log.warning("sage: curriculum.advance_by=%s needs the runner's round index; stage 1 this time",
                        cur.advance_by)
        return {"competence": comp, "stage": stage, "buckets": cur.buckets(pairs),
                "advance_by": cur.advance_by if self.curriculum is not None else None}

    def select(self, pairs: list[Pair], seed: int, scorer=None) -> list[Selected]:
        if not pairs:
            return []
        plan = self.plan(pairs)
        if self.granularity == "step":  # selection happens in the trainer (SageStepFilter); pass the pool on
            info = {"granularity": "step", "n": len(pairs), **_bucket_info(plan, range(len(pairs)))}
            return _annotated(pairs, list(range(len(pairs))), np.zeros(len(pairs)), np.zeros(len(pairs)), plan, info)
        if scorer is None:
            raise ValueError("selector=sage with granularity=pool needs the runner's pair scorer")
        lp = scorer(pairs)
        if self.score_name == "stable" and self.stability_weight > 0:
            log.warning("sage: the pool-level scorer sees one checkpoint; the stable score runs with s^2=0 "
                        "(= newton). Use granularity=step for a stability term.")
        mu, s2 = self.features(lp["policy_chosen"], lp["policy_rejected"], lp["ref_chosen"], lp["ref_rejected"],
                               lp["chosen_tokens"], lp["rejected_tokens"])
        if np.all(np.abs(mu) < 1e-6):
            log.warning("sage: every pool-level margin is 0 (reference = this round's policy?): ranking is random; "
                        "use selector.granularity=step")
        scores = self.score(mu, s2)
        kept = self.keep(scores, plan["buckets"], plan["stage"], np.random.default_rng(seed))
        info = {"granularity": "pool", "n": len(pairs), "kept": len(kept), "stability": False,
                **_bucket_info(plan, kept), **_histograms(mu, scores, kept)}
        return _annotated(pairs, kept, scores, mu, plan, info, s2)

    def callbacks(self) -> list[TrainerCallback]:
        """What the trainer runs for this selector: the per-step filter with ``granularity=step``, else nothing."""
        return [SageStepFilter(self)] if self.granularity == "step" else []


def _bucket_info(plan: dict[str, Any], kept: Sequence[int]) -> dict[str, Any]:
    if plan["buckets"] is None:
        return {"competence": None, "stage": None}
    stage = None if plan["stage"] is None else plan["stage"] + 1
    avail: dict[str, int] = {}
    took: dict[str, int] = {}
    for b in plan["buckets"]:
        avail[b] = avail.get(b, 0) + 1
    for i in kept:
        took[plan["buckets"][i]] = took.get(plan["buckets"][i], 0) + 1
    return {"competence": plan["competence"], "stage": stage, "advance_by": plan.get("advance_by"),
            "buckets": {b: {"available": n, "kept": took.get(b, 0), "kept_fraction": took.get(b, 0) / n}
                        for b, n in sorted(avail.items())}}


def _histograms(mu: np.ndarray, scores: np.ndarray, kept: Sequence[int]) -> dict[str, Any]:
    ls = np.log10(np.maximum(scores, 1e-300))
    return {"score_log10_edges": SCORE_EDGES, "score_hist_all": histogram(ls, SCORE_EDGES),
            "score_hist_kept": histogram(ls[list(kept)], SCORE_EDGES),
            "margin_edges": MARGIN_EDGES, "margin_hist_all": histogram(mu, MARGIN_EDGES),
            "margin_hist_kept": histogram(mu[list(kept)], MARGIN_EDGES)}


def _annotated(pairs: Sequence[Pair], kept: Sequence[int], scores: np.ndarray, mu: np.ndarray,
               plan: dict[str, Any], info: dict[str, Any], s2: np.ndarray | None = None) -> list[Selected]:
    """Kept pairs with their score in meta["sage"]; round-level stats ride on the first one (meta["sage_round"])."""
    out = []
    for j, i in enumerate(kept):
        p = pairs[i]
        m = {"score": float(scores[i]), "z": float(mu[i]), "s2": float(s2[i]) if s2 is not None else 0.0,
             "bucket": plan["buckets"][i] if plan["buckets"] else None}
        meta = {**p.meta, "sage": m, **({"sage_round": info} if j == 0 else {})}
        out.append(Selected(pair=dataclasses.replace(p, meta=meta), score=float(scores[i])))
    return out


# ------------------------------------------------------------------------------ the in-step filter


class SageStepFilter(StepFilter):
    """Per-step SAGE as a trainer callback: score a candidate batch of ~B/keep_ratio pairs with the current policy,
    keep the top ceil(keep_ratio * n). Runs on every trainer: the scores come from ``state.token_logps`` (on the
    ranks under DeepSpeed, gathered so every rank keeps the same pairs).

    Token-level margin variance uses per-token log-ratios against the round's *starting* policy (computed
    once, in ``on_train_begin``): exact for reference=previous_round; with a fixed reference it measures the
    dispersion of this round's movement (the per-token split of the start-vs-reference ratio is unknown).
    Writes every kept pair instance (step, epoch, pair, score) to ``<round>/kept_pairs.jsonl``.
    """

    transient = ("start",)  # rebuilt from the starting weights when a killed DeepSpeed round resumes

    def __init__(self, selector: SageSelector) -> None:
        self.sel = selector

    def draw_size(self, batch_size: int) -> int:
        return candidate_draw(batch_size, self.sel.keep_ratio)

    def on_train_begin(self, state: TrainState) -> None:
        enc = state.enc
        self.ref_c, self.ref_r = np.asarray(state.ref_logps["chosen"]), np.asarray(state.ref_logps["rejected"])
        self.plan = self.sel.plan(state.pairs)
        self.rng = np.random.default_rng(state.seed)
        self.start = state.token_logps(list(range(len(enc)))) if self.sel.uses_token_stats else None
        self.score_tokens = sum(len(c.ids) + len(r.ids) for c, r in enc) if self.start is not None else 0
        # the optimiser steps at which the whole pool was scored (charged in score_tokens; train_steps.json)
        self.pool_scoring_steps: list[int] = [int(state.step)] if self.start is not None else []
        self.snapshots: list[np.ndarray] = []  # the pool's margins at recent checkpoints (stability=checkpoints)
        self.recording = self.sel.uses_checkpoints
        if self.recording:
            self._snapshot(state)
        props = self.sel.curriculum.proportions(self.plan["stage"]) \
            if self.sel.curriculum is not None and self.plan["stage"] is not None and self.plan["buckets"] else None
        self.schedule, self.schedule_epoch = KeepSchedule(self.sel.keep_ratio, props), 0
        self.removed = {"unstable": 0, "sign_change": 0, "near_zero": 0}
        self.log: dict[str, list] = {"mu": [], "score": [], "kept_mu": [], "kept_score": [], "newton": [], "s2": [],
                                     "rho": []}
        self.differ = 0  # kept pairs that the newton score (same batch, same buckets) would not have kept
        self.kept_rows: list[dict[str, Any]] = []
        self.cand_rows: list[dict[str, Any]] = []  # every scored candidate: the logged pool of the stability study
        self.avail: dict[str, int] = {}
        self.took: dict[str, int] = {}
        self.step_kept = self.step_cands = 0

    def _margins(self, pol, idx) -> np.ndarray:
        pc = np.array([float(c.sum()) for c, _ in pol])
        pr = np.array([float(r.sum()) for _, r in pol])
        nc, nr = np.array([len(c) for c, _ in pol]), np.array([len(r) for _, r in pol])
        return self.sel.features(pc, pr, self.ref_c[idx], self.ref_r[idx], nc, nr)[0]

    def _snapshot(self, state: TrainState) -> None:
        """Record every pool pair's margin under the current policy (one scoring pass, charged to the ledger).

        A record where the policy equals the reference (``REF_RTOL``) is the start under reference=previous_round:
        it says nothing about any pair's stability, and kept in the window it would make the variance measure how
        far a margin has moved since the start (penalising the pairs just trained on), so it is not kept."""
        idx = list(range(len(state.enc)))
        pol = state.token_logps(idx)
        margins = self._margins(pol, idx)
        self.score_tokens += sum(len(c.ids) + len(r.ids) for c, r in state.enc)
        self.pool_scoring_steps.append(int(state.step))
        got = np.array([[float(c.sum()), float(r.sum())] for c, r in pol])
        ref = np.stack([self.ref_c[idx], self.ref_r[idx]], axis=1)
        if np.all(np.abs(got - ref) <= REF_RTOL * (np.abs(ref) + 1.0)):
            return
        self.snapshots = [*self.snapshots, margins][-self.sel.stability_window:]

    def on_step_begin(self, state: TrainState) -> None:
        if self.recording and state.step > 0 and state.step % self.sel.snapshot_every == 0:
            self._snapshot(state)

    def on_batch(self, state: TrainState, idx: list[int]) -> list[int]:
        enc = state.enc
        pol = state.token_logps(idx)
        pc = np.array([float(c.sum()) for c, _ in pol])
        pr = np.array([float(r.sum()) for _, r in pol])
        nc = np.array([len(c) for c, _ in pol])
        nr = np.array([len(r) for _, r in pol])
        var_c = var_r = None
        if self.start is not None:
            var_c = np.array([_var(c - self.start[i][0]) for (c, _), i in zip(pol, idx)])
            var_r = np.array([_var(r - self.start[i][1]) for (_, r), i in zip(pol, idx)])
        mu, s2 = self.sel.features(pc, pr, self.ref_c[idx], self.ref_r[idx], nc, nr, var_c, var_r)
        newton = newton_score(mu, s2, self.sel.lam, self.sel.curvature)
        history = np.stack([snap[idx] for snap in self.snapshots] + [mu]) if self.recording else mu[None, :]
        if self.recording:  # the margins at the recent checkpoints (not the all-zero start) and now
            s2 = history.var(axis=0)
            rho = margin_stability(history, self.sel.stability_eps, self.sel.stability_weight)
            scores = checkpoint_stable_score(mu, history, self.sel.lam, self.sel.curvature, self.sel.stability_weight,
                                             self.sel.stability_eps)
        else:
            scores, rho = self.sel.score(mu, s2), np.ones_like(mu)
        buckets = [self.plan["buckets"][i] for i in idx] if self.plan["buckets"] else None
        if state.epoch != self.schedule_epoch:  # the keep ratio and the stage shares hold per epoch
            self.schedule.reset()
            self.schedule_epoch = state.epoch
        k, want = self.schedule.plan(buckets or ["all"] * len(idx))
        # the counterfactual newton choice: same batch, same quotas, ties broken by the same random draws
        kept_newton = top_k(newton, k, copy.deepcopy(self.rng), buckets, want=want)
        kept = top_k(scores, k, self.rng, buckets, want=want)
        self.schedule.commit(len(idx), [buckets[j] for j in kept] if buckets else ["all"] * len(kept))
        dropped = sorted(set(kept_newton) - set(kept))  # newton's picks the stability factor pushed out
        self.differ += len(set(kept) - set(kept_newton))
        self.removed["unstable"] += len(dropped)
        self.removed["sign_change"] += sum(bool(history[:, j].min() < 0 < history[:, j].max()) for j in dropped)
        self.removed["near_zero"] += sum(bool(abs(history[:, j].mean()) < history[:, j].std()) for j in dropped)
        self.score_tokens += sum(len(enc[i][0].ids) + len(enc[i][1].ids) for i in idx)
        self.step_cands += len(idx)
        self.step_kept += len(kept)
        for b in buckets or []:
            self.avail[b] = self.avail.get(b, 0) + 1
        for j in kept:
            if buckets:
                self.took[buckets[j]] = self.took.get(buckets[j], 0) + 1
            self.kept_rows.append({"step": state.step, "epoch": state.epoch, "pair": int(idx[j]),
                                   "problem_id": state.pairs[idx[j]].problem_id, "score": float(scores[j]),
                                   "z": float(mu[j]), "s2": float(s2[j]), "bucket": buckets[j] if buckets else None})
        self.log["mu"] += mu.tolist()
        self.log["score"] += scores.tolist()
        self.log["kept_mu"] += mu[kept].tolist()
        self.log["kept_score"] += scores[kept].tolist()
        self.log["newton"] += newton.tolist()
        self.log["s2"] += np.broadcast_to(s2, mu.shape).tolist()
        self.log["rho"] += rho.tolist()
        keep_set = set(kept)
        self.cand_rows += [{"step": state.step, "pair": int(i), "z": float(mu[j]), "s2": float(np.broadcast_to(s2, mu.shape)[j]),
                            "score": float(scores[j]), "newton": float(newton[j]), "rho": float(rho[j]),
                            "kept": j in keep_set,
                            "bucket": buckets[j] if buckets else None} for j, i in enumerate(idx)]
        return [idx[j] for j in kept]

    def on_train_end(self, state: TrainState, history: list[dict[str, float]]) -> dict[str, float]:
        ls = np.log10(np.maximum(np.asarray(self.log["score"]), 1e-300))
        lk = np.log10(np.maximum(np.asarray(self.log["kept_score"]), 1e-300))
        state.log.update({
            "granularity": "step", "keep_ratio": self.sel.keep_ratio, "score": self.sel.score_name,
            "competence": self.plan["competence"], "stage": None if self.plan["stage"] is None else self.plan["stage"] + 1,
            "advance_by": self.plan.get("advance_by"),
            "candidates": len(self.log["mu"]), "kept": len(self.log["kept_mu"]), "score_forward_tokens": self.score_tokens,
            "pool_scoring_steps": self.pool_scoring_steps,
            "buckets": {b: {"candidates": n, "kept": self.took.get(b, 0), "kept_fraction": self.took.get(b, 0) / n}
                        for b, n in sorted(self.avail.items())},
            "score_log10_edges": SCORE_EDGES, "score_hist_all": histogram(ls, SCORE_EDGES),
            "score_hist_kept": histogram(lk, SCORE_EDGES), "margin_edges": MARGIN_EDGES,
            "margin_hist_all": histogram(self.log["mu"], MARGIN_EDGES),
            "margin_hist_kept": histogram(self.log["kept_mu"], MARGIN_EDGES)})
        if state.rank == 0:
            write_jsonl(state.round_dir / "kept_pairs.jsonl", self.kept_rows)
            write_jsonl(state.round_dir / "sage_candidates.jsonl", self.cand_rows)
        n_kept = len(self.log["kept_mu"])
        out = {"candidate_pairs": len(self.log["mu"]), "kept_pairs": n_kept, "score_forward_tokens": self.score_tokens,
               # does the stability term act? rank agreement with newton over the round's candidates, and the share
               # of kept pairs newton would not have kept
               "spearman_stable_newton": spearman(self.log["score"], self.log["newton"]),
               # ... and is it just a preference for the boundary? rank agreement with -|z|
               "spearman_score_neg_abs_z": spearman(self.log["score"], -np.abs(np.asarray(self.log["mu"]))),
               "kept_differ_from_newton": self.differ / n_kept if n_kept else 0.0,
               # why they differ: newton's picks dropped for instability, those whose margin changed sign across the
               # window, those whose |mean margin| < its sd
               "kept_differ_pairs": self.differ, "removed_unstable": self.removed["unstable"],
               "removed_sign_change": self.removed["sign_change"], "removed_near_zero": self.removed["near_zero"],
               "mean_s2": float(np.mean(self.log["s2"])) if self.log["s2"] else 0.0,
               "mean_rho": float(np.mean(self.log["rho"])) if self.log["rho"] else 1.0}
        state.log.update({k: out[k] for k in STABILITY_LOG})
        if self.plan["stage"] is not None:  # the curriculum's decision, into the round's train.json / metrics.json
            out.update(curriculum_stage=self.plan["stage"] + 1, curriculum_competence=self.plan["competence"])
        return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); 1.0 when either side is constant or has < 2 values."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        sx, r, i = x[order], np.empty(len(x)), 0
        while i < len(x):
            j = i
            while j + 1 < len(x) and sx[j + 1] == sx[i]:
                j += 1
            r[order[i: j + 1]] = (i + j) / 2
            i = j + 1
        return r

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 1.0
    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def _var(x: torch.Tensor) -> float:
    return float(x.var(unbiased=False)) if x.numel() > 1 else 0.0
