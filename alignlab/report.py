"""`alignlab report`: turn a pile of run directories into tables and plots.

Every run writes ``summary.json`` (contract in DESIGN.md) next to Hydra's ``.hydra/``. This module
finds them below any number of directories, groups runs by what was overridden (ignoring ``seed``
and ``hydra.*``), averages over seeds, and writes ``report.md``, ``report.csv`` and PNG plots.
Runs that failed or stopped early are listed, never averaged in and never fatal.

Ledger fields are per-round costs (DESIGN.md, "Compute ledger"); a run's compute is their sum
over rounds, so the frontier plots compare final accuracy against total compute spent.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignlab.records import RESUMED_IN, atomic_write_text

LEDGER_KEYS = ("prompts", "samples", "generated_tokens", "trained_tokens", "flops", "wall_s")
TOTAL_KEYS = ("pairs", "selected", *LEDGER_KEYS)
FAILED_STATUSES = ("fail", "error", "crash", "killed", "abort")
SWEEP_PLOTS = {"selector.keep_ratio": ("acc_vs_keep_ratio.png", "keep ratio"), "sampler.n": ("acc_vs_n.png", "N")}

Key = tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One run directory: what was asked (overrides, config) and what came out (summary)."""

    path: Path
    overrides: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    status: str = "ok"  # ok | failed | incomplete | missing | unreadable | malformed
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def seed(self) -> int | None:
        for source in ((self.summary or {}).get("seed"), self.overrides.get("seed"), self.config.get("seed")):
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
        """The effective value of a dotted key: the override if given, else the saved config's scalar."""
        if key in self.overrides:
            return self.overrides[key]
        if key == "experiment":
            return self.experiment
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
        rounds = (self.summary or {}).get("rounds") or []
        return sorted((r for r in rounds if isinstance(r, dict)), key=lambda r: _num(r.get("round"), 0))

    @property
    def base_accuracy(self) -> float:
        return _num(((self.summary or {}).get("base") or {}).get("accuracy"))

    @property
    def final_round(self) -> dict[str, Any]:
        return self.rounds[-1] if self.rounds else {}

    def totals(self) -> dict[str, float]:
        """Compute and data spent over all rounds (ledger entries are per round)."""
        out = {k: 0.0 for k in TOTAL_KEYS}
        for r in self.rounds:
            ledger = r.get("ledger") or {}
            for k in TOTAL_KEYS:
                out[k] += _num(r.get(k) if k in ("pairs", "selected") else ledger.get(k))
        return out


def _num(x: Any, default: float = math.nan) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return default


def _parse_overrides(lines: Iterable[Any]) -> dict[str, str]:
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


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
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
    if not isinstance(summary, dict):
        run.status, run.reason = "malformed", "summary.json is not an object"
        return
    run.summary = summary
    status = str(summary.get("status", "")).lower()
    if status.startswith(FAILED_STATUSES):
        err = summary.get("error") or summary.get("message") or ""
        run.status, run.reason = "failed", f"status={summary.get('status')}" + (f": {err}" if err else "")
        return
    if math.isnan(run.base_accuracy):
        run.status, run.reason = "malformed", "summary.json has no base.accuracy"
        return
    bad = [r.get("round") for r in run.rounds if math.isnan(_num((r.get("eval") or {}).get("accuracy")))]
    if bad:
        run.status, run.reason = "malformed", f"rounds without eval.accuracy: {bad}"
        return
    planned = _num(run.config.get("rounds"))
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
                overrides=_parse_overrides(overrides if isinstance(overrides, list) else []),
                config=config if isinstance(config, dict) else {},
            )
            _check(run, path / "summary.json")
            runs[path] = run
    return sorted(runs.values(), key=lambda r: (_sort_key(r.key()), r.seed if r.seed is not None else -1, str(r.path)))


# ---------------------------------------------------------------------------------- aggregate


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


def mean_se(values: Sequence[float], own_se: float = math.nan) -> Stat:
    """SE = sample std / sqrt(n) across seeds; with a single seed fall back to `own_se`."""
    n = len(values)
    if n == 0:
        return Stat(math.nan, math.nan, 0)
    mean = sum(values) / n
    if n == 1:
        return Stat(mean, own_se, 1)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Stat(mean, math.sqrt(var / n), n)


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


def _single_se(runs: list[Run], get: Any) -> float:
    return _num(get(runs[0])) if len(runs) == 1 else math.nan


def aggregate(runs: Iterable[Run], by: Sequence[str] | None = None) -> list[ConfigStats]:
    """Group the ok runs by configuration and average every reported number over seeds."""
    groups: dict[Key, list[Run]] = {}
    for run in runs:
        if run.ok:
            groups.setdefault(run.key(by), []).append(run)
    out = []
    for key in sorted(groups, key=_sort_key):
        rs = groups[key]
        round_ids = sorted({int(_num(r.get("round"), 0)) for run in rs for r in run.rounds})
        per_round = {}
        for rid in round_ids:
            evals = [(r.get("eval") or {}) for run in rs for r in run.rounds if int(_num(r.get("round"), 0)) == rid]
            own = _num(evals[0].get("se")) if len(evals) == 1 else math.nan
            per_round[rid] = mean_se([_num(e.get("accuracy")) for e in evals], own)
        finals = [run.final_round.get("eval") or {} for run in rs]
        diff_keys = sorted({k for f in finals for k in (f.get("by_difficulty") or {})}, key=_natural)
        totals = [run.totals() for run in rs]
        out.append(
            ConfigStats(
                key=key,
                runs=rs,
                base=mean_se([run.base_accuracy for run in rs], _single_se(rs, lambda r: r.summary["base"].get("se"))),
                rounds=per_round,
                final=mean_se(
                    [_num(f.get("accuracy")) for f in finals], _num(finals[0].get("se")) if len(rs) == 1 else math.nan
                ),
                totals={k: mean_se([t[k] for t in totals]) for k in TOTAL_KEYS},
                by_difficulty={
                    d: mean_se([_num(v) for f in finals if (v := (f.get("by_difficulty") or {}).get(d)) is not None])
                    for d in diff_keys
                },
            )
        )
    return out


def _natural(s: Any) -> tuple:
    """Sort '2' before '10', so sweeps come out in numeric order."""
    parts = re.split(r"(-?\d+(?:\.\d+)?)", "" if s is None else str(s))
    return tuple((0, float(t), "") if i % 2 else (1, 0.0, t) for i, t in enumerate(parts) if t)


def _sort_key(key: Key) -> tuple:
    return tuple((k, _natural(v)) for k, v in key)


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


# ----------------------------------------------------------------------------------- writing


def _fmt_int(x: float) -> str:
    return "" if math.isnan(x) else f"{x:,.0f}"


def _fmt_float(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.1f}"


def _fmt_sci(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.3g}"


def _rel(path: Path, out: Path) -> str:
    try:
        return os.path.relpath(path, out)
    except ValueError:
        return str(path)


DIAGNOSTICS = {  # summary.json rounds[k]["diagnostics"] key -> what the table shows (ipo_dynamics.md §5)
    "token_entropy": "mean token entropy of the samples (nats)",
    "distinct_answers": "distinct final answers per prompt",
    "pass_at_k": "pass@k over the N samples",
    "mean_pass_rate": "mean pass rate of the N samples",
}


def diagnostic(stats: ConfigStats, key: str, rid: int) -> Stat:
    """Mean ± SE over seeds of one round's sampling diagnostic (collapse shows as entropy and distinct answers falling)."""
    vals = [_num((r.get("diagnostics") or {}).get(key)) for run in stats.runs for r in run.rounds
            if int(_num(r.get("round"), 0)) == rid]
    return mean_se([v for v in vals if not math.isnan(v)])


def _diagnostics_section(stats: Sequence[ConfigStats], labels: dict[Key, str], round_ids: list[int]) -> list[str]:
    lines: list[str] = []
    for key, title in DIAGNOSTICS.items():
        cells = {s.key: [diagnostic(s, key, r) for r in round_ids] for s in stats}
        if not any(c.n for row in cells.values() for c in row):
            continue
        if not lines:
            lines += ["## Sampling diagnostics per round", "",
                      "Measured on each round's N samples before training (mean ± SE over seeds).", ""]
        lines += [f"**{title}** (`{key}`)", "", "| configuration | " + " | ".join(f"round {r}" for r in round_ids)
                  + " |", "|---|" + "---:|" * len(round_ids)]
        for s in stats:
            lines.append(f"| `{labels[s.key]}` | " + " | ".join(c.fmt() for c in cells[s.key]) + " |")
        lines.append("")
    return lines


def write_markdown(runs: Sequence[Run], stats: Sequence[ConfigStats], out: Path, plots: Sequence[str]) -> Path:
    """report.md: one row per configuration, then what failed, then the plots."""
    labels, common = short_labels(stats)
    round_ids = sorted({rid for s in stats for rid in s.rounds})
    ok = sum(r.ok for r in runs)
    lines = [
        "# alignlab report",
        "",
        f"{len(runs)} runs found, {ok} complete, {len(runs) - ok} failed or incomplete; {len(stats)} configurations.",
        "Accuracy is mean ± SE over seeds (SE = std/√n; with one seed, the run's own eval SE).",
        "Compute columns are totals over all rounds, averaged over seeds.",
        "",
    ]
    if common and len(stats) > 1:
        lines += ["Common to all configurations: " + ", ".join(f"`{k}={v}`" for k, v in common), ""]
    if stats:
        header = ["configuration", "n_seeds", "base acc", *[f"round {r}" for r in round_ids], "final acc"]
        header += ["generated tokens", "FLOPs", "trained tokens", "wall s"]
        lines += [
            "## Results",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        for s in stats:
            row = [f"`{labels[s.key]}`", str(s.n_seeds), s.base.fmt()]
            row += [s.rounds[r].fmt() if r in s.rounds else "" for r in round_ids]
            row += [
                f"**{s.final.fmt()}**",
                _fmt_int(s.totals["generated_tokens"].mean),
                _fmt_sci(s.totals["flops"].mean),
            ]
            row += [_fmt_int(s.totals["trained_tokens"].mean), _fmt_float(s.totals["wall_s"].mean)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        diffs = sorted({d for s in stats for d in s.by_difficulty}, key=_natural)
        if diffs:
            lines += ["## Final-round accuracy by difficulty", ""]
            lines += ["| configuration | " + " | ".join(diffs) + " |", "|---|" + "---:|" * len(diffs)]
            for s in stats:
                cells = [s.by_difficulty[d].fmt() if d in s.by_difficulty else "" for d in diffs]
                lines.append(f"| `{labels[s.key]}` | " + " | ".join(cells) + " |")
            lines.append("")
        lines += _diagnostics_section(stats, labels, round_ids)
        lines += ["## Seeds", "", "| configuration | seeds | run dirs |", "|---|---|---|"]
        for s in stats:
            seeds = ", ".join("?" if x is None else str(x) for x in s.seeds)
            dirs = ", ".join(f"`{_rel(r.path, out)}`" for r in s.runs)
            lines.append(f"| `{labels[s.key]}` | {seeds} | {dirs} |")
        lines.append("")
    bad = [r for r in runs if not r.ok]
    lines += ["## Failed or incomplete runs", ""]
    if bad:
        lines += ["| run dir | configuration | seed | status | reason |", "|---|---|---|---|---|"]
        for r in bad:
            reason = r.reason.replace("|", "\\|").replace("\n", " ")
            label = " ".join(f"{k}={v}" for k, v in r.key())
            seed = "?" if r.seed is None else r.seed
            lines.append(f"| `{_rel(r.path, out)}` | `{label}` | {seed} | {r.status} | {reason} |")
    else:
        lines.append("None.")
    lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def write_csv(runs: Sequence[Run], out: Path) -> Path:
    """report.csv: one flat row per run per round (failed runs' partial rounds included, see `status`), with the
    round's sampling diagnostics where the runs recorded them."""
    fixed = ["run_dir", "config", "experiment", "seed", "status", "round", "accuracy", "se", "n", "pairs", "selected"]
    fixed += [*LEDGER_KEYS, "base_accuracy", "base_se", "final_accuracy"]
    override_cols = sorted({k for r in runs for k in r.overrides if k not in fixed and k != "seed"})
    diff_cols = sorted(
        {d for r in runs for rd in r.rounds for d in ((rd.get("eval") or {}).get("by_difficulty") or {})}, key=_natural
    )
    diag_cols = [k for k in DIAGNOSTICS if any(k in (rd.get("diagnostics") or {}) for r in runs for rd in r.rounds)]
    path = out / "report.csv"
    f = io.StringIO(newline="")  # written atomically at the end
    w = csv.writer(f)
    w.writerow(fixed[:5] + override_cols + fixed[5:] + [f"acc_difficulty_{d}" for d in diff_cols] + diag_cols)
    for r in runs:
        base = (r.summary or {}).get("base") or {}
        final = (r.final_round.get("eval") or {}).get("accuracy")
        for rd in r.rounds:
            ev, ledger = rd.get("eval") or {}, rd.get("ledger") or {}
            row = [_rel(r.path, out), " ".join(f"{k}={v}" for k, v in r.key()), r.experiment, r.seed, r.status]
            row += [r.overrides.get(k, "") for k in override_cols]
            row += [
                rd.get("round"),
                ev.get("accuracy"),
                ev.get("se"),
                ev.get("n"),
                rd.get("pairs"),
                rd.get("selected"),
            ]
            row += [ledger.get(k) for k in LEDGER_KEYS] + [base.get("accuracy"), base.get("se"), final]
            row += [(ev.get("by_difficulty") or {}).get(d) for d in diff_cols]
            row += [(rd.get("diagnostics") or {}).get(k) for k in diag_cols]
            w.writerow(["" if v is None else v for v in row])
    atomic_write_text(path, f.getvalue())
    return path


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def write_plots(stats: Sequence[ConfigStats], out: Path) -> list[str]:
    """PNG plots (Agg, no pyplot state): learning curves, compute frontiers, and sweeps over keep ratio / N."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not stats:
        return []
    labels, _ = short_labels(stats)
    varying = varying_keys(stats)
    # One look per configuration across all plots; markers change once the 10 colours run out.
    style = {s.key: {"color": f"C{i % 10}", "marker": "os^Dv<>ph*"[(i // 10) % 10]} for i, s in enumerate(stats)}
    written: list[str] = []

    def new(title: str, xlabel: str, ylabel: str = "accuracy") -> tuple[Figure, Any]:
        fig = Figure(figsize=(7, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        return fig, ax

    def save(fig: Figure, ax: Any, name: str, legend: bool = True) -> None:
        entries = len(ax.get_legend_handles_labels()[0])
        if legend and entries:
            # Past a handful of configurations the legend would hide the data: move it outside.
            outside = {"bbox_to_anchor": (1.02, 1.0), "loc": "upper left"} if entries > 6 else {"loc": "best"}
            ax.legend(fontsize=7, **outside)
        tmp = out / f".{name}.tmp"  # a reader never sees half a PNG
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, out / name)
        written.append(name)

    # Accuracy per round, round 0 = the base model.
    fig, ax = new("Accuracy per round (mean ± SE over seeds)", "round")
    for s in stats:
        xs = [0, *s.rounds]
        pts = [s.base, *s.rounds.values()]
        ax.errorbar(
            xs, [p.mean for p in pts], yerr=[_finite(p.se) for p in pts], capsize=3, label=labels[s.key], **style[s.key]
        )
    ax.set_xticks(sorted({0, *(r for s in stats for r in s.rounds)}))
    save(fig, ax, "accuracy_per_round.png")

    # Final accuracy vs total compute, with the Pareto frontier (best accuracy at no more compute).
    for col, name, what in (
        ("generated_tokens", "frontier_generated_tokens.png", "generated tokens"),
        ("flops", "frontier_flops.png", "FLOPs"),
    ):
        pts = [(s.totals[col], s.final, s.key) for s in stats if math.isfinite(s.totals[col].mean)]
        if not pts:
            continue
        fig, ax = new(f"Final accuracy vs {what} (mean ± SE over seeds)", f"{what} (total over rounds)")
        for x, y, key in pts:
            ax.errorbar(
                [x.mean],
                [y.mean],
                xerr=[_finite(x.se)],
                yerr=[_finite(y.se)],
                capsize=3,
                label=labels[key],
                **style[key],
            )
        frontier, best = [], -math.inf
        for x, y, _ in sorted(pts, key=lambda p: (p[0].mean, -p[1].mean)):
            if y.mean > best:
                frontier.append((x.mean, y.mean))
                best = y.mean
        if len(frontier) > 1:
            ax.plot(*zip(*frontier), ls="--", color="gray", lw=1, drawstyle="steps-post", label="frontier")
        xs = [p[0].mean for p in pts if p[0].mean > 0]
        if xs and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        save(fig, ax, name)

    # Sweeps: final accuracy vs one key, one line per setting of the other varying keys.
    for key, (name, xlabel) in SWEEP_PLOTS.items():
        series: dict[str, list[tuple[float, Stat]]] = {}
        for s in stats:
            x = _num(s.value(key))
            if math.isfinite(x):
                rest = " ".join(f"{k}={v}" for k, v in s.key if k != key and k in varying)
                series.setdefault(rest or "final accuracy", []).append((x, s.final))
        xs = sorted({x for pts in series.values() for x, _ in pts})
        if len(xs) < 2:
            continue
        fig, ax = new(f"Final accuracy vs {xlabel} ({key})", xlabel)
        for label, pts in sorted(series.items()):
            pts.sort(key=lambda p: p[0])
            ax.errorbar(
                [p[0] for p in pts],
                [p[1].mean for p in pts],
                yerr=[_finite(p[1].se) for p in pts],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_xticks(xs)
        save(fig, ax, name)
    return written


# ---------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignlab report",
        description="Aggregate summary.json files of alignlab runs (single runs or multirun sweeps) over seeds.",
    )
    p.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories, searched recursively")
    p.add_argument("--out", type=Path, default=None, help="where to write report.md/csv/png (default: first dir)")
    p.add_argument(
        "--by",
        nargs="+",
        default=None,
        metavar="KEY",
        help="group only by these dotted keys (override, else the saved config); default: all overridden keys but "
        "seed. Put it after the dirs, since it takes every following word.",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `alignlab report`; returns a process exit code."""
    args = build_parser().parse_args(argv)
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"alignlab report: not a directory: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    runs = load_runs(args.dirs)
    if not runs:
        print(
            f"alignlab report: no runs (summary.json or .hydra/) below {', '.join(map(str, args.dirs))}",
            file=sys.stderr,
        )
        return 1
    out = (args.out or args.dirs[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stats = aggregate(runs, by=args.by)
    plots = write_plots(stats, out)
    md = write_markdown(runs, stats, out, plots)
    write_csv(runs, out)
    bad = sum(not r.ok for r in runs)
    print(f"{len(runs)} runs ({bad} failed or incomplete), {len(stats)} configurations -> {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
