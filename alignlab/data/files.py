"""``data=hf`` / ``data=verl``: training prompts from any source ``datasets`` reads.

``path`` is a hub dataset id (``openai/gsm8k``), a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file,
or a local directory of such files (``train.parquet`` + ``test.parquet``, as verl and OpenRLHF users keep them).
Which column is the prompt, the gold answer, the id, the difficulty and the data source is config (dotted keys reach
into nested columns: verl's ``reward_model.ground_truth``); a prompt column holding chat messages uses its last user
turn, and the whole chat (system and earlier turns too) is kept and rendered through the model's chat template.
The data source (verl's ``data_source`` column) travels with each problem to the verifier, where
``verifier=reward_fn`` routes by it.
Round k takes the k-th slice of a seeded order, as ``data=gsm8k`` does. Held-out problems come from
``heldout_path`` (or ``heldout_split`` of the same source) when given, else ``eval_problems`` rows are set aside
from the training source and never trained on.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from alignlab import hub
from alignlab.checks import require_dir, require_file
from alignlab.records import Problem
from alignlab.verify.extract import extract_boxed

log = logging.getLogger("alignlab")

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ANSWER_FORMATS = ("plain", "gsm8k", "boxed")
LOCAL_FIX = "point it at a .jsonl/.json/.parquet/.csv file, or a directory of them"
OFFLINE_HINT = ("Offline, point data.path at a local .jsonl/.parquet file or directory, or use data=gsm8k, which "
                "reads ../shared/data/train/gsm8k/train.jsonl (ALIGNLAB_DATA moves that root).")


def load_rows(path: str, split: str = "train", name: str | None = None, key: str = "data.path") -> list[dict]:
    """Every row of a hub dataset split, a local file, or a local directory (its ``split`` files), as dicts."""
    import datasets

    datasets.disable_progress_bars()
    local = Path(path).expanduser()
    try:
        if local.is_file():
            builder = FORMATS.get(local.suffix.lower())
            if builder is None:
                raise ValueError(f"{key}: {local} is not one of {', '.join(FORMATS)}")
            ds = datasets.load_dataset(builder, data_files=str(local), split="train")
        elif local.is_dir():
            ds = datasets.load_dataset(str(local), split=split)
        elif hub.is_hub_id(path):
            hub.require_hub(key, path, OFFLINE_HINT)
            snap = hub.verify_cached(path, key, "dataset")  # a file cut short by an interrupted download: never read
            if snap is not None and hub.offline():  # offline: the verified copy in the hub cache (hf download ...)
                ds = datasets.load_dataset(str(snap), name, split=split)
            else:
                ds = datasets.load_dataset(path, name, split=split)
        else:
            raise ValueError(f"{key}: no such file or directory {path} (nor an org/name hub dataset id)")
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError, ConnectionError) as e:
        raise ValueError(f"{key}: cannot read {path} (split {split!r}): {e}. {OFFLINE_HINT}") from e
    except datasets.exceptions.DatasetGenerationError as e:  # a local file datasets cannot parse
        raise ValueError(f"{key}: {path}: cannot be parsed ({e.__cause__ or e}); fix or drop the bad rows (data=gsm8k "
                         f"skips malformed rows with a file:line warning)") from e
    return ds.to_list()


def get_key(row: dict, key: str) -> Any:
    """``row["a"]["b"]`` for ``key="a.b"``; None when any part is missing."""
    cur: Any = row
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def chat_turns(value: Any) -> list[dict[str, str]] | None:
    """A chat-messages prompt's turns (role + text content) when it is more than one user turn (a system turn,
    few-shot turns), else None: the problem is then rendered from its text alone, as before."""
    if not isinstance(value, list):
        return None
    turns = [{"role": m["role"], "content": m["content"]} for m in value
             if isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)]
    return turns if len(turns) > 1 and any(t["role"] == "user" for t in turns) else None


def prompt_text(value: Any) -> str | None:
    """A prompt string, or the last user turn of a chat-messages list (verl's ``prompt`` column)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users and isinstance(users[-1], str) else None
    return None


def gold_of(value: Any, answer_format: str) -> str | None:
    """The bare gold answer: as is (``plain``), after GSM8K's ``####``, or inside the last ``\\boxed{}``."""
    if isinstance(value, list) and len(value) == 1:  # verl ground truths are sometimes one-element lists
        value = value[0]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(int(value)) if float(value).is_integer() else str(value)
    if not isinstance(value, str):
        return None
    if answer_format == "gsm8k":
        return value.rsplit("####", 1)[1].strip().replace(",", "") if "####" in value else None
    if answer_format == "boxed":
        return extract_boxed(value)
    return value.strip()


def to_problems(rows: list[dict], source: str, prompt_key: str, answer_key: str, id_key: str | None,
                difficulty_key: str | None, answer_format: str, strict: bool = False,
                data_source_key: str | None = None) -> list[Problem]:
    """Rows -> Problems; a row without a usable prompt or answer is skipped with a warning (an error if strict)."""
    out, skipped = [], 0
    for i, row in enumerate(rows):
        value = get_key(row, prompt_key)
        prompt, gold = prompt_text(value), gold_of(get_key(row, answer_key), answer_format)
        why = (f"no usable {prompt_key!r}" if not prompt or not prompt.strip()
               else f"no usable {answer_key!r} ({answer_format})" if not gold else "")
        if why:
            if strict:
                raise ValueError(f"{source} row {i}: {why} (data.strict=true)")
            skipped += 1
            if skipped <= 3:
                log.warning("%s row %d: skipping: %s", source, i, why)
            continue
        assert prompt is not None and gold is not None  # no `why`: both are non-empty strings
        uid = get_key(row, id_key) if id_key else None
        diff = get_key(row, difficulty_key) if difficulty_key else None
        try:
            diff = int(diff) if diff is not None else 0
        except (TypeError, ValueError):  # "Level 3" (MATH) -> 3
            digits = "".join(c for c in str(diff) if c.isdigit())
            diff = int(digits) if digits else 0
        data_source = get_key(row, data_source_key) if data_source_key else None
        out.append(Problem(id=f"{source}/{uid if uid is not None else i}", prompt=prompt.strip(), answer=gold,
                           difficulty=diff, source=source, data_source="" if data_source is None else str(data_source),
                           messages=chat_turns(value)))
    if skipped:
        log.warning("%s: skipped %d row(s) without a prompt or answer, kept %d", source, skipped, len(out))
    if not out:
        raise ValueError(f"data: no usable rows in {source} (prompt_key={prompt_key!r}, answer_key={answer_key!r}, "
                         f"answer_format={answer_format!r})")
    return out


def shard(rows: list[Problem], n: int, round_index: int, tag: str) -> list[Problem]:
    """Round k (1-based): the k-th n-row slice of a seeded order; a new order once fewer than n rows are left."""
    n = min(n, len(rows))
    epoch, slot = divmod(round_index - 1, len(rows) // n)
    order = list(range(len(rows)))
    random.Random(f"{tag}:{epoch}").shuffle(order)
    return [rows[i] for i in order[slot * n: (slot + 1) * n]]


class FileDataset:
    """Prompts and gold answers from a hub dataset, a local jsonl/parquet file or a directory (see module doc)."""

    def __init__(self, path: str, split: str = "train", name: str | None = None, prompt_key: str = "question",
                 answer_key: str = "answer", id_key: str | None = None, difficulty_key: str | None = None,
                 answer_format: str = "plain", train_prompts: int = 512, eval_problems: int = 200, seed: int = 0,
                 heldout_path: str | None = None, heldout_split: str | None = None, strict: bool = False,
                 data_source_key: str | None = "data_source") -> None:
        if train_prompts < 1:
            raise ValueError(f"train_prompts must be >= 1, got {train_prompts}")
        if eval_problems < 0:
            raise ValueError(f"eval_problems must be >= 0, got {eval_problems}")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")
        for key, value in (("path", path), ("heldout_path", heldout_path)):
            if value is None:
                continue
            local = Path(value).expanduser()
            if local.is_file() and local.suffix.lower() not in FORMATS:
                raise ValueError(f"{key}: {local} is not one of {', '.join(FORMATS)}")
            if not local.exists():
                if not hub.is_hub_id(value):
                    raise ValueError(f"{key}: no such file or directory {value} (nor an org/name hub dataset id)")
                hub.require_hub(f"data.{key}", value, OFFLINE_HINT)
            elif local.is_dir():
                require_dir(f"data.{key}", local, LOCAL_FIX)
            else:  # empty, unreadable or binary where text is expected: one line now, not a datasets traceback later
                require_file(f"data.{key}", local, LOCAL_FIX, text=local.suffix.lower() != ".parquet")
        if heldout_split and not heldout_path and Path(path).expanduser().is_file():
            raise ValueError(f"heldout_split: path {path} is a single file (it has no {heldout_split!r} split); "
                             f"name the held-out file with heldout_path")
        self.path, self.split, self.name = path, split, name
        self.keys: dict[str, Any] = dict(prompt_key=prompt_key, answer_key=answer_key, id_key=id_key, difficulty_key=difficulty_key,
                         answer_format=answer_format, strict=strict, data_source_key=data_source_key)
        self.train_prompts, self.eval_problems, self.seed = train_prompts, eval_problems, seed
        self.heldout_path, self.heldout_split = heldout_path, heldout_split
        self._train: list[Problem] | None = None
        self._heldout: list[Problem] | None = None
        self._load()  # a source without usable rows, or a hub dataset not reachable nor cached, fails before any work

    def _source(self, path: str, split: str) -> str:
        return f"{Path(path).name if Path(path).expanduser().exists() else path}:{split}"

    def _load(self) -> None:
        if self._train is not None:
            return
        rows = to_problems(load_rows(self.path, self.split, self.name), self._source(self.path, self.split),
                           **self.keys)
        if self.heldout_path or self.heldout_split:
            path, split = self.heldout_path or self.path, self.heldout_split or self.split
            held = to_problems(load_rows(path, split, self.name, key="data.heldout_path"), self._source(path, split),
                               **self.keys)[: self.eval_problems]
        else:  # set aside a seeded sample of the training source; those rows are never trained on
            order = list(range(len(rows)))
            random.Random(f"files-heldout:{self.seed}").shuffle(order)
            k = min(self.eval_problems, len(rows) - 1)
            held_idx = set(order[:k])
            held = [rows[i] for i in sorted(held_idx)]
            rows = [r for i, r in enumerate(rows) if i not in held_idx]
        self._train, self._heldout = rows, held
        log.info("data: %d training prompts from %s, %d held-out problems", len(rows), self.path, len(held))

    def train(self, round_index: int) -> list[Problem]:
        self._load()
        assert self._train is not None  # _load set it
        return shard(self._train, self.train_prompts, round_index, f"files:{self.seed}")

    def heldout(self) -> list[Problem]:
        self._load()
        assert self._heldout is not None  # _load set it
        return list(self._heldout)

    def check_heldout(self) -> None:
        """Nothing more to check: the constructor read both sets (a source without usable rows failed there)."""
