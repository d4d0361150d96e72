"""alignlab.data.benchmarks on the real files in ../shared/data/benchmarks."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from alignlab.data.benchmarks import BENCHMARKS, load_benchmark
from alignlab.records import Problem
from alignlab.verify import MathVerifier

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ROOT = DATA / "benchmarks"
# only the tests that read the real files need the data folder; the rest (names, errors, malformed rows) always run
needs_data = pytest.mark.skipif(not ROOT.is_dir(), reason=f"benchmark data not found at {ROOT} (../shared/data "
                                "beside the clone holds the 8 upstream test files)")

COUNTS = {
    "gsm8k": 1319,
    "math500": 500,
    "minerva_math": 272,
    "gaokao2023en": 385,
    "olympiadbench": 675,
    "college_math": 2818,
    "amc23": 40,
    "aime24": 30,
}

# first row of each file: (id, gold) as the adapter must produce it
FIRST = {
    "gsm8k": ("gsm8k/0", "18"),
    "math500": ("math500/test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    "minerva_math": ("minerva_math/0", "1.6"),
    "gaokao2023en": ("gaokao2023en/1", "\\{x|-2\\leq x < 1\\}"),
    "olympiadbench": ("olympiadbench/1606", "2"),
    "college_math": ("college_math/1", "10-4 n"),
    "amc23": ("amc23/0", "27"),
    "aime24": ("aime24/60", "204"),
}


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[Problem]]:
    return {name: load_benchmark(name, ROOT) for name in BENCHMARKS}


def test_names():
    assert set(BENCHMARKS) == set(COUNTS)


@needs_data
@pytest.mark.parametrize("name", list(COUNTS))
def test_counts_and_clean_golds(loaded, name):
    probs = loaded[name]
    assert len(probs) == COUNTS[name]
    assert len({p.id for p in probs}) == len(probs)
    assert (probs[0].id, probs[0].answer) == FIRST[name]
    for p in probs:
        assert isinstance(p, Problem) and p.source == name and p.prompt.strip()
        a = p.answer
        assert a and a == a.strip()
        assert "####" not in a and "\\boxed" not in a
        assert "$" not in a.replace("\\$", "")


@needs_data
def test_specific_schemas(loaded):
    gsm = {p.id: p.answer for p in loaded["gsm8k"]}
    assert all("," not in a for a in gsm.values())
    assert "25" in {p.answer for p in loaded["aime24"]}  # upstream "025"
    assert all(not a.answer.endswith(".0") for a in loaded["amc23"])
    oly = {p.id: p.answer for p in loaded["olympiadbench"]}
    assert any(", " in a for a in oly.values())  # multi-part answers joined
    m500 = loaded["math500"]
    assert {p.difficulty for p in m500} == {1, 2, 3, 4, 5}
    minerva = {p.id: p.answer for p in loaded["minerva_math"]}
    assert minerva["minerva_math/1"] == "4.5e33"
    # two gaokao rows ship the answer pasted into the question: it is moved out of the prompt
    gk = {p.id: p for p in loaded["gaokao2023en"]}
    assert gk["gaokao2023en/168"].answer == "\\frac{3}{10}" and "answers:" not in gk["gaokao2023en/168"].prompt
    assert gk["gaokao2023en/193"].answer == "A"


@needs_data
def test_root_may_be_the_data_folder():
    assert len(load_benchmark("aime24", DATA)) == 30
    assert len(load_benchmark("amc23", str(ROOT))) == 40


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="gsm8k.*aime24"):
        load_benchmark("mmlu", ROOT)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="aime24"):
        load_benchmark("aime24", tmp_path)


def test_malformed_rows_are_skipped_or_raise(tmp_path, caplog):
    d = tmp_path / "gsm8k"
    d.mkdir()
    good = json.dumps({"question": "1+1?", "answer": "so 2\n#### 2", "idx": 0})
    lines = [
        good.encode(),
        b'{"question": "broken", ',
        json.dumps({"question": "no answer", "idx": 2}).encode(),
        json.dumps({"question": "no hashes", "answer": "42", "idx": 3}).encode(),
        b'{"question": "\xff\xfe bad bytes", "answer": "#### 1", "idx": 4}',
        b"",
        json.dumps({"question": "1,000+1?", "answer": "#### 1,001", "idx": 5}).encode(),
    ]
    (d / "test.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="alignlab.data.benchmarks"):
        probs = load_benchmark("gsm8k", tmp_path)
    assert [(p.id, p.answer) for p in probs] == [("gsm8k/0", "2"), ("gsm8k/5", "1001")]
    warned = " ".join(r.getMessage() for r in caplog.records)
    for lineno in (2, 3, 4, 5):
        assert f"test.jsonl:{lineno}:" in warned
    with pytest.raises(ValueError, match=r"test.jsonl:2: broken JSON"):
        load_benchmark("gsm8k", tmp_path, strict=True)


@needs_data
def test_gold_responses_verify_on_every_benchmark(loaded):
    """A sample of each benchmark: the boxed gold verifies True, another row's gold verifies False, both with
    the default verifier and with every item forced through math-verify (no string/number shortcut)."""
    rng = random.Random(0)
    golds, others = [], []
    for name in BENCHMARKS:
        probs = loaded[name]
        for p in rng.sample(probs, 6):
            q = next(q for q in rng.sample(probs, len(probs)) if q.answer != p.answer)
            golds.append(p.answer)
            others.append(q.answer)
    right = [f"Step by step... so the answer is \\boxed{{{g}}}." for g in golds]
    wrong = [f"Step by step... so the answer is \\boxed{{{o}}}." for o in others]
    with MathVerifier(timeout_s=3.0) as fast, MathVerifier(timeout_s=3.0, fast_path=False) as slow:
        assert all(fast.verify_batch(right, golds))
        assert not any(fast.verify_batch(wrong, golds))
        sympy_right = slow.verify_batch(right, golds)
        sympy_wrong = slow.verify_batch(wrong, golds)
    assert sum(sympy_right) >= len(golds) - 1, [g for g, r in zip(golds, sympy_right) if not r]
    assert not any(sympy_wrong), [(g, o) for g, o, r in zip(golds, others, sympy_wrong) if r]
