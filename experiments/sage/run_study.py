"""Run the SAGE studies small enough for a 2-core CPU (tables and plots: experiments/sage/analyze.py).

    python experiments/sage/run_study.py [--studies sage_vs_dpo ablations keep_ratio] [--seeds 0 1 2] [-j 2]
        [--model DIR] [--out outputs/sage_study] [--extra KEY=VALUE ...]

Each run is a plain `alignlab experiment=... hydra.run.dir=<out>/<study>/<config>/seed<k>` (the same command
the README lists as a multirun). Round 1 of every configuration of a seed starts from the same base policy with
the same seed, so its prompts, samples, verdicts and pairs are identical: they (and the base evaluation) are
computed once per seed and copied into each run directory before it starts; the runner's resume logic skips
those complete stages and the copied ledger entries still charge their cost to every run. A run whose
summary.json exists is skipped, so the script can be re-run after an interruption.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED_STAGES = ("prompts", "sample", "verify", "pairs")
GAMMAS = (0.2, 0.4, 0.5, 0.6, 0.8, 1.0)

STUDIES: dict[str, list[tuple[str, list[str]]]] = {
    # same optimiser steps: keep_ratio 0.5 halves the pairs, so the filtered arms take twice the passes
    "sage_vs_dpo": [("dpo_full", ["experiment=sage_vs_dpo", "selector=full", "trainer.epochs=2"]),
                    ("dpo_random", ["experiment=sage_vs_dpo", "selector=random", "trainer.epochs=4"]),
                    ("sage", ["experiment=sage_vs_dpo", "selector=sage", "trainer.epochs=4"])],
    "ablations": [("default", ["experiment=sage_ablations"]),
                  ("no_curriculum", ["experiment=sage_ablations", "selector.curriculum=null"]),
                  ("signal_only", ["experiment=sage_ablations", "selector.score=signal"]),
                  ("no_curvature", ["experiment=sage_ablations", "selector.curvature=false"]),
                  ("summed", ["experiment=sage_ablations", "selector.length_normalized=false"]),
                  ("no_stability", ["experiment=sage_ablations", "selector.score=newton"]),
                  ("boundary_only", ["experiment=sage_ablations", "selector.score=boundary"]),
                  # sensitivity: does a 100x stability term change which pairs are kept?
                  ("stability_x100", ["experiment=sage_ablations", "selector.stability_weight=100"])],
    # reference=fixed: from round 2 on, pool-level margins (policy vs pi_0) are informative
    "pool_fixed": [("dpo_full_fixed", ["experiment=sage_vs_dpo", "selector=full", "reference=fixed", "trainer.epochs=2"]),
                   ("sage_pool_fixed", ["experiment=sage_vs_dpo", "selector=sage", "selector.granularity=pool",
                                        "reference=fixed", "trainer.epochs=4"])],
    "keep_ratio": [(f"gamma_{g}", ["experiment=sage_keep_ratio", f"selector.keep_ratio={g}"]) for g in GAMMAS],
    # the same optimiser steps per gamma without SAGE's choice: random subsets, and DPO full with one pass
    "keep_ratio_controls": [(f"random_gamma_{g}", ["experiment=sage_keep_ratio", "selector=random",
                                                   f"selector.keep_ratio={g}"]) for g in GAMMAS]
    + [("dpo_full_1pass", ["experiment=sage_keep_ratio", "selector=full", "trainer.epochs=1"])],
}


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).stdout.strip()


def run_one(args: list[str], out: Path, cache: Path | None, model: str | None) -> dict:
    """One alignlab run into ``out`` (round 1 pre-seeded from ``cache``); returns a manifest row."""
    if (out / "summary.json").exists():
        return {"dir": str(out), "args": args, "status": "done before"}
    if cache is not None and (cache / "base_eval.json").exists() and not out.exists():
        shutil.copytree(cache, out)
    cmd = ["nice", "-n", "10", sys.executable, "-m", "alignlab.cli", *args, f"hydra.run.dir={out}"]
    cmd += [f"model.path={model}"] if model else []
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "run.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "run.log").write_text(res.stdout + res.stderr)
    status = "ok" if res.returncode == 0 else f"failed ({res.returncode})"
    print(f"[{time.strftime('%H:%M:%S')}] {status:10s} {time.time() - t0:6.0f}s  {out}", flush=True)
    return {"dir": str(out), "args": args, "status": status, "wall_s": round(time.time() - t0, 1)}


def make_cache(run_dir: Path, cache: Path) -> None:
    """Keep what every configuration of this seed shares: base eval + round 1 up to the pairs."""
    if (cache / "base_eval.json").exists() or not (run_dir / "summary.json").exists():
        return
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "round_1").mkdir(parents=True)
    shutil.copy(run_dir / "base_eval.json", tmp / "base_eval.json")
    for f in ("prompts", "rollouts", "verdicts", "pairs"):
        shutil.copy(run_dir / "round_1" / f"{f}.jsonl", tmp / "round_1" / f"{f}.jsonl")
    ledger = json.loads((run_dir / "round_1" / "ledger.json").read_text())
    (tmp / "round_1" / "ledger.json").write_text(json.dumps({k: v for k, v in ledger.items() if k in SHARED_STAGES}))
    tmp.rename(cache)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("-j", "--jobs", type=int, default=2)
    p.add_argument("--model", default=None, help="model.path override (default: the embedded checkpoint)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "sage_study")
    p.add_argument("--extra", nargs="*", default=[], help="overrides appended to every run (e.g. trainer.lr=1e-4)")
    a = p.parse_args()
    jobs = [(study, name, args + a.extra + [f"seed={s}"], a.out / study / name / f"seed{s}", s)
            for study in a.studies for name, args in STUDIES[study] for s in a.seeds]
    manifest: list[dict] = []
    shared = {s: a.out / "_shared" / f"seed{s}" for s in a.seeds}
    first = {s: next(j for j in jobs if j[4] == s) for s in a.seeds if not (shared[s] / "base_eval.json").exists()}
    with ThreadPoolExecutor(a.jobs) as pool:  # one run per seed without a cache computes what the others share
        manifest += list(pool.map(lambda j: run_one(j[2], j[3], None, a.model), first.values()))
    for s, j in first.items():
        make_cache(j[3], shared[s])
    rest = [j for j in jobs if j not in first.values()]
    with ThreadPoolExecutor(a.jobs) as pool:
        manifest += list(pool.map(lambda j: run_one(j[2], j[3], a.out / "_shared" / f"seed{j[4]}", a.model), rest))
    info = {"commit": _sh("git", "rev-parse", "HEAD"), "dirty": _sh("git", "status", "--short", "alignlab", "conf"),
            "model": a.model or "embedded", "machine": f"{os.cpu_count()} CPU cores", "runs": manifest}
    if a.model:
        info["model_sha256"] = hashlib.sha256((Path(a.model) / "model.safetensors").read_bytes()).hexdigest()
    old = json.loads((a.out / "manifest.json").read_text()) if (a.out / "manifest.json").exists() else {}
    (a.out / "manifest.json").write_text(json.dumps({**old, **{k: v for k, v in info.items() if k != "runs"},
                                                     "runs": old.get("runs", []) + manifest}, indent=1))
    return 0 if all(r["status"] in ("ok", "done before") for r in manifest) else 1


if __name__ == "__main__":
    sys.exit(main())
