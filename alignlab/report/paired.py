"""Paired differences against a baseline configuration, over the seeds both ran (``alignlab report --baseline``).

Seed s of two configurations shares the data order, the initial model and the held-out set, so the per-seed
difference d_s = acc(config, s) − acc(baseline, s) removes what the seeds have in common. Over the n shared seeds
the report gives mean(d), a t-based 95 % interval mean ± t(0.975, n−1)·sd(d)/√n, and optionally a paired
percentile bootstrap; the t interval is the primary figure. Where every paired eval records its per-problem verdicts
(``eval.correct``, same problems in the same order: equal length and ``prompts_sha1``), the bootstrap resamples
seeds and problems as the crossed factors they are: every seed is evaluated on the same held-out problems, so one
replicate draws n seeds and m problem indices independently and uses the same problem indices for every drawn seed
and both arms (drawing problems anew within each seed would treat them as nested and understate the problem-level
variance by about the seed count). Otherwise it resamples seeds only. ``bootstrap_over`` says which.

With one shared seed there is no spread over seeds; where both evals record verdicts, McNemar's exact test compares
the two checkpoints on the same problems: b = problems only the configuration solves, c = only the baseline, two-sided
p = min(1, 2 P(Binomial(b + c, 1/2) <= min(b, c))).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alignlab.report.aggregate import ConfigStats
from alignlab.report.discovery import Key, Run, as_dict, num

PAIRED_COLUMNS = ["baseline", "paired_seeds", "diff_mean", "ci95_low", "ci95_high"]
BOOT_COLUMNS = ["boot95_low", "boot95_high", "bootstrap_over"]
MCNEMAR_COLUMNS = ["mcnemar_b", "mcnemar_c", "mcnemar_p"]
OVER_PROBLEMS, OVER_SEEDS = "seeds x problems", "seeds"
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
    bootstrap_over: str | None = None  # OVER_PROBLEMS or OVER_SEEDS once a bootstrap ran
    mcnemar_b: int | None = None  # one shared seed with verdicts: problems only the configuration solves
    mcnemar_c: int | None = None  # ... only the baseline solves
    mcnemar_p: float = math.nan  # McNemar's exact two-sided p

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

    @property
    def has_mcnemar(self) -> bool:
        """Whether some configuration has a single-seed McNemar test (its columns are shown only then)."""
        return any(d.mcnemar_b is not None for by_at in self.diffs.values() for d in by_at.values())

    def columns(self, runs: Sequence[Run], run_index: Sequence[int], rounds: Sequence[object]) -> dict[str, list]:
        """report.csv's paired columns, one value per row (a run's round): its configuration's difference at
        that round. Empty for the baseline's own rows and for runs that were not averaged in."""
        cols = PAIRED_COLUMNS + (BOOT_COLUMNS if self.bootstrap else []) + (MCNEMAR_COLUMNS if self.has_mcnemar else [])
        out: dict[str, list] = {c: [] for c in cols}
        for i, rnd in zip(run_index, rounds):
            key = self.config_of.get(runs[int(i)].path)
            d = None
            if key is not None and key != self.baseline:
                d = self.diffs.get(key, {}).get(int(num(rnd, 0)))
            out["baseline"].append(self.baseline_label if key is not None else None)
            values = {} if d is None else {"paired_seeds": d.n, "diff_mean": d.mean, "ci95_low": d.ci95_low,
                                           "ci95_high": d.ci95_high, "boot95_low": d.boot95_low,
                                           "boot95_high": d.boot95_high, "bootstrap_over": d.bootstrap_over,
                                           "mcnemar_b": d.mcnemar_b, "mcnemar_c": d.mcnemar_c,
                                           "mcnemar_p": d.mcnemar_p}
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
    """The one configuration whose runs all have the given values (override, else Hydra's choice, else config).

    When several match, the one labelled by exactly these values wins: ``--baseline experiment=sage_ablations``
    names the study's default arm, not every ablation of it."""
    matches = [s for s in stats if all(s.value(k) == v for k, v in want.items())]
    exact = [s for s in matches if dict(s.key) == want]
    label = " ".join(f"{k}={v}" for k, v in want.items())
    if len(matches) == 1 or len(exact) == 1:
        return (exact or matches)[0]
    if not matches:
        seen = {k: sorted({str(s.value(k)) for s in stats}) for k in want}
        raise BaselineError(f"--baseline {label}: no configuration matches; values found: "
                            + "; ".join(f"{k} in {{{', '.join(v)}}}" for k, v in seen.items()))
    raise BaselineError(f"--baseline {label}: {len(matches)} configurations match ("
                        + "; ".join(s.label for s in matches) + "); add KEY=VALUE words to pick one, or give exactly one configuration's label")


def _evals(stats: Sequence[ConfigStats]) -> pd.DataFrame:
    """Per configuration, seed and round (and ``final``): each run's eval (several rows where runs share a seed)."""
    rows: list[tuple[int, int, int | str, dict[str, Any]]] = []  # at: a round number or FINAL
    for i, s in enumerate(stats):
        for run in s.runs:
            if run.seed is None:
                continue
            for rd in run.rounds:
                rows.append((i, run.seed, int(num(rd.get("round"), 0)), as_dict(rd.get("eval"))))
            rows.append((i, run.seed, FINAL, as_dict(run.final_round.get("eval"))))
    frame = pd.DataFrame(rows, columns=["config", "seed", "at", "eval"])
    frame["accuracy"] = [num(e.get("accuracy")) for e in frame["eval"]]
    return frame


def _problem_diffs(evals: pd.DataFrame, config: int, baseline: int, at: int | str, seeds: list[int]
                   ) -> np.ndarray | None:
    """(seeds × problems) per-problem differences in correctness (−1, 0, 1), or None when some paired eval does
    not record the same problems as its partner: one run per seed and arm, equal ``correct`` lengths across all
    seeds, equal ``prompts_sha1`` within a seed where recorded."""
    rows = []
    for seed in seeds:
        pair = []
        for arm in (config, baseline):
            ev = evals[(evals["config"] == arm) & (evals["seed"] == seed) & (evals["at"] == at)]["eval"].tolist()
            correct = ev[0].get("correct") if len(ev) == 1 else None
            if not isinstance(correct, str) or not correct or set(correct) - {"0", "1"}:
                return None
            pair.append((np.frombuffer(correct.encode(), dtype=np.uint8) - ord("0"), ev[0].get("prompts_sha1")))
        (mine, sha_m), (base, sha_b) = pair
        if len(mine) != len(base) or (sha_m and sha_b and sha_m != sha_b):
            return None
        rows.append(mine.astype(np.int8) - base.astype(np.int8))
    return np.stack(rows) if rows and len({len(r) for r in rows}) == 1 else None


def crossed_means(diffs: np.ndarray, resamples: int, seed: int, chunk: int = 256) -> np.ndarray:
    """Bootstrap replicates of the mean of a (seeds x problems) difference matrix, seeds and problems crossed: each
    replicate draws seed rows and problem columns independently, with replacement, the same columns for every drawn
    row (and, as the matrix holds differences, for both arms)."""
    rng = np.random.default_rng(seed)
    n_seeds, n_problems = diffs.shape
    means = []
    for start in range(0, resamples, chunk):
        c = min(chunk, resamples - start)
        drawn_seeds = rng.integers(0, n_seeds, size=(c, n_seeds))
        drawn_problems = rng.integers(0, n_problems, size=(c, n_problems))
        means.append(diffs[drawn_seeds[:, :, None], drawn_problems[:, None, :]].mean(axis=(1, 2)))
    return np.concatenate(means) if means else np.zeros(0)


def _bootstrap_problems(diffs: np.ndarray, resamples: int, seed: int, chunk: int = 256) -> tuple[float, float]:
    """Percentile 95 % interval of the mean per-problem difference over crossed seed x problem resamples."""
    lo, hi = np.percentile(crossed_means(diffs, resamples, seed, chunk), [2.5, 97.5])
    return float(lo), float(hi)


def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact two-sided p for b and c discordant problems (one checkpoint right where the other is wrong):
    under no difference each discordant problem falls either way with probability 1/2."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _bootstrap(d: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile 95 % interval of the mean of `d` over resamples of its entries (the shared seeds)."""
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_differences(stats: Sequence[ConfigStats], baseline: ConfigStats, label: str, bootstrap: int = 0,
                       seed: int = 0) -> Paired:
    """Paired differences of every other configuration to `baseline`, per round and final, over shared seeds."""
    evals = _evals(stats)
    acc = evals.groupby(["config", "seed", "at"], sort=False, as_index=False)["accuracy"].mean()
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
            problems = _problem_diffs(evals, i, b, at, pd_.seeds) if bootstrap and n else None
            if n == 1:
                one = _problem_diffs(evals, i, b, at, pd_.seeds)
                if one is not None:
                    pd_.mcnemar_b, pd_.mcnemar_c = int((one == 1).sum()), int((one == -1).sum())
                    pd_.mcnemar_p = mcnemar_exact(pd_.mcnemar_b, pd_.mcnemar_c)
            if problems is not None:
                pd_.boot95_low, pd_.boot95_high = _bootstrap_problems(problems, bootstrap, seed)
                pd_.bootstrap_over = OVER_PROBLEMS
            elif bootstrap and n > 1:
                pd_.boot95_low, pd_.boot95_high = _bootstrap(d, bootstrap, seed)
                pd_.bootstrap_over = OVER_SEEDS
            out.diffs[s.key][at] = pd_
    return out
