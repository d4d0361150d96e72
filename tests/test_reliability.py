"""Issue 11, reliability: crash-safe resume under random SIGKILLs, determinism, truncated artifacts,
non-finite training, malformed data rows, verifier bounds, and safety (no eval/exec, safetensors only,
W&B offline unless asked)."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from alignlab.records import is_complete
from tests.conftest import ROOT, alignlab, kill_group, launch

ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
# the smallest run that still trains in both rounds (a couple of pairs per round)
RUN = ["data.train_prompts=8", "data.eval_problems=16", "sampler.n=4", "generation.max_new_tokens=48",
       "trainer.epochs=1", "trainer.batch_size=4", "logger=none", "threads=1", "rounds=2"]
# the only fields that depend on the clock or on what else the process did (its peak RSS counts earlier stages)
MEASURED = {"wall_s", "stage_wall_s", "train_seconds", "peak_rss_mib"}
TRIALS = 10


def _strip(x):
    """Drop measured (clock and memory) fields, recursively."""
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in MEASURED}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _summary(d: Path) -> dict:
    return _strip(json.loads((d / "summary.json").read_text()))


def _artifacts(d: Path) -> dict[str, str]:
    """Everything a run writes that must not depend on the clock or the run dir (text, or a hash for weights)."""
    out = {}
    for p in sorted(d.glob("round_*/*.jsonl")) + sorted(d.glob("round_*/*.json")) + [d / "base_eval.json"]:
        if p.name.startswith("ref_logps."):  # a cache keyed by the checkpoint's path and mtime
            continue
        text = p.read_text()
        out[str(p.relative_to(d))] = json.dumps(_strip(json.loads(text))) if p.suffix == ".json" else text
    for p in sorted(d.glob("round_*/checkpoint/*.safetensors")):
        out[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _records(path: Path) -> list[dict]:
    assert is_complete(path), f"{path} has no matching completion sidecar"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_no_loss_or_duplicate(d: Path, ref: Path) -> None:
    for rd in sorted(ref.glob("round_*")):
        for name, key in (("rollouts.jsonl", lambda r: (r["problem_id"], r["source"], r["sample_index"])),
                          ("verdicts.jsonl", lambda r: (r["problem_id"], r["source"], r["sample_index"])),
                          ("pairs.jsonl", lambda r: (r["problem_id"], r["chosen"], r["rejected"]))):
            got = Counter(key(r) for r in _records(d / rd.name / name))
            want = Counter(key(r) for r in _records(rd / name))
            assert max(got.values(), default=1) == 1, f"{rd.name}/{name}: duplicated {+(got - Counter(set(got)))}"
            assert got == want, f"{rd.name}/{name}: lost {want - got}, extra {got - want}"


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> dict:
    """One uninterrupted run; its artifacts in the order (and at the time) they appeared."""
    d = tmp_path_factory.mktemp("rel") / "ref"
    t0 = time.time()
    alignlab(*RUN, f"hydra.run.dir={d}", env=ENV)
    wall = time.time() - t0
    events = [(0.0, "")]  # (seconds after launch, glob pattern of the artifact that appeared then)
    for p in [*d.glob("*.json"), *d.glob("round_*/*")]:
        if p.name in ("summary.json", "ledger.json") or p.name.endswith(".tmp"):
            continue
        rel = str(p.relative_to(d))
        pattern = rel.split("ref_logps.")[0] + "ref_logps.*.json" if "ref_logps." in rel else rel
        events.append((p.stat().st_mtime - t0, pattern))
    events.sort()
    end = (d / "summary.json").stat().st_mtime - t0
    return {"dir": d, "wall": wall, "events": events, "end": end}


def _kill_points(ref: dict, rng: random.Random) -> list[tuple[str, float]]:
    """TRIALS points on the reference timeline, stratified: 2 in start-up + base eval, the rest spread over the
    rounds; each as (last artifact before it, seconds after that artifact appeared), so that a slower or
    faster machine still kills in the same stage."""
    t_base = next(t for t, p in ref["events"] if p == "base_eval.json")
    slices = [(0.0, t_base / 2), (t_base / 2, t_base)]
    k = TRIALS - len(slices)
    slices += [(t_base + i * (ref["end"] - t_base) / k, t_base + (i + 1) * (ref["end"] - t_base) / k) for i in range(k)]
    points = []
    for a, b in slices:
        tau = rng.uniform(a, b)
        t, pattern = max(e for e in ref["events"] if e[0] <= tau)
        points.append((pattern, tau - t))
    return points


def _trial(ref: dict, d: Path, pattern: str, delay: float) -> dict:
    """Start the run, SIGKILL its process group ``delay`` s after ``pattern`` appears, then resume it."""
    proc = launch(*RUN, f"hydra.run.dir={d}", env=ENV)
    deadline = time.time() + 10 * ref["wall"] + 60
    while pattern and not list(d.glob(pattern)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    crashed = proc.poll() not in (None, 0)  # it must die of the kill, not by itself
    kill_group(proc)
    interrupted = not (d / "summary.json").exists()
    seen = sorted(str(p.relative_to(d)) for p in d.glob("**/*") if ".hydra" not in p.parts and p.is_file()
                  and "checkpoint" not in p.parent.name)
    # killed before it wrote anything: there is no run to resume (resume=true would refuse the missing dir)
    res = alignlab(*RUN, f"hydra.run.dir={d}", *(["resume=true"] if d.exists() else []), env=ENV)
    return {"pattern": pattern, "delay": round(delay, 3), "interrupted": interrupted, "seen": seen, "crashed": crashed,
            "log": res.stderr + res.stdout}


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(ref, tmp_path):
    """>= 10 SIGKILLs of the run's process group, spread over every stage (start-up, base eval, each round's
    prompts/sample/verify/pairs/select/reference/train/eval); each resumed run ends equal to the clean one."""
    plan = [(tmp_path / f"trial{i}", *pt) for i, pt in enumerate(_kill_points(ref, random.Random(11)))]
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda p: _trial(ref, *p), plan))
    where = [(r["pattern"] or "launch", r["delay"], r["interrupted"]) for r in results]
    print("kill points (after artifact, delay s, interrupted):", where)
    assert not any(r["crashed"] for r in results), where
    assert sum(r["interrupted"] for r in results) >= TRIALS - 2, where
    assert any("base_eval.json" not in r["seen"] for r in results), where  # start-up / base eval
    for k in (1, 2):  # inside each round
        assert any(f"round_{k}/prompts.jsonl" in r["seen"] and f"round_{k}/metrics.json" not in r["seen"]
                   for r in results), where
    want_summary, want_art = _summary(ref["dir"]), _artifacts(ref["dir"])
    for (d, _, _), r in zip(plan, results):
        where = f"killed {r['delay']}s after {r['pattern'] or 'launch'} (artifacts then: {r['seen']})"
        assert _summary(d) == want_summary, where
        _check_no_loss_or_duplicate(d, ref["dir"])
        got = _artifacts(d)
        assert got.keys() == want_art.keys(), where
        for k in want_art:
            assert got[k] == want_art[k], f"{where}: {k} differs"


@pytest.mark.slow
def test_same_seed_gives_identical_artifacts_and_another_seed_differs(ref, tmp_path):
    alignlab(*RUN, f"hydra.run.dir={tmp_path / 'same'}", env=ENV)
    assert _artifacts(tmp_path / "same") == _artifacts(ref["dir"])
    assert _summary(tmp_path / "same") == _summary(ref["dir"])
    alignlab(*RUN, "rounds=1", "base_eval=false", "seed=1", f"hydra.run.dir={tmp_path / 'other'}", env=ENV)
    for name in ("prompts.jsonl", "rollouts.jsonl"):
        assert (tmp_path / "other" / "round_1" / name).read_text() != (ref["dir"] / "round_1" / name).read_text()


def _copy_unfinished(ref: dict, dst: Path) -> Path:
    shutil.copytree(ref["dir"], dst)
    (dst / "summary.json").unlink()
    return dst


@pytest.mark.slow
def test_truncated_jsonl_from_an_old_crash_is_detected_and_regenerated(ref, tmp_path):
    d = _copy_unfinished(ref, tmp_path / "run")
    rollouts = d / "round_1" / "rollouts.jsonl"
    data = rollouts.read_bytes()
    rollouts.write_bytes(data[: len(data) // 2 + 7])  # cut mid-line, as a non-atomic writer killed mid-write would
    assert not data[: len(data) // 2 + 7].endswith(b"\n")
    pairs = d / "round_2" / "pairs.jsonl"
    lines = pairs.read_text().splitlines(keepends=True)
    assert lines, "the reference run must build pairs in round 2"
    pairs.write_text("".join(lines[:-1]))  # whole lines, but one record short of what its sidecar says
    res = alignlab(*RUN, f"hydra.run.dir={d}", "resume=true", env=ENV)
    log = res.stderr + res.stdout
    assert f"{rollouts} is incomplete" in log and f"{pairs} is incomplete" in log
    assert rollouts.read_bytes() == data and pairs.read_text() == "".join(lines)
    assert _summary(d) == _summary(ref["dir"])
    assert _artifacts(d) == _artifacts(ref["dir"])


@pytest.mark.slow
def test_exploding_gradient_stops_the_round_keeps_the_previous_checkpoint_and_resumes(ref, tmp_path):
    d = _copy_unfinished(ref, tmp_path / "run")
    for name in ("checkpoint", "train.json", "eval.json", "metrics.json"):
        p = d / "round_2" / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    prev = {p.name: p.read_bytes() for p in (d / "round_1" / "checkpoint").iterdir()}
    res = alignlab(*RUN, f"hydra.run.dir={d}", "resume=true", "trainer.max_grad_norm_abort=1e-9", env=ENV,
                   check=False)
    out = res.stderr + res.stdout
    assert res.returncode != 0 and "NonFiniteLossError" in out and "resume=true" in out, out[-3000:]
    assert not (d / "round_2" / "checkpoint").exists() and not (d / "round_2" / "train.json").exists()
    assert not (d / "summary.json").exists()
    assert {p.name: p.read_bytes() for p in (d / "round_1" / "checkpoint").iterdir()} == prev
    alignlab(*RUN, f"hydra.run.dir={d}", "resume=true", env=ENV)
    assert _summary(d) == _summary(ref["dir"])


@pytest.mark.slow
def test_killed_between_checkpoint_and_train_json_retrains_the_round(ref, tmp_path):
    """The checkpoint is renamed into place before train.json is written: a kill in between must not leave
    a round without its training summary and ledger entry."""
    d = _copy_unfinished(ref, tmp_path / "run")
    (d / "round_2" / "train.json").unlink()
    for name in ("eval.json", "metrics.json"):
        (d / "round_2" / name).unlink()
    led = json.loads((d / "round_2" / "ledger.json").read_text())
    led.pop("train")
    (d / "round_2" / "ledger.json").write_text(json.dumps(led))
    alignlab(*RUN, f"hydra.run.dir={d}", "resume=true", env=ENV)
    assert _summary(d) == _summary(ref["dir"])
    assert _artifacts(d) == _artifacts(ref["dir"])


def test_resume_with_an_explicit_run_dir_never_continues_another_run(tmp_path):
    """A run killed before its first artifact, resumed with its own hydra.run.dir, stays in that dir even when
    another unfinished run sits next to it."""
    from omegaconf import OmegaConf

    from alignlab.runner import resolve_out_dir

    other = tmp_path / "a" / "other"
    (other / ".hydra").mkdir(parents=True)
    (other / "base_eval.json").write_text("{}")
    mine = tmp_path / "b" / "mine"
    (mine / ".hydra").mkdir(parents=True)
    cfg = OmegaConf.create({"out_dir": None, "resume": True, "experiment_name": "x"})
    assert resolve_out_dir(cfg, str(mine), explicit=True) == mine
    assert resolve_out_dir(cfg, str(mine)) == other  # the default layout: resume=true continues the latest one
    assert (mine / "resumed_in.txt").read_text().strip() == str(other.resolve())  # the new job dir says where
    from alignlab.report import load_runs

    for d in (mine, other):
        (d / ".hydra" / "overrides.yaml").write_text("- resume=true\n")
    assert [r.path for r in load_runs([tmp_path])] == [other.resolve()]  # not listed as a failed run


# scratch files that are rewritten before every use, or append-only logs; nothing reads them after a crash
NON_ATOMIC_OK = {("alignlab/train/deepspeed_trainer.py", "write_bytes"), ("alignlab/train/deepspeed_trainer.py", "open"),
                 ("alignlab/train/ds_worker.py", "open")}


def test_every_artifact_is_written_atomically():
    """Outside alignlab/records.py, files are written with atomic_write_text / write_jsonl, or into a ``tmp``
    path that is renamed afterwards."""
    bad = []
    for f in sorted((ROOT / "alignlab").rglob("*.py")):
        rel = str(f.relative_to(ROOT))
        if rel == "alignlab/records.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            target = ast.unparse(fn.value) if isinstance(fn, ast.Attribute) else ""
            if name == "open":
                pos = 0 if isinstance(fn, ast.Attribute) else 1  # Path.open(mode) / open(path, mode)
                mode = node.args[pos] if len(node.args) > pos else next(
                    (k.value for k in node.keywords if k.arg == "mode"), None)
                if not (isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax")):
                    continue
                target = ast.unparse(node.args[0]) if node.args and not target else target
            elif name not in ("write_text", "write_bytes"):
                continue
            if "tmp" not in target and (rel, name) not in NON_ATOMIC_OK:
                bad.append(f"{rel}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not bad, "write these with alignlab.records.atomic_write_text: " + "; ".join(bad)


# ------------------------------------------------------------------------------------------------------------
# non-finite training


def test_nan_loss_stops_training_without_touching_the_previous_checkpoint(tiny_dir, tmp_path):
    from alignlab.losses import DPOLoss
    from alignlab.records import Pair
    from alignlab.train import NonFiniteLossError
    from alignlab.train.torch_trainer import TorchTrainer, reference_logps

    prev = tmp_path / "round_1" / "checkpoint"
    shutil.copytree(tiny_dir, prev)
    before = {p.name: p.read_bytes() for p in prev.iterdir()}
    pairs = [Pair(f"p{i}", f"{i} + 1 = ?", f"{i} + 1 = {i + 1}\n\\boxed{{{i + 1}}}", f"\\boxed{{{i}}}")
             for i in range(4)]
    dpo = DPOLoss()

    def nan_loss(lp):
        losses, metrics = dpo(lp)
        return losses * math.nan, metrics

    out = tmp_path / "round_2" / "checkpoint"
    with pytest.raises(NonFiniteLossError, match=r"loss=nan.*previous checkpoint is intact.*resume=true"):
        TorchTrainer(lr=1e-3, epochs=1, batch_size=4).train(prev, pairs, reference_logps(prev, pairs), nan_loss,
                                                            out, seed=0)
    assert not out.exists() and not out.with_name("checkpoint.tmp").exists()
    assert {p.name: p.read_bytes() for p in prev.iterdir()} == before


# ------------------------------------------------------------------------------------------------------------
# malformed data rows


def _gsm8k_file(path: Path) -> Path:
    good = lambda i: json.dumps({"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"})  # noqa: E731
    rows = [good(1).encode(),
            json.dumps({"question": "No answer here?"}).encode(),                      # 2: missing answer
            json.dumps({"question": "  ", "answer": "1\n#### 1"}).encode(),             # 3: empty problem
            b'{"question": "broken", "answer": "#### 2"',                               # 4: broken JSON line
            b'{"question": "caf\xe9?", "answer": "#### 3"}',                           # 5: not UTF-8
            json.dumps({"question": "no gold", "answer": "2 apples"}).encode(),        # 6: no '####'
            b"[1, 2]",                                                                  # 7: not an object
            b"",                                                                        # blank lines are fine
            good(8).encode()]
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def test_malformed_gsm8k_rows_are_skipped_with_file_line_and_count(tmp_path, caplog):
    from alignlab.data.gsm8k import GSM8KDataset

    f = _gsm8k_file(tmp_path / "train.jsonl")
    with caplog.at_level(logging.WARNING, logger="alignlab"):
        rows = GSM8KDataset(path=str(f), train_prompts=2).train(1)
    assert sorted(p.answer for p in rows) == ["2", "9"]
    for line in range(2, 8):
        assert f"{f}:{line}: skipping malformed row" in caplog.text
    assert "skipped 6 malformed row(s), kept 2" in caplog.text
    for what in ("missing 'answer'", "empty 'question'", "broken JSON", "not UTF-8", "not a JSON object"):
        assert what in caplog.text


def test_malformed_gsm8k_row_is_an_error_with_strict(tmp_path):
    from alignlab.data.gsm8k import GSM8KDataset

    f = _gsm8k_file(tmp_path / "train.jsonl")
    with pytest.raises(ValueError, match=rf"{f}:2: malformed row: missing 'answer'"):
        GSM8KDataset(path=str(f), train_prompts=2, strict=True).train(1)


def test_data_strict_is_a_config_key_defaulting_to_false():
    cfg = _compose(["data=gsm8k"])
    assert cfg.data.strict is False
    assert _compose(["data=gsm8k", "data.strict=true"]).data.strict is True
    assert _compose(["eval=math_suite"]).eval.strict is False


# ------------------------------------------------------------------------------------------------------------
# the verifier inside a run


def test_one_batch_of_adversarial_predictions_is_bounded_and_keeps_the_pool_alive():
    """The runner verifies a whole round in one call: adversarial responses mixed with normal ones come back
    one verdict each (the timeouts bound each item), and the normal ones are still judged right."""
    from alignlab.verify import MathVerifier
    from tests.test_verify import ADVERSARIAL, boxed

    preds = [boxed(a) for a in ADVERSARIAL] + [boxed("\\frac{7}{13}"), "so the answer is 7/13"]
    timeout = 1.0
    with MathVerifier(timeout_s=timeout, workers=2) as v:
        got = v.check(preds, ["\\frac{7}{13}"] * len(preds))
        # bounded without a clock: an item a worker does not finish is cut by the soft timeout or its worker is
        # killed; every item came back, and the pool still judges after the adversarial ones
        assert v.verify_batch([boxed("x+1")], ["1+x"]) == [True]
    assert len(got) == len(preds)
    assert [g.correct for g in got] == [False] * len(ADVERSARIAL) + [True, True]


# ------------------------------------------------------------------------------------------------------------
# safety


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import alignlab.config  # noqa: F401 - registers run_schema
    from alignlab.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_no_eval_or_exec_anywhere_in_the_package():
    """Model output is text to verify, never code: the package calls no eval/exec/compile builtins."""
    bad = []
    for f in sorted((ROOT / "alignlab").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                builtin = isinstance(fn, ast.Name) or (isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name)
                                                       and fn.value.id in ("builtins", "__builtins__"))
                if builtin and name in ("eval", "exec", "compile", "__import__"):
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno}: {name}()")
    assert not bad, bad


def test_no_pickle_loading_of_weights():
    """Weights come from safetensors only: no torch.load / pickle.load on checkpoints in the package. The one
    exception is DeepSpeed's own optimizer-state files on resume, read with ``weights_only=True`` (no code runs)."""
    bad = []
    for f in sorted((ROOT / "alignlab").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name):
                mod, attr = node.func.value.id, node.func.attr
                weights_only = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                                   and k.value.value is True for k in node.keywords)
                if (mod, attr) in (("torch", "load"), ("pickle", "load"), ("joblib", "load")) and not (
                        (mod, attr) == ("torch", "load") and weights_only):
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno}: {mod}.{attr}")
    assert not bad, bad


def _pickle_only_dir(tiny_dir: Path, d: Path) -> Path:
    d.mkdir()
    for p in tiny_dir.iterdir():
        if p.suffix != ".safetensors":
            shutil.copy(p, d / p.name)
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle, never opened")
    return d


def test_a_checkpoint_with_only_pytorch_model_bin_is_refused(tiny_dir, tmp_path):
    from alignlab import config as C
    from alignlab.models import load_model
    from alignlab.runner import build_components

    d = _pickle_only_dir(tiny_dir, tmp_path / "pickled")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights \(found pytorch_model\.bin"):
        load_model(d)
    cfg = _compose([f"model.path={d}"])
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if v is not None}
    with pytest.raises(C.ConfigError, match=r"model\.path: .*pytorch_model\.bin: pickle checkpoints are refused"):
        build_components(cfg, choices)


def test_vllm_engine_loads_safetensors_only(monkeypatch):
    import importlib.util

    from alignlab.generation.vllm import VLLMGenerator

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # vLLM itself is not needed
    assert VLLMGenerator().engine_kwargs("/some/dir")["load_format"] == "safetensors"


def test_wandb_is_offline_unless_asked(monkeypatch):
    import importlib

    from hydra.utils import instantiate

    import alignlab.cli

    cfg = _compose([])
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert cfg.logger._target_.endswith("WandbLogger") and cfg.logger.mode is None  # null: $WANDB_MODE, else offline
    assert instantiate(cfg.logger).mode == "offline"
    for f in sorted((ROOT / "conf").rglob("*.yaml")):  # no preset turns it on
        assert "mode: online" not in f.read_text(), f
    monkeypatch.delenv("WANDB_MODE", raising=False)
    importlib.reload(alignlab.cli)  # the console script's environment defaults
    assert os.environ["WANDB_MODE"] == "offline"
