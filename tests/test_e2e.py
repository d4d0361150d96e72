"""End-to-end runs on the embedded task: the summary contract, kill + resume, multirun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_RUN, alignlab

pytestmark = pytest.mark.slow


def _check_contract(d: Path, rounds: int) -> dict:
    s = json.loads((d / "summary.json").read_text())
    assert isinstance(s["experiment"], str) and isinstance(s["seed"], int)
    assert set(s["base"]) >= {"accuracy", "se", "n"}
    assert [r["round"] for r in s["rounds"]] == list(range(1, rounds + 1))
    for r in s["rounds"]:
        assert set(r["eval"]) >= {"accuracy", "se", "n", "by_difficulty"}
        assert isinstance(r["pairs"], int) and isinstance(r["selected"], int)
        assert set(r["ledger"]) >= {"prompts", "samples", "generated_tokens", "trained_tokens", "flops", "wall_s"}
        assert r["ledger"]["samples"] == r["ledger"]["prompts"] * 4
        k = d / f"round_{r['round']}"
        for f in ("rollouts.jsonl", "pairs.jsonl", "selected.jsonl"):
            assert (k / f).exists()
        assert (k / "checkpoint" / "config.json").exists() and (k / "checkpoint" / "model.safetensors").exists()
    return s


def _artifacts(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): p.read_text() for p in sorted(d.glob("round_*/*.jsonl"))}


def test_two_rounds_killed_mid_stage_then_resumed_equal_an_uninterrupted_run(tmp_path):
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "killed"
    alignlab(*TINY_RUN, "rounds=2", f"hydra.run.dir={ref_dir}")
    ref = _check_contract(ref_dir, 2)
    # start the same run, kill -9 it once round 2 has started, resume it
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "alignlab.cli", *TINY_RUN, "rounds=2", f"hydra.run.dir={dir_}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (dir_ / "round_2" / "prompts.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (dir_ / "summary.json").exists(), "the run finished before it could be killed"
    done_before = {p.name for p in (dir_ / "round_1").iterdir()}
    alignlab(*TINY_RUN, "rounds=2", f"hydra.run.dir={dir_}", "resume=true")
    got = _check_contract(dir_, 2)
    assert "checkpoint" in done_before  # round 1 was complete and was not redone
    assert _artifacts(dir_) == _artifacts(ref_dir)
    for a, b in zip(ref["rounds"], got["rounds"]):
        assert a["eval"] == b["eval"] and a["pairs"] == b["pairs"]
        assert {k: v for k, v in a["ledger"].items() if k not in ("wall_s", "stage_wall_s")} == \
               {k: v for k, v in b["ledger"].items() if k not in ("wall_s", "stage_wall_s")}


def test_multirun_sweeps_over_n(tmp_path):
    alignlab("-m", *[a for a in TINY_RUN if not a.startswith("sampler.n")], "rounds=1", "base_eval=false",
             "sampler.n=2,3", f"hydra.sweep.dir={tmp_path}")
    for job, n in (("0", 2), ("1", 3)):
        s = json.loads((tmp_path / job / "summary.json").read_text())
        led = s["rounds"][0]["ledger"]
        assert led["samples"] == n * led["prompts"]
