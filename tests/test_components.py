"""Each component of the foundation on the embedded task, with the real tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.data import arith
from alignlab.eval import HeldoutEval, accuracy_se
from alignlab.generation.hf import HFGenerator, _prealloc_cache, uniform_noise
from alignlab.losses import DPOLoss
from alignlab.models import ModelSpec, load_tokenizer
from alignlab.pairs import BestWorstPairBuilder
from alignlab.records import Pair, Problem, Rollout, Selected, is_complete, read_jsonl, write_jsonl
from alignlab.reference import EMAReference, FixedReference, MixReference, PreviousRoundReference
from alignlab.sampling import BestOfNSampler, SampleContext
from alignlab.select import FullSelector
from alignlab.train.batching import collate, encode
from alignlab.train.torch_trainer import TorchTrainer, reference_logps
from alignlab.verify import ArithExactVerifier


def test_arith_is_deterministic_and_splits_never_overlap():
    a = arith.ArithDataset(train_prompts=300, eval_problems=300, seed=3)
    assert [p.prompt for p in a.train(1)] == [p.prompt for p in arith.ArithDataset(300, 300, seed=3).train(1)]
    assert [p.prompt for p in a.train(1)] != [p.prompt for p in a.train(2)]
    train = {p.prompt for k in range(1, 4) for p in a.train(k)}
    held = {p.prompt for p in a.heldout()}
    assert len(held) == 300 and not train & held
    assert {p.difficulty for p in a.heldout()} == set(arith.LEVELS)


def test_arith_solution_steps_are_true_and_end_boxed():
    for p in arith.generate(50, "train", seed=0):
        sol = arith.solution(p)
        assert sol.endswith(f"\\boxed{{{p.answer}}}.")
        for line in sol.splitlines()[:-1]:
            lhs, c = line.split(" = ")
            a, op, b = lhs.split()
            assert arith.apply(int(a), op, int(b)) == int(c)
        assert len(sol.splitlines()) == len(p.steps) + 1
        # the "stop early" habit boxes the penultimate value
        assert arith.solution(p, skip_last=True).endswith(f"\\boxed{{{p.values()[-2]}}}.")


def test_arith_difficulty_levels_scale_steps_and_operands():
    for level, (steps, hi) in arith.LEVELS.items():
        ps = arith.generate(30, "train", seed=1, levels=(level,))
        assert all(len(p.steps) == steps and p.start <= hi and p.level == level for p in ps)


def test_tokenizer_roundtrip_and_chat_template(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    spec = ModelSpec(path=str(tiny_dir))
    p = arith.generate(1, "train", seed=0)[0]
    prompt = spec.render(tok, p.text)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    text = arith.solution(p)
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    enc = encode(tok, prompt, text)
    ids, attn, tmask = collate([enc], tok.pad_token_id)
    # the target mask covers exactly the response tokens + the closing eos
    assert int(tmask.sum()) == len(enc.ids) - enc.prompt_len


def test_noise_is_a_pure_function_of_seed_step_token():
    s = torch.tensor([1, 2, 3], dtype=torch.int64)
    u = uniform_noise(s, 5, 100)
    assert torch.equal(u[1], uniform_noise(torch.tensor([2]), 5, 100)[0])
    assert (u > 0).all() and (u < 1).all() and abs(float(u.mean()) - 0.5) < 0.05
    assert not torch.equal(u, uniform_noise(s, 6, 100))


def test_hf_generation_reproducible_per_sample_whatever_the_batch(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    spec = ModelSpec(path=str(tiny_dir))
    prompts = [spec.render(tok, p.text) for p in arith.generate(6, "train", seed=0)]
    big = HFGenerator(max_new_tokens=40, batch_size=64).generate(tiny_dir, prompts, 3, seed=7)
    small = HFGenerator(max_new_tokens=40, batch_size=2).generate(tiny_dir, prompts[2:4], 3, seed=7)
    assert [s.text for s in big[2] + big[3]] == [s.text for s in small[0] + small[1]]
    other = HFGenerator(max_new_tokens=40).generate(tiny_dir, prompts, 3, seed=8)
    assert [s.text for o in big for s in o] != [s.text for o in other for s in o]
    s = big[0][0]
    assert s.tokens > 0 and s.logprob_sum < 0 and s.entropy >= 0
    greedy = HFGenerator(max_new_tokens=40).generate(tiny_dir, prompts[:2], 5, seed=1, greedy=True)
    assert len(greedy[0]) == 1 and greedy[0][0].finished


def test_preallocated_kv_cache_gives_the_same_samples_as_transformers_dynamic_cache(tiny_dir, monkeypatch):
    import alignlab.generation.hf as hf

    tok = load_tokenizer(tiny_dir)
    spec = ModelSpec(path=str(tiny_dir))
    prompts = [spec.render(tok, p.text) for p in arith.generate(12, "train", seed=4)]
    outs = []
    for prealloc in (True, False):
        g = HFGenerator(max_new_tokens=48, batch_size=16)
        if not prealloc:  # past_key_values=None: transformers' own DynamicCache
            monkeypatch.setattr(hf, "_prealloc_cache", lambda extra: None)
        outs.append([(s.text, s.logprob_sum, s.entropy, s.finished) for o in g.generate(tiny_dir, prompts, 4, seed=3)
                     for s in o])
    assert outs[0] == outs[1]


def test_preallocated_kv_layer_grows_selects_and_repeats_like_concatenation():
    cache = _prealloc_cache(extra=2)
    ref = []
    for t in (3, 1, 1, 1, 1):  # prefill 3, then steps past the 2 reserved positions: the buffer must grow
        k, v = torch.randn(2, 1, t, 4), torch.randn(2, 1, t, 4)
        keys, values = cache.update(k, v, 0)
        ref.append((k, v))
    assert torch.equal(keys, torch.cat([k for k, _ in ref], -2)) and torch.equal(values, torch.cat([v for _, v in ref], -2))
    cache.batch_repeat_interleave(3)
    cache.batch_select_indices(torch.tensor([5, 0]))
    layer = cache.layers[0]
    assert layer.get_seq_length() == 7 and torch.equal(layer.keys[0], keys[1]) and torch.equal(layer.values[1], values[0])
    k = torch.randn(2, 1, 1, 4)
    assert torch.equal(cache.update(k, k, 0)[0][:, :, -1:], k)


def test_top_p_keeps_only_the_nucleus():
    g = HFGenerator(top_p=0.5)
    logp = torch.log(torch.tensor([[0.6, 0.3, 0.1]] * 200))
    picks = g._sample(logp, torch.arange(200, dtype=torch.int64), 0)
    assert set(picks.tolist()) == {0}
    g = HFGenerator(top_p=0.8)
    picks = g._sample(logp, torch.arange(200, dtype=torch.int64), 0)
    assert set(picks.tolist()) == {0, 1}


def _ctx(tiny_dir, gen=None):
    tok = load_tokenizer(tiny_dir)
    spec = ModelSpec(path=str(tiny_dir))
    return SampleContext(str(tiny_dir), gen or HFGenerator(max_new_tokens=48), spec, tok, ArithExactVerifier(), 0)


def test_best_of_n_sampler_gives_n_samples_per_prompt(tiny_dir):
    problems = arith.ArithDataset(train_prompts=5).train(1)
    rs = BestOfNSampler(n=3).sample(problems, _ctx(tiny_dir))
    assert len(rs) == 15 and {r.problem_id for r in rs} == {p.id for p in problems}
    assert sorted(r.sample_index for r in rs if r.problem_id == problems[0].id) == [0, 1, 2]
    with pytest.raises(ValueError, match="n must be"):
        BestOfNSampler(n=0)


def _rollouts():
    mk = lambda pid, t, v: Rollout(pid, t, 3, -1.0, verdict=v)  # noqa: E731
    return [mk("a", "a1", True), mk("a", "a2", False), mk("a", "a3", False),
            mk("b", "b1", True), mk("b", "b2", True),  # all correct: no pair
            mk("c", "c1", False), mk("c", "c2", False)]  # all wrong: no pair


def test_best_worst_pairs_only_from_mixed_prompts():
    probs = [Problem(x, x, "1") for x in "abc"]
    pairs = BestWorstPairBuilder().build(probs, _rollouts(), {x: f"P{x}" for x in "abc"}, seed=0)
    assert len(pairs) == 1
    p = pairs[0]
    assert (p.problem_id, p.prompt, p.chosen) == ("a", "Pa", "a1") and p.rejected in ("a2", "a3")
    first = BestWorstPairBuilder(pick="first").build(probs, _rollouts(), {x: "" for x in "abc"}, seed=0)
    assert first[0].rejected == "a2"


def test_full_selector_keeps_everything():
    pairs = [Pair("a", "p", "c", "r"), Pair("b", "p", "c", "r")]
    assert [s.pair for s in FullSelector().select(pairs, seed=0)] == pairs


def test_records_roundtrip_and_truncation_is_detected(tmp_path):
    path = tmp_path / "x.jsonl"
    sel = [Selected(Pair("a", "p", "c", "r", {"k": 1}), 0.5)]
    write_jsonl(path, sel + sel)
    assert is_complete(path) and read_jsonl(path, Selected) == sel + sel
    assert len(path.read_text().splitlines()) == 2  # one line per record, no marker row
    full = path.read_text()
    path.write_text(full.splitlines()[0] + "\n")  # whole lines, one record short
    assert not is_complete(path)
    with pytest.raises(FileNotFoundError):
        read_jsonl(path, Selected)
    path.write_text(full[:-9])  # cut mid-line
    assert not is_complete(path)
    path.write_text(full)
    assert is_complete(path)
    write_jsonl(path, [])  # an empty stage is complete too, and is an empty file
    assert is_complete(path) and path.read_text() == "" and read_jsonl(path) == []


def test_references_pick_the_right_checkpoint(tmp_path):
    of = lambda d: {"chosen": [float(len(d))], "rejected": [0.0]}  # noqa: E731
    chain = ["base", "r1", "round_k_dir"]
    assert FixedReference().logps(chain, of, tmp_path)["chosen"] == [4]
    assert PreviousRoundReference().logps(chain, of, tmp_path)["chosen"] == [11]
    assert MixReference(0.0).logps(chain, of, tmp_path) == FixedReference().logps(chain, of, tmp_path)
    assert MixReference(1.0).logps(chain, of, tmp_path) == PreviousRoundReference().logps(chain, of, tmp_path)
    assert MixReference(0.25).logps(chain, of, tmp_path)["chosen"] == [pytest.approx(0.25 * 11 + 0.75 * 4)]


def test_mix_reference_on_real_checkpoints_matches_fixed_and_previous(tiny_dir, tmp_path):
    pairs = _pairs(tiny_dir, 4)
    tr = TorchTrainer(lr=3e-3, epochs=1, batch_size=4, warmup_ratio=0.0)
    tr.train(tiny_dir, pairs, reference_logps(tiny_dir, pairs), DPOLoss(), tmp_path / "r1", seed=0)
    chain = [str(tiny_dir), str(tmp_path / "r1")]
    of = lambda d: reference_logps(d, pairs)  # noqa: E731
    fixed, prev = FixedReference().logps(chain, of, tmp_path), PreviousRoundReference().logps(chain, of, tmp_path)
    assert fixed["chosen"] != prev["chosen"]
    assert MixReference(0.0).logps(chain, of, tmp_path)["chosen"] == fixed["chosen"]
    assert MixReference(1.0).logps(chain, of, tmp_path)["chosen"] == prev["chosen"]
    ema = EMAReference(decay=0.0).logps(chain, of, tmp_path)  # decay 0: the EMA is the latest weights
    assert ema["chosen"] == pytest.approx(prev["chosen"], abs=1e-4)


def test_ema_reference_averages_single_file_and_sharded_checkpoints(tiny_dir, tmp_path):
    """ema_1 = decay * theta_0 + (1 - decay) * theta_1, tensor by tensor, also when theta_1 is saved in shards
    (model.safetensors.index.json, as 7B checkpoints are)."""
    from safetensors.torch import load_file

    from alignlab.models import load_model, safetensors_files

    model = load_model(str(tiny_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    files = safetensors_files(tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists() and len(set(files.values())) > 1
    chain = [str(tiny_dir), str(tmp_path / "sharded")]
    EMAReference(decay=0.25).logps(chain, lambda d: {"chosen": [0.0], "rejected": [0.0]}, tmp_path / "w")
    base = load_file(str(tiny_dir / "model.safetensors"))
    ema = load_file(str(tmp_path / "w" / "ema_reference" / "model.safetensors"))
    assert set(base) <= set(ema)
    for k, v in base.items():
        torch.testing.assert_close(ema[k], v + 0.5 * 0.75)  # 0.25 * v + 0.75 * (v + 0.5)
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        safetensors_files(tmp_path)


def _pairs(tiny_dir, n=8):
    tok = load_tokenizer(tiny_dir)
    spec = ModelSpec(path=str(tiny_dir))
    out = []
    for p in arith.generate(n, "train", seed=5, levels=(3, 4)):
        out.append(Pair(str(p.answer), spec.render(tok, p.text), arith.solution(p), arith.solution(p, skip_last=True)))
    return out


def test_torch_trainer_dpo_raises_the_margin_and_saves_hf_dir(tiny_dir, tmp_path):
    pairs = _pairs(tiny_dir)
    ref = reference_logps(tiny_dir, pairs)
    tr = TorchTrainer(lr=3e-4, epochs=3, batch_size=4, grad_accum=2, warmup_ratio=0.0)
    res = tr.train(tiny_dir, pairs, ref, DPOLoss(beta=0.5), tmp_path / "ckpt", seed=0)
    assert (tmp_path / "ckpt" / "model.safetensors").exists() and res.steps == 3
    assert res.history[-1]["rewards/margins"] > res.history[0]["rewards/margins"]
    assert res.history[-1]["loss"] < math.log(2)
    after = reference_logps(tmp_path / "ckpt", pairs)
    margin = lambda r: sum(c - x for c, x in zip(r["chosen"], r["rejected"]))  # noqa: E731
    assert margin(after) > margin(ref)
    assert res.trained_tokens > 0 and all(math.isfinite(h["grad_norm"]) for h in res.history)


def test_trainer_stops_on_exploding_gradient(tiny_dir, tmp_path):
    from alignlab.train import NonFiniteLossError

    tr = TorchTrainer(lr=1e-3, epochs=1, batch_size=4, max_grad_norm_abort=1e-9)
    pairs = _pairs(tiny_dir, 4)
    with pytest.raises(NonFiniteLossError, match="resume=true"):
        tr.train(tiny_dir, pairs, reference_logps(tiny_dir, pairs), DPOLoss(), tmp_path / "ckpt", seed=0)
    assert not (tmp_path / "ckpt").exists()


def test_heldout_eval_reports_accuracy_se_and_difficulty(tiny_dir):
    data = arith.ArithDataset(eval_problems=24)
    tok = load_tokenizer(tiny_dir)
    res = HeldoutEval().evaluate(tiny_dir, HFGenerator(max_new_tokens=48), ModelSpec(path=str(tiny_dir)), tok,
                                 data.heldout())
    assert res["n"] == 24 and 0 <= res["accuracy"] <= 1
    assert res["se"] == pytest.approx(math.sqrt(res["accuracy"] * (1 - res["accuracy"]) / 24))
    assert set(res["by_difficulty"]) == {str(k) for k in arith.LEVELS}
    assert len(res["correct"]) == 24 and res["correct"].count("1") == round(res["accuracy"] * 24)  # report --bootstrap
    assert accuracy_se([True, False, True, True]) == (0.75, pytest.approx(math.sqrt(0.75 * 0.25 / 4)))


def test_arith_verifier_judges_the_boxed_integer():
    v = ArithExactVerifier()
    assert v.verify_batch(["1 + 2 = 3\nThe answer is \\boxed{3}.", "\\boxed{4}", "no answer"], ["3", "3", "3"]) == [
        True, False, False]


def test_wandb_logger_writes_offline_run_inside_the_output_dir(tmp_path, monkeypatch):
    from alignlab.logging import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "online")  # an inherited online mode must not win over the config
    lg = WandbLogger(project="alignlab-test", mode="offline")
    lg.start(tmp_path, {"seed": 0}, name="t")
    lg.log({"eval/accuracy": 0.5})
    lg.summary({"final_accuracy": 0.5})
    lg.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    with pytest.raises(ValueError, match="mode must be"):
        WandbLogger(mode="sometimes")


def test_mixed_policy_sampler_draws_lambda_share_on_policy(tiny_dir):
    from alignlab.sampling import MixedPolicySampler

    problems = arith.ArithDataset(train_prompts=3).train(1)
    rs = MixedPolicySampler(n=4, on_policy=0.5).sample(problems, _ctx(tiny_dir))
    assert len(rs) == 12
    assert sorted(r.source for r in rs if r.problem_id == problems[0].id) == ["base", "base", "policy", "policy"]
    assert sorted(r.sample_index for r in rs if r.problem_id == problems[0].id) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="on_policy"):
        MixedPolicySampler(on_policy=1.5)


def test_rollout_diagnostics_on_hand_built_rollouts():
    """Every value worked out by hand: p1 2 of 3 right (answers 3, 4), p2 none right (no answer, 7), p3 no samples
    (left out), p4 its one sample right; a sample of an unknown problem is ignored."""
    from alignlab.eval.metrics import rollout_diagnostics

    probs = [Problem(f"p{i}", "q", "3") for i in (1, 2, 3, 4)]

    def r(pid, verdict, extracted, entropy, finished=None):
        meta = {"entropy": entropy, **({} if finished is None else {"finished": finished})}
        return Rollout(pid, "t", 5, -1.0, verdict=verdict, extracted=extracted, meta=meta)

    rs = [r("p1", True, "3", 0.5, True), r("p1", False, "4", 1.0, False), r("p1", True, "3", 1.5, True),
          r("p2", False, None, 2.0, False), r("p2", False, "7", 3.0),  # no "finished" recorded: counted finished
          r("p4", True, "3", 4.0, True), r("other", True, "3", 100.0, False)]
    d = rollout_diagnostics(probs, rs)
    want = {"pass_at_k": 2 / 3, "mean_pass_rate": (2 / 3 + 0 + 1) / 3, "distinct_answers": (2 + 2 + 1) / 3,
            "token_entropy": (0.5 + 1.0 + 1.5 + 2.0 + 3.0 + 4.0) / 6, "finished_rate": 4 / 6,
            "all_correct": 1 / 3, "all_wrong": 1 / 3,
            "pool_pass_rate": 2 / 3}  # the prompts with both right and wrong samples: p1 only
    assert d == pytest.approx(want, abs=1e-12) and set(d) == set(want)


def test_mixed_policy_sampler_draws_base_samples_from_the_base_checkpoint(tiny_dir, tmp_path):
    """Base and policy are different checkpoints: each sample's logprob_sum is its own model's log-prob of the text
    (an unbatched forward), which tells the two apart."""
    from alignlab.models import load_model
    from alignlab.sampling import MixedPolicySampler
    from tests.test_logps import unbatched_token_logps

    base = load_model(tiny_dir)
    policy = load_model(tiny_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pol_dir = tmp_path / "policy"
    policy.save_pretrained(pol_dir, safe_serialization=True)
    load_tokenizer(tiny_dir).save_pretrained(pol_dir)
    tok, spec = load_tokenizer(tiny_dir), ModelSpec(path=str(tiny_dir))
    ctx = SampleContext(str(pol_dir), HFGenerator(max_new_tokens=48), spec, tok, ArithExactVerifier(), 0,
                        base_dir=str(tiny_dir))
    problems = arith.ArithDataset(train_prompts=2).train(1)
    rs = MixedPolicySampler(n=4, on_policy=0.5).sample(problems, ctx)
    assert sorted(r.source for r in rs) == ["base"] * 4 + ["policy"] * 4
    prompt = {p.id: spec.render(tok, p.prompt) for p in problems}
    models = {"base": base.eval(), "policy": policy.eval()}
    def logp(model, x) -> float:  # a cut sample has no end-of-turn token: its sum is over the text's tokens only
        per_token = unbatched_token_logps(model, tok, prompt[x.problem_id], x.text)
        return float(per_token.sum() if x.meta["finished"] else per_token[:-1].sum())

    # the samples whose text re-tokenises to the tokens generated (a garbled cut sample may not)
    same = [x for x in rs if len(tok(x.text, add_special_tokens=False)["input_ids"]) + x.meta["finished"] == x.tokens]
    assert {x.source for x in same} == {"base", "policy"}
    for x in same:
        own, other = logp(models[x.source], x), logp(models["policy" if x.source == "base" else "base"], x)
        assert abs(x.logprob_sum - own) < 1e-3 and abs(x.logprob_sum - other) > 1e-2, (x.source, own, other)


# chi-square 0.999 quantiles by degrees of freedom (a fixed table: the draws are seeded, so the test is deterministic;
# the level says how unlikely a correct sampler would be to fail with other seeds)
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


@pytest.mark.parametrize(("temperature", "top_p"), [(0.7, 1.0), (1.3, 1.0), (1.0, 0.8), (0.7, 0.9)])
def test_sampled_token_frequencies_follow_transformers_temperature_and_top_p(temperature, top_p):
    """20000 draws of the sampler's Gumbel-max step (one per seed) against the distribution transformers' own
    TemperatureLogitsWarper + TopPLogitsWarper define, by a chi-square test; the same draws reject the untempered
    distribution, so the test can tell temperatures apart."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    n = 20_000
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]])
    logp = torch.log_softmax(logits, -1)
    picks = HFGenerator(temperature=temperature, top_p=top_p)._sample(logp.expand(n, -1), torch.arange(n), 3)
    counts = torch.bincount(picks, minlength=8).double()

    def chi2(logits_ref: torch.Tensor) -> tuple[float, int]:
        p = torch.softmax(logits_ref, -1)[0].double()
        keep = p > 0
        assert counts[~keep].sum() == 0  # nothing outside the nucleus
        e = n * p[keep]
        return float(((counts[keep] - e) ** 2 / e).sum()), int(keep.sum()) - 1

    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logp.clone()))
    stat, df = chi2(warped)
    assert stat < CHI2_999[df], (stat, df, counts.tolist())
    if top_p == 1.0:
        wrong, df1 = chi2(logp)
        assert wrong > CHI2_999[df1], wrong  # temperature 1 is rejected by the same draws
