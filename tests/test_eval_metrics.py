"""Evaluation beyond greedy pass@1: avg@k, the unbiased pass@k, maj@k, the per-sample log and one W&B key per
benchmark; the estimators against brute force and hand-worked cases, the evaluators on the real tiny model."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from alignlab.data import arith
from alignlab.eval import HeldoutEval, eval_log_keys, write_sample_logs
from alignlab.eval.metrics import answer_vote_key, majority_index, pass_at_k, sampled_metrics
from alignlab.generation.hf import HFGenerator
from alignlab.models import ModelSpec, load_tokenizer
from alignlab.verify import ArithExactVerifier
from tests.conftest import alignlab


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (the first c correct) holding at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_the_share_of_k_subsets_with_a_correct_sample():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(200, 3, 1) == pytest.approx(3 / 200)  # pass@1 is the mean accuracy of the samples
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_maj_avg_and_pass_on_a_hand_worked_case():
    # 4 problems x 4 samples; answers as extracted, verdicts as a grader gave them (gold: the correct answer)
    extracted = [["12", "12", "7", None],            # majority 12 (correct)             -> maj right
                 ["3", "4", "4", "3"],               # tie 3 vs 4: the first seen (3) wins -> 3 is wrong
                 [None, None, None, None],           # no answer at all                   -> wrong
                 [" 5", "6", "5 ", "6"]]             # tie after normalising: " 5" first  -> right
    correct = [[True, True, False, False],
               [False, True, True, False],
               [False, False, False, False],
               [True, False, True, False]]
    assert [majority_index([answer_vote_key(x) for x in e]) for e in extracted] == [0, 0, None, 0]
    m = sampled_metrics(correct, extracted, [1, 2, 4])
    per_avg = [2 / 4, 2 / 4, 0, 2 / 4]
    assert m["avg@4"] == pytest.approx(sum(per_avg) / 4)
    assert m["avg@4_se"] == pytest.approx(math.sqrt(sum((a - 0.375) ** 2 for a in per_avg) / 4) / 2)
    assert m["maj@4"] == pytest.approx(2 / 4)  # problems 1 and 4
    # pass@2 with 2 of 4 correct: 1 - C(2,2)/C(4,2) = 5/6; pass@4: any correct
    assert m["pass@2"] == pytest.approx((5 / 6 * 3) / 4)
    assert m["pass@4"] == pytest.approx(3 / 4) and m["pass@1"] == pytest.approx(m["avg@4"])


def test_heldout_eval_with_samples_matches_its_own_sample_log(tiny_dir, tmp_path):
    """avg@k / pass@k / maj@k recomputed by hand from the logged answers (regraded by a fresh verifier)."""
    problems = arith.ArithDataset(eval_problems=8).heldout()
    tok, spec = load_tokenizer(tiny_dir), ModelSpec(path=str(tiny_dir))
    ev = HeldoutEval(samples=4, temperature=1.0, top_p=1.0, pass_k=[1, 2, 4], log_samples=True)
    gen = HFGenerator(max_new_tokens=48, temperature=0.0)  # the run's generator greedy: the eval's own knobs sample
    res = ev.evaluate(tiny_dir, gen, spec, tok, problems)
    assert (gen.temperature, gen.top_p) == (0.0, 1.0)  # restored after the eval
    res = write_sample_logs(res, tmp_path)
    assert "sample_log" not in res
    rows = [json.loads(line) for line in (tmp_path / "samples_heldout.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * (1 + 4) and sum(r["greedy"] for r in rows) == 8
    regraded = ArithExactVerifier().check([r["response"] for r in rows], [r["gold"] for r in rows])
    assert [r["correct"] for r in rows] == [v.correct for v in regraded]
    assert [r["extracted"] for r in rows] == [v.extracted for v in regraded]
    by_problem: dict[str, list[dict]] = {}
    for r in rows:
        if not r["greedy"]:
            by_problem.setdefault(r["problem_id"], []).append(r)
    assert [p.id for p in problems] == list(by_problem) and all(len(v) == 4 for v in by_problem.values())
    cs = [sum(r["correct"] for r in v) for v in by_problem.values()]
    assert res["avg@4"] == pytest.approx(sum(cs) / 32)
    assert res["pass@2"] == pytest.approx(sum(_brute_pass_at_k(4, c, 2) for c in cs) / 8)
    assert res["pass@4"] == pytest.approx(sum(c > 0 for c in cs) / 8)
    maj = 0
    for v in by_problem.values():
        answers = [r["extracted"].strip() if r["extracted"] else None for r in v]
        counts = {a: answers.count(a) for a in answers if a is not None}
        if counts:
            top = next(a for a in answers if a is not None and counts[a] == max(counts.values()))
            maj += int(top == v[0]["gold"])
    assert res["maj@4"] == pytest.approx(maj / 8)
    greedy = [r["correct"] for r in rows if r["greedy"]]
    assert res["accuracy"] == pytest.approx(sum(greedy) / 8) and res["samples"] == 4
    assert len({r["response"] for r in rows if not r["greedy"]}) > 8  # sampled, not 4 copies of the greedy answer
    keys = eval_log_keys(res)
    assert keys["eval/heldout/accuracy"] == res["accuracy"] and keys["eval/heldout/maj@4"] == res["maj@4"]
    assert keys["eval/heldout/pass@2_se"] == res["pass@2_se"] and "eval/heldout/correct" not in keys


@pytest.mark.parametrize("bad, match", [({"samples": -1}, "samples must be"), ({"samples": 4, "temperature": 0},
                                        "temperature must be > 0"), ({"samples": 4, "pass_k": [5]}, "pass_k"),
                                        ({"pass_k": [1]}, "pass_k needs samples")])
def test_sampling_knobs_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        HeldoutEval(**bad)


@pytest.mark.slow
def test_alignlab_eval_with_samples_writes_per_benchmark_metrics_and_sample_logs(tmp_path):
    """Three rows per benchmark in each upstream schema (GSM8K's ``#### answer``, AMC23's numeric answer), written
    here so that the test does not depend on ../shared/data beside the clone."""
    root, out = tmp_path / "benchmarks", tmp_path / "ev"
    rows = {"gsm8k": [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
                      for a, b in ((2, 3), (10, 7), (41, 1))],
            "amc23": [{"id": i, "problem": f"What is {a} times {b}?", "answer": float(a * b), "url": ""}
                      for i, (a, b) in enumerate(((2, 3), (4, 5), (6, 7)))]}
    for name, rs in rows.items():
        (root / name).mkdir(parents=True)
        (root / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    alignlab("eval", "eval=math_suite", "eval.benchmarks=[gsm8k,amc23]", "eval.limit=3", "eval.samples=4",
             "eval.log_samples=true", "generation.max_new_tokens=24", f"eval.root={root}", f"hydra.run.dir={out}")
    table = json.loads((out / "eval.json").read_text())
    assert set(table) == {"gsm8k", "amc23"}
    for name, m in table.items():
        assert {"accuracy", "avg@4", "avg@4_se", "pass@4", "pass@4_se", "maj@4", "maj@4_se"} <= set(m)
        rows = [json.loads(line) for line in (out / f"samples_{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 3 * (1 + 4) and {r["benchmark"] for r in rows} == {name}
        assert set(rows[0]) >= {"prompt", "response", "extracted", "gold", "correct", "finished"}
        assert m["avg@4"] == pytest.approx(sum(r["correct"] for r in rows if not r["greedy"]) / 12)
