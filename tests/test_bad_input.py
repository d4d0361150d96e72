"""Bad input on every user-facing path: one line naming the key or file, exit code 2, nothing written.

Each case starts the real console script against an existing run directory and checks: exit code 2 within
30 s, a last line that names the key or the file, no traceback, and every file of the run directory
byte-identical afterwards (a rejected start must not touch what is already there).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import TINY, TINY_RUN, alignlab

GOOD_ROW = {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
            "answer": "3 + 4 = 7\n#### 7"}


def _rows(path: Path, n: int, bad: list[bytes] | None = None) -> Path:
    lines = [json.dumps({**GOOD_ROW, "question": f"{GOOD_ROW['question']} ({i})"}).encode() for i in range(n)]
    path.write_bytes(b"\n".join((bad or []) + lines) + b"\n")
    return path


def _model(dst: Path, edit=None) -> Path:
    shutil.copytree(TINY, dst)
    if edit:
        edit(dst)
    return dst


def _set_config(key: str, value) -> callable:
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _shard_index(d: Path) -> None:
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors"}}))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One existing run (base eval only) and the bad inputs, all under one temporary directory."""
    t = tmp_path_factory.mktemp("bad_input")
    run = t / "run"
    alignlab(*TINY_RUN, "rounds=0", f"hydra.run.dir={run}", timeout=300)
    assert (run / "base_eval.json").exists() and (run / ".hydra" / "config.yaml").exists()
    (t / "empty.jsonl").write_bytes(b"")
    (t / "binary.jsonl").write_bytes(bytes(range(256)) * 64)
    (t / "a_dir.jsonl").mkdir()
    hostfile = t / "hostfile"
    hostfile.write_text("localhost slots=two\n")
    (t / "ds_list.json").write_text("[1, 2]")
    bench = t / "bench"
    (bench / "gsm8k").mkdir(parents=True)
    (bench / "gsm8k" / "test.jsonl").write_text("\n\n")
    (t / "alignlab_model_dir").mkdir()
    (t / "alignlab_model_dir" / "alignlab_model.json").write_text("{not json")
    return {
        "t": t, "run": run, "hostfile": hostfile, "bench": bench,
        "own": _rows(t / "own.jsonl", 8),
        "heldout": _rows(t / "heldout.jsonl", 4),
        "malformed": _rows(t / "malformed.jsonl", 0, [b'{"question": "no answer"}', b"{broken", b"\xff\xfe"]),
        "one_bad": _rows(t / "one_bad.jsonl", 4, [json.dumps({"question": "q", "answer": "no hashes"}).encode()]),
        "config_only": _model(t / "config_only", lambda d: (d / "model.safetensors").unlink()),
        "wrong_vocab": _model(t / "wrong_vocab", _set_config("vocab_size", 999)),
        "wrong_layers": _model(t / "wrong_layers", _set_config("num_hidden_layers", 6)),
        "truncated": _model(t / "truncated", _truncate),
        "bad_config": _model(t / "bad_config", lambda d: (d / "config.json").write_text("{\"model_type\": ")),
        "no_tokenizer": _model(t / "no_tokenizer", lambda d: [(d / n).unlink() for n in
                                                                ("tokenizer.json", "tokenizer_config.json")]),
        "missing_shard": _model(t / "missing_shard", _shard_index),
    }


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


GSM = ["data=gsm8k", "data.train_prompts=4", "data.eval_problems=4"]
DS = ["trainer=deepspeed_zero2", "trainer.batch_size=null", "trainer.micro_batch_size=2"]
# (id, arguments with {placeholders} from `files`, what the last line must name)
CASES = [
    ("data.path missing", GSM + ["data.path={t}/nope.jsonl"], "data.path: {t}/nope.jsonl: no such file"),
    ("data.path a directory", GSM + ["data.path={t}/a_dir.jsonl"], "data.path: {t}/a_dir.jsonl: is a directory"),
    ("data.path empty", GSM + ["data.path={t}/empty.jsonl"], "data.path: {t}/empty.jsonl: is empty"),
    ("data.path binary", GSM + ["data.path={t}/binary.jsonl"], "data.path: {t}/binary.jsonl: is binary"),
    ("data.path no usable rows", GSM + ["data.path={malformed}"], "data.path: {malformed}: holds no usable rows"),
    ("data.strict malformed row", GSM + ["data.path={one_bad}", "data.strict=true", "data.heldout_path={heldout}"],
     "{one_bad}:1: malformed row"),
    ("gsm8k own file without held-out set", GSM + ["data.path={own}"], "data.heldout_path: not set"),
    ("data.heldout_path missing", GSM + ["data.path={own}", "data.heldout_path={t}/nope.jsonl"],
     "data.heldout_path: {t}/nope.jsonl: no such file"),
    ("data=hf file empty", ["data=hf", "data.path={t}/empty.jsonl"], "data.path: {t}/empty.jsonl: is empty"),
    ("data=hf file datasets cannot parse", ["data=hf", "data.path={malformed}"],
     "data.path: {malformed}: cannot be parsed"),
    ("model.path missing", ["model.path={t}/no_model"], "model.path"),
    ("model.path a file", ["model.path={own}"], "model.path: no Hugging Face model directory at {own}"),
    ("model config.json but no weights", ["model.path={config_only}"], "no *.safetensors weights"),
    ("model weights vs vocab_size", ["model.path={wrong_vocab}"], "{wrong_vocab}/model.safetensors: tensor"),
    ("model weights vs num_hidden_layers", ["model.path={wrong_layers}"], "{wrong_layers}/model.safetensors: lacks"),
    ("model weights truncated", ["model.path={truncated}"], "{truncated}/model.safetensors: is truncated"),
    ("model config.json corrupt", ["model.path={bad_config}"], "{bad_config}/config.json: is not valid JSON"),
    ("model without tokenizer", ["model.path={no_tokenizer}"], "model.path: {no_tokenizer}: no tokenizer files"),
    ("model index names a missing shard", ["model.path={missing_shard}"],
     "{missing_shard}/model.safetensors.index.json: names 1 missing shard"),
    ("eval.root missing", ["eval=math_suite", "eval.root={t}/no_bench"], "eval.root: {t}/no_bench: no such directory"),
    ("benchmark without test.jsonl", ["eval=math_suite", "eval.root={t}", "eval.benchmarks=[gsm8k]"],
     "eval.benchmarks[gsm8k]: {t}/gsm8k/test.jsonl: no such file"),
    ("benchmark file blank", ["eval=math_suite", "eval.root={bench}", "eval.benchmarks=[gsm8k]"],
     "eval.benchmarks[gsm8k]: {bench}/gsm8k/test.jsonl: is empty"),
    ("hostfile missing", DS + ["trainer.launcher=deepspeed", "trainer.hostfile={t}/nohosts"],
     "trainer.hostfile: {t}/nohosts: no such file"),
    ("hostfile bad line", DS + ["trainer.launcher=deepspeed", "trainer.hostfile={hostfile}"],
     "trainer.hostfile: {hostfile}:1: bad line"),
    ("deepspeed config file missing", DS + ["trainer.deepspeed={t}/ds.json"], "trainer.deepspeed: {t}/ds.json"),
    ("deepspeed config not an object", DS + ["trainer.deepspeed={t}/ds_list.json"],
     "trainer.deepspeed: {t}/ds_list.json: holds a JSON list"),
    ("deepspeed nvme offload without a path", ["trainer=deepspeed_zero3", "trainer.batch_size=null",
                                               "trainer.micro_batch_size=2",
                                               "trainer.deepspeed.zero_optimization.offload_param.device=nvme"],
     "trainer.deepspeed.zero_optimization.offload_param.nvme_path: not set"),
    ("resume with another config", ["resume=true", "sampler.n=8", "loss.beta=0.3"],
     "sampler.n: 4 -> 8"),
    ("resume=maybe", ["resume=maybe"], "resume must be true, false or force"),
    ("hydra.run.dir a file", ["hydra.run.dir={own}"], "hydra.run.dir: {own}: is a file"),
    ("resume of a missing run dir", ["resume=true", "hydra.run.dir={t}/no_run"],
     "hydra.run.dir: {t}/no_run: no such run directory to resume"),
]


# `alignlab eval` and `alignlab report` take paths too (run without the run arguments above)
RAW_CASES = [
    ("eval of a model dir without weights", ["eval", "model={config_only}", "hydra.run.dir={t}/eval_job"],
     "{config_only}: no *.safetensors"),
    ("eval of weights that do not fit config.json", ["eval", "model={wrong_vocab}", "hydra.run.dir={t}/eval_job"],
     "{wrong_vocab}/model.safetensors"),
    ("eval of a dir with a corrupt alignlab_model.json", ["eval", "model={t}/alignlab_model_dir"],
     "alignlab_model_dir/alignlab_model.json: unreadable"),
    ("report of a file", ["report", "{own}"], "not a directory: {own}"),
    ("report of a missing dir", ["report", "{t}/no_runs_here"], "not a directory: {t}/no_runs_here"),
    ("report of a dir with no runs", ["report", "{t}/a_dir.jsonl"], "no runs (summary.json or .hydra/) below {t}/a_dir.jsonl"),
]


def _fmt(s: str, files: dict[str, Path]) -> str:
    return s.format(**{k: str(v) for k, v in files.items()})


def _start(files: dict[str, Path], case: tuple) -> dict:
    """One rejected start against its own copy of the run directory: exit code, output, before/after."""
    cid, args, _ = case
    run = files["t"] / "cases" / re.sub(r"\W", "_", cid) / "run"
    shutil.copytree(files["run"], run)
    args = [_fmt(a, {**files, "run": run}) for a in args]
    if case not in RAW_CASES:
        args = [*TINY_RUN, "rounds=0", *args]
        if not any(a.startswith("hydra.run.dir=") for a in args):
            args.append(f"hydra.run.dir={run}")
    before = _snapshot(run)
    res = alignlab(*args, check=False, timeout=60)
    return {"rc": res.returncode, "out": (res.stdout + res.stderr).strip(), "unchanged": _snapshot(run) == before}


@pytest.fixture(scope="module")
def results(files, request) -> dict[str, dict]:
    """Every selected case's start, two at a time (each start is ~3 s of imports on one core)."""
    chosen = {item.callspec.params["case"][0] for item in request.session.items
              if "case" in getattr(getattr(item, "callspec", None), "params", {})}
    cases = [c for c in CASES + RAW_CASES if c[0] in chosen]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([c[0] for c in cases], pool.map(lambda c: _start(files, c), cases)))


@pytest.mark.parametrize("case", CASES + RAW_CASES, ids=[c[0] for c in CASES + RAW_CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(files, results, case):
    r = results[case[0]]
    out, last = r["out"], (r["out"].splitlines() or [""])[-1]
    assert r["rc"] == 2, out[-2000:]
    # rejected before any work (not a clock): no model generated, no stage ran
    assert not any(m in out for m in ("greedy", "sample n=", "base accuracy", "round_1 ")), out[-2000:]
    assert _fmt(case[2], files) in last, out[-2000:]
    assert "Traceback" not in out
    assert r["unchanged"], "a rejected start changed the run directory"
    assert not (files["t"] / "no_run").exists() and not (files["t"] / "eval_job").exists()


def test_hydra_full_error_shows_the_traceback(files):
    res = alignlab(*TINY_RUN, "data=gsm8k", f"data.path={files['t']}/nope.jsonl", f"hydra.run.dir={files['run']}",
                   check=False, timeout=60, env={"HYDRA_FULL_ERROR": "1"})
    assert res.returncode != 0 and "Traceback" in res.stderr and "data.path" in res.stderr


def test_gsm8k_with_your_own_file_runs_when_a_heldout_set_is_named(files, tmp_path):
    """The user's own GSM8K-format file with a named held-out file: one tiny round end to end."""
    res = alignlab(*TINY_RUN, "data=gsm8k", f"data.path={files['own']}", f"data.heldout_path={files['heldout']}",
                   "data.train_prompts=4", "data.eval_problems=4", "sampler.n=2", "generation.max_new_tokens=16",
                   "rounds=1", f"hydra.run.dir={tmp_path}", timeout=300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["base"]["n"] == 4 and summary["rounds"][0]["eval"]["n"] == 4, res.stdout[-2000:]
    prompts = [json.loads(x)["prompt"] for x in (tmp_path / "round_1" / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 4 and all(p.startswith(GOOD_ROW["question"]) for p in prompts)


def test_resume_compares_only_keys_that_change_results(files):
    from alignlab.checks import check_run_dir, config_diff
    from alignlab.config import ConfigError

    saved = OmegaConf.to_container(OmegaConf.load(files["run"] / ".hydra" / "config.yaml"))
    same = {**saved, "resume": True, "threads": 2, "rounds": 5, "logger": {"_target_": "x"}}
    assert config_diff(saved, same) == []
    other = json.loads(json.dumps(saved))
    other["sampler"]["n"], other["seed"] = 8, 1
    other["loss"]["new_knob"] = 1
    assert [k for k, _, _ in config_diff(saved, other)] == ["loss.new_knob", "sampler.n", "seed"]
    cfg = OmegaConf.create({**other, "resume": True})
    with pytest.raises(ConfigError, match=r"loss\.new_knob: <unset> -> 1, sampler\.n: 4 -> 8, seed: 0 -> 1"):
        check_run_dir(cfg, files["run"], explicit=True)
    check_run_dir(OmegaConf.create({**other, "resume": "force"}), files["run"], explicit=True)  # asked for


def test_gsm8k_shared_layout_needs_no_heldout_flag(tmp_path):
    """The shared layout (root/train/gsm8k/train.jsonl + root/benchmarks/gsm8k/test.jsonl) keeps working as is;
    the same train file elsewhere does not borrow a held-out set from its surroundings."""
    from alignlab.config import ConfigError
    from alignlab.data.gsm8k import GSM8KDataset

    root = tmp_path / "data"
    (root / "train" / "gsm8k").mkdir(parents=True)
    (root / "benchmarks" / "gsm8k").mkdir(parents=True)
    train = _rows(root / "train" / "gsm8k" / "train.jsonl", 6)
    _rows(root / "benchmarks" / "gsm8k" / "test.jsonl", 3)
    data = GSM8KDataset(str(train), eval_problems=2, root=str(root))
    data.check_heldout()
    assert len(data.heldout()) == 2
    mine = GSM8KDataset(str(train), root=str(tmp_path / "elsewhere"))  # same layout around it, other root
    with pytest.raises(ConfigError, match="data.heldout_path: not set"):
        mine.check_heldout()
    assert mine.heldout() == []


def test_file_checks_name_what_is_wrong(tmp_path):
    """The helpers every path goes through, on the cases a subprocess cannot show here (a FIFO would block a
    reader; root reads a chmod 000 file anyway)."""
    import os

    from alignlab.checks import read_rows, require_dir, require_file
    from alignlab.config import ConfigError

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=rf"^k: {fifo}: is not a regular file; fix$"):
        require_file("k", fifo, "fix")  # checked without opening it
    locked = _rows(tmp_path / "locked.jsonl", 2)
    locked.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(ConfigError, match=r"cannot be read \(Permission denied\)"):
            require_file("k", locked, "fix")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ConfigError, match="no such file"):
        require_file("k", tmp_path / "loop", "fix")
    with pytest.raises(ConfigError, match=r"is a file, expected a directory"):
        require_dir("k", _rows(tmp_path / "f.jsonl", 1), "fix")
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text(json.dumps(GOOD_ROW) + "\n", encoding="utf-16")
    with pytest.raises(ConfigError, match="is binary, not UTF-8 text"):
        require_file("k", utf16, "fix")
    with pytest.raises(ConfigError, match="holds no usable rows"):
        read_rows("k", _rows(tmp_path / "ok.jsonl", 3), lambda p: [], "fix")
