"""Tables and plots for the SAGE studies run by run_study.py.

    python experiments/sage/analyze.py [--runs outputs/sage_study] [--out experiments/sage/results]

Writes `alignlab report` outputs per study (report.md/csv + plots) and, next to them, sage_tables.md
(accuracy, tokens, scoring cost, gradient statistics, kept fraction per difficulty bucket), runs.json
(the compact per-run numbers the tables come from) and SAGE-specific plots.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from alignlab.records import Selected, read_jsonl  # noqa: E402
from alignlab.select.curriculum import Curriculum  # noqa: E402

BUCKETS = ("easy", "medium", "hard")
# study -> the run folders its report compares
REPORTS = {"sage_vs_dpo": ["sage_vs_dpo"], "ablations": ["ablations"],
           "keep_ratio": ["keep_ratio", "keep_ratio_controls"], "pool_fixed": ["pool_fixed"]}


def run_stats(d: Path) -> dict | None:
    """The numbers of one run directory (None if it did not finish)."""
    if not (d / "summary.json").exists():
        return None
    s = json.loads((d / "summary.json").read_text())
    out = {"dir": str(d.relative_to(d.parents[2])), "seed": s["seed"], "base": s["base"]["accuracy"],
           "final": s["rounds"][-1]["eval"]["accuracy"], "acc": [r["eval"]["accuracy"] for r in s["rounds"]],
           "trained_tokens": sum(r["ledger"]["trained_tokens"] for r in s["rounds"]),
           "flops": sum(r["ledger"]["flops"] for r in s["rounds"]), "params": s.get("params", 0),
           # runs whose ledger has forward_tokens already count the filter's scoring forwards in the train stage
           "scoring_in_ledger": all("forward_tokens" in r["ledger"] for r in s["rounds"]),
           "steps": sum(r["train"].get("steps", 0) for r in s["rounds"]), "score_tokens": 0,
           "step_log": [], "avail": dict.fromkeys(BUCKETS, 0), "kept": dict.fromkeys(BUCKETS, 0),
           "hist": {}}
    cur = Curriculum()
    for k in range(1, len(s["rounds"]) + 1):
        rd = d / f"round_{k}"
        ts = json.loads((rd / "train_steps.json").read_text()) if (rd / "train_steps.json").exists() else {}
        out["step_log"] += [{a: st.get(a) for a in ("grad_norm", "grad_var_micro", "grad_snr", "loss",
                                                    "rewards/margins", "rewards/accuracies")} | {"round": k}
                            for st in ts.get("steps", [])]
        out["score_tokens"] += ts.get("score_forward_tokens", 0)
        if "buckets" in ts:  # step granularity: candidates seen vs kept, over all passes
            for b, v in ts["buckets"].items():
                if b in BUCKETS:
                    out["avail"][b] += v["candidates"]
                    out["kept"][b] += v["kept"]
            _add_hists(out["hist"], ts)
            continue
        pairs = read_jsonl(rd / "pairs.jsonl")
        sel = [s.pair for s in read_jsonl(rd / "selected.jsonl", Selected)]  # flat now, nested in older runs
        info = sel[0].meta.get("sage_round", {}) if sel else {}
        if "score_hist_all" in info:  # pool granularity: the round's histograms ride on the first kept pair
            _add_hists(out["hist"], info)
        for p in pairs:
            b = cur.bucket(p["meta"].get("pass_rate"))
            out["avail"][b] = out["avail"].get(b, 0) + 1
        for x in sel:
            b = cur.bucket(x.meta.get("pass_rate"))
            out["kept"][b] = out["kept"].get(b, 0) + 1
    return out


def _add_hists(acc: dict, src: dict) -> None:
    for h in ("score_hist_all", "score_hist_kept", "margin_hist_all", "margin_hist_kept"):
        acc[h] = (np.add(acc[h], src[h]) if h in acc else np.asarray(src[h])).tolist()
    acc["score_edges"], acc["margin_edges"] = src["score_log10_edges"], src["margin_edges"]


def mean_se(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return ""
    m = float(np.mean(xs))
    se = float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else float("nan")
    whole = all(float(x).is_integer() for x in xs)
    fmt = (lambda v: f"{v:,.0f}") if abs(m) >= 1000 or (whole and abs(m) >= 10) else \
        (lambda v: f"{v:.1f}") if whole or abs(m) >= 10 else (lambda v: f"{v:.3f}")
    return fmt(m) + (f" ± {fmt(se)}" if math.isfinite(se) else "")


def table(configs: dict[str, list[dict]]) -> list[str]:
    head = ["configuration", "seeds", "base acc", "final acc", "Δ acc", "opt. steps", "trained tokens",
            "scoring fwd tokens", "total FLOPs (incl. scoring)", "grad norm", "grad var (micro)", "grad SNR (median)",
            *[f"kept {b}" for b in BUCKETS]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, runs in configs.items():
        def per_run(f):
            return [f(r) for r in runs]
        steps = [[st for st in r["step_log"]] for r in runs]
        gn = [np.mean([st["grad_norm"] for st in s]) if s else None for s in steps]
        gv = [np.mean([st["grad_var_micro"] for st in s if st["grad_var_micro"] is not None]) if s else None
              for s in steps]
        snr = [np.median([st["grad_snr"] for st in s if st["grad_snr"] is not None]) if s else None for s in steps]
        avail = {b: sum(r["avail"][b] for r in runs) for b in BUCKETS}
        kept = [f"{sum(r['kept'][b] for r in runs) / avail[b]:.2f}" if avail[b] else "n/a" for b in BUCKETS]
        row = [f"`{name}`", str(len(runs)), mean_se(per_run(lambda r: r["base"])),
               f"**{mean_se(per_run(lambda r: r['final']))}**", mean_se(per_run(lambda r: r["final"] - r["base"])),
               mean_se(per_run(lambda r: r["steps"])), mean_se(per_run(lambda r: r["trained_tokens"])),
               mean_se(per_run(lambda r: r["score_tokens"])),
               f"{np.mean(per_run(lambda r: r['flops'] + (0 if r['scoring_in_ledger'] else 2 * r['params'] * r['score_tokens']))):.3g}",
               mean_se(gn), mean_se(gv), mean_se(snr), *kept]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def plots(configs: dict[str, list[dict]], out: Path, prefix: str) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from alignlab.report.plots import new_axes

    written = []

    def fig_ax(title, xlabel, ylabel):
        return new_axes(title, xlabel, ylabel, height=4.2)

    for key, label in (("grad_var_micro", "gradient variance across micro-batches"), ("grad_norm", "gradient norm")):
        fig, ax = fig_ax(f"{label} per optimiser step (mean over seeds; rounds concatenated)", "step", label)
        for name, runs in configs.items():
            n = min(len(r["step_log"]) for r in runs)
            if n == 0:
                continue
            ys = np.array([[st[key] if st[key] is not None else np.nan for st in r["step_log"][:n]] for r in runs])
            ax.plot(range(n), np.nanmean(ys, 0), label=name)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        name = f"{prefix}_{key}_per_step.png"
        fig.savefig(out / name, bbox_inches="tight")
        written.append(name)
    fig, ax = fig_ax("final accuracy vs trained tokens (mean ± SE over seeds)", "trained tokens (all rounds)",
                     "final held-out accuracy")
    for j, (name, runs) in enumerate(configs.items()):
        xs, ys = [r["trained_tokens"] for r in runs], [r["final"] for r in runs]
        se = float(np.std(ys, ddof=1) / math.sqrt(len(ys))) if len(ys) > 1 else 0.0
        mark = "s" if name.startswith("random") else "D" if name.startswith("dpo") else "o"
        ax.errorbar([np.mean(xs)], [np.mean(ys)], yerr=[se], fmt=mark, color=f"C{j % 10}", capsize=3, label=name)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(out / f"{prefix}_acc_vs_trained_tokens.png", bbox_inches="tight")
    written.append(f"{prefix}_acc_vs_trained_tokens.png")
    for name, runs in configs.items():
        hs = [r["hist"] for r in runs if r["hist"]]
        if not hs:
            continue
        fig = Figure(figsize=(10, 3.8), dpi=100)
        FigureCanvasAgg(fig)
        for j, (kind, edges_key, xl) in enumerate((("score", "score_edges", "log10 SAGE score"),
                                                  ("margin", "margin_edges", "margin z = beta * h (scaled)"))):
            ax = fig.add_subplot(1, 2, j + 1)
            edges = np.asarray(hs[0][edges_key])
            for part, color in (("all", "C7"), ("kept", "C0")):
                counts = np.sum([h[f"{kind}_hist_{part}"] for h in hs], 0)
                ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", alpha=0.6, color=color,
                       label=f"{part} candidates" if part == "all" else "kept")
            ax.set_xlabel(xl)
            ax.set_ylabel("pairs (all seeds, rounds, passes)")
            ax.legend(fontsize=7)
        fig.suptitle(f"{name}: scores of candidates vs kept pairs (edge bins include overflow)")
        fn = f"{prefix}_{name}_score_hist.png"
        fig.savefig(out / fn, bbox_inches="tight")
        written.append(fn)
    return written


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, default=ROOT / "outputs" / "sage_study")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "sage" / "results")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    md = ["# SAGE study tables (generated by experiments/sage/analyze.py)", "",
          "Mean ± SE over seeds. `opt. steps` and token counts are totals over rounds. `scoring fwd tokens`: extra",
          "no-grad forward tokens spent on SAGE scores (start-policy pass + every candidate batch); total FLOPs add",
          "2·params·scoring tokens to the ledger's FLOPs. Grad statistics are per optimiser step (2 micro-batches of",
          "kept pairs each), averaged over the run's steps. `kept <bucket>`: kept / candidates per pass-rate bucket",
          "(easy ≥ 0.75 > medium ≥ 0.25 > hard), pooled over seeds and rounds.", ""]
    compact = {}
    for study, dirs in REPORTS.items():
        roots = [a.runs / x for x in dirs if (a.runs / x).exists()]
        if not roots:
            continue
        subprocess.run([sys.executable, "-m", "alignlab.cli", "report", *map(str, roots), "--out",
                        str(a.out / study)], cwd=ROOT, check=False)
        configs: dict[str, list[dict]] = {}
        for root in roots:
            cfg_dirs = [root] if list(root.glob("seed*")) else sorted(x for x in root.iterdir() if x.is_dir())
            for c in cfg_dirs:
                runs = [r for r in (run_stats(s) for s in sorted(c.glob("seed*"))) if r]
                if runs:
                    configs[c.name] = runs
        if not configs:
            continue
        md += [f"## {study}", "", *table(configs), ""]
        md += [f"![{x}]({x})" for x in plots(configs, a.out, study)] + [""]
        compact[study] = {k: [{x: r[x] for x in ("dir", "seed", "base", "final", "acc", "trained_tokens", "steps",
                                                 "score_tokens", "flops", "avail", "kept")} for r in v]
                          for k, v in configs.items()}
    (a.out / "sage_tables.md").write_text("\n".join(md))
    (a.out / "runs.json").write_text(json.dumps(compact, indent=1))
    print(f"wrote {a.out / 'sage_tables.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
