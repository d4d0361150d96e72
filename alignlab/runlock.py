"""One writer per run directory: an advisory lock held for the life of a run.

A SLURM requeue whose first incarnation is still alive, or a user relaunching ``resume=true`` beside a running
sweep point, would otherwise make two processes write the same stages. The run holds ``fcntl.flock`` on
``<run dir>/.alignlab.lock`` and records its pid, host and start time there. The kernel drops the flock when the
holder dies, so a lock left by a dead process on the same host is taken over without asking. A record naming
another host, with no live flock behind it, cannot be checked from here: it is refused with a line saying how to
force it (``resume=force``). A normal exit, SIGTERM included, empties the record; the file itself stays, so no
two processes can ever hold locks on two different files of the same name.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from alignlab.config import ConfigError

LOCK_FILE = ".alignlab.lock"
log = logging.getLogger("alignlab")


class RunLocked(ConfigError):
    """Another live process writes this run directory (one line: who holds it and what to do)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """The record of the process that holds (or last held without releasing) the run dir's lock; None if empty."""
    try:
        text = (Path(run_dir) / LOCK_FILE).read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    try:
        rec = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def _who(rec: dict[str, Any] | None) -> str:
    if not rec:
        return "another process (no record)"
    return f"pid {rec.get('pid')} on host {rec.get('host')} since {rec.get('started')}"


class RunLock:
    """``with RunLock(run_dir):`` the one writer of ``run_dir``; raises :class:`RunLocked` naming the holder."""

    def __init__(self, run_dir: str | Path, force: bool = False) -> None:
        self.dir, self.force = Path(run_dir), force
        self.path = self.dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise; cheap, so it runs before any work."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _check_takeover(fd, self.dir, self.force)
        except BaseException:
            os.close(fd)
            raise
        rec = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(rec) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        """Empty the record, then drop the flock (the file stays: see the module docstring)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass  # a full or read-only disk: the flock is released below all the same
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _check_takeover(fd: int, run_dir: Path, force: bool) -> None:
    """flock ``fd`` (exclusive, non-blocking) and decide whether the record left in the file may be overwritten."""
    rec = read_holder(run_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise RunLocked(f"run directory {run_dir} is in use by {_who(read_holder(run_dir))} ({run_dir / LOCK_FILE}); "
                        f"wait for it to finish or stop it; one run directory has one writer") from None
    if not rec:
        return
    host, pid = rec.get("host"), int(rec.get("pid") or 0)
    if host == socket.gethostname():
        if pid != os.getpid():
            log.warning("run lock: taking over %s left by pid %d, which is no longer running%s", run_dir / LOCK_FILE,
                        pid, "" if not _alive(pid) else " (that pid is now another process)")
        return
    if force:
        log.warning("run lock: resume=force: taking over %s left by %s", run_dir / LOCK_FILE, _who(rec))
        return
    fcntl.flock(fd, fcntl.LOCK_UN)
    raise RunLocked(f"run directory {run_dir} was locked by {_who(rec)}, which cannot be checked from host "
                    f"{socket.gethostname()}; if that run is gone, rerun with resume=force to take it over")


def probe(run_dir: str | Path, force: bool = False) -> None:
    """Raise :class:`RunLocked` if ``run_dir`` has a live writer, without taking the lock (the pre-flight check,
    before Hydra writes into the directory)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check_takeover(fd, Path(run_dir), force)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
