"""Runs -> tables (pandas): one row per run per round, then mean ± SE over the seeds of each configuration.

`rounds_frame` is the single table behind both outputs: report.csv writes it as is, and `aggregate` groups its
ok rows by configuration. Ledger fields are per-round costs (README.md, "Compute ledger"); a run's compute is
their sum over rounds, so the frontier plots compare final accuracy against total compute spent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from alignlab.ledger import REPORTED_KEYS
from alignlab.report.discovery import TOTAL_KEYS, Key, Run, as_dict, natural, sort_key

DIAGNOSTICS = {  # summary.json rounds[k]["diagnostics"] key -> what the table shows
    # (diversity and collapse, as studied by "How Sampling Shapes LLM Alignment: From One-Shot Optima to Iterative
    # Dynamics", arXiv 2602.12180)
    "token_entropy": "mean token entropy of the samples (nats)",
    "distinct_answers": "distinct final answers per prompt",
    "pass_at_k": "pass@k over the N samples",
    "mean_pass_rate": "mean pass rate of the N samples",
}
ROUND_COLUMNS = ["round", "accuracy", "se", "n", "pairs", "selected", *REPORTED_KEYS, "base_accuracy", "base_se",
                 "final_accuracy"]
DIFFICULTY = "acc_difficulty_"


@dataclass
class Stat:
    """Mean over seeds with its standard error (the run's own eval SE when there is one seed)."""

    mean: float
    se: float
    n: int

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0 or math.isnan(self.mean):
            return ""
        return f"{self.mean:.{digits}f}" + (f" ± {self.se:.{digits}f}" if math.isfinite(self.se) else "")


NO_STAT = Stat(math.nan, math.nan, 0)


def mean_se(values: Iterable[float], own_se: float = math.nan) -> Stat:
    """SE = sample std / sqrt(n) across seeds; with a single seed fall back to `own_se`. A NaN value makes the
    mean NaN (a missing number is shown as missing, not averaged away)."""
    s = pd.Series(list(values), dtype=float)
    if len(s) == 0:
        return NO_STAT
    if len(s) == 1:
        return Stat(float(s.iloc[0]), own_se, 1)
    return Stat(float(s.mean(skipna=False)), float(s.sem(skipna=False)), len(s))


def rounds_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run per round, every run given (failed runs' partial rounds too), values as the summaries hold
    them (object dtype, so report.csv writes them unchanged). ``run`` indexes `runs`. Ledger fields beyond
    REPORTED_KEYS (for example ``forward_tokens``), ``acc_difficulty_<d>`` and the diagnostics columns exist only where
    some run recorded them, so reports of older runs keep their columns."""
    rows = []
    extra: dict[str, None] = {}  # ledger fields beyond REPORTED_KEYS (newer runs), in order of first appearance
    for i, r in enumerate(runs):
        base, final = r.base, as_dict(r.final_round.get("eval")).get("accuracy")
        for rd in r.rounds:
            ev, ledger = as_dict(rd.get("eval")), as_dict(rd.get("ledger"))
            more = {k: v for k, v in ledger.items()
                    if k not in ROUND_COLUMNS and isinstance(v, int | float) and not isinstance(v, bool)}
            extra |= dict.fromkeys(more)
            row = {"run": i, "round": rd.get("round"), "accuracy": ev.get("accuracy"), "se": ev.get("se"),
                   "n": ev.get("n"), "pairs": rd.get("pairs"), "selected": rd.get("selected"),
                   **{k: ledger.get(k) for k in REPORTED_KEYS}, **more, "base_accuracy": base.get("accuracy"),
                   "base_se": base.get("se"), "final_accuracy": final}
            row |= {f"{DIFFICULTY}{d}": v for d, v in as_dict(ev.get("by_difficulty")).items()}
            row |= {k: v for k, v in as_dict(rd.get("diagnostics")).items() if k in DIAGNOSTICS}
            rows.append(row)
    frame = pd.DataFrame(rows, dtype=object)
    diff_cols = sorted((c for c in frame.columns if c.startswith(DIFFICULTY)), key=lambda c: natural(c[len(DIFFICULTY):]))
    diag_cols = [k for k in DIAGNOSTICS if k in frame.columns]
    ledger_end = ROUND_COLUMNS.index(REPORTED_KEYS[-1]) + 1
    columns = [*ROUND_COLUMNS[:ledger_end], *extra, *ROUND_COLUMNS[ledger_end:]]
    return frame.reindex(columns=["run", *columns, *diff_cols, *diag_cols])


def difficulty_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith(DIFFICULTY)]


def diagnostic_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c in DIAGNOSTICS]


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.apply(pd.to_numeric, errors="coerce").astype(float)


def group_stats(frame: pd.DataFrame, by: list[str], col: str, own_se: str | None = None, skipna: bool = False
                ) -> dict:
    """{(group values as ints): Stat} of `col` over the rows of each group of `frame` (numeric).

    ``skipna=False``: a missing value makes the group's mean missing. A group of one row takes its SE from
    `own_se` (the run's own eval SE), since one seed has no spread to measure.
    """
    data = frame[[*by, col] + ([own_se] if own_se else [])]
    if skipna:
        data = data.dropna(subset=[col])
    grouped = data.groupby(by, sort=True)
    agg = grouped[col].agg(["mean", "sem", "count", "size"])
    first_se = grouped[own_se].first() if own_se else None
    out = {}
    for group, row in agg.iterrows():
        group = tuple(int(g) for g in (group if isinstance(group, tuple) else (group,)))
        n = int(row["size"])
        if row["count"] < n:  # only when skipna=False
            out[group] = Stat(math.nan, math.nan, n)
        elif n == 1:
            out[group] = Stat(float(row["mean"]), float(first_se.loc[row.name]) if first_se is not None else math.nan, 1)
        else:
            out[group] = Stat(float(row["mean"]), float(row["sem"]), n)
    return out


@dataclass
class ConfigStats:
    """One configuration (one row of the report), aggregated over its seeds."""

    key: Key
    runs: list[Run]
    base: Stat
    rounds: dict[int, Stat]
    final: Stat
    totals: dict[str, Stat]
    by_difficulty: dict[str, Stat]
    diagnostics: dict[str, dict[int, Stat]] = field(default_factory=dict)  # diagnostic -> round -> Stat

    @property
    def n_seeds(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.key) or "all runs"

    def value(self, key: str) -> str | None:
        """The key's value shared by all runs of this configuration, or None if it differs."""
        values = {r.value(key) for r in self.runs}
        return values.pop() if len(values) == 1 else None


def aggregate(runs: Iterable[Run], by: Sequence[str] | None = None) -> list[ConfigStats]:
    """Group the ok runs by configuration and average every reported number over seeds."""
    ok = [r for r in runs if r.ok]
    keys = sorted({r.key(by) for r in ok}, key=sort_key)
    key_id = {k: i for i, k in enumerate(keys)}
    per_run = pd.DataFrame(
        [{"key": key_id[r.key(by)], "base": r.base_accuracy, "base_se": r.base.get("se"),
          "final": as_dict(r.final_round.get("eval")).get("accuracy"),
          "final_se": as_dict(r.final_round.get("eval")).get("se"), **r.totals()} for r in ok],
        columns=["key", "base", "base_se", "final", "final_se", *TOTAL_KEYS],
    )
    per_run = _numeric(per_run)
    raw = rounds_frame(ok)
    rounds = _numeric(raw)
    rounds["key"] = [key_id[ok[int(i)].key(by)] for i in rounds["run"]]
    rounds["round"] = rounds["round"].fillna(0).astype(int)
    last = rounds.groupby("run")["round"].transform("max") == rounds["round"]
    final_rows = rounds[last]
    diff_cols = difficulty_columns(raw)
    base = group_stats(per_run, ["key"], "base", own_se="base_se")
    final = group_stats(per_run, ["key"], "final", own_se="final_se")
    totals = {k: group_stats(per_run, ["key"], k) for k in TOTAL_KEYS}
    per_round = group_stats(rounds, ["key", "round"], "accuracy", own_se="se")
    by_diff = {c: group_stats(final_rows, ["key"], c, skipna=True) for c in diff_cols}
    diags = {c: group_stats(rounds, ["key", "round"], c, skipna=True) for c in diagnostic_columns(raw)}
    out = []
    for key in keys:
        i = key_id[key]
        out.append(
            ConfigStats(
                key=key,
                runs=[r for r in ok if r.key(by) == key],
                base=base[(i,)],
                rounds={rid: s for (k, rid), s in per_round.items() if k == i},
                final=final[(i,)],
                totals={k: totals[k][(i,)] for k in TOTAL_KEYS},
                by_difficulty={c[len(DIFFICULTY):]: by_diff[c][(i,)] for c in diff_cols if (i,) in by_diff[c]},
                diagnostics={c: {rid: s for (k, rid), s in diags[c].items() if k == i} for c in diags},
            )
        )
    return out


def varying_keys(stats: Sequence[ConfigStats]) -> list[str]:
    """Keys whose value differs between configurations (missing counts as a value)."""
    keys = sorted({k for s in stats for k, _ in s.key})
    return [k for k in keys if len({dict(s.key).get(k) for s in stats}) > 1]


def short_labels(stats: Sequence[ConfigStats]) -> tuple[dict[Key, str], list[tuple[str, str]]]:
    """Label each configuration by the keys that vary between them; return the common ones apart."""
    varying = varying_keys(stats)
    common = sorted({(k, v) for s in stats for k, v in s.key if k not in varying})
    labels = {}
    for s in stats:
        d = dict(s.key)
        labels[s.key] = " ".join(f"{k}={d[k]}" for k in varying if k in d) or s.label
    return labels, common
