"""pair_builder=max_min_reward: chosen = highest scalar reward, rejected = lowest, from verifier=reward_fn's meta.reward."""

from __future__ import annotations

import json

import pytest

from alignlab.pairs import MaxMinRewardPairBuilder
from alignlab.records import Problem, Rollout
from tests import reward_examples as ex


def _r(pid: str, text: str, reward: float | None, verdict: bool) -> Rollout:
    return Rollout(pid, text, 3, -1.0, verdict=verdict, meta={"reward": reward})


ROLLOUTS = [
    _r("a", "a0", 0.2, False), _r("a", "a1", 0.9, True), _r("a", "a2", -0.5, False), _r("a", "a3", 0.9, True),
    _r("b", "b0", 0.3, False), _r("b", "b1", 0.3, False),  # equal rewards: no preference
    _r("c", "c0", None, False), _r("c", "c1", 0.1, False), _r("c", "c2", 0.4, False),  # all below threshold
    _r("d", "d0", None, False), _r("d", "d1", 1.0, True),  # one scored rollout: nothing to pair it with
    _r("e", "e0", 0.50, True), _r("e", "e1", 0.45, False),  # a gap of 0.05
]
PROBLEMS = [Problem(x, x, "1") for x in "abcde"]
PROMPTS = {x: f"P{x}" for x in "abcde"}


def _rows(pairs):
    return [(p.problem_id, p.prompt, p.chosen, p.rejected, p.meta["chosen_reward"], p.meta["rejected_reward"])
            for p in pairs]


def test_hand_built_prompts_pair_their_highest_with_their_lowest_reward():
    got = MaxMinRewardPairBuilder().build(PROBLEMS, ROLLOUTS, PROMPTS, seed=0)
    assert _rows(got) == [("a", "Pa", "a1", "a2", 0.9, -0.5),  # the first of the two 0.9s
                          ("c", "Pc", "c2", "c1", 0.4, 0.1),  # None left out; pairs though nothing is correct
                          ("e", "Pe", "e0", "e1", 0.50, 0.45)]
    assert [p.meta["kind"] for p in got] == ["max_min_reward"] * 3 and got[0].meta["pass_rate"] == 0.5
    strict = MaxMinRewardPairBuilder(require_correct=True, min_margin=0.1).build(PROBLEMS, ROLLOUTS, PROMPTS, seed=0)
    assert _rows(strict) == [("a", "Pa", "a1", "a2", 0.9, -0.5)]  # c: chosen not correct; e: gap 0.05 <= 0.1
    with pytest.raises(ValueError, match="verifier=reward_fn"):
        MaxMinRewardPairBuilder().build(PROBLEMS, [Rollout("a", "x", 1, 0.0, verdict=True)], PROMPTS, seed=0)


@pytest.mark.slow
def test_a_round_with_a_trl_reward_pairs_the_longest_with_the_shortest_answer(tmp_path):
    """One tiny round graded by length_reward (len/100, a stand-in reward model): pairs.jsonl holds, per prompt,
    the rollout the function itself scores highest against the one it scores lowest, recomputed from the texts."""
    from tests.conftest import TINY_RUN, alignlab

    run = tmp_path / "run"
    alignlab("verifier=reward_fn", "verifier.fn=tests.reward_examples.length_reward", "verifier.threshold=0.5",
             "pair_builder=max_min_reward", *TINY_RUN, "rounds=1", "base_eval=false", f"hydra.run.dir={run}")
    rows = [json.loads(line) for line in (run / "round_1" / "verdicts.jsonl").read_text().splitlines()]
    by_problem: dict[str, list[tuple[float, str]]] = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append((ex.length_reward([r["text"]])[0], r["text"]))
    want = {}
    for pid, scored in by_problem.items():
        hi = max(s for s, _ in scored)
        lo = min(s for s, _ in scored)
        if hi > lo:
            want[pid] = (next(t for s, t in scored if s == hi), next(t for s, t in scored if s == lo), hi, lo)
    pairs = [json.loads(line) for line in (run / "round_1" / "pairs.jsonl").read_text().splitlines()]
    got = {p["problem_id"]: (p["chosen"], p["rejected"], p["meta"]["chosen_reward"], p["meta"]["rejected_reward"])
           for p in pairs}
    assert len(pairs) == len(got) and got == want and len(want) >= 2
