"""A small process pool with a per-item wall-clock timeout that kills and replaces a stuck worker.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot cancel a running task, and killing one of its
processes breaks the whole pool. Why not ``multiprocessing``: fork from a threaded parent (pytest, Hydra, a
trainer with data-loader threads) can deadlock, and spawn/forkserver re-import the caller's ``__main__`` (slow,
and a script without a main guard recurses). Here one plain ``subprocess`` (the zygote, see ``_worker.py``)
imports math-verify, warms its parser up, and forks the workers; the parent talks JSON lines to each worker
over a Unix socket. This works from any thread, and a replacement worker is ready in milliseconds.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

from alignlab.logging import progress

PROGRESS_MIN_ITEMS = 64  # a bar for a stage's batch, not for the many small calls of tests and benchmarks
_WORKER = str(Path(__file__).with_name("_worker.py"))
_START_TIMEOUT_S = 300.0  # import + parser warm-up; generous because a loaded 2-core box can be very slow


class WorkerStartError(RuntimeError):
    """The verification processes could not start (e.g. math-verify missing). Raised, not hidden: silently
    grading every answer False is how verl lost all MATH scores (verl PR#5635)."""


@dataclass
class _Worker:
    sock: socket.socket
    pid: int
    buf: bytes = b""
    item: int | None = None
    deadline: float = 0.0
    sent_at: float = 0.0
    gold: str | None = None  # the gold of the last item sent: its parse is in this worker's cache

    @property
    def fd(self) -> int:
        return self.sock.fileno()


@dataclass
class PoolStats:
    """Counters for benchmarking and debugging; ``max_item_s`` is the slowest dispatch-to-answer time."""

    items: int = 0
    timeouts: int = 0
    crashes: int = 0
    forks: int = 0
    max_item_s: float = 0.0
    item_seconds: list[float] = field(default_factory=list, repr=False)


class _Zygote:
    """The process that forks workers. Owns them: only it can kill and reap them without pid-reuse races.

    One per parent process, shared by every pool (refcounted): its parser warm-up is paid once, not once per
    verifier, and pools with different timeouts pass theirs with each fork request.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ctrl, child = socket.socketpair()
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        # sympy's answers can depend on set iteration order; a fixed hash seed makes verdicts reproducible.
        env.setdefault("PYTHONHASHSEED", "0")
        self.proc = subprocess.Popen(
            [sys.executable or "python3", "-u", _WORKER, str(child.fileno())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=None,
            pass_fds=(child.fileno(),),
            close_fds=True,
            env=env,
        )
        child.close()
        self.ctrl.settimeout(_START_TIMEOUT_S)
        self._rfile = self.ctrl.makefile("rb")
        try:
            line = self._rfile.readline()
        except OSError as e:
            self.close()
            raise WorkerStartError(f"verify zygote not ready after {_START_TIMEOUT_S:.0f} s") from e
        if not line:
            rc = self.proc.wait()
            raise WorkerStartError(
                f"verify zygote exited during start-up (rc={rc}); is math-verify installed for {sys.executable}?"
            )
        self.ctrl.settimeout(30.0)

    def _call(self, msg: dict, fds: tuple[int, ...] = ()) -> dict:
        data = (json.dumps(msg) + "\n").encode()
        with self.lock:
            if fds:
                socket.send_fds(self.ctrl, [data], list(fds))
            else:
                self.ctrl.sendall(data)
            line = self._rfile.readline()
        if not line:
            raise OSError("zygote closed its control socket")
        return json.loads(line)

    def fork(self, soft_s: float, hard_s: float, memory_mb: int) -> _Worker:
        mine, theirs = socket.socketpair()
        try:
            msg = {"op": "fork", "soft_s": soft_s, "hard_s": hard_s, "memory_mb": memory_mb}
            pid = self._call(msg, (theirs.fileno(),))["pid"]
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        return _Worker(sock=mine, pid=pid)

    def kill(self, pid: int) -> None:
        self._call({"op": "kill", "pid": pid})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        for f in (self._rfile, self.ctrl):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_shared_lock = threading.Lock()
_shared: dict = {"zygote": None, "users": 0, "pid": None}


def _acquire_zygote(restart: bool = False) -> _Zygote:
    """The process-wide zygote, started on first use (and again if it died or ``restart``)."""
    with _shared_lock:
        if _shared["pid"] != os.getpid():  # first use, or we are a fork of the process that started it
            _shared.update(zygote=None, users=0, pid=os.getpid())
        z = _shared["zygote"]
        if z is not None and (restart or not z.alive()):
            z.close()
            z = None
        if z is None:
            z = _shared["zygote"] = _Zygote()
        return z


def _current_zygote() -> _Zygote | None:
    with _shared_lock:
        return _shared["zygote"] if _shared["pid"] == os.getpid() else None


def _register(delta: int) -> None:
    """Pools count themselves in and out; the zygote stops when the last one closes."""
    with _shared_lock:
        if _shared["pid"] != os.getpid():
            return
        _shared["users"] = max(0, _shared["users"] + delta)
        if _shared["users"] == 0 and _shared["zygote"] is not None:
            _shared["zygote"].close()
            _shared["zygote"] = None


def _kill_worker(w: _Worker) -> None:
    try:
        w.sock.close()
    except OSError:
        pass
    z = _current_zygote()
    try:
        if z is not None and z.alive():
            z.kill(w.pid)
        else:  # orphaned by a dead zygote: signal it directly
            os.kill(w.pid, 9)
    except (OSError, ValueError):
        pass


def _shutdown(state: dict, owner_pid: int) -> None:
    """Close the workers' sockets (they exit at EOF); only in the process that started them."""
    workers: list[_Worker] = state["workers"]
    if os.getpid() != owner_pid:  # a forked copy of the parent: these processes are not ours to stop
        workers.clear()
        state["registered"] = False
        return
    for w in workers:
        try:
            w.sock.close()
        except OSError:
            pass
    workers.clear()
    if state.get("registered"):
        state["registered"] = False
        _register(-1)


def _requeue(pending: OrderedDict[str, deque[int]], gold: str, i: int) -> None:
    """Put item ``i`` back at the front of the queue."""
    pending.setdefault(gold, deque()).appendleft(i)
    pending.move_to_end(gold, last=False)


class WorkerPool:
    """``n`` persistent worker processes; ``run(items)`` answers each ``(gold, pred)`` or False on timeout."""

    def __init__(self, n: int, timeout_s: float, memory_mb: int) -> None:
        self.n = n
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.stats = PoolStats()
        self._state: dict = {"workers": [], "registered": False}
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._finalizer = weakref.finalize(self, _shutdown, self._state, self._pid)

    @property
    def _workers(self) -> list[_Worker]:
        return self._state["workers"]

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _fork(self) -> _Worker:
        if not self._state["registered"]:
            _acquire_zygote()
            self._state["registered"] = True
            _register(+1)
        soft = max(0.05, 0.8 * self.timeout_s)
        for attempt in range(3):
            try:
                w = _acquire_zygote(restart=attempt > 0).fork(soft, self.timeout_s, self.memory_mb)
                self.stats.forks += 1
                return w
            except OSError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            _shutdown(self._state, self._pid)

    # -- work ------------------------------------------------------------------------------------------------
    def run(self, items: list[tuple[str, str]]) -> list[bool]:
        """Verdict per ``(gold, pred)``; False for items that time out or crash their worker."""
        with self._lock:
            if os.getpid() != self._pid:  # we are a forked child: never touch the parent's processes
                _shutdown(self._state, self._pid)
                self._pid = os.getpid()
                self._finalizer.detach()
                self._finalizer = weakref.finalize(self, _shutdown, self._state, self._pid)
            return self._run(items)

    def _run(self, items: list[tuple[str, str]]) -> list[bool]:
        if not items:
            return []
        results: list[bool | None] = [None] * len(items)
        while len(self._workers) < min(self.n, len(items)):
            self._workers.append(self._fork())
        pending: OrderedDict[str, deque[int]] = OrderedDict()  # gold -> its items: a gold's items go to one worker
        for i, (gold, _) in enumerate(items):
            pending.setdefault(gold, deque()).append(i)
        retried = [False] * len(items)
        done = 0
        sel = selectors.DefaultSelector()
        bar = progress(total=len(items), desc="verify", unit="answer") if len(items) >= PROGRESS_MIN_ITEMS else None
        try:
            for w in self._workers:
                sel.register(w.fd, selectors.EVENT_READ, w)
            for key, _ in sel.select(timeout=0):  # an idle worker with something to read has died (EOF)
                w = key.data
                try:
                    alive = bool(w.sock.recv(1 << 16))  # (or holds a stale line from an interrupted call)
                except OSError:
                    alive = False
                if not alive:
                    self._replace(sel, w)
            while done < len(items):
                for w in list(self._workers):
                    if w.item is None and pending:
                        i = self._next_item(w, pending)
                        if not self._send(w, i, items[i]):
                            _requeue(pending, items[i][0], i)  # the worker died while idle: not this item's fault
                            self._replace(sel, w)
                deadlines = [w.deadline for w in self._workers if w.item is not None]
                wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.0
                for key, _ in sel.select(timeout=min(wait, 1.0)):
                    w = key.data
                    try:
                        chunk = w.sock.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    if not chunk:  # EOF: the worker died (segfault, SIGXCPU, OOM killer, killed from outside)
                        if w.item is not None:
                            self.stats.crashes += 1
                            if retried[w.item]:  # died twice on this item: the item is the problem
                                results[w.item] = False
                                done += 1
                                self._record(time.monotonic() - w.sent_at)
                            else:  # maybe not its fault (killed while idle, OOM elsewhere): once more
                                retried[w.item] = True
                                _requeue(pending, items[w.item][0], w.item)
                            w.item = None
                        self._replace(sel, w)
                        continue
                    w.buf += chunk
                    while b"\n" in w.buf:
                        line, w.buf = w.buf.split(b"\n", 1)
                        try:
                            msg = json.loads(line)
                        except ValueError:
                            continue
                        if w.item is not None and msg.get("i") == w.item:
                            results[w.item] = bool(msg.get("ok"))
                            self._record(time.monotonic() - w.sent_at)
                            done += 1
                            w.item = None
                now = time.monotonic()
                for w in list(self._workers):
                    if w.item is not None and now >= w.deadline:
                        results[w.item] = False
                        done += 1
                        self.stats.timeouts += 1
                        self._record(now - w.sent_at)
                        w.item = None
                        self._replace(sel, w)
                if bar is not None and done > bar.n:
                    bar.update(done - bar.n)
        finally:
            sel.close()
            if bar is not None:
                bar.close()
        return [bool(r) for r in results]

    def _next_item(self, w: _Worker, pending: OrderedDict[str, deque[int]]) -> int:
        """The next item for idle worker ``w``: another of its last gold's items (that gold's parse is cached in
        ``w``), else the first gold no busy worker is on, else the first pending item. A rollout's N samples of
        one problem then cost one gold parse, not one per worker."""
        gold = w.gold if w.gold in pending else None
        if gold is None:
            busy = {o.gold for o in self._workers if o is not w and o.item is not None}
            gold = next((g for g in pending if g not in busy), next(iter(pending)))
        queue = pending[gold]
        i = queue.popleft()
        if not queue:
            del pending[gold]
        w.gold = gold
        return i

    def _record(self, seconds: float) -> None:
        self.stats.items += 1
        self.stats.max_item_s = max(self.stats.max_item_s, seconds)
        if len(self.stats.item_seconds) < 1_000_000:
            self.stats.item_seconds.append(seconds)

    def _send(self, w: _Worker, i: int, item: tuple[str, str]) -> bool:
        msg = (json.dumps({"i": i, "g": item[0], "p": item[1]}) + "\n").encode("utf-8", "surrogatepass")
        try:
            w.sock.sendall(msg)
        except OSError:
            return False
        w.item = i
        w.sent_at = time.monotonic()
        w.deadline = w.sent_at + self.timeout_s
        return True

    def _replace(self, sel: selectors.BaseSelector, w: _Worker) -> None:
        try:
            sel.unregister(w.fd)
        except (KeyError, ValueError):
            pass
        _kill_worker(w)
        idx = self._workers.index(w)
        nw = self._fork()
        self._workers[idx] = nw
        sel.register(nw.fd, selectors.EVENT_READ, nw)
