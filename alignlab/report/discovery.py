"""Find run directories and decide, per run, whether its ``summary.json`` can be averaged in.

A run is any directory holding ``summary.json`` (contract in README.md, "What a run writes") or a Hydra job's ``.hydra/``. Each one
becomes a :class:`Run` marked ``ok`` or with a status and a one-line reason; a bad run is listed by the report,
never averaged in and never fatal.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignlab.ledger import REPORTED_KEYS
from alignlab.records import RESUMED_IN

TOTAL_KEYS = ("pairs", "selected", *REPORTED_KEYS)
FAILED_STATUSES = ("fail", "error", "crash", "killed", "abort")

Key = tuple[tuple[str, str], ...]


def num(x: Any, default: float = math.nan) -> float:
    """A float, or `default` when `x` is missing or not a number (summaries are read, never trusted)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return default


def as_dict(x: Any) -> dict[str, Any]:
    """`x` if it is a JSON object, else an empty one, so a malformed field reads as missing."""
    return x if isinstance(x, dict) else {}


@dataclass
class Run:
    """One run directory: what was asked (overrides, config) and what came out (summary)."""

    path: Path
    overrides: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)  # Hydra's config-group choices (.hydra/hydra.yaml)
    summary: dict[str, Any] | None = None
    status: str = "ok"  # ok | failed | incomplete | missing | unreadable | malformed
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def seed(self) -> int | None:
        for source in ((self.summary or {}).get("seed"), self.overrides.get("seed"), self.config.get("seed")):
            if source is None:
                continue
            try:
                return int(source)
            except (TypeError, ValueError):
                continue
        return None

    @property
    def experiment(self) -> str:
        exp = (
            self.overrides.get("experiment") or (self.summary or {}).get("experiment") or self.config.get("experiment")
        )
        return str(exp) if isinstance(exp, str | int | float) else "?"

    def value(self, key: str) -> str | None:
        """The effective value of a dotted key: the override if given, else the config-group choice (``selector``
        -> ``sage``), else the saved config's scalar."""
        if key in self.overrides:
            return self.overrides[key]
        if key == "experiment":
            return self.experiment
        if key in self.choices:
            return self.choices[key]
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return None if isinstance(node, dict | list) or node is None else str(node)

    def key(self, by: Sequence[str] | None = None) -> Key:
        """The configuration this run belongs to; seeds of one configuration share it."""
        if by:
            return tuple((k, self.value(k) or "?") for k in by)
        items = {k: v for k, v in self.overrides.items() if k != "seed"}
        items["experiment"] = self.experiment  # never pool different experiments by accident
        return tuple(sorted(items.items(), key=lambda kv: (kv[0] != "experiment", kv[0])))

    @property
    def rounds(self) -> list[dict[str, Any]]:
        rounds = (self.summary or {}).get("rounds")
        rounds = rounds if isinstance(rounds, list) else []
        return sorted((r for r in rounds if isinstance(r, dict)), key=lambda r: num(r.get("round"), 0))

    @property
    def base(self) -> dict[str, Any]:
        return as_dict((self.summary or {}).get("base"))

    @property
    def base_accuracy(self) -> float:
        return num(self.base.get("accuracy"))

    @property
    def final_round(self) -> dict[str, Any]:
        return self.rounds[-1] if self.rounds else {}

    def totals(self) -> dict[str, float]:
        """Compute and data spent over all rounds (ledger entries are per round); NaN where a round lacks a field."""
        out = {k: 0.0 for k in TOTAL_KEYS}
        for r in self.rounds:
            ledger = as_dict(r.get("ledger"))
            for k in TOTAL_KEYS:
                out[k] += num(r.get(k) if k in ("pairs", "selected") else ledger.get(k))
        return out


def natural(s: Any) -> tuple:
    """Sort '2' before '10', so sweeps come out in numeric order."""
    parts = re.split(r"(-?\d+(?:\.\d+)?)", "" if s is None else str(s))
    return tuple((0, float(t), "") if i % 2 else (1, 0.0, t) for i, t in enumerate(parts) if t)


def sort_key(key: Key) -> tuple:
    """Order of configurations in every table and plot: by key, values in natural order."""
    return tuple((k, natural(v)) for k, v in key)


def parse_overrides(lines: Iterable[Any]) -> dict[str, str]:
    """Hydra override strings -> {key: value}; `+`/`++` prefixes dropped, hydra's own keys skipped."""
    out: dict[str, str] = {}
    for line in lines:
        if not isinstance(line, str) or "=" not in line or line.startswith("~"):
            continue
        key, value = line.split("=", 1)
        key = key.lstrip("+").strip()
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when built in: hydra.yaml is ~200 lines a run


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=_SAFE_LOADER)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _choices(hydra_yaml: Any) -> dict[str, str]:
    """``hydra.runtime.choices`` of a job's hydra.yaml: which yaml each config group was built from."""
    choices = as_dict(as_dict(as_dict(as_dict(hydra_yaml).get("hydra")).get("runtime")).get("choices"))
    return {str(k): str(v) for k, v in choices.items() if isinstance(v, str) and not str(k).startswith("hydra/")}


def summary_problem(summary: Any) -> tuple[str, str] | None:
    """(status, reason) when a parsed summary.json cannot be averaged in, else None.

    Checked field by field, so a partial or hand-edited summary names what is wrong instead of crashing the report.
    Optional parts are not problems: a run made with ``base_eval=false`` has no ``base`` (a missing base column).
    """
    if not isinstance(summary, dict):
        return "malformed", f"summary.json is not an object (a {type(summary).__name__})"
    status = str(summary.get("status", "")).lower()
    if status.startswith(FAILED_STATUSES):
        err = summary.get("error") or summary.get("message") or ""
        return "failed", f"status={summary.get('status')}" + (f": {err}" if err else "")
    if "base" in summary and not isinstance(summary["base"], dict):
        return "malformed", "summary.json: base is not an object"
    rounds = summary.get("rounds", [])
    if not isinstance(rounds, list):
        return "malformed", f"summary.json: rounds is not a list (a {type(rounds).__name__})"
    for i, r in enumerate(rounds):
        if not isinstance(r, dict):
            return "malformed", f"summary.json: rounds[{i}] is not an object"
        for name in ("eval", "ledger", "diagnostics"):
            if name in r and not isinstance(r[name], dict):
                return "malformed", f"summary.json: rounds[{i}].{name} is not an object"
        if "by_difficulty" in as_dict(r.get("eval")) and not isinstance(r["eval"]["by_difficulty"], dict):
            return "malformed", f"summary.json: rounds[{i}].eval.by_difficulty is not an object"
        if math.isnan(num(r.get("round"))):
            return "malformed", f"summary.json: rounds[{i}] has no round number"
    bad = [r.get("round") for r in rounds if math.isnan(num(as_dict(r.get("eval")).get("accuracy")))]
    if bad:
        return "malformed", f"rounds without eval.accuracy: {bad}"
    return None


def _check(run: Run, summary_path: Path) -> None:
    """Set run.status/reason; only complete, well-formed runs stay `ok`."""
    if not summary_path.exists():
        done = sum(1 for p in run.path.glob("round_*/metrics.json"))
        run.status, run.reason = "missing", f"no summary.json (still running or crashed; {done} round metrics found)"
        return
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        run.status, run.reason = "unreadable", f"summary.json unreadable: {e}"
        return
    problem = summary_problem(summary)
    if isinstance(summary, dict):
        run.summary = summary
    if problem:
        run.status, run.reason = problem
        return
    planned = num(run.config.get("rounds"))
    have = len(run.rounds)
    if have == 0 or (not math.isnan(planned) and have < planned):
        total = "?" if math.isnan(planned) else int(planned)
        run.status, run.reason = "incomplete", f"{have}/{total} rounds in summary.json"


def _is_run_dir(names: set[str], dirpath: str) -> bool:
    if "summary.json" in names:
        return True
    if RESUMED_IN in names:  # a `resume=true` job that continued an older run dir: not a run of its own
        return False
    # A Hydra job dir without a summary is a failed training run, unless it is an `alignlab eval` job.
    return (
        ".hydra" in names
        and os.path.isfile(os.path.join(dirpath, ".hydra", "overrides.yaml"))
        and ("eval.json" not in names)
    )


def load_runs(dirs: Iterable[str | Path]) -> list[Run]:
    """Every run directory below `dirs` (recursively), each marked ok or with why it is not."""
    runs: dict[Path, Run] = {}
    for root in dirs:
        for dirpath, dirnames, filenames in os.walk(root):
            names = set(dirnames) | set(filenames)
            if not _is_run_dir(names, dirpath):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                continue
            dirnames[:] = []  # runs do not nest; do not walk checkpoints
            path = Path(dirpath).resolve()
            if path in runs:
                continue
            hydra = path / ".hydra"
            overrides = _load_yaml(hydra / "overrides.yaml")
            config = _load_yaml(hydra / "config.yaml")
            run = Run(
                path=path,
                overrides=parse_overrides(overrides if isinstance(overrides, list) else []),
                config=config if isinstance(config, dict) else {},
                choices=_choices(_load_yaml(hydra / "hydra.yaml")),
            )
            _check(run, path / "summary.json")
            runs[path] = run
    return sorted(runs.values(), key=lambda r: (sort_key(r.key()), r.seed if r.seed is not None else -1, str(r.path)))
