"""mypy over the package: zero errors at its default (non-strict) level, configured in pyproject.toml's [tool.mypy]."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # minutes on a cold .mypy_cache, seconds after


def test_mypy_reports_no_errors() -> None:
    """The annotations are checked, not comments: a stage or verifier that breaks the protocol it claims (Verifier,
    the evaluators' and loggers' methods), an Optional read without its None case, or a call with the wrong
    argument types fails here, before a run trips over it. The cache is the repository's .mypy_cache (ignored by
    git), so a rerun checks only what changed."""
    res = subprocess.run([sys.executable, "-m", "mypy", "alignlab"], cwd=ROOT, capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, f"mypy alignlab failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
