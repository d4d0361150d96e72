"""The records that flow between the runner's stages, and their JSONL storage.

Every stage writes one JSONL file atomically (write tmp; fsync; rename), so a file that
exists is complete. A file without its trailing ``.done`` marker line is treated as absent.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

RESUMED_IN = "resumed_in.txt"  # left in a new Hydra job dir whose `resume=true` job continued an older run


@dataclass
class Problem:
    id: str
    prompt: str
    answer: str
    difficulty: int = 0
    source: str = ""


@dataclass
class Rollout:
    problem_id: str
    text: str
    tokens: int
    logprob_sum: float
    verdict: bool | None = None
    extracted: str | None = None
    source: str = "policy"  # "policy" | "refined"
    sample_index: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pair:
    """TRL-compatible preference pair (prompt / chosen / rejected columns)."""

    problem_id: str
    prompt: str
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Selected:
    """A pair kept by the selector, with the score it was kept for."""

    pair: Pair
    score: float = 0.0


T = TypeVar("T")

_END = {"__complete__": True}


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """Atomically write dataclass records as JSONL, ending with a completion marker line."""
    lines = [json.dumps(dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r) for r in records]
    lines.append(json.dumps(_END))
    atomic_write_text(path, "\n".join(lines) + "\n")


def is_complete(path: str | Path) -> bool:
    """True when ``path`` exists and ends with the completion marker (a truncated file is not)."""
    path = Path(path)
    if not path.exists():
        return False
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64))
        tail = f.read().decode("utf-8", errors="replace").strip().splitlines()
    return bool(tail) and tail[-1] == json.dumps(_END)


def read_jsonl(path: str | Path, cls: type[T] | None = None) -> list[T]:
    """Read records written by :func:`write_jsonl`; raises if the file is incomplete."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is missing or incomplete (no completion marker)")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row == _END:
                break
            out.append(_from_dict(cls, row) if cls is not None else row)
    return out


def _from_dict(cls: type[T], row: dict) -> T:
    if cls is Selected:
        return Selected(pair=Pair(**row["pair"]), score=row["score"])  # type: ignore[return-value]
    return cls(**row)
