"""PACE-specific columns that `alignlab report` does not show, from the runs' own artifacts.

Per configuration (runs grouped like `alignlab report` does, averaged over seeds): effective N (samples per
prompt, from the ledger), false-positive rate of the chosen responses (summary's chosen_false_positive_rate) and
pairs with a false-positive chosen response per prompt,
pairs and their kinds, refinement gate outcomes (rollouts.jsonl meta["gate"]), the mean policy log-prob per token
of the chosen responses under the round's starting policy (proximity: read from the runner's cached
ref_logps.*.json, which hold log pi_t(chosen | plain prompt) when reference=previous_round), and compute relative
to a reference configuration.

    python experiments/pace/pace_stats.py <run or sweep dirs>... [--ref 'sampler.n=16']
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

from alignlab.report import load_runs, mean_se, short_labels


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "__complete__" not in r]


def run_stats(run) -> dict[str, float]:
    """One run's PACE numbers, averaged over rounds (counts summed)."""
    eff, fp, corr_share, prox, corrupted = [], [], [], [], []
    gates: Counter = Counter()
    for r in run.rounds:
        led = r.get("ledger") or {}
        eff.append(led.get("samples", 0) / max(1, led.get("prompts", 0)))
        fp.append(float(r.get("chosen_false_positive_rate", math.nan)))
        # pairs whose chosen response is a false positive, per prompt (fp_amplification.py's "corrupted pairs")
        corrupted.append(fp[-1] * r.get("pairs", 0) / max(1, led.get("prompts", 0)))
        rd = run.path / f"round_{r['round']}"
        pairs = _rows(rd / "pairs.jsonl")
        kinds = Counter(p["meta"].get("kind") for p in pairs)
        corr_share.append(kinds["corrective"] / max(1, len(pairs)))
        for f in sorted(rd.glob("ref_logps.*.json"))[:1]:
            lp = json.loads(f.read_text())
            prox += [c / max(1, n) for c, n in zip(lp["chosen"], lp["chosen_tokens"])]
        gates.update(x["meta"].get("gate") for x in _rows(rd / "rollouts.jsonl") if x.get("source") == "refined")
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    refined = sum(gates.values())
    return {"eff_n": mean(eff), "fp": mean(fp), "corrupted": mean(corrupted), "corrective_share": mean(corr_share),
            "pass_rate": gates.get("pass", 0) / refined if refined else math.nan,
            "gates": dict(gates), "chosen_lp": mean(prox)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--ref", default=None, help="label substring of the configuration FLOPs are compared to")
    ap.add_argument("--by", nargs="*", default=None, help="group by these keys instead of the overrides")
    args = ap.parse_args()
    from alignlab.report import aggregate

    runs = load_runs(args.dirs)
    stats = aggregate(runs, by=args.by)
    labels, _ = short_labels(stats)
    per = {s.key: [run_stats(r) for r in s.runs] for s in stats}
    ref = next((s for s in stats if args.ref and args.ref in labels[s.key]), None)
    print("| configuration | seeds | final acc | effective N | gen tokens | FLOPs | FLOPs vs ref | FP rate of chosen "
          "| FP-chosen pairs per prompt | log pi_t(chosen)/token | corrective share of pairs | refinements passing gates "
          "| gate rejections (summed over seeds) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for s in stats:
        ps = per[s.key]
        eff, fp = mean_se([p["eff_n"] for p in ps]), mean_se([p["fp"] for p in ps])
        corrupted = mean_se([p["corrupted"] for p in ps])
        prox = mean_se([p["chosen_lp"] for p in ps])
        share = mean_se([p["corrective_share"] for p in ps])
        passing = [p["pass_rate"] for p in ps if not math.isnan(p["pass_rate"])]
        gates: Counter = Counter()
        for p in ps:
            gates.update(p["gates"])
        rej = ", ".join(f"{k}: {v}" for k, v in sorted(gates.items()) if k != "pass") or "-"
        ratio = s.totals["flops"].mean / ref.totals["flops"].mean if ref else math.nan
        print(f"| `{labels[s.key]}` | {s.n_seeds} | {s.final.fmt()} | {eff.mean:.2f} | "
              f"{s.totals['generated_tokens'].mean:,.0f} | {s.totals['flops'].mean:.3g} | {ratio:.2f} | "
              f"{fp.fmt()} | {corrupted.fmt()} | {prox.mean:.3f} | {share.mean:.2f} | {mean_se(passing).mean:.2f} | {rej} |")


if __name__ == "__main__":
    main()
