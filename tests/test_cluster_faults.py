"""Issue 34, faults a cluster throws: two writers on one run dir, preemption (SIGTERM), a full disk, interrupted
downloads, and no pickles through the run directory. Real processes, real signals, a real DeepSpeed launch."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignlab import config as C
from alignlab.runlock import LOCK_FILE, RunLock, RunLocked, read_holder
from alignlab.spec import SpecError, from_spec
from tests import test_reliability as R
from tests.conftest import ROOT, alignlab, launch
from tests.test_reliability import ENV, RUN, _summary

ref = R.ref  # the uninterrupted reference run (a module fixture)

HOLD = ("import sys, time\nfrom alignlab.runlock import RunLock\nwith RunLock(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n")


def _holder(d: Path) -> subprocess.Popen:
    """Another process that holds ``d``'s lock until killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


# ------------------------------------------------------------------------------------------ one writer


def test_a_live_lock_is_refused_naming_its_holder_and_a_dead_ones_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    try:
        rec = read_holder(tmp_path)
        assert rec["pid"] == proc.pid and rec["host"] == socket.gethostname()
        with pytest.raises(RunLocked, match=rf"in use by pid {proc.pid} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
        with pytest.raises(RunLocked):  # force does not break a live lock
            RunLock(tmp_path, force=True).acquire()
    finally:
        proc.kill()
        proc.wait()
    assert read_holder(tmp_path)["pid"] == proc.pid  # SIGKILL: its record stays behind, its flock does not
    with RunLock(tmp_path):
        assert read_holder(tmp_path)["pid"] == os.getpid()
    assert read_holder(tmp_path) is None  # released: the record is emptied


def test_a_record_from_another_host_needs_resume_force(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "node-elsewhere", "started": "then"}))
    with pytest.raises(RunLocked, match="pid 1 on host node-elsewhere.*resume=force"):
        RunLock(tmp_path).acquire()
    with RunLock(tmp_path, force=True):
        assert read_holder(tmp_path)["host"] == socket.gethostname()


def test_the_cli_refuses_a_second_writer_with_one_line_and_exit_code_2(tmp_path):
    d = tmp_path / "run"
    proc = _holder(d)
    try:
        res = alignlab(*RUN, f"hydra.run.dir={d}", "resume=true", env=ENV, check=False)
    finally:
        proc.kill()
        proc.wait()
    lines = [ln for ln in res.stderr.splitlines() if "ERROR" in ln]
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and f"in use by pid {proc.pid}" in lines[0] and "run locked" in lines[0], res.stderr
    assert sorted(p.name for p in d.iterdir()) == [LOCK_FILE]  # refused before anything was written


@pytest.mark.slow
def test_two_runs_on_one_dir_at_once_and_staggered_one_runs_and_ends_as_a_single_run(ref, tmp_path):
    want = _summary(ref["dir"])
    for name, stagger in (("at_once", 0.0), ("staggered", 0.4 * ref["wall"])):
        d = tmp_path / name
        a = launch(*RUN, f"hydra.run.dir={d}", env=ENV)
        time.sleep(stagger)
        b = subprocess.Popen([sys.executable, "-m", "alignlab.cli", *RUN, f"hydra.run.dir={d}"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HYDRA_FULL_ERROR": "0", **ENV})
        _, err_b = b.communicate(timeout=600)
        codes = sorted([a.wait(timeout=600), b.returncode])
        assert codes == [0, 2], (name, codes, err_b[-2000:])
        assert _summary(d) == want, name
        assert read_holder(d) is None  # the winner released the lock


# ------------------------------------------------------------------------------------------ no pickles


class Planted:
    """A pickle that, if ever loaded, leaves a marker file (and would run any code it liked)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_job_naming_a_class_outside_the_trusted_packages_is_refused_before_import(tmp_path):
    with pytest.raises(SpecError, match=r"loss._target_: 'os.system' is outside the trusted packages"):
        from_spec({"_target_": "os.system", "command": f"touch {tmp_path / 'x'}"}, "loss")
    with pytest.raises(SpecError, match="is not a class"):
        from_spec({"_target_": "alignlab.records.atomic_write_text", "path": str(tmp_path / "x"), "text": ""}, "loss")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_planted_pickles_in_rank_work_dirs_are_never_executed(tiny_dir, tmp_path):
    """loss.pkl / callbacks.pkl / generator.pkl planted where the ranks used to read them: a DeepSpeed train
    (2 gloo ranks, with SAGE's step filter) and a generation on the ranks both finish, and no pickle ran."""
    from alignlab.data.arith import generate, solution
    from alignlab.generation.hf import HFGenerator
    from alignlab.generation.ranks import RankGenerator
    from alignlab.losses import DPOLoss
    from alignlab.models import ModelSpec, load_tokenizer
    from alignlab.records import Pair
    from alignlab.spec import round_trip
    from alignlab.train.deepspeed_trainer import DeepSpeedTrainer, _fingerprint

    marker = tmp_path / "PWNED"
    payload = pickle.dumps(Planted(marker))
    tok, spec = load_tokenizer(tiny_dir), ModelSpec(path=str(tiny_dir))
    pairs = [Pair(str(i), spec.render(tok, p.text), solution(p), solution(p, skip_last=True))
             for i, p in enumerate(generate(6, "train", seed=5, levels=(3,)))]
    ref_lp = {"chosen": [-10.0] * 6, "rejected": [-11.0] * 6}
    sage = C.build("selector", OmegaConf.create({"_target_": "alignlab.select.sage.SageSelector", "keep_ratio": 0.5,
                                                 "granularity": "step", "curriculum": None}), {})
    trainer = DeepSpeedTrainer(micro_batch_size=1, ranks=2, threads_per_rank=1, epochs=1, max_length=128,
                               checkpoint_every=0)
    out = (tmp_path / "round_1" / "checkpoint").resolve()
    work = out.with_name("checkpoint.ds")
    job = trainer._job("train", tiny_dir, out, 3)
    job["loss"] = round_trip(DPOLoss(), "loss")
    job["callbacks"] = [round_trip(c, "cb") for c in sage.callbacks()]
    trainer._prepare(work, job, _fingerprint(job, pairs, ref_lp), pairs, ref_lp)
    for name in ("loss.pkl", "callbacks.pkl"):
        (work / name).write_bytes(payload)
    trainer.run_on_ranks("alignlab.train.ds_worker", work)
    assert json.loads((work / "result.json").read_text())["steps"] > 0 and (out / "model.safetensors").exists()

    gen = RankGenerator(HFGenerator(max_new_tokens=8, batch_size=4), trainer, tmp_path / ".generate")
    gwork = tmp_path / "gen"
    gwork.mkdir()
    (gwork / "generator.pkl").write_bytes(payload)
    (gwork / "prompts.json").write_text(json.dumps([p.prompt for p in pairs[:3]]))
    (gwork / "job.json").write_text(json.dumps({"model_dir": str(tiny_dir), "n": 1, "seed": 0, "greedy": True,
                                                "threads": 1, "generator": round_trip(gen.inner, "generation")}))
    trainer.run_on_ranks("alignlab.generation.ranks", gwork)
    assert sorted(json.loads((gwork / "shard0.json").read_text())) + \
        sorted(json.loads((gwork / "shard1.json").read_text())) != []
    assert not marker.exists(), "a planted pickle in the run directory was executed"


def test_no_pickle_is_loaded_anywhere_in_the_package():
    """``grep -rn pickle alignlab/``: no pickle.load(s) of anything (the ranks get JSON, JSONL and safetensors)."""
    hits = [f"{p}:{i}" for p in (ROOT / "alignlab").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if "pickle.load" in line or "import pickle" in line or "dill" in line.split("#")[0].split()]
    assert hits == []
