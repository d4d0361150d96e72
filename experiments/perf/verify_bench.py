"""Verifier acceptance and throughput on the 8 real benchmarks.

    .venv/bin/python experiments/perf/verify_bench.py [--root ../shared/data/benchmarks]

(a) a response ending "... so the answer is \\boxed{<gold>}" must verify True for >= 99.5% of rows;
(b) the same response with a different row's (different) gold must verify False for >= 99.5% of rows;
both with the default verifier and with the string/number fast path off (every item through sympy), which
shows that gold normalisation, not just string identity, carries (a).

(c) throughput of MathVerifier.verify_batch against raw single-process math-verify on college_math and
minerva_math, on four workloads drawn from the same rows: "right" (the (a) responses), "wrong" (the (b)
responses: no shortcut can prove two expressions different, so this is the worst case), "mixed" (both), and
"rollout" (8 samples per problem as a sampler produces them: 4 right in two formats, 4 wrong with a repeated
wrong answer). Two raw baselines: ``verify(parse(gold), parse(response))`` exactly as written (bare gold
strings often fail to parse, which makes it fast and wrong) and with the gold as ``$gold$`` (how bare golds
must be given to math-verify). Also the slowest single check, and the ceiling that math-verify's own parser
puts on wrong answers (``parse_floor``: the parses no verifier can skip, spread over the workers).
Writes experiments/perf/verify_results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from alignlab.data.benchmarks import BENCHMARKS, load_benchmark  # noqa: E402
from alignlab.verify import MathVerifier, answer_key, extract_answer, normalize_answer  # noqa: E402

TARGET = 0.995


def response(gold: str) -> str:
    return f"Let me work through this carefully step by step.\nPutting it all together, so the answer is \\boxed{{{gold}}}."


def minerva_response(gold: str) -> str:
    return f"Some steps.\nFinal Answer: The final answer is ${gold}$. I hope it is correct."


def wrong_golds(golds: list[str], seed: int) -> list[str]:
    """For row i, the gold of another row whose gold differs (as a normalised string) from row i's."""
    rng = random.Random(seed)
    keys = [answer_key(normalize_answer(g)) for g in golds]
    out = []
    n = len(golds)
    for i in range(n):
        start = rng.randrange(1, n)
        for k in range(n - 1):
            j = (i + start + k) % n
            if j != i and keys[j] != keys[i]:
                out.append(golds[j])
                break
        else:
            raise RuntimeError("all golds identical")
    return out


def warm_up(v: MathVerifier) -> None:
    """Start every worker process: pairs that the exact fast path cannot decide go to the pool (a plain number
    like \\boxed{1} never reaches it, so it would leave the pool's start-up inside the timed region)."""
    pairs = [(f"\\boxed{{x+{k}}}", f"{k}+x") for k in range(max(2, v.workers))]  # distinct: the verifier dedupes
    v.verify_batch([p for p, _ in pairs], [g for _, g in pairs])


def timed_batch(v: MathVerifier, preds: list[str], golds: list[str]) -> tuple[list[bool], float]:
    t = time.perf_counter()
    res = v.verify_batch(preds, golds)
    return res, time.perf_counter() - t


def raw_rate(preds: list[str], golds: list[str], wrap_gold: bool) -> dict:
    """Single-process math-verify as most pipelines call it: parse both strings for every check."""
    from math_verify import parse, verify

    times = []
    ok = 0
    t0 = time.perf_counter()
    for p, g in zip(preds, golds):
        t = time.perf_counter()
        ok += bool(verify(parse(f"${g}$" if wrap_gold else g), parse(p)))
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    return {"checks_per_s": len(preds) / total, "max_check_s": max(times), "true": ok}


def parse_floor(preds: list[str], golds: list[str], workers: int) -> dict:
    """The parses a fresh verifier cannot skip on a workload of new wrong answers, timed with math-verify's
    ``parse`` in this single, already warm process (the raw passes parsed the same strings): each distinct gold
    (parsed once, then cached) and each distinct extracted prediction (no cache holds an answer never seen, and
    no string or number shortcut proves two expressions different). ``ceiling_checks_per_s`` = ``workers`` x
    checks / that time: the most any verifier built on math-verify's parser can do here with ``workers``
    processes, even if comparing took no time. ``pred_only_*``: the same if every gold were already parsed."""
    from collections import OrderedDict

    from math_verify.parser import parse_latex_cached

    from alignlab.verify._worker import _parse  # the workers' own parse call, here with an empty cache

    def timed(strings: list[str]) -> float:
        parse_latex_cached.cache_clear()
        t0 = time.perf_counter()
        for a in strings:
            _parse(a, OrderedDict())
        return time.perf_counter() - t0

    answers = list(dict.fromkeys(normalize_answer(e) for e in map(extract_answer, preds) if e is not None))
    gold_answers = list(dict.fromkeys(normalize_answer(g) for g in golds))
    gold_s, pred_s = timed(gold_answers), timed(answers)
    return {
        "checks": len(preds),
        "distinct_golds": len(gold_answers),
        "distinct_predictions": len(answers),
        "ms_per_gold_parse": 1000 * gold_s / len(gold_answers),
        "ms_per_prediction_parse": 1000 * pred_s / len(answers),
        "ceiling_checks_per_s": workers * len(preds) / (gold_s + pred_s),
        "pred_only_ceiling_checks_per_s": workers * len(preds) / pred_s,
    }


def workloads(golds: list[str], others: list[str], n: int, seed: int) -> dict[str, tuple[list[str], list[str], int]]:
    """name -> (responses, golds, number that should verify True), ``n`` items each."""
    rng = random.Random(seed)
    rows = list(range(len(golds)))
    pick = rng.sample(rows, min(n, len(rows)))
    out = {
        "right": ([response(golds[i]) for i in pick], [golds[i] for i in pick], len(pick)),
        "wrong": ([response(others[i]) for i in pick], [golds[i] for i in pick], 0),
    }
    half = pick[: len(pick) // 2]
    out["mixed"] = (
        [response(golds[i]) for i in half] + [response(others[i]) for i in half],
        [golds[i] for i in half] * 2,
        len(half),
    )
    preds, gs = [], []
    for i in rng.sample(rows, min(n // 8, len(rows))):
        w1, w2 = others[i], others[(i + 1) % len(rows)]
        for p in (response(golds[i]),) * 3 + (minerva_response(golds[i]), response(w1), response(w1)):
            preds.append(p)
        preds += [response(w2), "I could not finish this one."]
        gs += [golds[i]] * 8
    out["rollout"] = (preds, gs, len(gs) // 2)
    return out


def repo_relative(arg: str) -> str:
    """A command-line argument with a path inside the repository made relative, so a results file names no machine."""
    key, eq, value = arg.rpartition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
    if Path(value).is_absolute():
        try:
            value = str(Path(value).resolve().relative_to(REPO.resolve()))
        except ValueError:
            pass
    return key + eq + value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "benchmarks"))
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n", type=int, default=160, help="items per throughput workload")
    ap.add_argument("--skip-sympy-pass", action="store_true", help="skip (a)/(b) with the fast path off")
    ap.add_argument("--out", default=str(REPO / "experiments" / "perf" / "verify_results.json"))
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # raw math-verify warns on every unparsable string

    results: dict = {
        "command": "python experiments/perf/verify_bench.py " + " ".join(map(repo_relative, sys.argv[1:])),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(),
            "python": platform.python_version(),
            "math_verify": version("math-verify"),
            "platform": platform.platform(),
        },
        "config": {"timeout_s": args.timeout, "workers": args.workers, "n": args.n, "target": TARGET},
        "benchmarks": {},
        "throughput": {},
        "wrong_answer_ceiling": {},
    }
    t_start = time.perf_counter()
    fast = MathVerifier(timeout_s=args.timeout, workers=args.workers)
    slow = MathVerifier(timeout_s=args.timeout, workers=args.workers, fast_path=False)
    data = {}
    for name in BENCHMARKS:
        probs = load_benchmark(name, args.root)
        golds = [p.answer for p in probs]
        others = wrong_golds(golds, seed=0)
        good = [response(g) for g in golds]
        bad = [response(g) for g in others]
        data[name] = (golds, others)
        row: dict = {"n": len(probs)}
        ra, ta = timed_batch(fast, good, golds)
        rb, tb = timed_batch(fast, bad, golds)
        row["a_true_rate"] = sum(ra) / len(ra)
        row["b_false_rate"] = 1 - sum(rb) / len(rb)
        row["a_failures"] = [golds[i] for i, r in enumerate(ra) if not r][:10]
        row["b_failures"] = [[golds[i], others[i]] for i, r in enumerate(rb) if r][:10]
        if not args.skip_sympy_pass:
            sa, _ = timed_batch(slow, good, golds)
            sb, _ = timed_batch(slow, bad, golds)
            row["a_true_rate_sympy"] = sum(sa) / len(sa)
            row["b_false_rate_sympy"] = 1 - sum(sb) / len(sb)
            row["a_failures_sympy"] = [golds[i] for i, r in enumerate(sa) if not r][:10]
            row["b_failures_sympy"] = [[golds[i], others[i]] for i, r in enumerate(sb) if r][:10]
        row["pass"] = row["a_true_rate"] >= TARGET and row["b_false_rate"] >= TARGET
        results["benchmarks"][name] = row
        print(f"{name:14s} n={len(probs):5d}  (a) {row['a_true_rate']:.4f}  (b) {row['b_false_rate']:.4f}", flush=True)
    max_item = max(fast.stats.max_item_s, slow.stats.max_item_s)
    timeouts = fast.stats.timeouts + slow.stats.timeouts
    fast.close()
    slow.close()

    for name in ("college_math", "minerva_math"):
        golds, others = data[name]
        entry: dict = {}
        for kind, (preds, gs, expect) in workloads(golds, others, args.n, seed=1).items():
            raw = raw_rate(preds, gs, wrap_gold=False)
            raw_wrapped = raw_rate(preds, gs, wrap_gold=True)
            v = MathVerifier(timeout_s=args.timeout, workers=args.workers)  # fresh: parse caches empty
            warm_up(v)  # start the worker processes outside the timed region
            res, t = timed_batch(v, preds, gs)
            max_item = max(max_item, v.stats.max_item_s)
            timeouts += v.stats.timeouts
            counts = dict(v.counts)
            v.close()
            cps = len(preds) / t
            if kind == "wrong":
                floor = parse_floor(preds, gs, args.workers)
                for k in ("ceiling", "pred_only_ceiling"):
                    floor[f"{k}_vs_raw"] = floor[f"{k}_checks_per_s"] / raw["checks_per_s"]
                    floor[f"{k}_vs_raw_gold_in_dollars"] = floor[f"{k}_checks_per_s"] / raw_wrapped["checks_per_s"]
                results["wrong_answer_ceiling"][name] = floor
            entry[kind] = {
                "items": len(preds),
                "should_be_true": expect,
                "raw": raw,
                "raw_gold_in_dollars": raw_wrapped,
                "mv_checks_per_s": cps,
                "mv_true": sum(res),
                "mv_counts": counts,
                "speedup_vs_raw": cps / raw["checks_per_s"],
                "speedup_vs_raw_gold_in_dollars": cps / raw_wrapped["checks_per_s"],
            }
            print(
                f"{name:14s} {kind:8s} raw {raw['checks_per_s']:6.1f}/s ({raw['true']}/{expect} true)  "
                f"raw$ {raw_wrapped['checks_per_s']:6.1f}/s ({raw_wrapped['true']}/{expect})  "
                f"MathVerifier {cps:7.1f}/s ({sum(res)}/{expect})",
                flush=True,
            )
        results["throughput"][name] = entry

    # Latency a caller sees for one check, on the hardest items (wrong answers, cold caches).
    v = MathVerifier(timeout_s=args.timeout, workers=args.workers)
    warm_up(v)
    single = []
    for name in ("college_math", "minerva_math"):
        golds, others = data[name]
        for i in random.Random(2).sample(range(len(golds)), 40):
            single.append(timed_batch(v, [response(others[i])], [golds[i]])[1])
    max_item = max(max_item, v.stats.max_item_s)
    timeouts += v.stats.timeouts
    v.close()
    results["max_item_s"] = max_item
    results["timeouts"] = timeouts
    results["single_call_s"] = {"max": max(single), "median": sorted(single)[len(single) // 2], "calls": len(single)}
    results["wall_s"] = time.perf_counter() - t_start

    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(
        "| benchmark | n | (a) gold verifies True | (b) other gold verifies False | (a) sympy path | (b) sympy path |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results["benchmarks"].items():
        sa = f"{r['a_true_rate_sympy']:.2%}" if "a_true_rate_sympy" in r else "-"
        sb = f"{r['b_false_rate_sympy']:.2%}" if "b_false_rate_sympy" in r else "-"
        print(f"| {name} | {r['n']} | {r['a_true_rate']:.2%} | {r['b_false_rate']:.2%} | {sa} | {sb} |")
    print()
    print(
        "| benchmark | workload (items) | raw checks/s (true) | raw, gold in $ (true) | MathVerifier checks/s (true) "
        "| speedup vs raw | vs raw, gold in $ |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, e in results["throughput"].items():
        for kind, r in e.items():
            print(
                f"| {name} | {kind} ({r['items']}, {r['should_be_true']} right) | "
                f"{r['raw']['checks_per_s']:.1f} ({r['raw']['true']}) | "
                f"{r['raw_gold_in_dollars']['checks_per_s']:.1f} ({r['raw_gold_in_dollars']['true']}) | "
                f"{r['mv_checks_per_s']:.1f} ({r['mv_true']}) | x{r['speedup_vs_raw']:.1f} | "
                f"x{r['speedup_vs_raw_gold_in_dollars']:.1f} |"
            )
    for name, f in results["wrong_answer_ceiling"].items():
        print(
            f"{name} wrong answers: math-verify parses a gold in {f['ms_per_gold_parse']:.1f} ms and a prediction in "
            f"{f['ms_per_prediction_parse']:.1f} ms (warm, single process), so {args.workers} workers top out at "
            f"x{f['ceiling_vs_raw']:.1f} raw (x{f['ceiling_vs_raw_gold_in_dollars']:.1f} raw$) even if comparing took "
            f"no time; x{f['pred_only_ceiling_vs_raw']:.1f} raw (x{f['pred_only_ceiling_vs_raw_gold_in_dollars']:.1f} "
            "raw$) if every gold were already parsed"
        )
    s = results["single_call_s"]
    print(
        f"\nslowest check inside the pool: {max_item:.2f} s (timeouts: {timeouts}); one-item verify_batch calls on "
        f"wrong answers: median {s['median'] * 1000:.0f} ms, max {s['max']:.2f} s"
    )
    ok = all(r["pass"] for r in results["benchmarks"].values())
    print(f"all benchmarks meet (a) and (b) >= {TARGET:.1%}: {ok}; wall {results['wall_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
