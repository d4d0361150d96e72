"""``data=gsm8k``: real training prompts from GSM8K's train split, a fresh shard per round.

The file stays where it is (``../shared/data/train/gsm8k/train.jsonl`` by default); nothing is copied into
the package. Round k takes the k-th slice of a seeded permutation (as DPO-R1 takes a new prompt shard per
iteration); when fewer than ``train_prompts`` are left a new permutation starts, so any number of rounds
works and no shard repeats a prompt. The gold
answer is the text after ``####`` (commas dropped); difficulty is the number of solution lines, i.e.
reasoning steps (1..8+), which gives ``by_difficulty`` in evaluation and SAGE's curriculum something real.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from alignlab.records import Problem

log = logging.getLogger("alignlab")


def gold_answer(solution: str) -> str:
    """GSM8K's final answer: after the last ``####``, without thousands separators."""
    if "####" not in solution:
        raise ValueError("no '####' in the solution")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def steps_of(solution: str) -> int:
    """Reasoning steps = non-empty solution lines before ``####``."""
    return sum(1 for line in solution.rsplit("####", 1)[0].splitlines() if line.strip())


class MalformedRow(ValueError):
    """A GSM8K row that cannot become a Problem (not UTF-8, broken JSON, empty question, no answer)."""


def _row_problem(raw: bytes, lineno: int, source: str) -> Problem:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedRow(f"not UTF-8 ({e.reason} at byte {e.start})") from e
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise MalformedRow(f"broken JSON ({e.msg})") from e
    if not isinstance(row, dict):
        raise MalformedRow("row is not a JSON object")
    q, a = row.get("question"), row.get("answer")
    if not isinstance(q, str) or not q.strip():
        raise MalformedRow("missing or empty 'question'")
    if not isinstance(a, str) or "####" not in a:
        raise MalformedRow("missing 'answer' or no '####' in it")
    gold = gold_answer(a)
    if not gold:
        raise MalformedRow("empty answer after '####'")
    return Problem(id=f"{source}/{lineno}", prompt=q.strip(), answer=gold, difficulty=steps_of(a), source=source)


def read_gsm8k(path: str | Path, source: str = "gsm8k", strict: bool = False) -> list[Problem]:
    """Every well-formed row of a GSM8K jsonl file (``question`` / ``answer``), in file order.

    A malformed row is skipped with a warning naming ``file:line`` (and a final count), or raises
    ``ValueError`` naming it with ``strict=True``.
    """
    out, skipped = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                out.append(_row_problem(raw, lineno, source))
            except MalformedRow as e:
                if strict:
                    raise ValueError(f"{path}:{lineno}: malformed row: {e} (data.strict=true)") from e
                skipped += 1
                log.warning("%s:%d: skipping malformed row: %s", path, lineno, e)
    if skipped:
        log.warning("%s: skipped %d malformed row(s), kept %d (data.strict=true makes this an error)", path, skipped,
                    len(out))
    return out


class GSM8KDataset:
    """Training prompts from GSM8K train (a new shard per round); held-out problems from GSM8K test."""

    def __init__(self, path: str, train_prompts: int = 512, eval_problems: int = 200, seed: int = 0,
                 benchmark_root: str | None = None, strict: bool = False) -> None:
        if train_prompts < 1:
            raise ValueError(f"train_prompts must be >= 1, got {train_prompts}")
        if eval_problems < 1:
            raise ValueError(f"eval_problems must be >= 1, got {eval_problems}")
        if not Path(path).is_file():
            raise ValueError(f"path: no GSM8K train file at {path} (expected ../shared/data/train/gsm8k/train.jsonl "
                             f"next to the repository, or set data.path)")
        if benchmark_root is not None and not Path(benchmark_root).is_dir():
            raise ValueError(f"benchmark_root: no such directory {benchmark_root}")
        self.path, self.train_prompts, self.eval_problems, self.seed = path, train_prompts, eval_problems, seed
        self.benchmark_root, self.strict = benchmark_root, strict
        self._rows: list[Problem] | None = None

    def _all(self) -> list[Problem]:
        if self._rows is None:
            self._rows = read_gsm8k(self.path, source="gsm8k_train", strict=self.strict)
        return self._rows

    def train(self, round_index: int) -> list[Problem]:
        """Round k (1-based): the next n-prompt slice of a seeded order; a new order once fewer than n are left."""
        rows = self._all()
        n = min(self.train_prompts, len(rows))
        epoch, slot = divmod(round_index - 1, len(rows) // n)
        order = list(range(len(rows)))
        random.Random(f"gsm8k:{self.seed}:{epoch}").shuffle(order)
        return [rows[i] for i in order[slot * n: (slot + 1) * n]]

    def heldout(self) -> list[Problem]:
        """The first ``eval_problems`` of GSM8K test (``benchmarks/gsm8k/test.jsonl``), or none if absent."""
        root = Path(self.benchmark_root) if self.benchmark_root else Path(self.path).resolve().parents[2] / "benchmarks"
        if not (root / "gsm8k" / "test.jsonl").is_file():
            log.warning("data.heldout: no %s; evaluation gets no GSM8K problems", root / "gsm8k" / "test.jsonl")
            return []
        try:
            from alignlab.data.benchmarks import load_benchmark
        except ImportError:  # the benchmark adapters are optional here: GSM8K's format is the train file's
            return read_gsm8k(root / "gsm8k" / "test.jsonl", strict=self.strict)[: self.eval_problems]
        return load_benchmark("gsm8k", root, strict=self.strict)[: self.eval_problems]
