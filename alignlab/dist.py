"""Launched ranks: the parent-death watch and the rank-error files, shared by the launcher and every rank.

The runner starts rank processes (DeepSpeed training, log-probs, sharded generation) with a launcher; a rank that
fails writes ``<work>/error.rank<R>.json`` and the runner raises the first one of its own launch.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from alignlab.records import atomic_write_text, is_disk_full
from alignlab.spec import LAUNCH_ENV

RUNNER_PID_ENV, RUNNER_HOST_ENV = "ALIGNLAB_RUNNER_PID", "ALIGNLAB_RUNNER_HOST"


def pdeathsig() -> None:
    """SIGTERM this process when its parent dies (Linux; a no-op elsewhere). Safe in ``preexec_fn``."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def runner_env() -> dict[str, str]:
    """What a launch tells its ranks about the runner, so that :func:`die_with_parent` can watch it."""
    return {RUNNER_PID_ENV: str(os.getpid()), RUNNER_HOST_ENV: socket.gethostname()}


def die_with_parent() -> None:
    """A killed run must leave no orphan ranks: SIGTERM when the launcher dies, and, on the runner's host, exit
    when the runner itself is gone (the deepspeed launcher is two processes deep)."""
    pdeathsig()
    pid = int(os.environ.get(RUNNER_PID_ENV, "0"))
    if not pid or os.environ.get(RUNNER_HOST_ENV) != socket.gethostname():
        return

    def watch() -> None:
        while True:
            time.sleep(2.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass

    threading.Thread(target=watch, daemon=True, name="runner-watch").start()


def write_rank_error(work: Path, rank: int, e: BaseException) -> None:
    """``<work>/error.rank<R>.json``: the exception, tagged with this launch (a killed launch's orphan may still
    write here after the next launch began)."""
    atomic_write_text(work / f"error.rank{rank}.json", json.dumps(
        {"type": type(e).__name__, "message": str(e), "rank": rank, "launch": os.environ.get(LAUNCH_ENV),
         "traceback": traceback.format_exc(), "disk_full": is_disk_full(e), "filename": getattr(e, "filename", None)}))


def launch_errors(work: Path, launch: str) -> list[dict[str, Any]]:
    """The ranks' error reports of this launch only: a rank of a killed earlier launch can outlive the kill by a
    second or two (its collective fails when its peer dies) and write its report after the resumed launch began."""
    out = []
    for path in sorted(work.glob("error.rank*.json")):
        try:
            err = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if err.get("launch") == launch:
            out.append(err)
    return out
