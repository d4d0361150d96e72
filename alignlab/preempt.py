"""Graceful preemption: SIGTERM or SIGUSR1 stops a run at a safe point and exits with :data:`EXIT_PREEMPTED`.

SLURM sends SIGTERM, then SIGKILL after its grace period (``KillWait``, 30 s by default), on preemption and at the
time limit; ``--signal=B:USR1@<s>`` sends SIGUSR1 ahead of time. Every artifact is written atomically, so a
stage in flight can be abandoned at any point (as a SIGKILL would) and is redone on resume. Two places wait
instead of abandoning: a DeepSpeed train stage, whose ranks are told to stop (``<work>/stop``) and save a
DeepSpeed checkpoint at the next step boundary, so the resumed round continues from that step; and the rank
processes themselves, which only note the signal (:func:`install` with ``raise_now=False``).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure, retry": resume the run with the same command
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_FILE = "stop"  # in a rank work dir: the runner asks its ranks to save and stop
PREEMPTED_FILE = "preempted.json"  # in a rank work dir: the ranks stopped early, with a checkpoint (or none)

_state: dict[str, int] = {"signal": 0, "deferred": 0, "raise_now": 1}


class Preempted(BaseException):
    """Raised in the main thread when a stop was asked; a BaseException, so ``except Exception`` cleanup code
    in stages does not swallow it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def requested() -> int:
    """The signal that asked this process to stop (0: none)."""
    return _state["signal"]


def check() -> None:
    """Raise :class:`Preempted` if a stop was asked (called between stages)."""
    if _state["signal"]:
        raise Preempted(_state["signal"])


def _handler(signum: int, frame: FrameType | None) -> None:
    first = not _state["signal"]
    _state["signal"] = signum
    if first and _state["raise_now"] and not _state["deferred"]:
        raise Preempted(signum)


def install(raise_now: bool = True) -> dict[int, object]:
    """Handle SIGTERM and SIGUSR1 in this process (main thread only); returns the previous handlers."""
    _state.update(signal=0, deferred=0, raise_now=int(raise_now))
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _handler) for s in SIGNALS}


def ignore() -> None:
    """The run's work is done: SIGTERM/SIGUSR1 no longer interrupt the exit. Python's interpreter teardown puts the
    default action back for signals it handled, so a signal then would end a finished run with -15, not 0."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


@contextmanager
def handled(raise_now: bool = True) -> Iterator[None]:
    """Handle SIGTERM/SIGUSR1 for the duration of a run, then restore the previous handlers (submitit's)."""
    old = install(raise_now)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        _state.update(signal=0, deferred=0)


@contextmanager
def deferred() -> Iterator[None]:
    """While waiting for ranks that save on a stop: a signal only sets the flag (the waiter polls
    :func:`requested`, tells the ranks, and raises :class:`Preempted` once they are done)."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
