"""alignlab.verify: extraction, real math-verify equivalences, adversarial inputs, threads, noisy/hackable."""

from __future__ import annotations

import os
import pickle
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from alignlab.verify import (
    ArithExactVerifier,
    HackableVerifier,
    MathVerifier,
    NoisyVerifier,
    Verdict,
    Verifier,
    extract_answer,
    normalize_answer,
    parse_number,
)

TIMEOUT = 1.5


@pytest.fixture(scope="module")
def mv():
    with MathVerifier(timeout_s=TIMEOUT, workers=2) as v:
        yield v


# --------------------------------------------------------------------------------------------------------------
# extraction (pure string code)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        # Minerva form wins over a later \boxed, as in Qwen's parser
        ("final answer is $7$. I hope it is correct. \\boxed{8}", "7"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("so $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
        ("the result is $\\boxed 5$ indeed", "5"),
        ("\\fbox{42}", "42"),
        ("\\boxed{12} and later \\fbox{13}", "13"),
        ("truncated \\boxed{\\frac{1}{2", "\\frac{1}{2"),
        ("The answer is 5.", "5"),
        ("The answer is: $x^2$ since ...", "x^2"),
        ("so the final answer is 3/4", "3/4"),
        ("we get 12 apples, then 1,234 pears", "1234"),
        ("temperature drops to -3.5 degrees", "-3.5"),
        ("no digits at all", None),
        ("", None),
        ("\\boxed{}", None),
        ("answer \\boxed{ 10 }.", "10"),
        ("line\n\\boxed{a\n+b}", "a +b"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_returns_on_megabyte_strings():
    """Megabyte inputs that would make a backtracking pattern run for hours return (how fast is ``make bench``'s
    business, not a test's): no box closes -> None; the last closed box wins."""
    cases = [
        ("{" * 1_000_000, None),
        ("\\boxed{" * 200_000, None),
        ("\\boxed{" + "{" * 1_000_000, ...),
        ("1" * 1_000_000, ...),
        ("-." * 500_000, None),
        ("he answer is " * 80_000, None),
        ("final answer is $" + "x" * 1_000_000, ...),
        ("\\" * 1_000_000, None),
        ("\\boxed{1}" * 100_000, "1"),
    ]
    for s, want in cases:
        got = extract_answer(s)
        assert got is None or isinstance(got, str)
        if want is not ...:
            assert got == want


def test_normalize_and_numbers():
    assert normalize_answer("$x = \\dfrac{3}{4}$.") == "\\frac{3}{4}"
    assert normalize_answer("30^\\circ") == "30"
    assert normalize_answer("\\$1{,}000") == "1000"
    assert normalize_answer("1.6 \\mathrm{~cm}") == "1.6"
    assert normalize_answer("5 \\text{ apples}") == "5"
    assert normalize_answer("2 x") == "2 x"  # a product, not a unit
    assert normalize_answer("\\left( 3, \\frac{\\pi}{2} \\right)") == "( 3, \\frac{\\pi}{2} )"
    assert parse_number("1,234")[0] == 1234
    assert parse_number("\\frac{3}{4}")[0] == parse_number("3/4")[0] == parse_number("0.75")[0]
    assert parse_number("4.5e33")[0] == parse_number("4.5\\times10^{33}")[0]
    assert parse_number("1e100000") is None  # would be a 100k-digit Fraction
    assert parse_number("x+1") is None


# --------------------------------------------------------------------------------------------------------------
# MathVerifier with real math-verify


def boxed(s: str) -> str:
    return f"Reasoning... so the answer is \\boxed{{{s}}}."


EQUIVALENT = [
    ("1/2", "0.5"),
    ("\\frac{1}{2}", "1/2"),
    ("0.5", "\\frac{1}{2}"),
    ("\\frac12", "\\dfrac{1}{2}"),
    ("3", "3.0"),
    ("3.0", "3"),
    ("1000", "1,000"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("\\frac{\\sqrt2}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("(0, 1]", "(0,1]"),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)"),
    ("[2, 5)", "\\left[2, 5\\right)"),
    ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}"),
    ("\\{1,2\\}", "\\{2, 1\\}"),
    ("(x+1)^2", "x^2+2x+1"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("x = 5", "5"),
    ("30^\\circ", "30"),
    ("\\$18", "18"),
    ("50\\%", "50"),
    ("\\text{(B)}", "(B)"),
    ("\\pi/2", "\\frac{\\pi}{2}"),
    ("4.5 \\times 10^{33}", "4.5e33"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
]

DIFFERENT = [
    ("1/2", "0.6"),
    ("3", "4"),
    ("1000", "1001"),
    ("(0, 1]", "[0, 1]"),
    ("\\{1, 2\\}", "\\{1, 3\\}"),
    ("(x+1)^2", "x^2+1"),
    ("\\sqrt{2}", "\\sqrt{3}"),
    ("x^2", "y^2"),
    ("\\frac{\\pi}{2}", "\\pi"),
    ("10000", "10001"),
]


def test_equivalences(mv):
    golds = [g for g, _ in EQUIVALENT] + [g for g, _ in DIFFERENT]
    preds = [boxed(p) for _, p in EQUIVALENT] + [boxed(p) for _, p in DIFFERENT]
    got = mv.verify_batch(preds, golds)
    expected = [True] * len(EQUIVALENT) + [False] * len(DIFFERENT)
    wrong = [(g, p, e) for g, p, e, r in zip(golds, preds, expected, got) if r != e]
    assert not wrong


def test_sympy_path_alone_handles_equivalences():
    """With the string/number shortcut off, math-verify itself must agree (normalisation feeds it well)."""
    with MathVerifier(timeout_s=TIMEOUT, workers=2, fast_path=False) as v:
        pairs = [("1/2", "0.5"), ("3", "3.0"), ("\\frac{\\sqrt2}{2}", "\\sqrt{2}/2"), ("(0,1]", "(0, 1]")]
        pairs += [("\\{1,2\\}", "\\{2,1\\}"), ("1/2", "0.6"), ("\\{1,2\\}", "\\{1,3\\}")]
        got = v.verify_batch([boxed(p) for _, p in pairs], [g for g, _ in pairs])
    assert got == [True, True, True, True, True, False, False]


def test_check_returns_extracted_and_handles_missing_answers(mv):
    vs = mv.check([boxed("\\frac{1}{2}"), "I don't know", "", None, "The answer is 7."], ["0.5", "1", "1", "1", "7"])
    assert all(isinstance(v, Verdict) for v in vs)
    assert [v.correct for v in vs] == [True, False, False, False, True]
    assert [v.extracted for v in vs] == ["\\frac{1}{2}", None, None, None, "7"]
    assert isinstance(mv, Verifier)
    with pytest.raises(ValueError, match="length"):
        mv.check(["a"], [])


def test_constructor_is_cheap_and_validates():
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}
    v = MathVerifier()
    assert v._pool is None  # cheap: no pool, no worker started until the first check
    assert {p.pid for p in multiprocessing.active_children()} <= before
    for kw in ({"timeout_s": 0}, {"timeout_s": float("nan")}, {"workers": 0}, {"memory_mb": -1}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            MathVerifier(**kw)
    v.close()  # closing an unused verifier is fine


def _adversarial() -> list[str]:
    towers = [
        "9^9^9^9",
        "9^{9^{9^{9}}}",
        "10^{10^{10}}",
        "10^{10^{10^{10}}}",
        "2^{2^{2^{2^{2^{2}}}}}",
        "(10^{100})!",
        "99999!",
        "10^{10^{100}}",
        "9**9**9**9",
        "\\left(9^{9}\\right)^{9^{9^{9}}}",
        "e^{e^{e^{e^{100}}}}",
        "\\sum_{n=1}^{10^{100}} n",
        "\\prod_{k=1}^{10^{9}} k",
        "10^{-10^{10}}",
        "1.5^{10^{20}}",
    ]
    nested = [
        "(" * 5000 + "1" + ")" * 5000,
        "{" * 5000 + "1" + "}" * 5000,
        "\\frac{" * 300 + "1" + "}{2}" * 300,
        "\\sqrt{" * 500 + "2" + "}" * 500,
        "[" * 3000 + "1" + "]" * 3000,
        "x^{" * 400 + "2" + "}" * 400,
        "((((((((((((((((((((((((((((((((((((((((((((((((((((((((((1",
        "\\left(" * 1000 + "x",
        "-" * 10000 + "1",
        "\\sqrt" * 2000 + "{2}",
    ]
    unbalanced = [
        "\\frac{1}{2",
        "\\frac{{{{{{{{1}",
        "}}}}}}{{{",
        "\\begin{pmatrix} 1 & 2",
        "\\left( 1, 2",
        "x^{2",
        "\\sqrt{",
        "{}{}{}}}}}{{{{",
        "$$$$$$",
        "\\",
    ]
    huge = [
        "1" * 1_000_000,
        "x+" * 500_000 + "1",
        "\\frac{1}{2}" * 100_000,
        "9" * 5000,
        "a" * 1_000_000,
        "\\boxed{" * 100_000,
        "\u2603" * 300_000,
        "\x00" * 100_000,
        "1/0",
        "0/0",
    ]
    weird = [
        "\\infty^{\\infty}",
        "\\tan(\\pi/2)",
        "\\log(0)",
        "\\int_0^\\infty e^{x^2} dx",
        "\\lim_{x \\to 0} \\frac{1}{x}",
        "\\begin{pmatrix}" + " & ".join(["1"] * 200) + "\\end{pmatrix}",
        "\\zeta(10^{10})",
        "\\Gamma(10^{12})",
        "\\binom{10^{12}}{10^{6}}",
        "x^{x^{x^{x^{x^{x}}}}}",
        "1e999999999",
        "nan",
        "\\mathbb{R}^{\\mathbb{R}}",
        "\\text{\\text{\\text{\\text{hi}}}}",
        "\U0001f600\U0001f600\U0001f600",
    ]
    return towers + nested + unbalanced + huge + weird


ADVERSARIAL = _adversarial()


def test_at_least_fifty_adversarial_cases():
    assert len(ADVERSARIAL) >= 50


def test_adversarial_predictions_are_false_and_bounded(mv):
    # bounded: an item the worker does not finish within TIMEOUT is cut (soft timeout) or its worker killed (hard),
    # and either way answers False; the pool keeps answering afterwards
    for i, a in enumerate(ADVERSARIAL):
        for pred in (boxed(a), a):  # boxed, and as a raw response (extraction falls to the last number)
            got = mv.check([pred], ["\\frac{7}{13}"])
            assert got[0].correct is False, (i, a[:60])
    assert mv.verify_batch([boxed("x+1")], ["1+x"]) == [True]


def test_adversarial_golds_do_not_crash(mv):
    bad = ["", "\\frac{", "9^9^9^9", "{" * 3000, "x" * 100_000]
    got = mv.verify_batch([boxed("1")] * len(bad), bad)
    assert got == [False] * len(bad)


def test_timeout_kills_and_replaces_worker():
    """A worker that does not answer within timeout_s (here: frozen with SIGSTOP, as a C-level computation
    that no signal handler can interrupt would be) is killed and replaced; its item is False."""
    with MathVerifier(timeout_s=0.5, workers=1) as v:
        assert v.verify_batch([boxed("x+1")], ["1+x"]) == [True]  # starts the worker
        (worker,) = v._pool._workers
        os.kill(worker.pid, signal.SIGSTOP)
        assert v.verify_batch([boxed("x^2+1")], ["(x+1)^2"]) == [False]
        assert v.stats.timeouts == 1 and v._pool._workers[0].pid != worker.pid
        assert v.verify_batch([boxed("x^2+2x+1")], ["(x+1)^2"]) == [True]


def test_slow_python_work_is_cut_by_the_soft_timeout(mv):
    """Pure-Python sympy work that runs long is interrupted inside the worker (no kill needed): the same worker
    processes answer, and the pool counted no hard timeout and no crash."""
    mv.verify_batch([boxed("x+1")], ["1+x"])  # the workers are up
    pids, stats = [w.pid for w in mv._pool._workers], (mv.stats.timeouts, mv.stats.crashes)
    assert mv.verify_batch([boxed("(10^{6})!")], ["(x+1)^{2}"]) == [False]
    assert [w.pid for w in mv._pool._workers] == pids and (mv.stats.timeouts, mv.stats.crashes) == stats


def test_worker_crash_is_recovered(mv):
    mv.verify_batch([boxed("x+1")], ["1+x"])
    pids = [w.pid for w in mv._pool._workers]
    for pid in pids:
        os.kill(pid, 9)
    assert mv.verify_batch([boxed("x+1"), boxed("2x")], ["1+x", "x+x"]) == [True, True]


def test_items_of_one_gold_go_to_the_worker_that_parsed_it():
    """A rollout's samples share a gold: the scheduler keeps them on one worker (one gold parse, not one per
    worker), gives an idle worker a gold nobody is on, and only then shares a gold to keep both busy."""
    from collections import OrderedDict, deque

    from alignlab.verify._pool import WorkerPool, _requeue, _Worker

    pool = WorkerPool(2, timeout_s=1.0, memory_mb=0)
    a, b = _Worker(sock=None, pid=1), _Worker(sock=None, pid=2)  # type: ignore[arg-type]
    pool._state["workers"] = [a, b]
    pending = OrderedDict(g1=deque([0, 1, 2]), g2=deque([3, 4]))
    a.item = pool._next_item(a, pending)
    b.item = pool._next_item(b, pending)
    assert (a.item, a.gold, b.item, b.gold) == (0, "g1", 3, "g2")
    assert [pool._next_item(a, pending), pool._next_item(a, pending)] == [1, 2]  # a stays on g1
    _requeue(pending, "g1", 2)  # a retried item goes back to the front
    assert list(pending) == ["g1", "g2"] and pool._next_item(b, pending) == 4  # b finishes its own gold first
    assert pool._next_item(b, pending) == 2 and not pending  # then helps with g1
    pool._state["workers"].clear()  # fake workers: nothing to shut down


def test_verify_batch_off_main_thread():
    v = MathVerifier(timeout_s=TIMEOUT, workers=2)  # pool created lazily inside the thread
    out: list = []
    th = threading.Thread(target=lambda: out.append(v.verify_batch([boxed("x^2-1"), boxed("2")], ["(x-1)(x+1)", "3"])))
    th.start()
    th.join(timeout=60)
    assert out == [[True, False]]
    with ThreadPoolExecutor(4) as ex:  # concurrent callers share one pool safely
        res = list(ex.map(lambda k: v.verify_batch([boxed(f"{k}x+x")], [f"{k + 1}x"]), range(8)))
    assert res == [[True]] * 8
    v.close()
    assert v.verify_batch([boxed("1")], ["1"]) == [True]  # usable again after close
    v.close()


def test_pickles_without_its_processes(mv):
    mv.verify_batch([boxed("1")], ["1"])
    clone = pickle.loads(pickle.dumps(mv))
    assert clone._pool is None
    assert clone.verify_batch([boxed("1")], ["1"]) == [True]
    clone.close()


# --------------------------------------------------------------------------------------------------------------
# ArithExact, Noisy, Hackable


def test_arith_exact():
    v = ArithExactVerifier()
    preds = ["so \\boxed{42}", "The answer is 1,234.", "\\boxed{42.5}", "\\boxed{forty}", "", "9" * 10_000, "-7"]
    golds = ["42", "1234", "42", "40", "1", "9", "-7"]
    assert v.verify_batch(preds, golds) == [True, True, False, False, False, False, True]
    assert v.check(["\\boxed{3}"], ["3"])[0].extracted == "3"


def test_noisy_flip_rate_and_determinism():
    base = ArithExactVerifier()
    n = 4000
    preds = [f"Attempt {i}: \\boxed{{{i % 7}}}" for i in range(n)]  # distinct pairs: flips are per pair
    golds = [str(i % 5) for i in range(n)]
    truth = base.verify_batch(preds, golds)
    noisy = NoisyVerifier(base, epsilon=0.2, seed=3)
    vs = noisy.check(preds, golds)
    assert [v.true_correct for v in vs] == truth
    flips = sum(v.correct != t for v, t in zip(vs, truth))
    assert abs(flips / n - 0.2) < 0.03
    # independent of batch order and batching, reproducible, seed-dependent
    rev = NoisyVerifier(base, epsilon=0.2, seed=3).verify_batch(preds[::-1], golds[::-1])[::-1]
    assert rev == [v.correct for v in vs]
    assert noisy.verify_batch(preds[:10], golds[:10]) == [v.correct for v in vs[:10]]
    other = NoisyVerifier(base, epsilon=0.2, seed=4).verify_batch(preds, golds)
    assert other != [v.correct for v in vs]
    assert NoisyVerifier(base, 0.0).verify_batch(preds, golds) == truth
    assert NoisyVerifier(base, 1.0).verify_batch(preds, golds) == [not t for t in truth]


def test_hackable():
    v = HackableVerifier(ArithExactVerifier(), tolerance=1.0)
    vs = v.check(["\\boxed{10}", "\\boxed{11}", "\\boxed{9.5}", "\\boxed{12}", "\\boxed{x}"], ["10"] * 5)
    assert [x.correct for x in vs] == [True, True, True, False, False]
    assert [x.true_correct for x in vs] == [True, False, False, False, False]
    assert HackableVerifier(ArithExactVerifier(), tolerance=0).verify_batch(["\\boxed{11}"], ["10"]) == [False]


def test_wrappers_stack_and_keep_the_truth(mv):
    v = NoisyVerifier(HackableVerifier(mv, tolerance=0.5), epsilon=0.0)
    vs = v.check([boxed("\\frac{1}{2}"), boxed("0.9")], ["0.5", "1"])
    assert [x.correct for x in vs] == [True, True]
    assert [x.true_correct for x in vs] == [True, False]


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: NoisyVerifier(ArithExactVerifier(), epsilon=-0.1), "epsilon"),
        (lambda: NoisyVerifier(ArithExactVerifier(), epsilon=1.5), "epsilon"),
        (lambda: NoisyVerifier(ArithExactVerifier(), epsilon=float("nan")), "epsilon"),
        (lambda: NoisyVerifier(ArithExactVerifier(), epsilon=0.1, seed=1.5), "seed"),
        (lambda: HackableVerifier(ArithExactVerifier(), tolerance=-1), "tolerance"),
        (lambda: HackableVerifier(ArithExactVerifier(), tolerance=float("inf")), "tolerance"),
    ],
)
def test_wrappers_reject_impossible_values(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_wrappers_reject_non_verifiers():
    with pytest.raises(TypeError, match="base"):
        NoisyVerifier(object(), 0.1)


def test_numeric_tolerance_is_the_configs_rel_tol_with_near_misses_on_both_sides():
    """``verifier.rel_tol`` (conf/verifier/math_verify.yaml, 1e-4 as Qwen2.5-Math's grader): a decimal within
    1e-4 of the gold (relative) is right, one just outside is wrong; two exact numbers compare exactly."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import ROOT

    node = OmegaConf.load(ROOT / "conf" / "verifier" / "math_verify.yaml")
    assert node.rel_tol == 1e-4
    cases = [  # (prediction, gold, right at 1e-4): relative differences 9.0e-5, 1.1e-4, 8.1e-5, 2.0e-4, 9.0e-5, 1.1e-4
        ("1000.09", "1000", True), ("1000.11", "1000", False), ("12346.0", "12345", True), ("12347.5", "12345", False),
        ("999.91", "1000", True), ("999.89", "1000", False),
        ("12346", "12345", False),  # two integers: exact, whatever the tolerance
        ("1000.0", "1000", True),
    ]
    preds, golds = [boxed(p) for p, _, _ in cases], [g for _, g, _ in cases]
    with instantiate(node) as v, instantiate(node, rel_tol=0.0) as exact:
        assert v.verify_batch(preds, golds) == [want for _, _, want in cases]
        assert exact.verify_batch(preds, golds) == [p == "1000.0" for p, _, _ in cases]
