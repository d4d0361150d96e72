"""The wheel a user installs: conf/ ships inside it, and the console script runs from any directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
SOURCES = ("alignlab", "conf", "pyproject.toml", "setup.py", "README.md", "LICENSE")


def _sh(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the sources, install it (no deps) into a fresh venv; returns the venv.

    The venv sees the dependencies through a .pth line naming the test interpreter's site-packages, which adds
    them to sys.path without running that directory's .pth files, so the editable alignlab there stays invisible.
    """
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCES:
        s = ROOT / name
        if s.is_dir():
            shutil.copytree(s, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(s, src / name)
    _sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", tmp / "dist", src, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("alignlab-*.whl")
    venv = tmp / "venv"
    _sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    py = venv / "bin" / "python"
    site = Path(_sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp).strip())
    (site / "_alignlab_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh(py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp)
    return venv


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {
        "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def test_the_wheel_carries_the_config_tree(installed):
    py = installed / "bin" / "python"
    out = _sh(py, "-c", "import alignlab, alignlab_conf, importlib.resources as r, json; print(alignlab.__file__); "
              "print(json.dumps(sorted(p.name for p in r.files('alignlab_conf').iterdir())))", cwd=installed)
    path, names = out.splitlines()[0], json.loads(out.splitlines()[1])
    assert path.startswith(str(installed)), f"imported alignlab from {path}, not from the wheel"
    groups = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert set(groups) <= set(names), names


def test_the_wheel_declares_and_ships_the_apache_licence(installed):
    """Reuse needs a licence: the metadata names Apache-2.0 (SPDX) and the wheel carries the repository's LICENSE text."""
    py = installed / "bin" / "python"
    out = _sh(py, "-c", "import importlib.metadata as m, json; d = m.distribution('alignlab'); "
              "lic = [f for f in d.files if f.name == 'LICENSE']; "
              "print(json.dumps([d.metadata['License-Expression'], d.metadata.get_all('License-File'), "
              "lic[0].read_text() if lic else None]))", cwd=installed)
    expression, files, text = json.loads(out.splitlines()[-1])
    assert expression == "Apache-2.0" and files == ["LICENSE"]
    assert text == (ROOT / "LICENSE").read_text() and "Apache License" in text and "Version 2.0, January 2004" in text


PIP_WITH_PEP639 = "pip>=25.1"  # 25.1: `pip show` prints License-Expression (PEP 639); 23.2 prints only License


def test_pip_show_names_the_licence(installed):
    """`pip show alignlab` tells a user the licence. The venv gets its own pip new enough to print PEP 639's
    License-Expression (the one the test interpreter lends it, 23.2, prints only the legacy License field, empty here).
    Skipped only when the package registry cannot be reached."""
    py = installed / "bin" / "python"
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", PIP_WITH_PEP639], cwd=installed, capture_output=True,
                         text=True, timeout=300, env=_env())
    if res.returncode != 0:
        err = res.stdout + res.stderr
        if any(s in err for s in ("No matching distribution", "NewConnectionError", "Could not fetch", "timed out")):
            pytest.skip(f"{PIP_WITH_PEP639} cannot be installed (package registry unreachable): {err[-300:]}")
        pytest.fail(f"installing {PIP_WITH_PEP639} failed:\n{err}")
    version = _sh(py, "-m", "pip", "--version", cwd=installed, env=_env())
    assert version.split()[3].startswith(str(installed)), f"the venv's own pip is not the one running: {version}"
    show = _sh(py, "-m", "pip", "show", "alignlab", cwd=installed, env=_env())
    fields = dict(line.split(": ", 1) for line in show.splitlines() if ": " in line)
    assert fields.get("Name") == "alignlab" and fields.get("License-Expression") == "Apache-2.0", show


def test_installed_console_script_composes_and_runs_one_round_from_an_empty_directory(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    exe = installed / "bin" / "alignlab"
    job = _sh(exe, "--cfg", "job", cwd=empty, env=_env())
    assert "experiment_name: quickstart" in job and "pkg://assets/tiny_arith" in job
    assert list(empty.iterdir()) == []  # --cfg job writes nothing
    _sh(exe, "rounds=1", "data.train_prompts=12", "data.eval_problems=12", "sampler.n=4",
        "generation.max_new_tokens=48", "trainer.epochs=1", "trainer.batch_size=4", "logger=none", "threads=1",
        "hydra.run.dir=run", cwd=empty, env=_env())
    summary = json.loads((empty / "run" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1] and summary["rounds"][0]["pairs"] > 0
    assert str(installed) in summary["model"]  # the embedded checkpoint came out of the installed wheel
    assert (empty / "run" / "round_1" / "checkpoint" / "model.safetensors").exists()
