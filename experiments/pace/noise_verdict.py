"""Issue 29's noise grid, from the committed run files (experiments/pace/results/i29/runs/<arm>/s<seed>/summary.json).

Per arm and noise level: final accuracy and corrupted pairs per prompt (pairs whose chosen response the verifier
accepted but the true verdict rejects: chosen_false_positive_rate x pairs / prompts, averaged over rounds), mean
over the seeds. Then the claim "scaling N amplifies verifier noise" as an accuracy effect: the accuracy that noise
costs an arm, drop(eps) = acc(eps) - acc(0) for the same seed, compared between arms by paired differences over the
seeds (difference in differences), with a t 95 % interval.

    python experiments/pace/noise_verdict.py            # seeds found under results/i29/runs
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean, stdev

from alignlab.report.paired import t_quantile

RUNS = Path(__file__).resolve().parent / "results" / "i29" / "runs"
PROMPTS = 512
EPS = ("0", "0.1", "0.2")
ARMS = {"PACE (`arith_steps` off)": "pace_noarith_eps{e}", **{f"DPO-R1 N={n}": f"dpo_r1_n{n}_eps{{e}}" for n in (2, 4, 8, 16)}}


def run_dir(arm: str, eps: str, seed: int) -> Path:
    name = ARMS[arm].format(e=eps)
    if eps == "0" and name.startswith("dpo_r1"):
        name = name.rsplit("_eps", 1)[0]  # eps 0 for DPO-R1 is the main study's run
    return RUNS / name / f"s{seed}"


def seeds() -> list[int]:
    """Seeds for which every cell of the grid finished."""
    found = sorted(int(p.name[1:]) for p in (RUNS / "pace_noarith_eps0.2").glob("s*"))
    return [s for s in found if all((run_dir(a, e, s) / "summary.json").exists() for a in ARMS for e in EPS)]


def cell(arm: str, eps: str, seed: int) -> tuple[float, float, float]:
    """Final accuracy, corrupted pairs per prompt (mean over rounds), FLOPs (the ledger's, summed over rounds)."""
    s = json.loads((run_dir(arm, eps, seed) / "summary.json").read_text())
    corrupted = mean(r["chosen_false_positive_rate"] * r["pairs"] / PROMPTS for r in s["rounds"])
    return s["final_accuracy"], corrupted, sum(r["ledger"]["flops"] for r in s["rounds"])


def t_ci(d: list[float]) -> str:
    m = mean(d)
    h = t_quantile(0.975, len(d) - 1) * stdev(d) / math.sqrt(len(d))
    return f"{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]"


def main() -> None:
    ss = seeds()
    print(f"seeds {ss}\n")
    print("| arm | eps = 0: final acc | eps = 0.1: final acc / corrupted pairs per prompt | "
          "eps = 0.2: final acc / corrupted pairs per prompt |\n|---|---:|---:|---:|")
    for arm in ARMS:
        cells = {e: [cell(arm, e, s) for s in ss] for e in EPS}
        acc = {e: mean(c[0] for c in cells[e]) for e in EPS}
        cor = {e: mean(c[1] for c in cells[e]) for e in EPS}
        print(f"| {arm} | {acc['0']:.3f} | {acc['0.1']:.3f} / {cor['0.1']:.3f} | {acc['0.2']:.3f} / {cor['0.2']:.3f} |")
    print("\nCorrupted pairs per prompt, paired by seed (t 95 % CI), and the FLOPs ratio of the two arms:\n")
    print("| comparison | eps | n seeds | difference [95 % CI] | FLOPs ratio |\n|---|---|---:|---|---:|")
    for a, b in (("DPO-R1 N=16", "DPO-R1 N=2"), ("PACE (`arith_steps` off)", "DPO-R1 N=16")):
        for e in ("0.1", "0.2"):
            d = [cell(a, e, s)[1] - cell(b, e, s)[1] for s in ss]
            ratio = mean(cell(a, e, s)[2] for s in ss) / mean(cell(b, e, s)[2] for s in ss)
            print(f"| {a} vs {b} | {e} | {len(ss)} | {t_ci(d)} | {ratio:.2f} |")
    print("\nAccuracy lost to noise, drop = acc(eps) - acc(0) per seed; paired difference of drops, t 95 % CI over "
          "the seeds:\n")
    print("| comparison | eps | n seeds | drop (first) | drop (second) | difference of drops [95 % CI] |\n"
          "|---|---|---:|---:|---:|---|")
    for a, b in (("DPO-R1 N=16", "DPO-R1 N=2"), ("DPO-R1 N=8", "DPO-R1 N=2"), ("PACE (`arith_steps` off)", "DPO-R1 N=16")):
        for e in ("0.1", "0.2"):
            da = [cell(a, e, s)[0] - cell(a, "0", s)[0] for s in ss]
            db = [cell(b, e, s)[0] - cell(b, "0", s)[0] for s in ss]
            print(f"| {a} vs {b} | {e} | {len(ss)} | {mean(da):+.3f} | {mean(db):+.3f} | "
                  f"{t_ci([x - y for x, y in zip(da, db)])} |")


if __name__ == "__main__":
    main()
