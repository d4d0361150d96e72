"""Adapters for the 8 math benchmarks in ``../shared/data/benchmarks/<name>/test.jsonl``.

Each file keeps its upstream schema, so each benchmark needs its own way to find the gold answer. All of them
end as :class:`~alignlab.records.Problem` with a bare gold string (no ``$``, no ``####``, no ``\\boxed``), which
is what :class:`alignlab.verify.MathVerifier` expects. Gold strings are otherwise kept as upstream wrote them;
presentation (``\\text``, ``^\\circ``, units, ...) is normalised by the verifier on both sides alike.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignlab.checks import bad_path, read_rows, require_dir
from alignlab.data.files import load_rows
from alignlab.records import Problem
from alignlab.verify.extract import extract_boxed

__all__ = ["BENCHMARKS", "load_benchmark", "load_benchmark_from", "benchmark_path"]

log = logging.getLogger(__name__)

BENCHMARKS: tuple[str, ...] = (
    "gsm8k",
    "math500",
    "minerva_math",
    "gaokao2023en",
    "olympiadbench",
    "college_math",
    "amc23",
    "aime24",
)


class MalformedRow(ValueError):
    """A row that cannot become a Problem (broken JSON, no answer, not UTF-8)."""


def json_row(raw: bytes) -> Any:
    """One JSONL line's value; a line that is not UTF-8 or not JSON is a :class:`MalformedRow` saying which."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedRow(f"not UTF-8 ({e.reason} at byte {e.start})") from e
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise MalformedRow(f"broken JSON ({e.msg})") from e


def _clean(ans: str) -> str:
    """Strip math delimiters and outer whitespace/periods: ``$\\frac12$.`` -> ``\\frac12``."""
    s = ans.strip()
    s = re.sub(r"(?<!\\)\$", "", s).strip()
    if s.endswith(".") and not s.endswith("\\ldots."):
        s = s[:-1].rstrip()
    return s


def _require_str(row: dict, key: str) -> str:
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        raise MalformedRow(f"missing or empty '{key}'")
    return v


def _gsm8k(row: dict) -> str:
    sol = _require_str(row, "answer")
    if "####" not in sol:
        raise MalformedRow("no '####' in 'answer'")
    return sol.rsplit("####", 1)[1].strip().replace(",", "")


def _minerva(row: dict) -> str:
    boxed = extract_boxed(_require_str(row, "solution"))
    if boxed is None or not boxed.strip():
        raise MalformedRow("no \\boxed{} in 'solution'")
    return _clean(boxed)  # one gold has "$ $" inside its box (a line break in the source)


def _olympiad(row: dict) -> str:
    fa = row.get("final_answer")
    if isinstance(fa, str):
        fa = [fa]
    if not isinstance(fa, list) or not fa or not all(isinstance(x, str) and x.strip() for x in fa):
        raise MalformedRow("missing or empty 'final_answer'")
    return ", ".join(_clean(x) for x in fa)


def _amc(row: dict) -> str:
    v = row.get("answer")
    if isinstance(v, bool) or v is None:
        raise MalformedRow("missing 'answer'")
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, int):
        return str(v)
    return _clean(_require_str(row, "answer"))


def _aime(row: dict) -> str:
    s = _clean(_require_str(row, "answer"))
    return str(int(s)) if s.isdigit() else s  # "025" -> "25": AIME answers are integers 0..999


def _plain(key: str) -> Callable[[dict], str]:
    def get(row: dict) -> str:
        return _clean(_require_str(row, key))

    return get


# name -> (gold getter, prompt keys in order of preference, upstream id key or None, difficulty key or None)
_SPECS: dict[str, tuple[Callable[[dict], str], tuple[str, ...], str | None, str | None]] = {
    "gsm8k": (_gsm8k, ("question",), "idx", None),
    "math500": (_plain("answer"), ("problem",), "unique_id", "level"),
    "minerva_math": (_minerva, ("problem",), "idx", None),
    "gaokao2023en": (_plain("answer"), ("question",), None, None),
    "olympiadbench": (_olympiad, ("question",), "id", None),
    "college_math": (_plain("answer"), ("question",), None, None),
    "amc23": (_amc, ("problem", "question"), "id", None),
    "aime24": (_aime, ("problem", "question"), "id", None),
}


def benchmark_path(name: str, root: str | Path) -> Path:
    """``root/<name>/test.jsonl``; ``root`` may also be the ``data`` folder above ``benchmarks``."""
    if name not in _SPECS:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    root = Path(root)
    for cand in (root / name / "test.jsonl", root / "benchmarks" / name / "test.jsonl"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"{name}: no test.jsonl under {root} (expected {root / name / 'test.jsonl'} "
        f"or {root / 'benchmarks' / name / 'test.jsonl'})"
    )


_LEAKED_ANSWER_RE = re.compile(r"^(.*?)\s*(?:answers?|Answer)\s*:\s*(\S[^\n]*?)\s*$", re.DOTALL)


def _recover_gaokao(row: dict) -> dict:
    """Two gaokao2023en rows have an empty ``answer`` and the answer pasted at the end of the question
    (``...saddle point.answers: $\\frac{3}{10}$``); split it off so the prompt stops leaking it."""
    if isinstance(row.get("answer"), str) and row["answer"].strip():
        return row
    m = _LEAKED_ANSWER_RE.match(row.get("question") or "")
    if not m:
        return row
    return {**row, "question": m.group(1), "answer": m.group(2)}


def _row_to_problem(name: str, row: Any, lineno: int) -> Problem:
    if not isinstance(row, dict):
        raise MalformedRow("row is not a JSON object")
    if name == "gaokao2023en":
        row = _recover_gaokao(row)
    gold_fn, prompt_keys, id_key, diff_key = _SPECS[name]
    prompt = next((row[k] for k in prompt_keys if isinstance(row.get(k), str) and row[k].strip()), None)
    if prompt is None:
        raise MalformedRow(f"missing prompt ({' or '.join(prompt_keys)})")
    if name == "olympiadbench" and isinstance(row.get("context"), str) and row["context"].strip():
        prompt = row["context"].strip() + "\n\n" + prompt
    answer = gold_fn(row)
    if not answer:
        raise MalformedRow("empty answer after cleaning")
    uid = row.get(id_key) if id_key else None
    pid = f"{name}/{uid}" if uid is not None else f"{name}/{lineno}"
    diff = row.get(diff_key) if diff_key else None
    return Problem(
        id=pid, prompt=prompt.strip(), answer=answer, difficulty=diff if isinstance(diff, int) else 0, source=name
    )


def load_benchmark(name: str, root: str | Path, strict: bool = False) -> list[Problem]:
    """All problems of benchmark ``name`` with bare gold answers, in file order.

    Malformed rows are skipped with a warning naming ``file:line`` (one bad line should not cost an eval run),
    or raise ``ValueError`` with ``strict=True``.
    """
    path = benchmark_path(name, root)
    out: list[Problem] = []
    seen: set[str] = set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                p = _row_to_problem(name, json_row(raw), lineno)
                if p.id in seen:  # duplicate upstream id: fall back to the line number, still unique
                    p.id = f"{name}/line{lineno}"
                seen.add(p.id)
                out.append(p)
            except MalformedRow as e:
                if strict:
                    raise ValueError(f"{path}:{lineno}: {e}") from e
                log.warning("%s:%d: skipping malformed row: %s", path, lineno, e)
    return out


def load_benchmark_from(name: str, path: str, split: str = "test", config: str | None = None,
                        strict: bool = False) -> list[Problem]:
    """Benchmark ``name`` from any source ``datasets`` reads (a hub id such as ``HuggingFaceH4/MATH-500``, a local
    jsonl/parquet file or a directory), in the benchmark's upstream schema, through the same gold-answer adapter
    as :func:`load_benchmark`."""
    if name not in _SPECS:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    out: list[Problem] = []
    seen: set[str] = set()
    for i, row in enumerate(load_rows(path, split, config, key=f"eval.sources.{name}"), start=1):
        try:
            p = _row_to_problem(name, row, i)
        except MalformedRow as e:
            if strict:
                raise ValueError(f"{path} ({split}) row {i}: {e}") from e
            log.warning("%s (%s) row %d: skipping malformed row: %s", path, split, i, e)
            continue
        if p.id in seen:
            p.id = f"{name}/line{i}"
        seen.add(p.id)
        out.append(p)
    return out


def check_benchmarks(names: Sequence[str], root: str | Path, strict: bool = False) -> None:
    """``eval.root`` is a folder and each of ``eval.benchmarks`` has a readable test.jsonl with usable rows."""
    root = require_dir("eval.root", root, "set eval.root (or ALIGNLAB_BENCHMARKS) to the folder holding "
                                          "<benchmark>/test.jsonl")
    for name in names:
        fix = f"put {name}/test.jsonl under eval.root, point eval.root elsewhere, or drop {name} from eval.benchmarks"
        try:
            path = benchmark_path(name, root)
        except FileNotFoundError:
            raise bad_path(f"eval.benchmarks[{name}]", root / name / "test.jsonl", "no such file", fix) from None
        read_rows(f"eval.benchmarks[{name}]", path, functools.partial(_load_checked, name, root, strict), fix)


def _load_checked(name: str, root: Path, strict: bool, _path: Path) -> list[Problem]:
    return load_benchmark(name, root, strict=strict)
