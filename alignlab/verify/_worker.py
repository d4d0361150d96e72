"""Verification processes: a warm "zygote" that forks workers, and the workers' check loop.

Started as ``python _worker.py CONTROL_FD`` — a plain script (not
``-m alignlab...``), so it never imports the caller's ``__main__`` or the alignlab package and behaves the same
under a script, pytest or a Hydra job, whichever thread started it.

Why a zygote: math-verify parses LaTeX with an ANTLR parser whose prediction cache (DFA) starts empty in every
process; a cold process needs hundreds of milliseconds to seconds per expression until the cache fills. The
zygote imports math-verify and warms that cache once, then forks workers that inherit it. A worker killed at
its timeout is replaced by another warm fork in milliseconds. The zygote is single-threaded, so forking it is
safe (unlike forking a parent that runs pytest, Hydra or data-loader threads).

Control protocol (Unix socket, one JSON line each way): ``{"op": "fork", "soft_s": float, "hard_s": float,
"memory_mb": int}`` with the worker's socket attached (SCM_RIGHTS) -> ``{"pid": int}``; ``{"op": "kill", "pid": int}`` -> ``{"ok": true}`` (the zygote kills and
reaps its own child, so a recycled pid is never signalled). Worker protocol (its socket, JSON lines):
``{"i": int, "g": gold, "p": prediction}`` -> ``{"i": int, "ok": bool}``; EOF ends it.

Timeouts are layered. A soft ``setitimer`` alarm (the worker's main thread, so signals work) aborts slow
pure-Python work and answers False without losing the process. C-level work (a bignum power) cannot be
interrupted; the parent kills the worker at the hard timeout, and an ``RLIMIT_CPU`` set just above the hard
timeout ends it even if the parent is gone. ``RLIMIT_AS`` turns memory blow-ups into MemoryError.
"""

from __future__ import annotations

import cmath
import json
import logging
import math
import os
import random
import resource
import signal
import socket
import sys
from collections import OrderedDict

_CACHE_SIZE = 20000
# One cache for golds and predictions: a correct answer written like its gold is then parsed once.
_cache: OrderedDict[str, list] = OrderedDict()
_gold_cache = _pred_cache = _cache

# Answer shapes the benchmarks use; parsing them once fills ANTLR's prediction cache for similar inputs.
WARMUP = [
    "18", "-3", "0.75", "1,000", "4.5e33", "3.14", "\\frac{1}{2}", "-\\frac{3}{4}", "\\frac{\\sqrt{3}}{2}",
    "2\\sqrt{5}", "\\sqrt[3]{2}", "\\pi", "12\\pi", "\\frac{\\pi}{6}", "30^\\circ", "50\\%", "\\$18.90",
    "x^2+2x+1", "(x+1)^2", "3x-4y+5z", "10-4 n", "15 v^{2}-26 v+8", "a^{2} b^{3}", "\\frac{5}{x(x-6)}",
    "x_{1}+x_{2}", "c_{1} e^{2 x}+c_{2} e^{-x}", "e^{-3 t}(\\cos 2t + \\sin 2t)", "\\ln|x|+C", "\\log_{2}(8)",
    "\\sin(x)\\cos(x)", "\\tan^{-1}(2)", "\\arcsin\\frac{1}{2}", "\\sum_{n=0}^{\\infty} \\frac{x^n}{n!}",
    "\\int_0^1 x^2 dx", "\\lim_{x\\to 0} x", "n!", "\\binom{10}{3}", "\\dbinom{5}{2}", "|x-1|",
    "(1,2)", "[0,1)", "(-\\infty, 2) \\cup (3, \\infty)", "\\{1, 2, 3\\}", "1, 2, 3", "(1, 8, 19), (2, 7, 13)",
    "x=5", "y=2x+3", "x \\in [2,3)", "x \\leq 5", "1 < x < 2", "a > b > c", "\\emptyset", "\\mathbb{R}",
    "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}",
    "1-12i", "\\frac{4-6 i}{13}", "\\text{(B)}", "B", "\\text{No solution}", "\\text{converges}",
    "1.5 \\times 10^{4}", "\\frac{a M^{1/3}}{G M^{2/3}+b}", "\\left( 3, \\frac{\\pi}{2} \\right)",
    "f^{-1}(x)=\\sqrt[5]{x-3}+2", "\\frac{dM}{dt}=k M", "\\max at -1, \\min at 1", "\\infty", "-\\infty",
    "0.5 \\mathrm{~cm}", "300 \\text{ km/s}", "\\frac{3 t}{8}+\\frac{\\sin 2 t}{4}+C", "x^{2}-11=0",
]  # fmt: skip


# Equal-but-different pairs: they reach simplify, set and relation comparison, whose first use in a process
# imports and caches a lot of sympy.
WARMUP_PAIRS = [
    ("(x+1)^2", "x^2+2x+1"), ("\\sin^2 x+\\cos^2 x", "1"), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("\\{1,2\\}", "\\{2,1\\}"), ("(0,1]", "(0, 1]"), ("x=2", "2"), ("2x+2=0", "x+1=0"), ("x \\leq 5", "5 \\geq x"),
    ("0.5", "\\frac{1}{2}"), ("e^{\\ln 2}", "2"), ("\\log_2 8", "3"), ("1+i", "i+1"), ("x^2-1", "(x-1)(x+1)"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"), ("1, 2", "2, 1"),
]  # fmt: skip


class _SoftTimeout(BaseException):
    """BaseException so that math-verify's/sympy's ``except Exception`` blocks cannot swallow it."""


def _on_alarm(signum, frame):  # noqa: ARG001
    raise _SoftTimeout()


def _parse(s: str, cache: OrderedDict[str, list]) -> list:
    from math_verify import parse

    hit = cache.get(s)
    if hit is not None:
        cache.move_to_end(s)
        return hit
    # Normalised answers arrive bare; \boxed{} makes math-verify read the whole string as one LaTeX answer
    # (and is faster than $...$, which also tries every inline-math match).
    res = parse("\\boxed{" + s + "}", parsing_timeout=None)
    cache[s] = res
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return res


def _plain_expr(x) -> bool:
    from sympy import Expr, Float, Symbol
    from sympy.matrices.expressions import MatrixExpr

    return isinstance(x, Expr) and not isinstance(x, Symbol | MatrixExpr) and not x.has(Float)


def _elements(x) -> list | None:
    """The elements math-verify compares ``x`` by: a finite set's or tuple's members, or ``[x]`` for a plain
    expression (it turns a lone expression into a singleton set when the other side is a set); None when
    anything is not a plain expression."""
    from sympy import FiniteSet, Tuple

    els = list(x.args) if isinstance(x, FiniteSet | Tuple) else [x]
    return els if els and all(_plain_expr(e) for e in els) else None


def _same_values(a: list[complex], b: list[complex]) -> bool:
    def close(u: complex, v: complex) -> bool:
        return abs(u - v) <= 1e-8 * max(1.0, abs(u), abs(v))

    return all(any(close(u, v) for v in b) for u in a) and all(any(close(v, u) for u in a) for v in b)


def _values_differ(g, p) -> bool:
    """True when ``g`` and ``p`` (plain expressions, or finite sets/tuples of them) take clearly different
    values at two random points, so math-verify could only answer False.

    For such pairs math-verify ends in ``simplify(g - p)`` or a sympy set symmetric difference, which are most
    of its time and all of its tail latency. Every path by which it could answer True (structural equality,
    numeric equality, simplify to zero, equal sets, element-wise equality) implies equal values everywhere,
    so different values at each of two points is a sound reject. Floats (which it rounds), bare symbols
    (compared by name), relations, intervals and matrices are left to math-verify.
    """
    try:
        return _values_differ_unsafe(g, p)
    except Exception:  # noqa: BLE001 - inconclusive: let math-verify decide
        return False


def _values_differ_unsafe(g, p) -> bool:
    ge, pe = _elements(g), _elements(p)
    if ge is None or pe is None:
        return False
    syms: set = set()
    for e in ge + pe:
        syms |= e.free_symbols
    if len(syms) > 10:
        return False
    order = sorted(syms, key=str)
    rng = random.Random(0)
    from sympy import Rational

    for _ in range(2):
        pt = {s: Rational(rng.randint(1101, 2899), 1000) for s in order}  # in (1.1, 2.9): off 0, 1, and poles
        a = [_number(e, pt) for e in ge]
        b = [_number(e, pt) for e in pe]
        if any(v is None for v in a + b) or _same_values(a, b):  # type: ignore[arg-type]
            return False
    return True


def _number(e, pt: dict) -> complex | None:
    """``e`` at ``pt`` as a finite complex number, or None.

    Infinite/undefined expressions are refused up front: ``complex(oo**oo)`` goes through
    ``as_real_imag`` and leaves sympy's cache in a state where a later ``simplify(7/13 - oo**oo)`` returns 0,
    i.e. it would change math-verify's answers for the rest of the process.
    """
    from sympy import S

    bad = (S.Infinity, S.NegativeInfinity, S.ComplexInfinity, S.NaN)
    if e.has(*bad):
        return None
    v = e.evalf(30, subs=pt)
    if not v.is_number or v.has(*bad):
        return None
    if v.is_Number:
        c = complex(float(v))
    else:
        re, im = v.as_real_imag()
        if not (re.is_Number and im.is_Number):
            return None
        c = complex(float(re), float(im))
    return c if cmath.isfinite(c) else None


def _infinite_value(x) -> bool:
    """``x`` is an expression with oo/zoo/nan among its values, outside limits, sums, products and integrals
    (whose bounds may be infinite while their value is finite)."""
    from sympy import Expr, Integral, Limit, Product, S, Sum
    from sympy.core.traversal import preorder_traversal

    if not isinstance(x, Expr):
        return False
    bad = (S.Infinity, S.NegativeInfinity, S.ComplexInfinity, S.NaN)
    walk = preorder_traversal(x)
    for node in walk:
        if isinstance(node, Limit | Sum | Product | Integral):
            walk.skip()
        elif node in bad:
            return True
    return False


def _finite_expr(x) -> bool:
    from sympy import Expr

    return isinstance(x, Expr) and not _infinite_value(x) and not x.has(*_infinities())


def _infinities() -> tuple:
    from sympy import S

    return (S.Infinity, S.NegativeInfinity, S.ComplexInfinity, S.NaN)


def check(gold: str, pred: str) -> bool:
    """math-verify's verdict on normalised ``gold`` vs ``pred``, with parse caches and a numeric fast reject."""
    from math_verify import verify

    g = _parse(gold, _gold_cache)
    if not g:
        return False
    p = _parse(pred, _pred_cache)
    if not p:
        return False
    g_sym = [x for x in g if not isinstance(x, str)]
    p_sym = [x for x in p if not isinstance(x, str)]
    if g_sym and p_sym and all(_finite_expr(x) for x in g_sym) and all(_infinite_value(x) for x in p_sym):
        # A finite number or expression never equals an infinite one, and sympy is unreliable on those: with
        # some hash seeds math-verify says 7/13 == oo**oo (simplify(7/13 - oo**oo) returns 0). Sets, intervals
        # and relations (R == (-oo, oo)) are left to math-verify.
        return False
    g_str = {x.strip() for x in g if isinstance(x, str)}
    if not any(isinstance(x, str) and x.strip() in g_str for x in p) and all(
        _values_differ(a, b) for a in g_sym for b in p_sym
    ):
        return False
    return bool(verify(g, p, timeout_seconds=None))


def _serve(sock: socket.socket, soft_s: float, hard_s: float, memory_mb: int) -> None:
    """A worker's life: answer requests until EOF. Runs in a freshly forked, single-threaded child."""
    if memory_mb > 0:
        try:
            resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        except (ValueError, OSError):
            pass
    signal.signal(signal.SIGALRM, _on_alarm)
    cpu_margin = math.ceil(hard_s) + 2
    rfile = sock.makefile("rb")
    for line in rfile:
        req = json.loads(line)
        # Kernel-enforced backstop: if this item burns more CPU than the hard timeout, SIGXCPU ends us.
        used = resource.getrusage(resource.RUSAGE_SELF)
        try:
            _, hard = resource.getrlimit(resource.RLIMIT_CPU)
            resource.setrlimit(resource.RLIMIT_CPU, (int(used.ru_utime + used.ru_stime) + cpu_margin, hard))
        except (ValueError, OSError):
            pass
        ok = False
        try:
            signal.setitimer(signal.ITIMER_REAL, soft_s)
            try:
                ok = check(req["g"], req["p"])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            ok = False
        except (Exception, RecursionError, MemoryError):  # noqa: BLE001 - any failure to verify is "not correct"
            ok = False
        sock.sendall((json.dumps({"i": req["i"], "ok": ok}) + "\n").encode())


def _reap(children: set[int]) -> None:
    while children:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)


def main() -> None:
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it will close us
    logging.disable(logging.CRITICAL)  # math-verify logs every unparsable prediction at WARNING
    import math_verify  # noqa: F401

    for gold, pred in [(e, e) for e in WARMUP] + WARMUP_PAIRS:
        try:
            check(gold, pred)
        except Exception:  # noqa: BLE001
            pass
    _cache.clear()
    children: set[int] = set()
    ctrl.sendall(b'{"ready": true}\n')
    while True:
        msg, fds, _, _ = socket.recv_fds(ctrl, 4096, 1)
        _reap(children)
        if not msg:
            return  # parent gone: children see EOF on their own sockets and exit too
        req = json.loads(msg)
        if req["op"] == "fork" and fds:
            pid = os.fork()
            if pid == 0:
                ctrl.close()
                try:
                    _serve(socket.socket(fileno=fds[0]), req["soft_s"], req["hard_s"], req["memory_mb"])
                finally:
                    os._exit(0)
            os.close(fds[0])
            children.add(pid)
            ctrl.sendall((json.dumps({"pid": pid}) + "\n").encode())
        elif req["op"] == "kill":
            pid = req["pid"]
            if pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                children.discard(pid)
            ctrl.sendall(b'{"ok": true}\n')
        else:
            for fd in fds:
                os.close(fd)
            ctrl.sendall(b'{"error": "bad request"}\n')


if __name__ == "__main__":
    main()
