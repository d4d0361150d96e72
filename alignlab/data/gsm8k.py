"""``data=gsm8k``: real training prompts from GSM8K's train split, a fresh shard per round.

The file stays where it is (``../shared/data/train/gsm8k/train.jsonl`` by default, or any GSM8K-format
file of your own with ``data.path``, read and checked when the config is built); nothing is copied into
the package. Round k takes the k-th slice of a seeded permutation (as DPO-R1 takes a new prompt shard per
iteration); when fewer than ``train_prompts`` are left a new permutation starts, so any number of rounds
works and no shard repeats a prompt. The gold
answer is the text after ``####`` (commas dropped); difficulty is the number of solution lines, i.e.
reasoning steps (1..8+), which gives ``by_difficulty`` in evaluation and SAGE's curriculum something real.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alignlab.checks import read_rows
from alignlab.config import ConfigError
from alignlab.data.benchmarks import MalformedRow, json_row, load_benchmark
from alignlab.data.files import shard
from alignlab.records import Problem

log = logging.getLogger("alignlab")
HELDOUT_FIX = ("set data.heldout_path=<GSM8K-format jsonl of held-out problems>, or evaluate on the benchmarks "
               "with eval=math_suite")


def gold_answer(solution: str) -> str:
    """GSM8K's final answer: after the last ``####``, without thousands separators."""
    if "####" not in solution:
        raise ValueError("no '####' in the solution")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def steps_of(solution: str) -> int:
    """Reasoning steps = non-empty solution lines before ``####``."""
    return sum(1 for line in solution.rsplit("####", 1)[0].splitlines() if line.strip())


def _row_problem(raw: bytes, lineno: int, source: str) -> Problem:
    row = json_row(raw)  # a MalformedRow also for an empty question or no answer (below)
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
    """Training prompts from a GSM8K-format file (a new shard per round); held-out problems from a named file.

    ``root`` is the shared data layout (``train/gsm8k/train.jsonl``, ``benchmarks/gsm8k/test.jsonl``). The
    held-out set is ``heldout_path`` when set; otherwise GSM8K test under ``root``, but only while ``path`` is
    the layout's own train file: for a file of your own, name the held-out set (``data.heldout_path``) or
    evaluate with ``eval=math_suite``; it is never guessed from where the training file lives.
    """

    def __init__(self, path: str, train_prompts: int = 512, eval_problems: int = 200, seed: int = 0,
                 heldout_path: str | None = None, root: str | None = None, strict: bool = False) -> None:
        if train_prompts < 1:
            raise ValueError(f"train_prompts must be >= 1, got {train_prompts}")
        if eval_problems < 1:
            raise ValueError(f"eval_problems must be >= 1, got {eval_problems}")
        self.path, self.train_prompts, self.eval_problems, self.seed = path, train_prompts, eval_problems, seed
        self.heldout_path, self.root, self.strict = heldout_path, root, strict
        self._rows: list[Problem] = read_rows(
            "data.path", path, lambda p: read_gsm8k(p, source="gsm8k_train", strict=strict),
            "set data.path to a GSM8K-format jsonl (one {\"question\", \"answer\": \"... #### 42\"} per line)")

    def _all(self) -> list[Problem]:
        return self._rows

    def train(self, round_index: int) -> list[Problem]:
        """Round k (1-based): the next n-prompt slice of a seeded order; a new order once fewer than n are left."""
        return shard(self._all(), self.train_prompts, round_index, f"gsm8k:{self.seed}")

    def _shared_test(self) -> Path | None:
        """GSM8K test of the shared layout, when ``path`` is that layout's train file."""
        if self.root is None:
            return None
        root = Path(self.root).expanduser()
        if Path(self.path).expanduser().resolve() != (root / "train" / "gsm8k" / "train.jsonl").resolve():
            return None
        return root / "benchmarks" / "gsm8k" / "test.jsonl"

    def check_heldout(self) -> None:
        """The held-out set the evaluator will read is named, readable, and has usable rows."""
        if self.heldout_path is not None:
            read_rows("data.heldout_path", self.heldout_path, self._read_heldout, HELDOUT_FIX)
            return
        shared = self._shared_test()
        if shared is None:
            raise ConfigError(f"data.heldout_path: not set, and data.path={self.path} is your own file, so there is "
                              f"no held-out set to evaluate on; {HELDOUT_FIX}")
        read_rows("data.heldout_path", shared, self._read_heldout, HELDOUT_FIX)

    def _read_heldout(self, path: Path) -> list[Problem]:
        if self.heldout_path is not None:
            return read_gsm8k(path, source="gsm8k_heldout", strict=self.strict)
        return load_benchmark("gsm8k", path.parent.parent, strict=self.strict)

    def heldout(self) -> list[Problem]:
        """The first ``eval_problems`` of the held-out set (none when none is named: ``eval=math_suite``)."""
        path = Path(self.heldout_path) if self.heldout_path is not None else self._shared_test()
        if path is None:
            return []
        return self._read_heldout(path)[: self.eval_problems]
