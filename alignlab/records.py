"""The records that flow between the runner's stages, and their JSONL storage.

Every stage writes one JSONL file atomically (write tmp; fsync; rename) holding exactly one record per line,
so ``datasets.load_dataset("json")`` and TRL read it unchanged. Completeness is shown by a sidecar
``<name>.done`` written after the rename, holding the file's row count, size and sha256: a file without a
matching sidecar (a crash before the sidecar, or a file truncated or edited later) is treated as absent.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
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
    data_source: str = ""  # verl's data_source column (data=verl / data=hf): picks verifier=reward_fn's route
    # the row's own chat when it has more than the one user turn (system turns, few-shot turns); ``prompt`` is its
    # last user turn, and the prompt is rendered from these turns (ModelSpec.messages)
    messages: list[dict[str, str]] | None = None


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
    data_source: str = ""  # its problem's data_source (set by the sample stage)


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
    """A pair kept by the selector, with the score it was kept for. Stored flat, as TRL's pair columns plus
    ``score`` (:meth:`row`), so ``load_dataset("json")`` on ``selected.jsonl`` gives the trained pairs directly."""

    pair: Pair
    score: float = 0.0

    def row(self) -> dict[str, Any]:
        """The JSONL row: the pair's columns (problem_id, prompt, chosen, rejected, meta) and ``score``."""
        return {**dataclasses.asdict(self.pair), "score": self.score}


T = TypeVar("T")

DONE_SUFFIX = ".done"  # sidecar completion marker: <name>.jsonl.done


def done_path(path: str | Path) -> Path:
    """The sidecar marker that says ``path`` was written completely."""
    path = Path(path)
    return path.with_name(path.name + DONE_SUFFIX)


class DiskFull(OSError):
    """A write failed for lack of space; the message is the one line a user sees (path, free space, what to do)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        where = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
        free = shutil.disk_usage(where).free
        super().__init__(errno.ENOSPC, f"no space left writing {path} ({free / 2**20:.1f} MiB free on its filesystem); "
                         f"every earlier artifact is intact: free space, then rerun the same command", str(path))

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library (safetensors, torch) wraps it in its own exception type."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the whole new one. A full disk
    leaves the old file and raises :class:`DiskFull` (the partial temporary file is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFull(path) from e
        raise
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _fingerprint(data: bytes) -> dict[str, Any]:
    return {"rows": data.count(b"\n"), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """Atomically write records as JSONL (one record per line, nothing else), then its ``.done`` sidecar."""
    path = Path(path)
    done_path(path).unlink(missing_ok=True)  # a stale marker must never vouch for the new file
    text = "".join(json.dumps(_row(r)) + "\n" for r in records)
    atomic_write_text(path, text)
    atomic_write_text(done_path(path), json.dumps(_fingerprint(text.encode("utf-8"))) + "\n")


def is_complete(path: str | Path) -> bool:
    """True when ``path`` exists and matches its ``.done`` sidecar (a truncated or half-written file does not)."""
    path, marker = Path(path), done_path(path)
    if not path.exists() or not marker.exists():
        return False
    try:
        want = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(want, dict) or path.stat().st_size != want.get("bytes"):
        return False
    return _fingerprint(path.read_bytes()) == want


def read_jsonl(path: str | Path, cls: type[T] | None = None) -> list[T]:
    """Read records written by :func:`write_jsonl`; raises if the file is incomplete."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is missing or incomplete (no matching {done_path(path).name})")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [_from_dict(cls, row) for row in rows] if cls is not None else rows


def _row(r: Any) -> Any:
    if isinstance(r, Selected):
        return r.row()
    return dataclasses.asdict(r) if dataclasses.is_dataclass(r) and not isinstance(r, type) else r


def _from_dict(cls: type[T], row: dict) -> T:
    if cls is Selected:
        if "pair" in row:  # written before selected.jsonl was flat ({pair, score})
            return Selected(pair=Pair(**row["pair"]), score=row["score"])  # type: ignore[return-value]
        fields = {k: v for k, v in row.items() if k != "score"}
        return Selected(pair=Pair(**fields), score=row.get("score", 0.0))  # type: ignore[return-value]
    return cls(**row)


def conversational_pair(pair: Pair, prompt_messages: list[dict[str, str]]) -> dict[str, Any]:
    """``pair`` in TRL's conversational format: the prompt as chat messages, each answer one assistant turn."""
    return {"problem_id": pair.problem_id, "prompt": prompt_messages,
            "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}], "meta": pair.meta}


def pairs_key(pairs: list[Pair]) -> str:
    """Identity of a list of pairs (their texts, in order): what a cached log-prob file was computed for."""
    h = hashlib.sha1()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    return h.hexdigest()
