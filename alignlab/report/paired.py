"""Paired differences against a baseline configuration, over the seeds both ran (``alignlab report --baseline``).

Seed s of two configurations shares the data order, the initial model and the held-out set, so the per-seed
difference d_s = acc(config, s) − acc(baseline, s) removes what the seeds have in common. Over the n shared seeds
the report gives mean(d), a t-based 95 % interval mean ± t(0.975, n−1)·sd(d)/√n, and optionally a percentile
bootstrap over the shared seeds. summary.json holds per-round accuracies, not per-problem verdicts, so the
bootstrap resamples seeds only (no seeds × problems resampling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from alignlab.report.aggregate import ConfigStats
from alignlab.report.discovery import Key, Run, as_dict, num

PAIRED_COLUMNS = ["baseline", "paired_seeds", "diff_mean", "ci95_low", "ci95_high"]
BOOT_COLUMNS = ["boot95_low", "boot95_high"]
FINAL = "final"


class BaselineError(ValueError):
    """--baseline matches no configuration, or more than one."""


def t_abs_cdf(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with integer `df`, in closed form (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/π)(θ + sinθ(cosθ + 2/3 cos³θ + … ))
        if df == 1:
            return 2 * theta / math.pi
        term = acc = math.cos(theta)
        for k in range(3, df - 1, 2):
            term *= (k - 1) / k * c2
            acc += term
        return 2 / math.pi * (theta + s * acc)
    term = acc = 1.0  # even: sinθ(1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + … )
    for k in range(2, df - 1, 2):
        term *= (k - 1) / k * c2
        acc += term
    return s * acc


def t_quantile(p: float, df: int) -> float:
    """The `p` quantile (p > 0.5) of Student's t with integer `df` ≥ 1, by bisection on the exact CDF."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    target = 2 * p - 1
    lo, hi = 0.0, 1.0
    while t_abs_cdf(hi, int(df)) < target:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_abs_cdf(mid, int(df)) < target else (lo, mid)
    return (lo + hi) / 2


@dataclass
class PairedDiff:
    """One configuration against the baseline at one round (or the final accuracy), over shared seeds."""

    seeds: list[int]
    mean: float
    sd: float
    ci95_low: float = math.nan
    ci95_high: float = math.nan
    boot95_low: float = math.nan
    boot95_high: float = math.nan

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def verdict(self) -> str:
        """Whether the 95 % interval excludes 0; with fewer than two shared seeds there is no interval."""
        if self.n == 0:
            return "no shared seeds"
        if not math.isfinite(self.ci95_low):
            return "n < 2"
        return "yes" if self.ci95_low > 0 or self.ci95_high < 0 else "no"


@dataclass
class Paired:
    """Every configuration's paired differences to the baseline, by round and for the final accuracy."""

    baseline: Key
    baseline_label: str
    bootstrap: int
    diffs: dict[Key, dict[int | str, PairedDiff]] = field(default_factory=dict)
    config_of: dict[Path, Key] = field(default_factory=dict)  # run dir -> its configuration (ok runs only)

    def columns(self, runs: Sequence[Run], run_index: Sequence[int], rounds: Sequence[object]) -> dict[str, list]:
        """report.csv's paired columns, one value per row (a run's round): its configuration's difference at
        that round. Empty for the baseline's own rows and for runs that were not averaged in."""
        cols = PAIRED_COLUMNS + (BOOT_COLUMNS if self.bootstrap else [])
        out: dict[str, list] = {c: [] for c in cols}
        for i, rnd in zip(run_index, rounds):
            key = self.config_of.get(runs[int(i)].path)
            d = None
            if key is not None and key != self.baseline:
                d = self.diffs.get(key, {}).get(int(num(rnd, 0)))
            out["baseline"].append(self.baseline_label if key is not None else None)
            values = {} if d is None else {"paired_seeds": d.n, "diff_mean": d.mean, "ci95_low": d.ci95_low,
                                           "ci95_high": d.ci95_high, "boot95_low": d.boot95_low,
                                           "boot95_high": d.boot95_high}
            for c in cols[1:]:
                v = values.get(c)
                out[c].append(None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
        return out


def parse_baseline(items: Sequence[str]) -> dict[str, str]:
    """``["selector=full", ...]`` -> {key: value}; a word without '=' is an error that names it."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BaselineError(f"--baseline {item!r}: expected KEY=VALUE, for example selector=full")
        out[key.strip().lstrip("+")] = value.strip()
    return out


def find_baseline(stats: Sequence[ConfigStats], want: dict[str, str]) -> ConfigStats:
    """The one configuration whose runs all have the given values (override, else Hydra's choice, else config)."""
    matches = [s for s in stats if all(s.value(k) == v for k, v in want.items())]
    label = " ".join(f"{k}={v}" for k, v in want.items())
    if len(matches) == 1:
        return matches[0]
    if not matches:
        seen = {k: sorted({str(s.value(k)) for s in stats}) for k in want}
        raise BaselineError(f"--baseline {label}: no configuration matches; values found: "
                            + "; ".join(f"{k} in {{{', '.join(v)}}}" for k, v in seen.items()))
    raise BaselineError(f"--baseline {label}: {len(matches)} configurations match ("
                        + "; ".join(s.label for s in matches) + "); add KEY=VALUE words to pick one")


def _accuracies(stats: Sequence[ConfigStats]) -> pd.DataFrame:
    """Per configuration, seed and round (and ``final``): the accuracy, averaged over runs sharing a seed."""
    rows = []
    for i, s in enumerate(stats):
        for run in s.runs:
            if run.seed is None:
                continue
            for rd in run.rounds:
                rows.append((i, run.seed, int(num(rd.get("round"), 0)), num(as_dict(rd.get("eval")).get("accuracy"))))
            rows.append((i, run.seed, FINAL, num(as_dict(run.final_round.get("eval")).get("accuracy"))))
    frame = pd.DataFrame(rows, columns=["config", "seed", "at", "accuracy"])
    return frame.groupby(["config", "seed", "at"], sort=False, as_index=False)["accuracy"].mean()


def _bootstrap(d: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile 95 % interval of the mean of `d` over resamples of its entries (the shared seeds)."""
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_differences(stats: Sequence[ConfigStats], baseline: ConfigStats, label: str, bootstrap: int = 0,
                       seed: int = 0) -> Paired:
    """Paired differences of every other configuration to `baseline`, per round and final, over shared seeds."""
    acc = _accuracies(stats)
    b = stats.index(baseline)
    base = acc[acc["config"] == b][["seed", "at", "accuracy"]]
    merged = acc[acc["config"] != b].merge(base, on=["seed", "at"], suffixes=("", "_base"))
    merged["diff"] = merged["accuracy"] - merged["accuracy_base"]
    out = Paired(baseline=baseline.key, baseline_label=label, bootstrap=bootstrap,
                 config_of={r.path: s.key for s in stats for r in s.runs})
    for i, s in enumerate(stats):
        if i == b:
            continue
        mine = merged[merged["config"] == i]
        ats = [*sorted({a for a in acc[acc["config"] == i]["at"] if a != FINAL}), FINAL]
        out.diffs[s.key] = {}
        for at in ats:
            rows = mine[mine["at"] == at].sort_values("seed")
            d = rows["diff"].to_numpy(dtype=float)
            n = len(d)
            pd_ = PairedDiff(seeds=[int(x) for x in rows["seed"]], mean=float(d.mean()) if n else math.nan,
                             sd=float(d.std(ddof=1)) if n > 1 else math.nan)
            if n > 1:
                half = t_quantile(0.975, n - 1) * pd_.sd / math.sqrt(n)
                pd_.ci95_low, pd_.ci95_high = pd_.mean - half, pd_.mean + half
                if bootstrap:
                    pd_.boot95_low, pd_.boot95_high = _bootstrap(d, bootstrap, seed)
            out.diffs[s.key][at] = pd_
    return out
