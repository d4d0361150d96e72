"""PACE: quality gates on constructed texts, the sampler's accounting, the corrective pair builder, and a reduced
end-to-end run through the CLI on the embedded task."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from alignlab.data import arith
from alignlab.generation import Sample
from alignlab.models import ModelSpec, load_tokenizer
from alignlab.pairs.corrective import CorrectivePairBuilder
from alignlab.records import Problem, Rollout, read_jsonl
from alignlab.sampling import SampleContext
from alignlab.sampling.gates import (
    PASS,
    ArithStepsGate,
    Candidate,
    FormatGate,
    NoHintLeakGate,
    ProximityGate,
    VerifiedGate,
    apply_gates,
    build_gates,
)
from alignlab.sampling.pace import PaceSampler
from alignlab.verify import ArithExactVerifier, NoisyVerifier
from tests.conftest import TINY_RUN, alignlab


@pytest.fixture(autouse=True)
def one_thread():
    """Torch on one thread: the CI box has 2 shared cores, and oversubscribed threads spin."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PROBLEM = Problem(id="p", prompt="Ava has 5 apples. Ava buys 7 more apples. Ava gives away 4 apples. How many apples "
                                 "does Ava have now?", answer="8")
GOOD = "5 + 7 = 12\n12 - 4 = 8\nThe answer is \\boxed{8}."
FAILED = "5 + 7 = 12\nThe answer is \\boxed{12}."


def cand(text: str, tokens: int = 20, verified: bool = True, finished: bool = True, lp: float = -2.0,
         failed_tokens: int = 14, problem: Problem = PROBLEM) -> Candidate:
    r = Rollout(problem.id, text, tokens, lp, verdict=verified, source="refined", sample_index=2,
                meta={"verified": verified, "finished": finished, "refines": 0})
    return Candidate(problem, r, Rollout(problem.id, FAILED, failed_tokens, -5.0, verdict=False))


def test_each_gate_passes_a_clean_fix_and_rejects_what_it_should():
    gates = [VerifiedGate(), NoHintLeakGate(), FormatGate(), ArithStepsGate()]
    assert apply_gates(gates, [cand(GOOD)], None) == [PASS]
    rejects = {
        "verified": [cand(GOOD, verified=False)],
        "no_hint_leak": [
            cand("The correct final answer is 8.\n5 + 7 = 12\n12 - 4 = 8\nThe answer is \\boxed{8}."),
            cand("We know the correct answer is 8.\n5 + 7 = 12\n12 - 4 = 8\nThe answer is \\boxed{8}."),
            cand("Looking at the previous attempt:\n5 + 7 = 12\n12 - 4 = 8\nThe answer is \\boxed{8}."),
            cand("It is 8.\n5 + 7 = 12\n12 - 4 = 8\nThe answer is \\boxed{8}."),  # answer before the derivation
            cand("\\boxed{8}\n5 + 7 = 12\n12 - 4 = 8"),
            cand("The answer is \\boxed{8}."),  # no derivation at all
        ],
        "format": [
            cand("5 + 7 = 12\n12 - 4 = 8\nThe answer is 8."),  # no box
            cand("5 + 7 = 12\n12 - 4 = 8\n\\boxed{8} or \\boxed{9}."),  # hedging
            cand(GOOD, finished=False),  # cut at max_new_tokens
            cand(GOOD, tokens=60, failed_tokens=14),  # > 3x the failed attempt
        ],
        "arith_steps": [
            cand("5 + 7 = 12\n12 - 4 = 9\nThe answer is \\boxed{8}."),  # a false step
            cand("5 + 7 = 12\n12 - = 8\nThe answer is \\boxed{8}."),  # a malformed step (strict)
        ],
    }
    for name, cs in rejects.items():
        got = apply_gates(gates, cs, None)
        assert got == [name] * len(cs), (name, got)
    # a gold number that occurs in the problem may appear early; a chain break fails only with chain=true
    p5 = Problem("q", "Bo has 5 cards. Bo finds 3 cards. Bo loses 3 cards. How many?", "5")
    assert NoHintLeakGate().check([cand("Bo starts with 5.\n5 + 3 = 8\n8 - 3 = 5\n\\boxed{5}", problem=p5)]) == [True]
    no_steps = cand("Add then subtract: twelve, then eight.\nThe answer is \\boxed{8}.")
    assert ArithStepsGate().check([no_steps]) == [False] and ArithStepsGate(min_steps=0).check([no_steps]) == [True]
    broken = cand("5 + 7 = 12\n11 - 3 = 8\nThe answer is \\boxed{8}.")
    assert ArithStepsGate().check([broken]) == [True] and ArithStepsGate(chain=True).check([broken]) == [False]
    assert FormatGate(max_tokens=10).check([cand(GOOD)]) == [False]
    assert FormatGate(max_length_ratio=None).check([cand(GOOD, tokens=60)]) == [True]


def test_proximity_gate_scores_refine_prompt_logprob_or_exact_plain_prompt(tiny_dir):
    assert ProximityGate(threshold=-1.0).check([cand(GOOD, lp=-10.0), cand(GOOD, lp=-30.0)], None) == [True, False]
    c = cand(GOOD, lp=-40.0)
    assert ProximityGate().check([c], None) == [True] and c.refined.meta["proximity_logprob_per_token"] == -2.0
    tok = load_tokenizer(tiny_dir)
    ctx = SampleContext(str(tiny_dir), None, ModelSpec(path=str(tiny_dir)), tok, None, seed=0)
    good, bad = cand(GOOD, lp=-40.0), cand("apples apples apples\n\\boxed{8}", lp=-40.0)
    assert ProximityGate(threshold=-3.0, exact=True).check([good, bad], ctx) == [True, False]
    assert good.refined.meta["plain_logprob_sum"] < 0
    assert good.refined.meta["proximity_logprob_per_token"] > bad.refined.meta["proximity_logprob_per_token"]


def test_gates_build_from_a_mapping_with_nulls_and_reject_junk():
    gates = build_gates({"verified": VerifiedGate(), "arith_steps": None, "format": FormatGate()})
    assert [g.name for g in gates] == ["verified", "format"]
    with pytest.raises(ValueError, match="gates"):
        build_gates([{"threshold": 1}])
    for bad in ({"max_boxed": 0}, {"max_length_ratio": 0}, {"min_tokens": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FormatGate(**bad)
    with pytest.raises(ValueError, match="phrases"):
        NoHintLeakGate(phrases=[""])


class ScriptedGenerator:
    """Policy samples and refinements from a script keyed by problem; records the refine prompts it saw."""

    def __init__(self, policy: dict[str, list[str]], fixes: dict[str, str]) -> None:
        self.policy, self.fixes, self.refine_prompts = policy, fixes, []

    def generate(self, model_dir, prompts, n, seed, greedy=False):
        out = []
        for pr in prompts:
            pid = next(k for k in self.policy if k in pr)
            if "Previous attempt" in pr:
                self.refine_prompts.append(pr)
                texts = [self.fixes[pid]]
            else:
                texts = self.policy[pid][:n]
            out.append([Sample(t, 10 + len(t) // 4, -3.0, 1.0, True) for t in texts])
        return out

    def release(self) -> None:
        pass


def _scripted(verifier=None):
    probs = [Problem(f"id{i}", f"problem-{i}: Ava has 5 apples.", str(8 + i)) for i in range(4)]
    ok = [f"5 + {3 + i} = {8 + i}\nThe answer is \\boxed{{{8 + i}}}." for i in range(4)]
    bad = [f"5 + 1 = 6\nThe answer is \\boxed{{{100 + i}}}." for i in range(4)]
    policy = {"problem-0": [ok[0], ok[0]], "problem-1": [ok[1], bad[1]], "problem-2": [bad[2], bad[2] + " "],
              "problem-3": [bad[3], ok[3]]}
    fixes = {"problem-0": ok[0], "problem-1": ok[1], "problem-2": ok[2], "problem-3": "The correct final answer is 11.\n" + ok[3]}
    gen = ScriptedGenerator(policy, fixes)
    spec = ModelSpec(path="unused")
    tok = type("Tok", (), {"apply_chat_template": lambda self, m, tokenize, add_generation_prompt: m[-1]["content"]})()
    ctx = SampleContext("unused", gen, spec, tok, verifier or ArithExactVerifier(), seed=3)
    return probs, ctx, gen


def test_sampler_refines_once_per_failing_prompt_and_gates_refinements():
    probs, ctx, gen = _scripted()
    s = PaceSampler(n=2, gates=[VerifiedGate(), NoHintLeakGate(), FormatGate(), ArithStepsGate()], pick="first")
    rs = s.sample(probs, ctx)
    refined = [r for r in rs if r.source == "refined"]
    assert len(rs) / len(probs) == 2 + 3 / 4  # effective N: 3 of 4 prompts had a failure
    assert [r.problem_id for r in refined] == ["id1", "id2", "id3"]
    assert all(r.verdict is not None for r in rs)  # the runner's verify stage has nothing left to do
    assert [r.meta["refines"] for r in refined] == [1, 0, 0]  # the index of the failed policy sample
    assert [r.meta["gate"] for r in refined] == [PASS, PASS, "no_hint_leak"]
    assert [r.verdict for r in refined] == [True, True, False] and refined[2].meta["verified"] is True
    assert s.last_gate_counts == {PASS: 2, "verified": 0, "no_hint_leak": 1, "format": 0, "arith_steps": 0}
    # the refine prompt carries the problem, the failed attempt and the gold answer
    assert "problem-2" in gen.refine_prompts[1] and "\\boxed{102}" in gen.refine_prompts[1]
    assert "The correct final answer is 10" in gen.refine_prompts[1]
    assert len(PaceSampler(refine_if="all_failed").sample(probs, _scripted()[1])) == 2 * 4 + 1


def test_sampler_keeps_the_truth_under_a_noisy_verifier():
    probs, ctx, _ = _scripted(NoisyVerifier(ArithExactVerifier(), epsilon=1.0))
    rs = PaceSampler(n=2).sample(probs, ctx)
    pol = [r for r in rs if r.source == "policy"]
    assert all(r.meta["true_verdict"] is (not r.verdict) for r in pol)  # every label flipped, truth kept


def test_corrective_builder_mixes_kinds_on_the_plain_prompt():
    probs, ctx, _ = _scripted()
    rs = PaceSampler(n=2, pick="first").sample(probs, ctx)
    prompts = {p.id: f"PLAIN {p.prompt}" for p in probs}
    pairs = CorrectivePairBuilder().build(probs, rs, prompts, seed=0)
    kinds = Counter((p.problem_id, p.meta["kind"]) for p in pairs)
    # id1: fix + natural; id2: both failed -> corrective only; id3: fix leaked the hint -> natural only
    assert kinds == Counter({("id1", "corrective"): 1, ("id1", "natural"): 1, ("id2", "corrective"): 1,
                             ("id3", "natural"): 1})
    assert all(p.prompt == prompts[p.problem_id] and "Previous attempt" not in p.prompt for p in pairs)
    for p in pairs:
        assert p.meta["chosen_true"] is True and p.chosen != p.rejected
        if p.meta["kind"] == "corrective":
            assert p.meta["chosen_source"] == "refined" and p.meta["rejected_source"] == "policy"
    only_nat = CorrectivePairBuilder(corrective=False).build(probs, rs, prompts, 0)
    only_corr = CorrectivePairBuilder(natural=False).build(probs, rs, prompts, 0)
    assert {p.meta["kind"] for p in only_nat} == {"natural"} and {p.meta["kind"] for p in only_corr} == {"corrective"}
    capped = {w: CorrectivePairBuilder(max_pairs_per_prompt=1, corrective_weight=w).build(probs, rs, prompts, 0)
              for w in (0.0, 1.0)}
    assert [p.meta["kind"] for p in capped[1.0] if p.problem_id == "id1"] == ["corrective"]
    assert [p.meta["kind"] for p in capped[0.0] if p.problem_id == "id1"] == ["natural"]
    two_failed = CorrectivePairBuilder(natural=False, against="all_failed").build(probs, rs, prompts, 0)
    assert sum(p.problem_id == "id2" for p in two_failed) == 2
    with pytest.raises(ValueError, match="corrective_weight"):
        CorrectivePairBuilder(corrective_weight=1.5)
    with pytest.raises(ValueError, match="natural"):
        CorrectivePairBuilder(corrective=False, natural=False)


def test_tiny_model_refinement_gives_gated_pairs_at_effective_n_between_2_and_3(tiny_dir):
    from alignlab.generation.hf import HFGenerator

    tok = load_tokenizer(tiny_dir)
    spec = ModelSpec(path=str(tiny_dir), refine_template="{problem}\nPrevious attempt:\n{attempt}\nThe correct final "
                                                         "answer is {answer}. Write a corrected solution.")
    probs = [arith.to_problem(p) for p in arith.generate(24, "train", seed=5, levels=(1, 3))]
    ctx = SampleContext(str(tiny_dir), HFGenerator(max_new_tokens=48, batch_size=64), spec, tok,
                        ArithExactVerifier(), seed=11)
    s = PaceSampler(n=2, gates=[VerifiedGate(), NoHintLeakGate(), FormatGate(), ArithStepsGate()], greedy_refine=True)
    rs = s.sample(probs, ctx)
    assert 2 < len(rs) / len(probs) < 3
    assert s.last_gate_counts[PASS] >= 1, s.last_gate_counts
    assert sum(s.last_gate_counts.values()) == sum(r.source == "refined" for r in rs)
    pairs = CorrectivePairBuilder().build(probs, rs, {p.id: spec.render(tok, p.prompt) for p in probs}, seed=0)
    corr = [p for p in pairs if p.meta["kind"] == "corrective"]
    assert corr and all("Previous attempt" not in p.prompt and "\\boxed" in p.chosen for p in corr)
    for p in corr:  # every corrective chosen passes the gates again, as a text
        c = Candidate(next(q for q in probs if q.id == p.problem_id),
                      Rollout(p.problem_id, p.chosen, p.meta["chosen_tokens"], 0.0, True, meta={"verified": True}),
                      Rollout(p.problem_id, p.rejected, p.meta["rejected_tokens"], 0.0, False))
        assert apply_gates(s.gates, [c], None) == [PASS]


@pytest.mark.slow
def test_reduced_pace_run_end_to_end_reports_effective_n_and_chosen_fp_rate(tmp_path, tiny_dir):
    run = [a for a in TINY_RUN if not a.startswith("sampler.n")]
    alignlab("experiment=pace", *run, "rounds=1", "base_eval=false", "verifier=noisy", "verifier.epsilon=0.2",
             f"hydra.run.dir={tmp_path}")
    s = json.loads((tmp_path / "summary.json").read_text())
    r = s["rounds"][0]
    led = r["ledger"]
    assert 2 * led["prompts"] < led["samples"] <= 3 * led["prompts"]
    assert 0.0 <= r["chosen_false_positive_rate"] <= 1.0
    rollouts = read_jsonl(tmp_path / "round_1" / "rollouts.jsonl", Rollout)
    refined = [x for x in rollouts if x.source == "refined"]
    assert len(rollouts) == led["samples"] and refined
    assert all("gate" in x.meta and "true_verdict" in x.meta for x in refined)
    pairs = [json.loads(line) for line in (tmp_path / "round_1" / "pairs.jsonl").read_text().splitlines()]
    assert r["pairs"] == len(pairs) and {p["meta"]["kind"] for p in pairs} <= {"corrective", "natural"}
    assert all("Previous attempt" not in p["prompt"] for p in pairs)
    assert all(p["meta"]["chosen_true"] is not None for p in pairs)


def test_arith_steps_gate_off_is_one_override_and_then_a_false_step_refinement_passes(tiny_dir):
    """The fair noise-study setting (experiments/pace/README.md): without `arith_steps`, PACE has no process oracle
    that DPO-R1 lacks, so a refinement with a false step but the right boxed answer is accepted as DPO-R1's would be."""
    from alignlab import config as C
    from tests.test_config import _choices, _compose

    cfg = _compose(["experiment=pace", "sampler.gates.arith_steps=null", f"model.path={tiny_dir}"])
    sampler = C.build("sampler", cfg.sampler, _choices(cfg))
    assert [g.name for g in sampler.gates] == ["verified", "no_hint_leak", "format", "proximity"]
    false_step = cand("5 + 7 = 13\n13 - 4 = 8\nThe answer is \\boxed{8}.")
    on = _compose(["experiment=pace", f"model.path={tiny_dir}"])
    with_gate = C.build("sampler", on.sampler, _choices(on)).gates
    assert apply_gates(with_gate, [false_step], None) == ["arith_steps"]
    assert apply_gates(sampler.gates, [cand("5 + 7 = 13\n13 - 4 = 8\nThe answer is \\boxed{8}.")], None) == [PASS]
