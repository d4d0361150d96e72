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


def read_gsm8k(path: str | Path, source: str = "gsm8k") -> list[Problem]:
    """Every well-formed row of a GSM8K jsonl file (``question`` / ``answer``), in file order."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            q, a = row.get("question"), row.get("answer")
            if not isinstance(q, str) or not isinstance(a, str) or "####" not in a:
                continue
            out.append(Problem(id=f"{source}/{lineno}", prompt=q.strip(), answer=gold_answer(a),
                               difficulty=steps_of(a), source=source))
    return out


class GSM8KDataset:
    """Training prompts from GSM8K train (a new shard per round); held-out problems from GSM8K test."""

    def __init__(self, path: str, train_prompts: int = 512, eval_problems: int = 200, seed: int = 0,
                 benchmark_root: str | None = None) -> None:
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
        self.benchmark_root = benchmark_root
        self._rows: list[Problem] | None = None

    def _all(self) -> list[Problem]:
        if self._rows is None:
            self._rows = read_gsm8k(self.path, source="gsm8k_train")
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
            return read_gsm8k(root / "gsm8k" / "test.jsonl")[: self.eval_problems]
        return load_benchmark("gsm8k", root)[: self.eval_problems]
