"""verifier=reward_fn: verl compute_score and TRL reward_funcs by dotted path, thresholded, routed by data_source."""

from __future__ import annotations

import math

import pytest

from alignlab.verify import RewardFnVerifier
from tests import reward_examples as ex

PREDS = ["so 3 + 4 = 7\n#### 7", "#### 8", "no answer", "it is \\boxed{12}", "\\boxed{13}", "#### 1,200"]
GOLDS = ["7", "7", "7", "12", "12", "1200"]


def test_verl_compute_score_by_dotted_path_gives_scores_and_thresholded_verdicts():
    v = RewardFnVerifier(fn="tests.reward_examples.compute_score", threshold=0.5)
    want = [ex.compute_score("default", p, g) for p, g in zip(PREDS, GOLDS)]  # the function called directly
    assert want == [1.0, 0.1, 0.0, 0.0, 0.0, 1.0]
    got = v.check(PREDS, GOLDS)
    assert [x.score for x in got] == want and [x.correct for x in got] == [s >= 0.5 for s in want]
    assert got[0].extracted == "7"  # the answer the response ends with, as every verifier reports
    strict = RewardFnVerifier(fn="tests.reward_examples:compute_score", threshold=0.05)  # module:fn form too
    assert [x.correct for x in strict.check(PREDS, GOLDS)] == [True, True, False, False, False, True]


def test_trl_reward_func_lists_are_thresholded_and_none_is_never_correct():
    v = RewardFnVerifier(fn="tests.reward_examples.boxed_reward", threshold=0.0)
    want = ex.boxed_reward(PREDS, GOLDS)
    assert want == [None, None, None, 1.0, -1.0, None]
    got = v.check(PREDS, GOLDS)
    assert [x.score for x in got] == [-math.inf if w is None else w for w in want]
    assert [x.correct for x in got] == [False, False, False, True, False, False]


def test_routing_by_data_source_calls_each_source_its_own_function():
    v = RewardFnVerifier(routes={"openai/gsm8k": "tests.reward_examples.compute_score",
                                 "math_boxed": "tests.reward_examples.boxed_reward"}, threshold=0.5)
    sources = ["openai/gsm8k", "openai/gsm8k", "math_boxed", "math_boxed", "math_boxed", "openai/gsm8k"]
    got = v.check(PREDS, GOLDS, data_sources=sources)
    want = [ex.compute_score(s, p, g) if s == "openai/gsm8k" else ex.boxed_reward([p], [g])[0]
            for s, p, g in zip(sources, PREDS, GOLDS)]
    assert [x.score for x in got] == [-math.inf if w is None else w for w in want]
    assert [x.correct for x in got] == [True, False, False, True, False, True]
    with pytest.raises(ValueError, match="no reward function for data_source 'other'"):
        v.check(PREDS[:1], GOLDS[:1], data_sources=["other"])


def test_a_bad_function_path_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="verifier.fn: cannot import 'tests.reward_examples.nope'"):
        RewardFnVerifier(fn="tests.reward_examples.nope")
    with pytest.raises(ValueError, match="verifier.routes.x: cannot import"):
        RewardFnVerifier(fn="tests.reward_examples.compute_score", routes={"x": "no_such_module.f"})
    f = tmp_path / "my_rewards.py"
    f.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                 "    return {'score': float(solution_str.strip() == ground_truth)}\n")
    v = RewardFnVerifier(fn=f"{f}:compute_score")  # verl's custom_reward_function.path form, dict result
    assert [x.correct for x in v.check(["7", " 8"], ["7", "7"])] == [True, False]


@pytest.mark.slow
def test_a_round_graded_by_a_trl_reward_func_keeps_each_score(tmp_path):
    import json

    from tests.conftest import TINY_RUN, alignlab

    run = tmp_path / "run"
    alignlab("verifier=reward_fn", "verifier.fn=tests.reward_examples.boxed_reward", "verifier.threshold=0", *TINY_RUN,
             "rounds=1", "base_eval=false", f"hydra.run.dir={run}")
    gold = {p["id"]: p["answer"] for p in map(json.loads, (run / "round_1" / "prompts.jsonl").read_text().splitlines())}
    rows = [json.loads(line) for line in (run / "round_1" / "verdicts.jsonl").read_text().splitlines()]
    want = ex.boxed_reward([r["text"] for r in rows], [gold[r["problem_id"]] for r in rows])
    assert [r["meta"]["reward"] for r in rows] == want  # None: the function gave no reward
    assert [r["verdict"] for r in rows] == [w is not None and w >= 0 for w in want]
    assert 0 < sum(r["verdict"] for r in rows) < len(rows)  # both kinds, so pairs could be built


@pytest.mark.slow
def test_a_verl_parquet_round_routes_each_data_source_to_its_own_function(tmp_path):
    """data=verl's data_source column reaches the verifier in a real round: two sources, two functions, no
    fallback fn (a problem whose data_source were lost would have no route and stop the run)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from alignlab.data.arith import ArithDataset
    from tests.conftest import TINY_RUN, alignlab

    problems = ArithDataset(train_prompts=40, eval_problems=12, seed=3).train(1)
    rows = [{"data_source": "arith_a" if i % 2 else "arith_b", "prompt": [{"role": "user", "content": p.prompt}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": p.answer},
             "extra_info": {"split": "train", "index": i}} for i, p in enumerate(problems)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    run = tmp_path / "run"
    alignlab("data=verl", f"data.path={tmp_path / 'train.parquet'}", "verifier=reward_fn",
             "verifier.routes={arith_a: tests.reward_examples.last_number_score, "
             "arith_b: tests.reward_examples.length_reward}", *TINY_RUN, "rounds=1", "base_eval=false",
             f"hydra.run.dir={run}")
    source_of = {f"train.parquet:train/{r['extra_info']['index']}": r["data_source"] for r in rows}
    gold = {p["id"]: p["answer"] for p in map(json.loads, (run / "round_1" / "prompts.jsonl").read_text().splitlines())}
    got = [json.loads(line) for line in (run / "round_1" / "verdicts.jsonl").read_text().splitlines()]
    assert {source_of[r["problem_id"]] for r in got} == {"arith_a", "arith_b"}
    for r in got:
        src = source_of[r["problem_id"]]
        assert r["data_source"] == src  # kept on the rollout
        want = (ex.last_number_score(src, r["text"], gold[r["problem_id"]]) if src == "arith_a"
                else ex.length_reward([r["text"]])[0])
        assert r["meta"]["reward"] == want and r["verdict"] == (want >= 0.5)
    assert len({r["meta"]["reward"] for r in got if source_of[r["problem_id"]] == "arith_b"}) > 2  # lengths, not 0/1
    assert math.isfinite(json.loads((run / "round_1" / "eval.json").read_text())["accuracy"])  # held-out rows routed
