"""data=verl keeps a row's whole chat: system turns (and earlier turns) are rendered through the chat template."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignlab.data.arith import ArithDataset
from alignlab.data.files import FileDataset
from alignlab.models import ModelSpec, load_tokenizer
from tests.conftest import TINY_RUN, alignlab

SYSTEM = "You are a careful calculator. Count every step."


def _verl_parquet(path, n: int = 40) -> list[dict]:
    """verl rows (examples/data_preprocess schema) whose prompt is [system, user]; every tenth row user-only."""
    problems = ArithDataset(train_prompts=n, eval_problems=12, seed=3).train(1)
    rows = [{"data_source": "arith",
             "prompt": ([{"role": "system", "content": SYSTEM}] if i % 10 else []) + [{"role": "user", "content": p.prompt}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": p.answer},
             "extra_info": {"split": "train", "index": i}} for i, p in enumerate(problems)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def test_a_verl_system_turn_is_rendered_through_the_chat_template(tmp_path, tiny_dir):
    rows = _verl_parquet(tmp_path / "train.parquet")
    data = FileDataset(str(tmp_path / "train.parquet"), prompt_key="prompt", answer_key="reward_model.ground_truth",
                       id_key="extra_info.index", train_prompts=40, eval_problems=4)
    tok = load_tokenizer(tiny_dir)
    by_id = {f"train.parquet:train/{r['extra_info']['index']}": r for r in rows}
    problems = data.train(1) + data.heldout()
    assert len(problems) == 40
    for spec in (ModelSpec(path=str(tiny_dir)), ModelSpec(path=str(tiny_dir), system_prompt="model default")):
        for p in problems:
            row = by_id[p.id]["prompt"]
            assert p.prompt == row[-1]["content"]  # the last user turn stays the problem text
            want = tok.apply_chat_template(  # the row's own chat, as verl renders it
                row if len(row) > 1 or not spec.system_prompt else [{"role": "system", "content": "model default"},
                                                                     *row],
                tokenize=False, add_generation_prompt=True)
            assert spec.render(tok, p.prompt, p.messages) == want
    assert sum(SYSTEM in ModelSpec(path=str(tiny_dir)).render(tok, p.prompt, p.messages) for p in problems) == 36


@pytest.mark.slow
def test_a_verl_round_trains_on_prompts_that_keep_the_system_turn(tmp_path, tiny_dir):
    rows = _verl_parquet(tmp_path / "train.parquet")
    run = tmp_path / "run"
    alignlab("data=verl", f"data.path={tmp_path / 'train.parquet'}", *TINY_RUN, "rounds=1", "base_eval=false",
             "eval.log_samples=true", f"hydra.run.dir={run}")
    tok = load_tokenizer(tiny_dir)
    row_of = {f"train.parquet:train/{r['extra_info']['index']}": r["prompt"] for r in rows}
    want = lambda pid: tok.apply_chat_template(row_of[pid], tokenize=False, add_generation_prompt=True)  # noqa: E731
    # what the policy was prompted with (the held-out eval's sample log) and what it trained on (pairs.jsonl)
    samples = [json.loads(line) for line in (run / "round_1" / "samples_heldout.jsonl").read_text().splitlines()]
    assert sum(len(row_of[s["problem_id"]]) == 2 for s in samples) >= 6  # 12 held-out rows, 9 in 10 with a system turn
    pairs = [json.loads(line) for line in (run / "round_1" / "pairs.jsonl").read_text().splitlines()]
    assert pairs
    for rec in samples + pairs:
        assert rec["prompt"] == want(rec["problem_id"])
