"""SAGE selection: score ranking, exact keep counts, curriculum proportions, the trainer hook, one CLI run."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from alignlab.data import arith
from alignlab.eval.metrics import rollout_diagnostics
from alignlab.losses import DPOLoss
from alignlab.models import ModelSpec, load_tokenizer
from alignlab.records import Pair, Problem, Rollout, read_jsonl
from alignlab.runner import build_components
from alignlab.select.curriculum import Curriculum, KeepSchedule, quotas, top_k
from alignlab.select.random import RandomSelector, RandomStepFilter
from alignlab.select.sage import (
    SageSelector,
    SageStepFilter,
    checkpoint_stable_score,
    keep_count,
    newton_score,
    stable_score,
)
from alignlab.train.torch_trainer import TorchTrainer, reference_logps
from tests.conftest import TINY_RUN, alignlab


def _compose(overrides: list[str]):
    """The composed config a CLI run with these overrides would get (in-process)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import alignlab.config  # noqa: F401 - registers run_schema
    from alignlab.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=overrides, return_hydra_config=True)


def _choices(cfg) -> dict[str, str]:
    return {k: v for k, v in cfg.hydra.runtime.choices.items() if v is not None}

# Constructed pairs: (name, policy margin in nats over the reference, pass rate). beta=0.5, summed scoring.
KINDS = [("confident_error", -8.0, 0.125), ("mild_error", -2.0, 0.25), ("boundary", 0.0, 0.5),
         ("boundary2", 0.2, 0.5), ("solved", 4.0, 0.75), ("trivial", 12.0, 0.875)]


def _pairs(spec=KINDS) -> tuple[list[Pair], dict[str, list[float]]]:
    pairs, lp = [], {k: [] for k in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected",
                                     "chosen_tokens", "rejected_tokens")}
    for i, (name, h, rate) in enumerate(spec):
        pairs.append(Pair(f"p{i}", "q", f"good {name}", f"bad {name}", meta={"pass_rate": rate, "name": name}))
        for k, v in zip(lp, (-10.0 + h / 2, -10.0 - h / 2, -10.0, -10.0, 10, 10)):
            lp[k].append(v)
    return pairs, lp


def _scorer(lp):
    return lambda pairs: lp


def _sel(**kw) -> SageSelector:
    base = dict(granularity="pool", beta=0.5, length_normalized=False, curriculum=None)
    return SageSelector(**{**base, **kw})


def test_newton_and_stable_rank_confident_errors_first_boundary_middle_trivial_last():
    mu = np.array([-4.0, -1.0, 0.0, 1.0, 4.0])
    for f in (newton_score, stable_score):
        s = f(mu, np.zeros(5), 1e-3)
        assert list(np.argsort(-s)) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(stable_score(mu, np.zeros(5), 1e-3), newton_score(mu, np.zeros(5), 1e-3), rtol=1e-9)
    # not a function of the margin alone: an error whose margin is uncertain ranks below a stable one
    s = stable_score(np.array([-4.0, -4.0, 0.0]), np.array([0.0, 16.0, 0.0]), 1e-3)
    assert s[0] > 10 * s[1] and s[1] > s[2]


@pytest.mark.parametrize("form", ["newton", "stable", "signal"])
def test_pool_selection_keeps_confident_errors_and_filters_boundary_and_trivial(form):
    pairs, lp = _pairs()
    kept = _sel(score=form, keep_ratio=0.3).select(pairs, seed=0, scorer=_scorer(lp))
    assert [s.pair.meta["name"] for s in kept] == ["confident_error", "mild_error"]
    assert kept[0].score > kept[1].score and kept[0].pair.meta["sage_round"]["kept"] == 2
    scores = {p.meta["name"]: s for p, s in zip(pairs, _sel(score=form).score(*_sel().features(
        *(lp[k] for k in lp))))}
    assert scores["confident_error"] > scores["mild_error"] > scores["boundary"] > scores["solved"] > scores["trivial"]


def test_boundary_form_prefers_pairs_nearest_the_decision_boundary():
    pairs, lp = _pairs()
    kept = _sel(score="boundary", keep_ratio=0.3).select(pairs, seed=0, scorer=_scorer(lp))
    assert {s.pair.meta["name"] for s in kept} == {"boundary", "boundary2"}


@pytest.mark.parametrize("gamma", [0.2, 0.4, 0.5, 0.6, 0.8, 1.0])
def test_keep_ratio_keeps_exactly_ceil_gamma_n(gamma):
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 7, 10, 33):
        spec = [(f"x{i}", float(h), float(r)) for i, (h, r) in enumerate(zip(rng.normal(0, 3, n),
                                                                              rng.choice([0.125, 0.5, 0.875], n)))]
        pairs, lp = _pairs(spec)
        want = math.ceil(round(gamma * n, 9))
        assert len(_sel(keep_ratio=gamma).select(pairs, seed=1, scorer=_scorer(lp))) == want
        assert len(_sel(keep_ratio=gamma, curriculum=Curriculum()).select(pairs, 1, _scorer(lp))) == want
        assert len(RandomSelector(gamma, mode="fixed").select(pairs, seed=1)) == want
    assert keep_count(0.6, 5) == 3 and keep_count(0.2, 20) == 4


def test_random_selector_is_seeded():
    pairs, _ = _pairs([(f"x{i}", 0.0, 0.5) for i in range(40)])
    ids = lambda s: [x.pair.problem_id for x in RandomSelector(0.5, mode="fixed").select(pairs, seed=s)]  # noqa: E731
    assert ids(3) == ids(3) and ids(3) != ids(4)


def test_length_normalised_margin_ignores_response_length():
    sel = _sel(length_normalized=True, length_scale=10.0, beta=1.0)
    # same per-token log-ratio (-0.1 chosen vs 0 rejected), chosen 10 vs 100 tokens: equal normalised margins
    mu, _ = sel.features([-1.0, -10.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [10, 100], [10, 10])
    np.testing.assert_allclose(mu, [-1.0, -1.0])
    mu, _ = _sel(beta=1.0).features([-1.0, -10.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [10, 100], [10, 10])
    np.testing.assert_allclose(mu, [-1.0, -10.0])


def test_curriculum_buckets_stages_and_proportions():
    cur = Curriculum()
    assert [cur.bucket(p) for p in (0.125, 0.25, 0.5, 0.74, 0.75, 0.875, None)] == \
        ["hard", "medium", "medium", "medium", "easy", "easy", "unknown"]
    assert [cur.stage(c) for c in (None, 0.2, 0.5, 0.69, 0.7, 0.9)] == [0, 0, 1, 1, 2, 2]
    avail = {"easy": 100, "medium": 100, "hard": 100}
    for stage, want in enumerate(([10, 8, 2], [4, 10, 6], [2, 8, 10])):
        assert list(quotas(20, avail, cur.proportions(stage)).values()) == want
    # top_k keeps the best of each bucket, in the stage's proportions
    buckets = ["easy"] * 30 + ["medium"] * 30 + ["hard"] * 30
    scores = np.arange(90.0)
    kept = top_k(scores, 10, np.random.default_rng(0), buckets, cur.proportions(0))
    assert [buckets[i] for i in kept].count("easy") == 5 and [buckets[i] for i in kept].count("hard") == 1
    assert max(i for i in kept if buckets[i] == "easy") == 29


def test_curriculum_shortfall_goes_to_the_other_buckets_by_their_shares():
    props = Curriculum().proportions(0)  # 0.5 / 0.4 / 0.1
    q = quotas(20, {"easy": 2, "medium": 50, "hard": 50, "unknown": 5}, props)
    assert q["easy"] == 2 and q["medium"] + q["hard"] == 18 and q["medium"] == 14 and q["unknown"] == 0
    q = quotas(20, {"easy": 2, "medium": 3, "hard": 4, "unknown": 30}, props)
    assert q == {"easy": 2, "medium": 3, "hard": 4, "unknown": 11}
    assert sum(quotas(50, {"easy": 2, "medium": 3}, props).values()) == 5


def test_curriculum_competence_is_the_pools_mean_pass_rate_per_prompt():
    pairs, _ = _pairs([("a", 0, 0.125), ("b", 0, 0.875)])
    pairs.append(Pair("p0", "q", "x", "y", meta={"pass_rate": 0.125}))  # same prompt twice counts once
    assert Curriculum.competence(pairs) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="advance_at"):
        Curriculum(advance_at=[0.5])
    with pytest.raises(ValueError, match="stages"):
        Curriculum(stages=[[0.5, 0.5, 0.5]], advance_at=[])


def test_curriculum_reaches_stages_2_and_3_by_rounds_or_by_pass_rate_gain_and_logs_them():
    pairs, lp = _pairs()  # pool competence 0.5 in every round: the pool rule gives stage 2 whatever the round
    by_rounds = _sel(keep_ratio=0.5, curriculum=Curriculum())  # the default: advance_by=rounds, 1 round per stage
    stages = []
    for k in (1, 2, 3, 4):
        by_rounds.observe_round(k, [0.2] * k)  # flat pass rate: stages advance on rounds alone
        info = by_rounds.select(pairs, seed=0, scorer=_scorer(lp))[0].pair.meta["sage_round"]
        stages.append(info["stage"])
        assert info["advance_by"] == "rounds" and info["competence"] == pytest.approx(Curriculum.competence(pairs))
    assert stages == [1, 2, 3, 3]
    assert Curriculum(rounds_per_stage=2).decide(pairs, {"round": 3, "pass_rates": []})[1] == 1  # 0-based: stage 2
    gain = Curriculum(advance_by="pass_rate_gain", advance_at=[0.05, 0.1])
    # competence = all-prompt pass rate now minus round 1's (the base policy's)
    got = [gain.decide(pairs, {"round": len(r), "pass_rates": r}) for r in ([0.2], [0.2, 0.26], [0.2, 0.26, 0.31])]
    assert [st for _, st in got] == [0, 1, 2] and got[2][0] == pytest.approx(0.11)
    assert Curriculum(advance_by="pool").decide(pairs, {"round": 3, "pass_rates": [0.2, 0.3, 0.4]})[1] == 1
    sel = _sel(curriculum=gain)
    sel.observe_round(2, [0.2, 0.35])
    step = SageStepFilter(sel)
    step.plan = sel.plan(pairs)
    assert step.plan["stage"] == 2 and step.plan["competence"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="advance_by"):
        Curriculum(advance_by="epochs")
    with pytest.raises(ValueError, match="rounds_per_stage"):
        Curriculum(rounds_per_stage=0)


def test_competence_curriculum_advances_one_way_at_the_rounds_the_pool_crosses_its_thresholds():
    """advance_by=competence: a constructed run whose pool competence goes 0.27, 0.31, 0.29, 0.36, 0.30 (the embedded
    task's range) enters stage 2 in round 2 and stage 3 in round 4, and keeps them (hand-derived, thresholds 0.30 /
    0.35); the old pool rule (0.5 / 0.7) stays in stage 1 on the same pools."""
    comps = [0.27, 0.31, 0.29, 0.36, 0.30]
    want = [1, 2, 2, 3, 3]  # by hand: the first round >= 0.30 is 2, the first >= 0.35 is 4; never back
    cur = Curriculum(advance_by="competence")
    assert cur.competence_at == [0.30, 0.35]
    sel = _sel(curriculum=cur)
    got, old = [], []
    for k, c in enumerate(comps, start=1):
        rate_a, rate_b = round(c - 0.05, 4), round(c + 0.05, 4)  # one pool of two prompts whose mean pass rate is c
        pairs, lp = _pairs([("a", -1.0, rate_a), ("b", 1.0, rate_b)])
        # the runner's pool_rates: rounds 1..k from metrics.json; the last is replaced by this pool's own competence
        sel.observe_round(k, [0.15] * k, [*comps[: k - 1], 0.99])
        info = sel.select(pairs, seed=0, scorer=_scorer(lp))[0].pair.meta["sage_round"]
        got.append(info["stage"])
        assert info["advance_by"] == "competence" and info["competence"] == pytest.approx(c)
        old.append(Curriculum(advance_by="pool").decide(pairs, sel.round_info)[1] + 1)
    assert got == want and old == [1] * 5
    # a round from before pool_pass_rate was logged (None) is skipped; without the runner, this pool alone
    assert cur.decide(pairs, {"round": 3, "pass_rates": [], "pool_rates": [None, 0.36, None]})[1] == 2
    assert cur.decide(pairs, None) == (pytest.approx(0.30), 1)
    with pytest.raises(ValueError, match="competence_at"):
        Curriculum(competence_at=[0.4, 0.3])


def test_rollout_diagnostics_pool_pass_rate_is_the_mean_over_prompts_that_can_give_a_pair():
    verdicts = {"a": [1, 1, 1, 1], "b": [1, 0, 0, 0], "c": [0, 0, 0, 0], "d": [1, 1, 0, 0]}
    probs = [Problem(id=k, prompt="q", answer="1") for k in verdicts]
    rolls = [Rollout(problem_id=k, text="r", tokens=1, logprob_sum=0.0, verdict=bool(v), extracted="1")
             for k, vs in verdicts.items() for v in vs]
    d = rollout_diagnostics(probs, rolls)
    assert d["pool_pass_rate"] == pytest.approx((0.25 + 0.5) / 2)  # a (always) and c (never) give no pair
    assert d["mean_pass_rate"] == pytest.approx((1 + 0.25 + 0 + 0.5) / 4)


def test_constructor_rejects_impossible_values_naming_the_argument():
    for kw, name in (({"keep_ratio": 0}, "keep_ratio"), ({"keep_ratio": 1.5}, "keep_ratio"), ({"score": "x"}, "score"),
                     ({"granularity": "batch"}, "granularity"), ({"lam": -1}, "lam"), ({"beta": 0}, "beta")):
        with pytest.raises(ValueError, match=name):
            SageSelector(**kw)
    with pytest.raises(ValueError, match="keep_ratio"):
        RandomSelector(0)


def _real_pairs(tiny_dir, n: int) -> list[Pair]:
    tok, spec = load_tokenizer(tiny_dir), ModelSpec(path=str(tiny_dir))
    rates = [0.125, 0.5, 0.875]
    return [Pair(str(i), spec.render(tok, p.text), arith.solution(p), arith.solution(p, skip_last=True),
                 meta={"pass_rate": rates[i % 3]}) for i, p in enumerate(arith.generate(n, "train", seed=2))]


@pytest.fixture
def one_thread():
    """Oversubscribed threads make tiny CPU training crawl on a shared machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_step_hook_keeps_ceil_gamma_of_each_candidate_batch_and_logs_grad_variance(tiny_dir, tmp_path, one_thread):
    pairs = _real_pairs(tiny_dir, 30)
    ref = reference_logps(tiny_dir, pairs)
    sel = SageSelector(keep_ratio=0.4, granularity="step", curriculum=Curriculum(advance_by="pool"))
    tr = TorchTrainer(lr=1e-3, epochs=1, batch_size=2, grad_accum=2, grad_stats=True)
    res = tr.train(tiny_dir, pairs, ref, DPOLoss(), tmp_path / "ckpt", seed=0, callbacks=sel.callbacks())
    # candidate batches of floor(2 / 0.4) = 5 pairs, 2 per step: 30 pairs -> 6 batches -> 3 steps, 2 + 2 kept each
    assert res.steps == 3 and [h["candidates"] for h in res.history] == [10, 10, 10]
    assert [h["kept"] for h in res.history] == [4, 4, 4] and res.trained_tokens > 0
    assert all(h["grad_var_micro"] > 0 and h["grad_snr"] > 0 for h in res.history)
    log = json.loads((tmp_path / "train_steps.json").read_text())
    assert log["candidates"] == 30 and log["kept"] == 12 and sum(log["score_hist_all"]) == 30
    assert sum(b["kept"] for b in log["buckets"].values()) == 12 and log["stage"] == 2  # competence 0.5
    assert log["score_forward_tokens"] > 0 and len(log["steps"]) == 3
    kept = read_jsonl(tmp_path / "kept_pairs.jsonl")  # every kept pair instance, with its step and score
    assert len(kept) == 12 and [k["step"] for k in kept] == sorted(k["step"] for k in kept)
    assert res.summary["trained_pairs"] == 12 and res.summary["pairs_per_epoch"] == 12
    # without a filter the stats hook changes nothing: same losses as a trainer without a hook
    a = TorchTrainer(lr=1e-3, epochs=1, batch_size=4, grad_accum=2, grad_stats=True)
    b = TorchTrainer(lr=1e-3, epochs=1, batch_size=4, grad_accum=2)
    ra = a.train(tiny_dir, pairs, ref, DPOLoss(), tmp_path / "a", seed=0)
    rb = b.train(tiny_dir, pairs, ref, DPOLoss(), tmp_path / "b", seed=0)
    assert [h["loss"] for h in ra.history] == [h["loss"] for h in rb.history]
    assert all(abs(h["grad_norm"] - h2["grad_norm"]) < 1e-5 for h, h2 in zip(ra.history, rb.history))


@pytest.mark.slow
def test_sage_run_end_to_end_through_the_cli(tiny_dir, tmp_path):
    run = [a for a in TINY_RUN if not a.startswith(("sampler.n", "data.train_prompts"))]
    alignlab(*run, "sampler.n=8", "data.train_prompts=24", "selector=sage", "selector.keep_ratio=0.5", "trainer.grad_accum=2", "trainer.batch_size=2",
             "trainer.grad_stats=true",
             "rounds=1", "base_eval=false", f"model.path={tiny_dir}", f"hydra.run.dir={tmp_path}",
             "selector.curriculum.advance_by=competence")
    s = json.loads((tmp_path / "summary.json").read_text())
    r = s["rounds"][0]
    # the runner hands the round's pool pass rate to the curriculum; the stage it used is in train.json / metrics
    pool = json.loads((tmp_path / "round_1" / "metrics.json").read_text())["diagnostics"]["pool_pass_rate"]
    assert r["train"]["curriculum_competence"] == pytest.approx(pool)
    assert r["train"]["curriculum_stage"] == 1 + (pool >= 0.30) + (pool >= 0.35)
    # step granularity: the whole pool goes to the trainer's filter; `selected` counts the pairs it trained on
    assert abs(r["selected"] - r["pairs"] / 2) <= 0.05 * r["pairs"] / 2 + 1 and r["selected"] < r["pairs"]
    assert r["ledger"]["trained_pairs"] == r["train"]["trained_pairs"] == r["train"]["kept_pairs"]
    sel = read_jsonl(tmp_path / "round_1" / "selected.jsonl")
    assert sel[0]["meta"]["sage_round"]["granularity"] == "step"
    log = json.loads((tmp_path / "round_1" / "train_steps.json").read_text())
    assert [st["kept"] for st in log["steps"]] == [math.ceil(st["candidates"] / 2) for st in log["steps"]]
    assert r["train"]["kept_pairs"] == log["kept"] > 0 and r["train"]["score_forward_tokens"] > 0
    assert "grad_norm_micro" in r["train"]


@pytest.mark.parametrize("overrides", [["experiment=sage_ablations", "selector.keep_ratio=0.3"],
                                       ["experiment=sage_vs_dpo", "selector=random"],
                                       ["experiment=sage", "trainer=deepspeed_zero3", "trainer.ranks=2"],
                                       ["selector=sage", "selector.granularity=pool", "selector.curriculum=null"]])
def test_sage_configs_compose_and_give_the_trainer_its_callbacks(overrides, tiny_dir):
    """The selector brings its own in-step filter; nothing is wired into the trainer's config by hand."""
    cfg = _compose([*overrides, f"model.path={tiny_dir}"])
    assert "step_hook" not in cfg.trainer and "callbacks" not in cfg.trainer
    comps = build_components(cfg, _choices(cfg))
    cbs = comps["selector"].callbacks()
    step = isinstance(comps["selector"], SageSelector) and comps["selector"].granularity == "step"
    per_step_random = isinstance(comps["selector"], RandomSelector) and comps["selector"].mode == "step"
    assert [type(c) for c in cbs] == ([SageStepFilter] if step else [RandomStepFilter] if per_step_random else [])
    # the SAGE study presets ask for gradient statistics; ZeRO-3 has none to give (warned, not an error)
    assert comps["trainer"].grad_stats == (overrides[0].startswith("experiment=sage") and "trainer=" not in str(overrides))
    if step:
        assert cbs[0].sel.keep_ratio == comps["selector"].keep_ratio and cbs[0].sel.beta == comps["loss"].beta


@pytest.mark.parametrize("override,message", [("selector.keep_ratio=0", "selector: keep_ratio must be in (0, 1]"),
                                              ("selector.curriculum.advance_at=[0.9,0.1]", "advance_at")])
def test_bad_sage_values_fail_before_work_naming_the_argument(override, message, tiny_dir):
    from alignlab.runner import build_components
    from tests.test_config import _choices, _compose

    with pytest.raises(Exception, match=re.escape(message)):  # noqa: PT011 - ConfigError
        cfg = _compose(["selector=sage", override, f"model.path={tiny_dir}"])
        build_components(cfg, _choices(cfg))


class _MovingPolicy:
    """Per-token log-probs of a pool whose margins move between checkpoints (time ``t``), ``MARGINS[i][t]``."""

    # pair 0: a confident error, steady; 1: an error that was a success one checkpoint ago (sign change);
    # 2: oscillates around 0; 3: a milder error, steady; 4: solved, steady
    MARGINS = {0: [-1.0, -1.0], 1: [2.0, -1.2], 2: [0.3, -0.3], 3: [-0.5, -0.5], 4: [3.0, 3.0]}

    def __init__(self, margins: dict[int, list[float]] | None = None) -> None:
        self.t, self.calls, self.margins = 0, 0, margins or self.MARGINS

    def __call__(self, idx):
        self.calls += 1
        # length-normalised features with beta=0.1, length_scale=32: mu = 3.2 * (chosen log-ratio - rejected's)
        return [(torch.tensor([self.margins[i][min(self.t, len(self.margins[i]) - 1)] / 3.2]), torch.tensor([0.0]))
                for i in idx]


def _moving_state(tmp_path, policy, n=None, rates=None):
    from alignlab.train.batching import Encoded
    from alignlab.train.callbacks import TrainState

    n = len(policy.margins) if n is None else n
    pairs = [Pair(f"p{i}", "q", "a", "b", meta={} if rates is None else {"pass_rate": rates[i]}) for i in range(n)]
    enc = [(Encoded([1, 2], [False, True]), Encoded([1, 3], [False, True])) for _ in pairs]
    return TrainState(pairs=pairs, enc=enc, ref_logps={"chosen": [0.0] * n, "rejected": [0.0] * n},
                      round_dir=tmp_path, seed=0, batch_size=2, epochs=1, token_logps=policy,
                      grad_vector=lambda: torch.zeros(1))


def _one_filtered_step(tmp_path, margins=None, keep_ratio=0.4, **kw):
    policy = _MovingPolicy(margins)
    sel = SageSelector(keep_ratio=keep_ratio, granularity="step", curriculum=None, snapshot_every=1,
                       stability_window=2, **kw)
    f, state = SageStepFilter(sel), _moving_state(tmp_path, policy)
    f.on_train_begin(state)  # records the margins at t = 0
    policy.t, state.step = 1, 1
    f.on_step_begin(state)  # records them again at t = 1
    kept = f.on_batch(state, list(range(len(policy.margins))))
    return kept, f.on_train_end(state, []), f, policy


def test_checkpoint_stability_filters_sign_changes_and_boundary_oscillation_keeps_steady_errors(tmp_path):
    kept, out, f, policy = _one_filtered_step(tmp_path)
    mu = np.array([-1.0, -1.2, -0.3, -0.5, 3.0])
    newton = newton_score(mu, 0, 1e-3)  # ranks by the current margin alone: the swinging error 1 first
    assert np.argsort(-newton).tolist() == [1, 0, 3, 2, 4]
    hist = np.array([[-1.0, 2.0, 0.3, -0.5, 3.0], [-1.0, -1.2, -0.3, -0.5, 3.0], mu])  # t = 0, t = 1, now
    m, v = hist.mean(axis=0), hist.var(axis=0)
    rho = (m**2 + 1e-12) / (m**2 + 1e-12 + v)  # the squared-SNR weight, by hand
    stable = checkpoint_stable_score(mu, hist, 1e-3)
    np.testing.assert_allclose(stable, newton * rho, rtol=1e-12)
    np.testing.assert_allclose(rho[[0, 3, 4]], 1.0)  # steady margins keep newton's score exactly
    order = np.argsort(-stable).tolist()
    # the steady errors lead; the pair oscillating around 0 and the one that changed sign fall behind them;
    # the steadily solved pair stays in the bottom two
    assert order[:2] == [0, 3] and set(order[2:]) == {1, 2, 4} and order.index(4) >= 3
    # keep 2 of 5: newton keeps {1, 0}; the stable score swaps the sign-changing error for the steady milder one
    assert kept == [0, 3]
    assert out["kept_differ_from_newton"] == 0.5 and out["kept_differ_pairs"] == 1
    assert out["removed_unstable"] == 1 and out["removed_sign_change"] == 1 and out["removed_near_zero"] == 1
    from alignlab.select.sage import spearman
    assert out["spearman_stable_newton"] == pytest.approx(spearman(stable, newton))
    assert out["spearman_score_neg_abs_z"] == pytest.approx(spearman(stable, -np.abs(mu)))
    assert out["score_forward_tokens"] == 3 * 5 * 4  # two pool records + the candidate batch, 4 tokens per pair
    assert policy.calls == 3 and out["mean_s2"] == pytest.approx(float(np.mean(v)))
    rows = read_jsonl(tmp_path / "sage_candidates.jsonl")  # the logged candidate pool
    assert [r["kept"] for r in rows] == [True, False, False, True, False] and rows[1]["s2"] == pytest.approx(v[1])
    # no stability weight, or the old token-level term with nothing moving: exactly newton's choice
    for kw in ({"stability_weight": 0.0}, {"stability": "token"}):
        kept, out, _, _ = _one_filtered_step(tmp_path, **kw)
        assert kept == [0, 1] and out["kept_differ_from_newton"] == 0 and out["spearman_stable_newton"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="stability"):
        SageSelector(stability="dropout")
    with pytest.raises(ValueError, match="snapshot_every"):
        SageSelector(snapshot_every=0)
    with pytest.raises(ValueError, match="stability_eps"):
        SageSelector(stability_eps=0)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_checkpoint_stability_equals_newton_when_no_margin_varies_at_any_scale(scale):
    """Scale-aware, not normalised by the batch: variances ~0 leave newton's ranking, however small they all are."""
    rng = np.random.default_rng(1)
    mu = rng.normal(0, 2, 40) * scale
    mu[0] = 0.0  # a steady pair on the boundary keeps newton's rank too
    tiny = rng.uniform(0, 1e-9, (3, 40)) * scale  # every margin wobbles by ~1e-9 of its scale
    hist = np.vstack([mu + tiny, mu[None, :]])
    newton = newton_score(mu, 0, 1e-3)
    assert np.argsort(-checkpoint_stable_score(mu, hist, 1e-3), kind="stable").tolist() == \
        np.argsort(-newton, kind="stable").tolist()
    # the factor is a function of the SNR alone: the same histories at 1000x the scale get the same weights
    from alignlab.select.sage import margin_stability
    wobble = np.array([[1.0, -1.0, 2.0], [1.2, 1.0, 2.0], [0.8, -0.9, 2.0]])
    np.testing.assert_allclose(margin_stability(wobble * 1e-3, eps=1e-12), margin_stability(wobble * 1e3, eps=1e-12),
                               rtol=1e-6)


@pytest.mark.parametrize("start", [0.0, 9e-8, -9e-8])
def test_the_all_zero_start_of_a_previous_round_reference_is_not_a_record(tmp_path, start):
    """With reference = previous round every margin is 0 at the start: that record is dropped (but charged), so a
    pair that moved since the start is not called unstable for having moved. 'Zero' up to float noise: the policy's
    batched forward and the reference's differ by up to 9e-8 in z on the embedded model (measured at step 0 of
    `experiment=sage rounds=1 data.train_prompts=128`, where the start was kept and every rho was 0.5 at step 1)."""
    margins = {0: [start, -1.0], 1: [-start, -0.8], 2: [start, 0.5], 3: [start, 2.0]}
    kept, out, f, policy = _one_filtered_step(tmp_path, margins, keep_ratio=0.5)
    assert len(f.snapshots) == 1  # the t = 1 record only
    assert kept == [0, 1] and out["kept_differ_from_newton"] == 0 and out["mean_rho"] == 1.0
    assert out["score_forward_tokens"] == 3 * 4 * 4  # the dropped record's pass is still in the ledger


def _epoch_of_batches(tmp_path, sel, rates, draws, margins=None):
    """Run a SageStepFilter over one epoch of candidate batches of the given sizes (a static policy)."""
    n = sum(draws)
    policy = _MovingPolicy(margins or {i: [float(np.sin(i))] for i in range(n)})
    state = _moving_state(tmp_path, policy, n=n, rates=rates)
    f = sel.callbacks()[0]
    f.on_train_begin(state)
    kept, start = [], 0
    for step, d in enumerate(draws):
        state.step = step
        f.on_step_begin(state)
        kept += f.on_batch(state, list(range(start, start + d)))
        start += d
    f.on_train_end(state, [])
    return kept


@pytest.mark.parametrize("gamma,batch", [(0.6, 4), (0.4, 4), (0.5, 3), (0.7, 2), (0.3, 16)])
def test_step_keep_ratio_is_gamma_within_one_pair_per_epoch(tmp_path, gamma, batch):
    draw = SageStepFilter(SageSelector(keep_ratio=gamma)).draw_size(batch)
    draws = [draw] * 17 + [max(1, draw // 2)]  # a short last batch, as an epoch ends
    for sel in (SageSelector(keep_ratio=gamma, granularity="step", curriculum=None, stability="token"),
                RandomSelector(gamma)):
        kept = _epoch_of_batches(tmp_path, sel, None, draws)
        assert abs(len(kept) - gamma * sum(draws)) <= 1, (type(sel).__name__, len(kept), gamma * sum(draws))
        assert len(set(kept)) == len(kept)
    # the per-batch rounding this replaces: ceil(0.6 * 6) = 4 of every 6 is a realised ratio of 0.67
    assert keep_count(0.6, 6) / 6 > 0.66


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_curriculum_shares_hold_over_the_epoch_within_one_pair_per_bucket(tmp_path, stage):
    """Stage shares applied over the epoch, not rounded away per batch: with 4 kept per batch, stage 1's 0.1 hard
    share would round to 0 in every batch."""
    rates = [0.875, 0.5, 0.125] * 40  # each candidate batch of 8 holds >= 2 of every bucket
    cur = Curriculum(advance_by="pool", advance_at=[0.0, 0.0][:stage] + [1.0, 1.0][stage:])
    sel = SageSelector(keep_ratio=0.5, granularity="step", curriculum=cur, stability="token")
    kept = _epoch_of_batches(tmp_path, sel, rates, [8] * 15)
    assert len(kept) == 60
    shares = dict(zip(("easy", "medium", "hard"), Curriculum().stages[stage]))
    got = {b: sum(cur.bucket(rates[i]) == b for i in kept) for b in shares}
    for b, p in shares.items():
        assert abs(got[b] - p * len(kept)) <= 1, (b, got, shares)
    # and the schedule itself, batch by batch: never more than one pair from the share of the kept so far
    sched = KeepSchedule(0.5, shares)
    for _ in range(50):
        batch = ["easy", "medium", "hard"] * 3
        k, want = sched.plan(batch)
        sched.commit(len(batch), [b for b in want for _ in range(want[b])])
        assert all(abs(sched.took.get(b, 0) - p * sched.kept) < 1 for b, p in shares.items())


def test_random_step_mode_redraws_every_step_and_epoch_with_sages_draw_and_count(tmp_path):
    sel = RandomSelector(0.5)
    assert sel.mode == "step" and len(sel.select(_pairs()[0], seed=0)) == len(KINDS)  # the pool goes to the filter
    f = sel.callbacks()[0]
    assert f.draw_size(4) == SageStepFilter(SageSelector(keep_ratio=0.5)).draw_size(4) == 8
    kept = _epoch_of_batches(tmp_path, RandomSelector(0.5), None, [8] * 10)
    again = _epoch_of_batches(tmp_path, RandomSelector(0.5), None, [8] * 10)
    assert kept == again and len(kept) == 40  # seeded
    per_batch = [sorted(i % 8 for i in kept if lo <= i < lo + 8) for lo in range(0, 80, 8)]
    assert len({tuple(b) for b in per_batch}) > 3  # a fresh uniform choice in each batch, not one fixed pattern
    fixed = RandomSelector(0.5, mode="fixed")
    assert fixed.callbacks() == [] and len(fixed.select(_pairs()[0], seed=0)) == 3
    with pytest.raises(ValueError, match="mode"):
        RandomSelector(0.5, mode="pool")


def test_trained_pairs_counted_distinct_and_total_and_a_step_budget(tiny_dir, tmp_path, one_thread):
    """Every arm reports its steps and trained pairs, distinct and total; trainer.max_steps caps the plan (the
    compute-matched Full arm). Per-step Random over 2 epochs re-draws: more distinct pairs than one epoch's share."""
    from alignlab.train.pair_count import TrainedPairs

    pairs = _real_pairs(tiny_dir, 24)
    ref = reference_logps(tiny_dir, pairs)
    counter = TrainedPairs()
    tr = TorchTrainer(lr=1e-3, epochs=2, batch_size=2, grad_accum=1)
    res = tr.train(tiny_dir, pairs, ref, DPOLoss(), tmp_path / "r", seed=0,
                   callbacks=[*RandomSelector(0.5).callbacks(), counter])
    kept = read_jsonl(tmp_path / "kept_pairs.jsonl")
    assert res.summary["trained_pair_instances"] == res.summary["trained_pairs"] == len(kept) == 24  # 0.5 * 2 * 24
    assert res.summary["trained_pairs_distinct"] == len({k["pair"] for k in kept}) > 12
    capped = TorchTrainer(lr=1e-3, epochs=2, batch_size=4, grad_accum=1, max_steps=3)
    res = capped.train(tiny_dir, pairs, ref, DPOLoss(), tmp_path / "c", seed=0, callbacks=[TrainedPairs()])
    assert res.steps == 3 and res.summary["trained_pairs"] == res.summary["trained_pair_instances"] == 12
    assert res.summary["trained_pairs_distinct"] == 12
    with pytest.raises(ValueError, match="max_steps"):
        TorchTrainer(max_steps=0)


def _g(z):
    """sigmoid(-z) written out, not sage.sigmoid: the gradient signal of a DPO margin z."""
    return 1.0 / (1.0 + np.exp(np.asarray(z, dtype=float)))


@pytest.mark.parametrize("lam", [1e-3, 0.1, 2.0])
def test_newton_and_stable_closed_forms_at_zero_margin_and_without_curvature(lam):
    """Closed forms of sage.py's documented scores, with the issue's names mapped to the code's: ``newton`` is
    g^2 / (c + lam) (g = sigmoid(-z), c = sigmoid(z) sigmoid(-z); ``SageSelector(lam=..., curvature=...)``).

    * z = 0: g = 1/2, c = 1/4, so newton = 0.25 / (0.25 + lam).
    * ``stable`` at mu = 0 for any s^2: E[g] = 1/2 by symmetry and E[c] + Var[g] = E[g] - E[g]^2 = 1/4
      (c = g - g^2), so it is 0.25 / (0.25 + lam) too (the docstring's "at z = 0 its value does not depend on s^2").
    * ``curvature=false``: the curvature term is dropped, newton = g^2 / lam; ``stable`` with s = 0 equals it.
    """
    sel = {curv: {form: _sel(score=form, lam=lam, curvature=curv) for form in ("newton", "stable")}
           for curv in (True, False)}
    np.testing.assert_allclose(sel[True]["newton"].score(np.zeros(1), np.zeros(1)), [0.25 / (0.25 + lam)], rtol=1e-12)
    s2 = np.array([0.0, 0.3, 1.0, 4.0, 9.0])
    np.testing.assert_allclose(sel[True]["stable"].score(np.zeros(5), s2), np.full(5, 0.25 / (0.25 + lam)), rtol=1e-9)
    z = np.array([-6.0, -2.5, -0.3, 0.0, 0.7, 3.0, 8.0])
    want = _g(z) ** 2 / lam
    np.testing.assert_allclose(sel[False]["newton"].score(z, np.zeros(7)), want, rtol=1e-12)
    np.testing.assert_allclose(sel[False]["stable"].score(z, np.zeros(7)), want, rtol=1e-9)
    with_c = _g(z) ** 2 / (_g(z) * (1 - _g(z)) + lam)  # and with the curvature on, the written-out decrement
    np.testing.assert_allclose(sel[True]["newton"].score(z, np.zeros(7)), with_c, rtol=1e-12)


@pytest.mark.parametrize("curvature", [True, False])
def test_stable_score_with_margin_variance_is_its_gaussian_expectation_by_monte_carlo(curvature):
    """``stable`` with s^2 > 0 is, by its docstring, newton's decrement with z ~ N(mu, s^2):
    E[g]^2 / (E[c] * curvature + Var[g] + lam). Here z is sampled (2e6 draws per pair), the three moments are the
    sample means, and the score must agree within 5 Monte-Carlo standard errors (from 40 independent batches).
    s^2 comes through ``stability=token`` as ``SageSelector.features`` maps per-token variances: the summed margin
    of n tokens of variance v has variance n v, times beta^2 for z = beta * h."""
    lam, beta = 1e-2, 0.5
    sel = _sel(score="stable", stability="token", lam=lam, beta=beta, curvature=curvature)
    h = np.array([-8.0, -3.0, -1.0, 0.5, 2.0, 6.0])  # chosen minus rejected log-ratio (summed)
    nc, nr = np.array([10, 4, 20, 8, 3, 12]), np.array([6, 9, 20, 5, 7, 2])
    var_c, var_r = np.array([0.3, 0.5, 0.05, 0.4, 0.2, 0.5]), np.array([0.1, 0.2, 0.05, 0.3, 0.6, 0.1])
    mu, s2 = sel.features(h, np.zeros(6), np.zeros(6), np.zeros(6), nc, nr, var_c, var_r)
    np.testing.assert_allclose(mu, beta * h, rtol=1e-12)
    np.testing.assert_allclose(s2, beta**2 * (nc * var_c + nr * var_r), rtol=1e-12)
    assert s2.min() > 0.2
    got = sel.score(mu, s2)

    rng = np.random.default_rng(35)
    batches = []
    for _ in range(40):
        z = mu[:, None] + np.sqrt(s2)[:, None] * rng.standard_normal((6, 50_000))
        g = _g(z)
        eg, vg, ec = g.mean(axis=1), g.var(axis=1), (g * (1 - g)).mean(axis=1)
        batches.append(eg**2 / (ec * curvature + vg + lam))
    batches = np.array(batches)
    mc, se = batches.mean(axis=0), batches.std(axis=0, ddof=1) / np.sqrt(len(batches))
    assert np.all(np.abs(got - mc) < 5 * se + 1e-9 * mc), (got, mc, se)
    # not a function of the mean margin alone: s^2 moves the score away from newton's at the same mu
    newton = _sel(score="newton", lam=lam, curvature=curvature).score(mu, s2)
    assert np.all(np.abs(newton - mc) > 20 * se), (newton, mc, se)


@pytest.mark.parametrize("score,stability,every", [("stable", "checkpoints", 2), ("stable", "checkpoints", 4),
                                                   ("stable", "token", 4), ("newton", "checkpoints", 4)])
def test_pool_scoring_passes_logged_for_the_ledger_are_the_forwards_the_filter_ran(tmp_path, score, stability, every):
    """``pool_scoring_steps`` (train_steps.json; test_ledger counts the ledger's whole-pool scoring charge from it)
    lists exactly the whole-pool forwards the filter asked for, counted here at the policy; score_forward_tokens is
    every forward's tokens. The schedule is the documented one: for stability=checkpoints the start and every
    ``snapshot_every`` steps, for stability=token the start once, for newton none."""
    n, steps = 12, 6
    policy = _MovingPolicy({i: [float(np.sin(i)), float(np.cos(i))] for i in range(n)})
    state = _moving_state(tmp_path, policy, n=n)
    calls: list[tuple[int, list[int]]] = []
    inner = state.token_logps
    state.token_logps = lambda idx: (calls.append((state.step, list(idx))), inner(idx))[1]
    sel = SageSelector(keep_ratio=0.5, granularity="step", curriculum=None, score=score, stability=stability,
                       snapshot_every=every)
    f = sel.callbacks()[0]
    f.on_train_begin(state)
    for step in range(steps):
        state.step, policy.t = step, step % 2
        f.on_step_begin(state)
        f.on_batch(state, [2 * step, 2 * step + 1])
        f.on_step_end(state)
    f.on_train_end(state, [])
    whole = [s for s, idx in calls if idx == list(range(n))]
    assert state.log["pool_scoring_steps"] == whole
    assert state.log["score_forward_tokens"] == sum(4 * len(idx) for _, idx in calls)  # 2 + 2 ids per pair
    want = {"checkpoints": list(range(0, steps, every)), "token": [0]}[stability] if score == "stable" else []
    assert whole == want
