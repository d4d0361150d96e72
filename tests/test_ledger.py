"""The compute ledger charges every forward token: a round's FLOPs recomputed from its artifacts (prompts, rollouts,
pairs, kept pairs) equal the ledger's, for DPO-R1 (the reduced quickstart), SAGE's in-step filter, PACE with
refinement prompts and the exact proximity gate, and two rounds of reference=fixed|mix|ema (whose round-2 reference
log-probs come from the right checkpoints of the chain, checked against unbatched forwards)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignlab import config as C
from alignlab.models import checkpoint_params, load_tokenizer
from alignlab.records import Pair, Problem, Rollout, Selected, read_jsonl
from alignlab.train.torch_trainer import encode_pairs
from tests.conftest import TINY_RUN, alignlab


def _seq_tokens(tok, pairs: list[Pair], max_len: int) -> list[int]:
    """Tokens of each pair through the model: prompt + chosen and prompt + rejected (what trainer.logps runs)."""
    return [len(c.ids) + len(r.ids) for c, r in encode_pairs(tok, pairs, max_len)]


def _recompute(run: Path, k: int) -> dict[str, int]:
    """Forward tokens of round ``k`` per kind, from its artifacts alone (not from the ledger)."""
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    spec = C.build("model", cfg.model, {})
    tok = load_tokenizer(str(spec.directory))
    rd = run / f"round_{k}"
    problems = {p.id: p for p in read_jsonl(rd / "prompts.jsonl", Problem)}
    rollouts = read_jsonl(rd / "verdicts.jsonl", Rollout)
    n_tok = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompt = sum(n_tok(spec.render(tok, p.prompt)) for p in problems.values())  # one prefill per prompt
    refined = [r for r in rollouts if r.source == "refined"]
    by_index = {(r.problem_id, r.sample_index): r for r in rollouts if r.source != "refined"}
    for r in refined:  # PACE: problem + failed attempt + gold hint, prefilled once per refinement
        p, failed = problems[r.problem_id], by_index[(r.problem_id, r.meta["refines"])]
        prompt += n_tok(spec.render_refine(tok, p.prompt, failed.text, p.answer))
    max_len = int(cfg.trainer.max_length)
    # the exact proximity gate re-scores each refinement that reached it under the plain prompt (one sequence)
    gated = [r for r in refined if r.meta.get("gate") in ("pass", "proximity") and "plain_logprob_sum" in r.meta]
    proximity = sum(_seq_tokens(tok, [Pair(r.problem_id, spec.render(tok, problems[r.problem_id].prompt), r.text, "")
                                      for r in gated], max_len))
    pool = [s.pair for s in read_jsonl(rd / "selected.jsonl", Selected)]
    seq = _seq_tokens(tok, pool, max_len)
    epochs = int(cfg.trainer.epochs)
    kept_file = rd / "kept_pairs.jsonl"
    if kept_file.exists():  # an in-step filter: trained = the kept pair instances
        trained = sum(seq[row["pair"]] for row in read_jsonl(kept_file))
        # SAGE's no-grad forwards: every scored candidate (sage_candidates.jsonl) + each whole-pool pass it logged
        # (train_steps.json: margin records, or token-level stability's start); selector=random mode=step: none
        cands = rd / "sage_candidates.jsonl"
        candidates = sum(seq[row["pair"]] for row in read_jsonl(cands)) if cands.exists() else 0
        passes = len(json.loads((rd / "train_steps.json").read_text()).get("pool_scoring_steps", []))
        scoring = candidates + passes * sum(seq)
    else:
        trained, scoring = sum(seq) * epochs, 0
    if str(cfg.selector.get("_target_", "")).endswith("SageSelector") and cfg.selector.granularity == "pool":
        # pool-level SAGE scores the round's whole pool once at the select stage, under the round's starting
        # policy; with reference=previous_round that checkpoint is also the reference (one pass, not two)
        assert str(cfg.reference._target_).endswith("PreviousRoundReference"), "recomputed for previous_round only"
        scoring += sum(_seq_tokens(tok, read_jsonl(rd / "pairs.jsonl", Pair), max_len))
    # each reference pass leaves its cached log-probs (one file per checkpoint it ran: two for reference=mix)
    passes = len(list(rd.glob("ref_logps.*.json")))
    return {"prompt": prompt, "generated": sum(r.tokens for r in rollouts), "reference": passes * sum(seq),
            "trained": trained, "scoring": scoring, "proximity": proximity}


def _check_round(run: Path, k: int) -> dict[str, int]:
    got = _recompute(run, k)
    params = checkpoint_params(OmegaConf.load(run / ".hydra" / "config.yaml").model.path)
    ledger = json.loads((run / f"round_{k}" / "ledger.json").read_text())
    want = 2 * params * (got["prompt"] + got["generated"]) + 2 * params * got["reference"] \
        + 6 * params * got["trained"] + 2 * params * (got["scoring"] + got["proximity"])
    assert sum(s.get("flops", 0.0) for s in ledger.values()) == pytest.approx(want, rel=1e-12)
    metrics = json.loads((run / f"round_{k}" / "metrics.json").read_text())
    assert metrics["ledger"]["flops"] == pytest.approx(want, rel=1e-12)
    # every stage that runs a model records forward_tokens beside its flops
    for name, stage in ledger.items():
        assert ("flops" in stage) == ("forward_tokens" in stage), name
    assert ledger["sample"]["forward_tokens"] == got["prompt"] + got["generated"]
    assert ledger["reference"]["forward_tokens"] == got["reference"]
    assert ledger["train"]["trained_tokens"] == got["trained"]
    return got


@pytest.mark.slow
def test_reduced_quickstart_ledger_flops_recomputed_from_the_rounds_artifacts(tiny_dir, tmp_path):
    run = [a for a in TINY_RUN if not a.startswith("trainer.epochs")]
    alignlab("experiment=quickstart", *run, "trainer.epochs=2", "rounds=1", "base_eval=false",
             f"model.path={tiny_dir}", f"hydra.run.dir={tmp_path}")
    got = _check_round(tmp_path, 1)
    assert got["reference"] > 0 and got["scoring"] == got["proximity"] == 0
    # the reference passes run over the same sequences the trainer sees: per epoch, the same tokens
    train = json.loads((tmp_path / "round_1" / "train.json").read_text())
    assert got["reference"] == train["trained_tokens"] / 2


@pytest.mark.slow
def test_sage_round_ledger_charges_scoring_and_the_curriculum_advances_per_round(tiny_dir, tmp_path):
    run = [a for a in TINY_RUN if not a.startswith(("sampler.n", "data.train_prompts"))]
    alignlab(*run, "sampler.n=8", "data.train_prompts=24", "selector=sage", "rounds=2", "base_eval=false",
             "trainer.batch_size=2", f"model.path={tiny_dir}", f"hydra.run.dir={tmp_path}")
    for k in (1, 2):
        got = _check_round(tmp_path, k)
        assert got["scoring"] > 0 and got["trained"] < 2 * got["reference"]
        ledger = json.loads((tmp_path / f"round_{k}" / "ledger.json").read_text())
        assert ledger["train"]["forward_tokens"] == got["trained"] + got["scoring"]
        # the curriculum's stage and competence are logged per round (advance_by=rounds: stage k in round k)
        train = json.loads((tmp_path / f"round_{k}" / "train.json").read_text())
        assert train["curriculum_stage"] == k and 0 <= train["curriculum_competence"] <= 1
        steps = json.loads((tmp_path / f"round_{k}" / "train_steps.json").read_text())
        assert steps["stage"] == k and steps["advance_by"] == "rounds"
        # what _recompute charged: whole-pool passes on the documented schedule of stability=checkpoints (the
        # start, then every snapshot_every optimiser steps) and each selected pair scored once per epoch
        cfg = OmegaConf.load(tmp_path / ".hydra" / "config.yaml")
        assert steps["pool_scoring_steps"] == list(range(0, train["steps"], int(cfg.selector.snapshot_every)))
        pool = read_jsonl(tmp_path / f"round_{k}" / "selected.jsonl", Selected)
        cands = Counter(row["pair"] for row in read_jsonl(tmp_path / f"round_{k}" / "sage_candidates.jsonl"))
        assert cands == {i: int(cfg.trainer.epochs) for i in range(len(pool))}


@pytest.mark.slow
def test_pool_sage_rounds_charge_their_scoring_at_the_select_stage(tiny_dir, tmp_path):
    """selector=sage granularity=pool through the runner (LogpsScorer): every pair of the pool scored once per
    round, charged to the select stage; the kept share is ceil(keep_ratio * pool)."""
    run = [a for a in TINY_RUN if not a.startswith(("sampler.n", "data.train_prompts"))]
    alignlab(*run, "sampler.n=8", "data.train_prompts=24", "selector=sage", "selector.granularity=pool",
             "rounds=2", "base_eval=false", "trainer.batch_size=2", f"model.path={tiny_dir}", f"hydra.run.dir={tmp_path}")
    cfg = OmegaConf.load(tmp_path / ".hydra" / "config.yaml")
    for k in (1, 2):
        got = _check_round(tmp_path, k)
        ledger = json.loads((tmp_path / f"round_{k}" / "ledger.json").read_text())
        assert ledger["select"]["forward_tokens"] == got["scoring"] > 0
        assert not (tmp_path / f"round_{k}" / "kept_pairs.jsonl").exists()  # no in-step filter
        pool = read_jsonl(tmp_path / f"round_{k}" / "pairs.jsonl", Pair)
        kept = read_jsonl(tmp_path / f"round_{k}" / "selected.jsonl", Selected)
        assert len(kept) == math.ceil(float(cfg.selector.keep_ratio) * len(pool)) < len(pool)


@pytest.mark.slow
def test_pace_round_charges_refinement_prompts_and_the_proximity_gate_as_its_own_stage(tiny_dir, tmp_path):
    # the other gates off, so every refinement reaches the proximity gate (its last) and is re-scored there
    off = [f"sampler.gates.{g}=null" for g in ("verified", "no_hint_leak", "format", "arith_steps")]
    alignlab("experiment=pace", *TINY_RUN, "rounds=1", "base_eval=false", "sampler.gates.proximity.exact=true", *off,
             f"model.path={tiny_dir}", f"hydra.run.dir={tmp_path}")
    got = _check_round(tmp_path, 1)
    refined = [r for r in read_jsonl(tmp_path / "round_1" / "verdicts.jsonl", Rollout) if r.source == "refined"]
    assert refined and all("plain_logprob_sum" in r.meta for r in refined)
    ledger = json.loads((tmp_path / "round_1" / "ledger.json").read_text())
    assert ledger["proximity"]["forward_tokens"] == got["proximity"] > 0
    assert ledger["proximity"]["flops"] == 2 * checkpoint_params(tiny_dir) * got["proximity"]


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["fixed", "mix", "ema"])
def test_two_rounds_reference_chain_and_ledger(tiny_dir, tmp_path, reference):
    """Round 2's reference log-probs come from pi_0 (fixed), from pi_0 and pi_1 (mix: two passes) or from the
    average of their weights (ema, built by the test from the safetensors); the ledger charges each pass once."""
    import torch
    from safetensors.torch import load_file

    from alignlab.models import load_model
    from tests.test_logps import ATOL, unbatched_token_logps

    alignlab(*TINY_RUN, "data.eval_problems=4", "rounds=2", "base_eval=false", f"reference={reference}", "trainer.lr=1e-3",
             "verifier=noisy", "verifier.epsilon=0.3",
             f"model.path={tiny_dir}", f"hydra.run.dir={tmp_path}")
    for k in (1, 2):
        got = _check_round(tmp_path, k)
        assert got["reference"] > 0
        # the diagnostics the curriculum reads, from the round's verdicts: per prompt, the share of right samples
        verdicts = read_jsonl(tmp_path / f"round_{k}" / "verdicts.jsonl", Rollout)
        by_prompt: dict[str, list[bool]] = {}
        for r in verdicts:
            by_prompt.setdefault(r.problem_id, []).append(bool(r.verdict))
        diag = json.loads((tmp_path / f"round_{k}" / "metrics.json").read_text())["diagnostics"]
        rates = [sum(v) / len(v) for v in by_prompt.values()]
        assert diag["mean_pass_rate"] == pytest.approx(sum(rates) / len(rates))
        assert diag["pass_at_k"] == pytest.approx(sum(r > 0 for r in rates) / len(rates))
    rd, pi1 = tmp_path / "round_2", tmp_path / "round_1" / "checkpoint"
    pairs = [s.pair for s in read_jsonl(rd / "selected.jsonl", Selected)]
    tok = load_tokenizer(tiny_dir)

    def chosen_sums(model) -> list[float]:
        return [float(unbatched_token_logps(model, tok, p.prompt, p.chosen).sum()) for p in pairs]

    under = {"pi0": chosen_sums(load_model(tiny_dir).eval()), "pi1": chosen_sums(load_model(pi1).eval())}
    assert max(abs(a - b) for a, b in zip(under["pi0"], under["pi1"])) > 100 * ATOL  # the round moved the policy
    if reference == "ema":  # ema_1 = 0.5 * theta_0 + 0.5 * theta_1 (decay 0.5), tensor by tensor
        w0, w1 = load_file(tiny_dir / "model.safetensors"), load_file(pi1 / "model.safetensors")
        assert set(w0) == set(w1)
        ema = load_model(tiny_dir).eval()
        ema.load_state_dict({k: 0.5 * w0[k] + 0.5 * w1[k] for k in w0}, strict=False)
        ema.tie_weights()
        built = load_file(rd / "ema_reference" / "model.safetensors")
        for key in w0:
            torch.testing.assert_close(built[key], 0.5 * w0[key] + 0.5 * w1[key])
        under["ema"] = chosen_sums(ema)
    want = {"fixed": ["pi0"], "mix": ["pi0", "pi1"], "ema": ["ema"]}[reference]
    files = [json.loads(f.read_text()) for f in sorted(rd.glob("ref_logps.*.json"))]
    assert len(files) == len(want)  # mix: two reference passes in round 2; one in round 1 (the same pi_0)
    for name in want:
        assert sum(all(abs(a - b) < ATOL for a, b in zip(f["chosen"], under[name])) for f in files) == 1, name
    assert len(list((tmp_path / "round_1").glob("ref_logps.*.json"))) == 1
