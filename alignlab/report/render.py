"""report.md and report.csv: the aggregated tables as markdown, the per-run per-round table as CSV."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from alignlab.records import atomic_write_text
from alignlab.report.aggregate import DIAGNOSTICS, NO_STAT, ROUND_COLUMNS, ConfigStats, rounds_frame, short_labels
from alignlab.report.discovery import Key, Run, natural
from alignlab.report.paired import Paired

CSV_FIXED = ["run_dir", "config", "experiment", "seed", "status"]


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


def _diagnostics_section(stats: Sequence[ConfigStats], labels: dict[Key, str], round_ids: list[int]) -> list[str]:
    lines: list[str] = []
    for key, title in DIAGNOSTICS.items():
        cells = {s.key: [s.diagnostics.get(key, {}).get(r, NO_STAT) for r in round_ids] for s in stats}
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


def _signed(x: float) -> str:
    return "" if math.isnan(x) else f"{x:+.3f}"


def _paired_section(paired: Paired, labels: dict[Key, str], round_ids: list[int]) -> list[str]:
    """Per configuration: the paired difference to the baseline per round and for the final accuracy."""
    boot = paired.bootstrap > 0
    mcn = paired.has_mcnemar
    lines = [
        f"## Paired differences vs baseline `{paired.baseline_label}`",
        "",
        "Difference in accuracy to the baseline configuration, paired by seed over the seeds both ran "
        "(mean over shared seeds; 95 % CI = mean ± t(0.975, n−1)·sd/√n"
        + (f"; bootstrap: {paired.bootstrap} resamples, percentile interval, over the shared seeds and, where the "
           "evals record per-problem verdicts, the held-out problems, crossed with the seeds: the same problems "
           "drawn for every seed and both arms (column `boot over`)"
           if boot else "")
        + ("; with one shared seed: McNemar's exact test on the problems only one of the two solves "
           "(b: only this configuration, c: only the baseline; two-sided p)" if mcn else "")
        + "). An interval that excludes 0 is a measured difference; one that includes 0 is not.",
        f"Baseline configuration: `{labels[paired.baseline]}`.",
        "",
    ]
    header = ["configuration", "paired seeds", *[f"Δ round {r} [95% CI]" for r in round_ids], "Δ final acc",
              "ci95_low", "ci95_high", *(["boot95_low", "boot95_high", "boot over"] if boot else []),
              *(["McNemar b/c", "McNemar p"] if mcn else []), "excludes 0"]
    aligns = ["---", "---"] + ["---:"] * (len(round_ids) + 3 + 2 * boot) + ["---"] * boot + ["---:"] * (2 * mcn) + ["---"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
    for key, by_round in paired.diffs.items():
        f = by_round.get("final")
        if f is None:
            continue
        cells = [f"`{labels[key]}`", ", ".join(map(str, f.seeds)) or "none shared"]
        for r in round_ids:
            d = by_round.get(r)
            cells.append("" if d is None or math.isnan(d.mean) else
                         f"{_signed(d.mean)}" + (f" [{_signed(d.ci95_low)}, {_signed(d.ci95_high)}]"
                                                 if math.isfinite(d.ci95_low) else ""))
        cells += [_signed(f.mean), _signed(f.ci95_low), _signed(f.ci95_high)]
        if boot:
            cells += [_signed(f.boot95_low), _signed(f.boot95_high), f.bootstrap_over or ""]
        if mcn:
            cells += ["" if f.mcnemar_b is None else f"{f.mcnemar_b}/{f.mcnemar_c}",
                      "" if math.isnan(f.mcnemar_p) else f"{f.mcnemar_p:.4g}"]
        cells.append(f.verdict)
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def write_markdown(runs: Sequence[Run], stats: Sequence[ConfigStats], out: Path, plots: Sequence[str],
                   paired: Paired | None = None) -> Path:
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
        if paired is not None:
            lines += _paired_section(paired, labels, round_ids)
        diffs = sorted({d for s in stats for d in s.by_difficulty}, key=natural)
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


def write_csv(runs: Sequence[Run], out: Path, paired: Paired | None = None, by: Sequence[str] | None = None) -> Path:
    """report.csv: one flat row per run per round (failed runs' partial rounds included, see `status`), with the
    round's sampling diagnostics where the runs recorded them and, with a baseline, the paired difference of the
    run's configuration at that round. With ``--by``, a ``grouped_by`` column names the keys the configurations
    (and so the paired columns) were grouped by."""
    frame = rounds_frame(runs)
    override_cols = sorted({k for r in runs for k in r.overrides if k not in CSV_FIXED + ROUND_COLUMNS and k != "seed"})
    run_cols: dict[str, list[Any]] = {
        "run_dir": [_rel(r.path, out) for r in runs],
        "config": [" ".join(f"{k}={v}" for k, v in r.key()) for r in runs],
        **({"grouped_by": [" ".join(by)] * len(runs)} if by else {}),
        "experiment": [r.experiment for r in runs],
        "seed": [r.seed for r in runs],
        "status": [r.status for r in runs],
        **{k: [r.overrides.get(k, "") for r in runs] for k in override_cols},
    }
    idx = [int(i) for i in frame["run"]]
    for col, values in reversed(run_cols.items()):
        frame.insert(0, col, pd.Series([values[i] for i in idx], index=frame.index, dtype=object))
    if paired is not None:
        for col, values in paired.columns(runs, idx, list(frame["round"])).items():
            frame[col] = pd.Series(values, index=frame.index, dtype=object)
    frame = frame.drop(columns="run")
    path = out / "report.csv"
    atomic_write_text(path, frame.to_csv(index=False, lineterminator="\r\n"))
    return path


def format_table(summary: dict[str, Any]) -> str:
    """The table a run prints at its end: one row per round (and the base model), accuracy and the ledger."""
    rows = [("round", "accuracy", "pairs", "selected", "gen tokens", "trained tokens", "FLOPs", "wall s")]
    if "base" in summary:
        b = summary["base"]
        rows.append(("base", f"{b['accuracy']:.3f} ± {b['se']:.3f}", "", "", "", "", "", ""))
    for r in summary["rounds"]:
        e, lg = r["eval"], r["ledger"]
        rows.append((str(r["round"]), f"{e['accuracy']:.3f} ± {e['se']:.3f}", str(r["pairs"]), str(r["selected"]),
                     str(lg["generated_tokens"]), str(lg["trained_tokens"]), f"{lg['flops']:.3g}",
                     f"{lg['wall_s']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
