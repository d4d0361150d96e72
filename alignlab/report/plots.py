"""PNG plots of the aggregated report: learning curves, compute frontiers, sweeps over keep ratio and N.

Drawn with matplotlib's Agg canvas and no pyplot state, so reports can be made from threads and servers; each PNG
is written to a temporary name, then renamed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignlab.report.aggregate import ConfigStats, Stat, short_labels, varying_keys
from alignlab.report.discovery import num

SWEEP_PLOTS = {"selector.keep_ratio": ("acc_vs_keep_ratio.png", "keep ratio"), "sampler.n": ("acc_vs_n.png", "N")}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def new_axes(title: str, xlabel: str, ylabel: str, height: float = 4.5) -> tuple[Any, Any]:
    """One titled, labelled, gridded axes on its own Agg figure (no pyplot state), 7 inches wide."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def write_plots(stats: Sequence[ConfigStats], out: Path) -> list[str]:
    """PNG plots (Agg, no pyplot state): learning curves, compute frontiers, and sweeps over keep ratio / N."""
    from matplotlib.figure import Figure

    if not stats:
        return []
    labels, _ = short_labels(stats)
    varying = varying_keys(stats)
    # One look per configuration across all plots; markers change once the 10 colours run out.
    style = {s.key: {"color": f"C{i % 10}", "marker": "os^Dv<>ph*"[(i // 10) % 10]} for i, s in enumerate(stats)}
    written: list[str] = []

    def new(title: str, xlabel: str, ylabel: str = "accuracy") -> tuple[Figure, Any]:
        return new_axes(title, xlabel, ylabel)

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
        rounds = [0, *s.rounds]
        curve = [s.base, *s.rounds.values()]
        ax.errorbar(
            rounds, [p.mean for p in curve], yerr=[_finite(p.se) for p in curve], capsize=3, label=labels[s.key],
            **style[s.key],
        )
    ax.set_xticks(sorted({0, *(r for s in stats for r in s.rounds)}))
    save(fig, ax, "accuracy_per_round.png")

    # Final accuracy vs total compute, with the Pareto frontier (best accuracy at no more compute).
    for col, name, what in (
        ("generated_tokens", "frontier_generated_tokens.png", "generated tokens"),
        ("flops", "frontier_flops.png", "FLOPs"),
    ):
        finals = [(s.totals[col], s.final, s.key) for s in stats if math.isfinite(s.totals[col].mean)]
        if not finals:
            continue
        fig, ax = new(f"Final accuracy vs {what} (mean ± SE over seeds)", f"{what} (total over rounds)")
        for total, final, cfg in finals:
            ax.errorbar(
                [total.mean],
                [final.mean],
                xerr=[_finite(total.se)],
                yerr=[_finite(final.se)],
                capsize=3,
                label=labels[cfg],
                **style[cfg],
            )
        frontier: list[tuple[float, float]] = []
        best = -math.inf
        for total, final, _ in sorted(finals, key=lambda p: (p[0].mean, -p[1].mean)):
            if final.mean > best:
                frontier.append((total.mean, final.mean))
                best = final.mean
        if len(frontier) > 1:
            ax.plot(*zip(*frontier), ls="--", color="gray", lw=1, drawstyle="steps-post", label="frontier")
        totals = [p[0].mean for p in finals if p[0].mean > 0]
        if totals and max(totals) / min(totals) > 20:
            ax.set_xscale("log")
        save(fig, ax, name)

    # Sweeps: final accuracy vs one key, one line per setting of the other varying keys.
    for key, (name, xlabel) in SWEEP_PLOTS.items():
        series: dict[str, list[tuple[float, Stat]]] = {}
        for s in stats:
            x = num(s.value(key))
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
