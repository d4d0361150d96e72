"""`alignlab report <dir>...`: arguments, checks that fail before any output is written, then the outputs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignlab.report.aggregate import aggregate
from alignlab.report.discovery import load_runs
from alignlab.report.paired import BaselineError, find_baseline, paired_differences, parse_baseline
from alignlab.report.plots import write_plots
from alignlab.report.render import write_csv, write_markdown


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
    p.add_argument(
        "--baseline",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        help="add each configuration's paired difference to the configuration with these values (for example "
        "selector=full), over the seeds both ran: mean and t-based 95%% CI (ci95_low, ci95_high). Put it after "
        "the dirs, since it takes every following word.",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="RESAMPLES",
        help="with --baseline, also a percentile bootstrap 95%% CI over the shared seeds (for example 10000); "
        "0 = off",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `alignlab report`; returns a process exit code (0 written, 2 bad arguments or no runs)."""
    args = build_parser().parse_args(argv)
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"alignlab report: not a directory: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    if args.bootstrap < 0 or (args.bootstrap and not args.baseline):
        print("alignlab report: --bootstrap needs --baseline and a resample count >= 0", file=sys.stderr)
        return 2
    runs = load_runs(args.dirs)
    if not runs:
        print(
            f"alignlab report: no runs (summary.json or .hydra/) below {', '.join(map(str, args.dirs))}: "
            "give the directory of a run (hydra.run.dir) or of a multirun sweep",
            file=sys.stderr,
        )
        return 2
    stats = aggregate(runs, by=args.by)
    paired = None
    if args.baseline:
        try:
            want = parse_baseline(args.baseline)
            baseline = find_baseline(stats, want)
        except BaselineError as e:
            print(f"alignlab report: {e}", file=sys.stderr)
            return 2
        paired = paired_differences(stats, baseline, " ".join(args.baseline), bootstrap=args.bootstrap)
    out = (args.out or args.dirs[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(stats, out)
    md = write_markdown(runs, stats, out, plots, paired)
    write_csv(runs, out, paired, by=args.by)
    bad = sum(not r.ok for r in runs)
    print(f"{len(runs)} runs ({bad} failed or incomplete), {len(stats)} configurations -> {md}")
    return 0
