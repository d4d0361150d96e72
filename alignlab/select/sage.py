"""``selector=sage``: stability-aware pair selection (SAGE, arXiv 2602.01207, "Not All
Preferences Are Created Equal: Stability-Aware and Gradient-Efficient Alignment for Reasoning Models").

Each pair gets a forward-pass score from its DPO margin z = beta * h (h = chosen minus rejected
log-ratio, summed or length-normalised) and, for the stability-aware form, from how uncertain that
margin is. Hard filtering keeps the top ceil(keep_ratio * n) pairs, over the round's pool
(``granularity=pool``, informative when the reference is fixed) or per optimiser step over an
over-sampled candidate batch scored with the *current* policy (``granularity=step``; needed with
reference=previous_round, where every margin is 0 when the round starts).

Score forms (g = sigmoid(-z) is the gradient signal, c = sigmoid(z) sigmoid(-z) the curvature):

* ``newton``   g^2 / (c + lam): the Newton decrement in the margin. Monotone in z (= ranking by margin).
* ``stable``   the same decrement with z ~ N(mu, s^2), where s^2 is the token-level variance of the
               margin: E[g]^2 / (E[c] + Var[g] + lam). A confident error whose margin rests on a few
               tokens ranks like a boundary pair; with s = 0 it equals ``newton``. Not a function of z alone.
* ``signal``   g only (ablation: no curvature, no stability).
* ``boundary`` c only (ablation: prefer pairs nearest the decision boundary, the opposite bet).

``curvature=false`` drops the curvature term from ``newton``/``stable`` (ablation "no curvature").
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from alignlab.records import Pair, Selected, write_jsonl
from alignlab.select.curriculum import Curriculum, top_k
from alignlab.train.callbacks import TrainerCallback, TrainState

log = logging.getLogger("alignlab")

_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(24)
_GH_W = _GH_W / _GH_W.sum()  # E[f(Z)], Z ~ N(0, 1)
SCORE_EDGES = [float(x) for x in np.arange(-6.0, 4.01, 0.5)]  # histogram bins of log10(score)
MARGIN_EDGES = [float(x) for x in np.arange(-8.0, 8.01, 0.5)]  # histogram bins of z


def keep_count(keep_ratio: float, n: int) -> int:
    """ceil(keep_ratio * n), robust to float error (0.6 * 5 is 3.0000000000000004, not 4)."""
    return min(n, math.ceil(keep_ratio * n - 1e-9))


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


def signal_score(mu: np.ndarray, s2: np.ndarray, lam: float, curvature: bool = True) -> np.ndarray:
    return sigmoid(-mu)


def boundary_score(mu: np.ndarray, s2: np.ndarray, lam: float, curvature: bool = True) -> np.ndarray:
    return sigmoid(mu) * sigmoid(-mu)


SCORES: dict[str, Callable[..., np.ndarray]] = {"newton": newton_score, "stable": stable_score,
                                                "signal": signal_score, "boundary": boundary_score}


def histogram(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts per bin, with under/overflow folded into the first/last bin (JSON-friendly)."""
    v = np.clip(np.asarray(values, dtype=float), edges[0], edges[-1])
    return np.histogram(v, bins=np.asarray(edges))[0].tolist()


class SageSelector:
    """Top-``keep_ratio`` pairs by a SAGE score, optionally spread over difficulty by a curriculum."""

    def __init__(self, keep_ratio: float = 0.5, score: str = "stable", granularity: str = "step", beta: float = 0.1,
                 lam: float = 1e-3, length_normalized: bool = True, length_scale: float = 32.0,
                 stability_weight: float = 1.0, curvature: bool = True, curriculum: Curriculum | None = None) -> None:
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
        if lam == 0 and not curvature and score in ("newton", "stable"):
            raise ValueError("lam must be > 0 when curvature=false (the score would divide by zero)")
        self.keep_ratio, self.score_name, self.granularity = float(keep_ratio), score, granularity
        self.beta, self.lam, self.length_normalized = float(beta), float(lam), bool(length_normalized)
        self.length_scale, self.stability_weight, self.curvature = float(length_scale), float(stability_weight), \
            bool(curvature)
        self.curriculum = curriculum
        self.round_info: dict | None = None  # set by the runner before each round (observe_round)

    def observe_round(self, round_index: int, pass_rates: Sequence[float]) -> None:
        """The runner's round index and all-prompt mean pass rates of rounds 1..k: what the curriculum advances on."""
        self.round_info = {"round": int(round_index), "pass_rates": [float(r) for r in pass_rates]}

    @property
    def uses_token_stats(self) -> bool:
        return self.score_name == "stable" and self.stability_weight > 0

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
        comp, stage = cur.decide(pairs, self.round_info)
        if self.curriculum is None:
            stage = None
        elif self.round_info is None and cur.advance_by != "pool":
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
        if self.uses_token_stats:
            log.warning("sage: the scorer gives summed log-probs only; the pool-level stable score runs with s^2=0 "
                        "(= newton). Use granularity=step for token-level stability.")
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


class SageStepFilter(TrainerCallback):
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
        return max(batch_size, math.floor(batch_size / self.sel.keep_ratio + 1e-9))

    def on_train_begin(self, state: TrainState) -> None:
        enc = state.enc
        self.ref_c, self.ref_r = np.asarray(state.ref_logps["chosen"]), np.asarray(state.ref_logps["rejected"])
        self.plan = self.sel.plan(state.pairs)
        self.rng = np.random.default_rng(state.seed)
        self.start = state.token_logps(list(range(len(enc)))) if self.sel.uses_token_stats else None
        self.score_tokens = sum(len(c.ids) + len(r.ids) for c, r in enc) if self.start is not None else 0
        self.log: dict[str, list] = {"mu": [], "score": [], "kept_mu": [], "kept_score": []}
        self.kept_rows: list[dict[str, Any]] = []
        self.avail: dict[str, int] = {}
        self.took: dict[str, int] = {}
        self.step_kept = self.step_cands = 0

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
        scores = self.sel.score(mu, s2)
        buckets = [self.plan["buckets"][i] for i in idx] if self.plan["buckets"] else None
        kept = self.sel.keep(scores, buckets, self.plan["stage"], self.rng)
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
                                   "z": float(mu[j]), "bucket": buckets[j] if buckets else None})
        self.log["mu"] += mu.tolist()
        self.log["score"] += scores.tolist()
        self.log["kept_mu"] += mu[kept].tolist()
        self.log["kept_score"] += scores[kept].tolist()
        return [idx[j] for j in kept]

    def on_step_end(self, state: TrainState) -> dict[str, float]:
        out = {"candidates": float(self.step_cands), "kept": float(self.step_kept)}
        self.step_cands = self.step_kept = 0
        return out

    def on_train_end(self, state: TrainState, history: list[dict[str, float]]) -> dict[str, float]:
        ls = np.log10(np.maximum(np.asarray(self.log["score"]), 1e-300))
        lk = np.log10(np.maximum(np.asarray(self.log["kept_score"]), 1e-300))
        state.log.update({
            "granularity": "step", "keep_ratio": self.sel.keep_ratio, "score": self.sel.score_name,
            "competence": self.plan["competence"], "stage": None if self.plan["stage"] is None else self.plan["stage"] + 1,
            "advance_by": self.plan.get("advance_by"),
            "candidates": len(self.log["mu"]), "kept": len(self.log["kept_mu"]), "score_forward_tokens": self.score_tokens,
            "buckets": {b: {"candidates": n, "kept": self.took.get(b, 0), "kept_fraction": self.took.get(b, 0) / n}
                        for b, n in sorted(self.avail.items())},
            "score_log10_edges": SCORE_EDGES, "score_hist_all": histogram(ls, SCORE_EDGES),
            "score_hist_kept": histogram(lk, SCORE_EDGES), "margin_edges": MARGIN_EDGES,
            "margin_hist_all": histogram(self.log["mu"], MARGIN_EDGES),
            "margin_hist_kept": histogram(self.log["kept_mu"], MARGIN_EDGES)})
        if state.rank == 0:
            write_jsonl(state.round_dir / "kept_pairs.jsonl", self.kept_rows)
        out = {"candidate_pairs": len(self.log["mu"]), "kept_pairs": len(self.log["kept_mu"]),
               "score_forward_tokens": self.score_tokens}
        if self.plan["stage"] is not None:  # the curriculum's decision, into the round's train.json / metrics.json
            out.update(curriculum_stage=self.plan["stage"] + 1, curriculum_competence=self.plan["competence"])
        return out


def _var(x: torch.Tensor) -> float:
    return float(x.var(unbiased=False)) if x.numel() > 1 else 0.0
