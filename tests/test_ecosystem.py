"""Fits the ecosystem: data through `datasets`, pair files that `datasets` and TRL read unchanged, hub ids that
fail fast offline, W&B runs that resume under one id, progress a person can follow."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from alignlab.data.arith import ArithDataset
from tests.conftest import TINY, TINY_RUN, alignlab

ROUND = [*TINY_RUN, "rounds=1"]
UNREACHABLE = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""}  # a closed local port: offline on any CI


def _arith_rows(n: int = 60) -> list[dict]:
    problems = ArithDataset(train_prompts=n, eval_problems=12, seed=3).train(1)
    return [{"question": p.prompt, "answer": p.answer, "uid": p.id, "level": p.difficulty} for p in problems]


def _verl_rows(rows: list[dict]) -> list[dict]:
    """verl's RL parquet schema (examples/data_preprocess/gsm8k.py)."""
    return [{"data_source": "arith", "prompt": [{"role": "user", "content": r["question"]}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": r["answer"]},
             "extra_info": {"split": "train", "index": i, "level": r["level"]}} for i, r in enumerate(rows)]


# -- data through `datasets` -------------------------------------------------------------------------------------

def test_hf_data_reads_jsonl_parquet_and_directories_with_configured_keys(tmp_path):
    import datasets

    from alignlab.data.files import FileDataset

    rows = _arith_rows(40)
    (tmp_path / "d").mkdir()
    datasets.Dataset.from_list(rows).to_json(tmp_path / "train.jsonl")
    datasets.Dataset.from_list(rows[:30]).to_parquet(tmp_path / "d" / "train.parquet")
    datasets.Dataset.from_list(rows[30:]).to_parquet(tmp_path / "d" / "test.parquet")
    ds = FileDataset(str(tmp_path / "train.jsonl"), id_key="uid", difficulty_key="level", train_prompts=8,
                     eval_problems=10)
    held, r1, r2 = ds.heldout(), ds.train(1), ds.train(2)
    assert len(held) == 10 and len(r1) == len(r2) == 8
    assert not {p.id for p in held} & {p.id for p in r1 + r2}  # held-out rows are never trained on
    by_id = {f"train.jsonl:train/{r['uid']}": r for r in rows}
    for p in held + r1:
        assert p.prompt == by_id[p.id]["question"] and p.answer == by_id[p.id]["answer"]
        assert p.difficulty == by_id[p.id]["level"]
    d = FileDataset(str(tmp_path / "d"), heldout_split="test", train_prompts=8, eval_problems=5)
    assert [p.answer for p in d.heldout()] == [r["answer"] for r in rows[30:35]]
    assert {p.answer for p in d.train(1)} <= {r["answer"] for r in rows[:30]}
    with pytest.raises(ValueError, match="heldout_split: path .* is a single file"):
        FileDataset(str(tmp_path / "train.jsonl"), heldout_split="test")
    with pytest.raises(ValueError, match="path: no such file or directory"):
        FileDataset(str(tmp_path / "missing.parquet"))


def test_verl_preset_on_a_local_parquet_runs_one_round(tmp_path):
    import datasets

    datasets.Dataset.from_list(_verl_rows(_arith_rows(60))).to_parquet(tmp_path / "train.parquet")
    run = tmp_path / "run"
    # with a hub that cannot be reached and no HF_HUB_OFFLINE: a run on local data and a local model never needs it
    alignlab("data=verl", f"data.path={tmp_path / 'train.parquet'}", "data.difficulty_key=extra_info.level",
             *ROUND, f"hydra.run.dir={run}", env=UNREACHABLE)
    s = json.loads((run / "summary.json").read_text())
    assert s["base"]["n"] == 12 and s["rounds"][0]["ledger"]["prompts"] == 12
    prompts = [json.loads(line) for line in (run / "round_1" / "prompts.jsonl").read_text().splitlines()]
    assert all(p["id"].startswith("train.parquet:train/") and p["difficulty"] >= 1 for p in prompts)


def test_a_hub_dataset_id_without_network_fails_fast_naming_the_offline_path(tmp_path):
    for env in (UNREACHABLE, {"HF_HUB_OFFLINE": "1"}):
        res = alignlab("data=gsm8k_hub", *ROUND, f"hydra.run.dir={tmp_path / 'run'}", env=env, check=False)
        out = res.stdout + res.stderr
        assert res.returncode == 2, out[-2000:]
        _failed_before_any_work(out, tmp_path / "run")
        assert "openai/gsm8k" in out and "local .jsonl/.parquet file or directory" in out and "data=gsm8k" in out
        assert not (tmp_path / "run" / "base_eval.json").exists()


def _failed_before_any_work(out: str, run_dir: Path) -> None:
    """What "fails fast" means, read from the log and the run dir instead of a clock: no model generated (no
    "greedy" / "sample n=" progress), no stage ran (no "round_k <stage>:" line), no hub request was retried (the
    hub client logs "Retrying in ..." before each back-off), and no stage wrote anything."""
    for marker in ("greedy", "sample n=", "round_1 ", "Retrying in"):
        assert marker not in out, (marker, out[-2000:])
    assert not (run_dir / "base_eval.json").exists() and not list(run_dir.glob("round_*"))


# -- pair files ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_round(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pairs") / "run"
    res = alignlab(*ROUND, "pairs_format=conversational", f"hydra.run.dir={run}")
    (run.parent / "console.txt").write_text(res.stdout + res.stderr)
    return run


def test_round_files_load_with_datasets_one_row_per_record(one_round):
    import datasets

    s = json.loads((one_round / "summary.json").read_text())
    rd = one_round / "round_1"
    pairs = datasets.load_dataset("json", data_files=str(rd / "pairs.jsonl"), split="train")
    assert s["rounds"][0]["pairs"] > 0 and pairs.num_rows == s["rounds"][0]["pairs"]
    assert pairs.column_names == ["problem_id", "prompt", "chosen", "rejected", "meta"]
    assert all(isinstance(x, str) and x for x in pairs["chosen"])
    sel = datasets.load_dataset("json", data_files=str(rd / "selected.jsonl"), split="train")
    assert sel.num_rows == s["rounds"][0]["selected"]
    assert sel.column_names == ["problem_id", "prompt", "chosen", "rejected", "meta", "score"]  # TRL's + score
    roll = datasets.load_dataset("json", data_files=str(rd / "rollouts.jsonl"), split="train")
    assert roll.num_rows == s["rounds"][0]["ledger"]["samples"] and "__complete__" not in roll.column_names


def _dpo_step(data_file: Path, tmp_path: Path) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    ds = datasets.load_dataset("json", data_files=str(data_file), split="train")
    tok = AutoTokenizer.from_pretrained(TINY)
    tok.pad_token = tok.pad_token or tok.eos_token
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=1, report_to=[],
                     use_cpu=True, logging_steps=1, save_strategy="no", max_length=256, disable_tqdm=True)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(TINY), args=args, train_dataset=ds,
                         processing_class=tok)
    trainer.train()
    return trainer.state.log_history[0]


def test_trl_dpo_trainer_trains_on_pairs_jsonl_unchanged(one_round, tmp_path):
    logs = _dpo_step(one_round / "round_1" / "pairs.jsonl", tmp_path)
    assert logs["loss"] == pytest.approx(0.6931, abs=1e-3)  # first step: policy == reference, loss = log 2
    assert {"rewards/margins", "rewards/accuracies"} <= set(logs)  # the names alignlab logs too


def test_conversational_pairs_file_is_in_trl_messages_format_and_trains(one_round, tmp_path):
    rd = one_round / "round_1"
    rows = [json.loads(line) for line in (rd / "pairs.conversational.jsonl").read_text().splitlines()]
    flat = [json.loads(line) for line in (rd / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == len(flat) > 0
    for r, f in zip(rows, flat):
        assert r["prompt"][-1]["role"] == "user" and r["prompt"][-1]["content"] in f["prompt"]
        assert r["chosen"] == [{"role": "assistant", "content": f["chosen"]}]
        assert r["rejected"] == [{"role": "assistant", "content": f["rejected"]}]
    logs = _dpo_step(rd / "pairs.conversational.jsonl", tmp_path)
    assert logs["loss"] == pytest.approx(0.6931, abs=1e-3)


def test_no_hub_offline_default_is_forced_on_users(monkeypatch):
    import importlib

    import alignlab.cli

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    importlib.reload(alignlab.cli)
    assert "HF_HUB_OFFLINE" not in os.environ


# -- hub models ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env", [UNREACHABLE, {"HF_HUB_OFFLINE": "1"}], ids=["unreachable", "offline"])
def test_a_hub_model_id_without_network_fails_fast_saying_how_to_download_it(tmp_path, env):
    res = alignlab("model.path=Qwen/Qwen2.5-0.5B-Instruct", *ROUND, f"hydra.run.dir={tmp_path / 'run'}", env=env,
                   check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-2000:]
    _failed_before_any_work(out, tmp_path / "run")
    assert "huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir" in out


@pytest.mark.parametrize("env", [UNREACHABLE, {"HF_HUB_OFFLINE": "1"}], ids=["unreachable", "offline"])
def test_eval_of_a_hub_model_id_stays_a_hub_id_and_fails_fast_offline(tmp_path, env):
    """`alignlab eval model=org/name` is a hub id (as model.path=org/name is), not <cwd>/org/name."""
    res = alignlab("eval", "model=Qwen/Qwen2.5-Math-7B", "hydra.run.dir=ev", cwd=tmp_path, env=env, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-2000:]
    _failed_before_any_work(out, tmp_path / "ev")
    assert "huggingface-cli download Qwen/Qwen2.5-Math-7B --local-dir" in out, out[-2000:]
    assert str(tmp_path / "Qwen") not in out


def test_eval_model_override_a_local_org_name_directory_is_a_path(tmp_path, monkeypatch):
    from alignlab.cli import model_dir_override

    monkeypatch.chdir(tmp_path)
    assert model_dir_override("model=Qwen/Qwen2.5-Math-7B") == "model=hf_dir\nmodel.path=Qwen/Qwen2.5-Math-7B"
    (tmp_path / "Qwen" / "Qwen2.5-Math-7B").mkdir(parents=True)  # the same name, now a directory under cwd
    assert model_dir_override("model=Qwen/Qwen2.5-Math-7B") == (
        f"model=hf_dir\nmodel.path={tmp_path / 'Qwen' / 'Qwen2.5-Math-7B'}")
    assert model_dir_override("model=tiny_arith") == "model=tiny_arith"  # a config choice stays one


def test_a_missing_local_model_dir_fails_fast_saying_how_to_download_it(tmp_path):
    res = alignlab(f"model.path={tmp_path / 'nowhere'}", *ROUND, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-2000:]
    _failed_before_any_work(out, tmp_path / "run")
    assert f"huggingface-cli download <org/name> --local-dir {tmp_path / 'nowhere'}" in out


# -- W&B -------------------------------------------------------------------------------------------------------

def _wandb_records(path: Path):
    """The records of an offline W&B run file (LevelDB log format: 32 KiB blocks of crc/len/type chunks)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7: pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def test_a_killed_and_resumed_run_logs_to_one_wandb_run_with_a_round_axis(tmp_path):
    from alignlab.logging import run_id
    from tests.conftest import kill_group, launch

    run = tmp_path / "run"
    args = [*[a for a in TINY_RUN if a != "logger=none"], "logger=wandb", "rounds=2", f"hydra.run.dir={run}"]
    proc = launch(*args, env={"WANDB_MODE": "offline"})
    deadline = time.time() + 300
    while not (run / "round_2" / "prompts.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    kill_group(proc)
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    alignlab(*args, "resume=true", env={"WANDB_MODE": "offline"})
    dirs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2, dirs  # the killed run and its resumption: offline-run-<time>-<run id>
    assert {d.name.split("-", 3)[3] for d in dirs} == {run_id(run)}
    # the killed process's records may never reach its file (W&B's writer died with it); the resumed one's do
    records = [list(_wandb_records(f)) for f in sorted(dirs[-1].glob("*.wandb"))]
    assert {r.run.run_id for recs in records for r in recs if r.WhichOneof("record_type") == "run"} == {run_id(run)}
    metrics = {(r.metric.name or r.metric.glob_name, r.metric.step_metric) for r in records[-1]
               if r.WhichOneof("record_type") == "metric"}
    assert {("eval/*", "round"), ("ledger/*", "round"), ("train/*", "train/global_step")} <= metrics
    rounds = [json.loads(i.value_json) for recs in records for r in recs if r.WhichOneof("record_type") == "history"
              for i in r.history.item if (i.key or "/".join(i.nested_key)) == "round"]
    assert rounds == [0, 1, 2]  # base and round 1 (done before the kill, logged again), round 2 (after)
    train_keys = {i.key or "/".join(i.nested_key) for recs in records for r in recs
                  if r.WhichOneof("record_type") == "history" for i in r.history.item}
    assert {"train/rewards/margins", "train/rewards/accuracies"} <= train_keys  # TRL's names


# -- benchmarks from any source ----------------------------------------------------------------------------------

MATH500_ROWS = [{"problem": f"What is ${a} + {b}$?", "solution": f"${a} + {b} = \\boxed{{{a + b}}}$.",
                 "answer": str(a + b), "subject": "Prealgebra", "level": 1 + a % 5, "unique_id": f"test/pre/{a}.json"}
                for a, b in ((3, 4), (10, 5), (7, 8), (12, 30), (2, 2))]  # MATH-500's upstream schema


def test_a_benchmark_reads_from_a_local_parquet_in_its_upstream_schema(tmp_path, monkeypatch):
    import datasets

    from alignlab.data.benchmarks import load_benchmark_from
    from alignlab.eval.math_suite import MathSuiteEval

    datasets.Dataset.from_list(MATH500_ROWS).to_parquet(tmp_path / "math500.parquet")
    probs = load_benchmark_from("math500", str(tmp_path / "math500.parquet"))
    assert [(p.id, p.answer, p.difficulty) for p in probs] == \
           [(f"math500/{r['unique_id']}", r["answer"], r["level"]) for r in MATH500_ROWS]
    out = tmp_path / "eval"
    alignlab("eval", f"model={TINY}", "eval=math_suite", "eval.benchmarks=[math500]",
             f"eval.sources={{math500: {tmp_path / 'math500.parquet'}}}", f"eval.root={tmp_path / 'no_root'}",
             "eval.limit=3", "generation.max_new_tokens=16", f"hydra.run.dir={out}")
    table = json.loads((out / "eval.json").read_text())
    assert set(table) == {"math500"} and table["math500"]["n"] == 3
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE["HF_ENDPOINT"])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    slept: list[float] = []  # fast = no retry with back-off: the hub client waits between tries with time.sleep
    monkeypatch.setattr(time, "sleep", slept.append)
    with pytest.raises(ValueError, match="eval.sources.math500=HuggingFaceH4/MATH-500: .*not reachable.*local"):
        MathSuiteEval(benchmarks=["math500"], sources={"math500": "HuggingFaceH4/MATH-500"}, root=str(tmp_path))
    assert slept == []


# -- progress ---------------------------------------------------------------------------------------------------

def test_a_progress_bar_keeps_drawing_while_a_long_step_finishes_nothing(capsys):
    """On a clock the test drives (no real time): 15 polls 0.1 s apart with nothing finished redraw about once per
    0.2 s interval, and no more often."""
    from alignlab.logging import progress

    now = [1000.0]
    with progress(total=4, desc="stalled", unit="sample", interval_s=0.2) as bar:
        bar._time = lambda: now[0]  # tqdm reads its clock through _time
        bar.last_print_t = bar.start_t = now[0]
        now[0] += 0.3
        bar.update(1)  # one sample finished: tqdm's own pacing (dynamic miniters) now waits for the next one
        capsys.readouterr()
        for _ in range(15):  # a batch in which no sample finishes for 1.5 s of the test's clock
            now[0] += 0.1
            bar.update(0)
        draws = capsys.readouterr().err.count("stalled")
        bar.update(3)
    assert 6 <= draws <= 8, draws  # one redraw per 0.2 s of silence (7), not none and not one per poll (15)


def test_stage_lines_and_no_third_party_noise_in_a_run_log(one_round):
    out = (one_round.parent / "console.txt").read_text()
    assert re.search(r"base_eval: n=12, in [0-9.]+ s", out)
    for stage in ("prompts", "sample", "verify", "pairs", "select"):
        assert re.search(rf"round_1 {stage}: \d+ records in [0-9.]+ s -> ", out), stage
    assert re.search(r"round_1 reference: \d+ pairs, \d+ tokens in", out)
    assert re.search(r"round_1 train: \d+ pairs, \d+ steps, \d+ tokens in", out)
    assert "Loading weights" not in out and "Setting accelerator to CPU" not in out


def test_rank_zero_bars_in_a_launcher_log_reach_the_console(tmp_path, capsys):
    from alignlab.logging import RankBars

    log = tmp_path / "launcher.log"
    log.write_text("old launch\n")
    bars = RankBars(log)
    with open(log, "a") as f:  # what a rank writes: DeepSpeed chatter, transformers' noise, our bars
        f.write("[INFO] [config.py:100] DeepSpeed config\nWriting model shards: 100%|##| 1/1 [00:00<00:00, 9.1it/s]\n")
        f.write("\rsample n=8:  12%|#   | 1/8 [00:23<02:43, 23.38s/batch]\rsample n=8:  25%|##  | 2/8 [00:41<02:02, "
                "20.39s/batch]")
    bars.poll()
    err = capsys.readouterr().err
    assert "sample n=8:  25%" in err and "12%" not in err and "DeepSpeed config" not in err
    assert "Writing model shards" not in err and "old launch" not in err
