"""Issue 30's tables, from the committed run files alone (experiments/real_model/study/runs/<arm>/s<seed>/).

1. Round 2 against the warm start, per arm: the same held-out problems, so each seed's pair of checkpoints is
   compared by McNemar's exact test on the per-problem verdicts (``correct`` in eval.json), and the seeds' mean
   difference gets a t 95 % interval.
2. The arms against each other: ``alignlab report --baseline sampler.n=8`` over the same seeds (paired t CIs),
   written to study/report; the FLOPs and tokens come from each round's ledger.json.
3. Wall time per stage, from ledger.json (mean over seeds, per round).

    python experiments/real_model/study_table.py   # prints the README's tables; rewrites study/tables.md, study/report
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from statistics import mean, stdev

from alignlab.report import main as report_main
from alignlab.report.paired import mcnemar_exact, t_quantile

HERE = Path(__file__).resolve().parent
RUNS = HERE / "study" / "runs"
ARMS = {"dpo_r1_n4": "DPO-R1 N=4", "dpo_r1_n8": "DPO-R1 N=8", "pace": "PACE (N=2 + refinement)"}
STAGES = ("sample", "verify", "pairs", "select", "reference", "train", "eval")


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def seeds_of(arm: str) -> list[int]:
    """Seeds whose run finished (summary.json present)."""
    return sorted(int(p.parent.name[1:]) for p in (RUNS / arm).glob("s*/summary.json"))


def t_interval(d: list[float]) -> tuple[float, float, float]:
    m = mean(d)
    if len(d) < 2:
        return m, math.nan, math.nan
    h = t_quantile(0.975, len(d) - 1) * stdev(d) / math.sqrt(len(d))
    return m, m - h, m + h


def round2_vs_warm_start() -> list[str]:
    rows = ["| arm | seeds | warm start | round 2 | difference (95 % CI over seeds) | per seed: only round 2 / only warm "
            "start, McNemar exact p |", "|---|---:|---:|---:|---|---|"]
    for arm, label in ARMS.items():
        seeds = seeds_of(arm)
        if not seeds:
            continue
        base, final, diffs, per_seed = [], [], [], []
        for s in seeds:
            d = RUNS / arm / f"s{s}"
            b, f = _load(d / "base_eval.json"), _load(d / "round_2" / "eval.json")
            if b["prompts_sha1"] != f["prompts_sha1"]:
                raise SystemExit(f"{d}: the warm start and round 2 were evaluated on different problems")
            only_f = sum(x == "1" and y == "0" for x, y in zip(f["correct"], b["correct"]))
            only_b = sum(x == "0" and y == "1" for x, y in zip(f["correct"], b["correct"]))
            base.append(b["accuracy"])
            final.append(f["accuracy"])
            diffs.append(f["accuracy"] - b["accuracy"])
            per_seed.append(f"s{s}: {only_f}/{only_b}, p={mcnemar_exact(only_f, only_b):.2g}")
        m, lo, hi = t_interval(diffs)
        rows.append(f"| {label} | {len(seeds)} | {mean(base):.3f} | {mean(final):.3f} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                    f"| {'; '.join(per_seed)} |")
    return rows


def wall_per_stage() -> list[str]:
    rows = ["| arm | round | " + " | ".join(STAGES) + " | round total | FLOPs (ledger) | generated tokens |",
            "|---|---:|" + "---:|" * (len(STAGES) + 3)]
    for arm, label in ARMS.items():
        seeds = seeds_of(arm)
        for k in (1, 2):
            ledgers = [_load(RUNS / arm / f"s{s}" / f"round_{k}" / "ledger.json") for s in seeds]
            if not ledgers:
                continue
            walls = [mean(lg.get(st, {}).get("wall_s", 0.0) for lg in ledgers) for st in STAGES]
            total = mean(sum(c.get("wall_s", 0.0) for c in lg.values()) for lg in ledgers)
            flops = mean(sum(c.get("flops", 0.0) for c in lg.values()) for lg in ledgers)
            gen = mean(sum(c.get("generated_tokens", 0) for c in lg.values()) for lg in ledgers)
            rows.append(f"| {label} | {k} | " + " | ".join(f"{w:.0f} s" for w in walls)
                        + f" | {total / 60:.1f} min | {flops:.2e} | {gen:,.0f} |")
    return rows


def arms_report() -> None:
    """``alignlab report`` over the committed runs, DPO-R1 N=8 as the baseline (paired t CIs over shared seeds)."""
    dirs = [str(RUNS / arm) for arm in ARMS if seeds_of(arm)]
    report_main([*dirs, "--out", str(HERE / "study" / "report"), "--baseline", "sampler.n=8"])


if __name__ == "__main__":
    tables = "\n".join(round2_vs_warm_start()) + "\n\n" + "\n".join(wall_per_stage()) + "\n"
    print(tables)
    if "--no-report" not in sys.argv:
        (HERE / "study" / "tables.md").write_text(tables)
        arms_report()
