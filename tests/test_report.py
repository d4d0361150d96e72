"""`alignlab report` on fake run trees: numbers must match the summaries, bad runs must be listed."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from alignlab import report
from alignlab.report.discovery import parse_overrides

ROUNDS = 3
NS = (4, 8)
KEEPS = (0.5, 1.0)
SEEDS = (0, 1, 2)


def _acc(n: int, keep: float, seed: int, rnd: int) -> float:
    """A deterministic, seed-noisy accuracy that grows with rounds, N and keep ratio."""
    return round(0.30 + 0.05 * rnd + 0.01 * n + 0.04 * keep + 0.013 * ((seed * 7 + rnd * 3 + n) % 5), 4)


def _summary(n: int, keep: float, seed: int, rounds: int = ROUNDS, experiment: str = "sweep") -> dict:
    return {
        "experiment": experiment,
        "seed": seed,
        "base": {"accuracy": 0.25 + 0.01 * seed, "se": 0.02, "n": 500},
        "rounds": [
            {
                "round": r,
                "eval": {
                    "accuracy": _acc(n, keep, seed, r),
                    "se": 0.021,
                    "n": 500,
                    "by_difficulty": {"1": _acc(n, keep, seed, r) + 0.1, "2": _acc(n, keep, seed, r) - 0.1},
                },
                "diagnostics": {"token_entropy": 1.0 / (r + seed), "distinct_answers": 4.0 - 0.5 * r, "pass_at_k": 0.5},
                "pairs": 100 * n,
                "selected": int(100 * n * keep),
                "ledger": {
                    "prompts": 100,
                    "samples": 100 * n,
                    "generated_tokens": 1000 * n * r + seed,
                    "trained_tokens": int(5000 * keep) * r,
                    "flops": 2.0e9 * n * r,
                    "wall_s": 10.0 + seed,
                },
            }
            for r in range(1, rounds + 1)
        ],
    }


def _write_run(d: Path, overrides: list[str], summary: dict | str | None, rounds: int = ROUNDS) -> Path:
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (d / ".hydra" / "config.yaml").write_text(
        f"seed: 0\nrounds: {rounds}\nsampler:\n  n: 4\nselector:\n  keep_ratio: 1.0\n"
    )
    if isinstance(summary, dict):
        (d / "summary.json").write_text(json.dumps(summary))
    elif isinstance(summary, str):
        (d / "summary.json").write_text(summary)
    return d


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A multirun sweep (2 N x 2 keep ratios x 3 seeds + 4 broken jobs) and a separate single-seed run."""
    root = tmp_path_factory.mktemp("report")
    sweep = root / "multirun" / "2025-01-01" / "12-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    job = 0
    for n in NS:
        for keep in KEEPS:
            for seed in SEEDS:
                ov = ["experiment=sweep", f"sampler.n={n}", f"selector.keep_ratio={keep}", f"seed={seed}"]
                _write_run(sweep / str(job), ov + ["hydra.job.chdir=true"], _summary(n, keep, seed))
                job += 1
    bad = {
        "failed": _write_run(
            sweep / str(job),
            ["experiment=sweep", "sampler.n=16", "selector.keep_ratio=0.5", "seed=0"],
            {**_summary(16, 0.5, 0, rounds=1), "status": "failed", "error": "CUDA OOM"},
        ),
        "missing": _write_run(sweep / str(job + 1), ["experiment=sweep", "sampler.n=16", "seed=1"], None),
        "truncated_json": _write_run(
            sweep / str(job + 2), ["experiment=sweep", "sampler.n=16", "seed=2"], json.dumps(_summary(16, 1.0, 2))[:150]
        ),
        "short": _write_run(
            sweep / str(job + 3), ["experiment=sweep", "sampler.n=16", "seed=3"], _summary(16, 1.0, 3, rounds=1)
        ),
    }
    single = root / "outputs" / "quick" / "run"
    _write_run(single, ["experiment=quick"], _summary(4, 1.0, 7, experiment="quick"))
    # An `alignlab eval` job is not a training run and must not be reported as failed.
    evaldir = root / "outputs" / "eval"
    _write_run(evaldir, ["model=foo"], None)
    (evaldir / "eval.json").write_text("{}")
    return {"root": root, "sweep": sweep, "single": single, "bad": bad}


def _expected(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def test_parse_overrides_drops_hydra_and_prefixes() -> None:
    got = parse_overrides(
        ["+a.b=1", "++c='x y'", "hydra.run.dir=/tmp/x", "hydra/launcher=basic", "~d", "e=f=g"]
    )
    assert got == {"a.b": "1", "c": "x y", "e": "f=g"}


def test_load_runs_finds_all_and_marks_bad(tree: dict) -> None:
    runs = report.load_runs([tree["root"]])
    assert len(runs) == len(NS) * len(KEEPS) * len(SEEDS) + 4 + 1  # eval job skipped
    status = {r.path: r.status for r in runs}
    assert status[tree["bad"]["failed"].resolve()] == "failed"
    assert status[tree["bad"]["missing"].resolve()] == "missing"
    assert status[tree["bad"]["truncated_json"].resolve()] == "unreadable"
    assert status[tree["bad"]["short"].resolve()] == "incomplete"
    assert sum(r.ok for r in runs) == len(NS) * len(KEEPS) * len(SEEDS) + 1
    failed = next(r for r in runs if r.status == "failed")
    assert "CUDA OOM" in failed.reason and failed.seed == 0
    assert all("hydra.job.chdir" not in r.overrides for r in runs)


def test_aggregate_matches_summaries(tree: dict) -> None:
    stats = report.aggregate(report.load_runs([tree["sweep"]]))
    assert len(stats) == len(NS) * len(KEEPS)
    for s in stats:
        d = dict(s.key)
        assert "seed" not in d and d["experiment"] == "sweep"
        n, keep = int(d["sampler.n"]), float(d["selector.keep_ratio"])
        assert s.n_seeds == len(SEEDS) and sorted(s.seeds) == list(SEEDS)
        mean, se = _expected([_acc(n, keep, seed, ROUNDS) for seed in SEEDS])
        assert s.final.mean == pytest.approx(mean) and s.final.se == pytest.approx(se) and s.final.n == len(SEEDS)
        for r in range(1, ROUNDS + 1):
            m, e = _expected([_acc(n, keep, seed, r) for seed in SEEDS])
            assert (s.rounds[r].mean, s.rounds[r].se) == (pytest.approx(m), pytest.approx(e))
        bm, bse = _expected([0.25 + 0.01 * seed for seed in SEEDS])
        assert (s.base.mean, s.base.se) == (pytest.approx(bm), pytest.approx(bse))
        gen = [sum(1000 * n * r + seed for r in range(1, ROUNDS + 1)) for seed in SEEDS]
        assert s.totals["generated_tokens"].mean == pytest.approx(statistics.mean(gen))
        assert s.totals["flops"].mean == pytest.approx(2.0e9 * n * sum(range(1, ROUNDS + 1)))
        assert s.totals["wall_s"].mean == pytest.approx(statistics.mean([ROUNDS * (10.0 + seed) for seed in SEEDS]))
        assert s.by_difficulty["1"].mean == pytest.approx(mean + 0.1)


def test_single_seed_uses_runs_own_se(tree: dict) -> None:
    (s,) = report.aggregate(report.load_runs([tree["single"]]))
    assert s.n_seeds == 1 and s.final.se == pytest.approx(0.021) and s.base.se == pytest.approx(0.02)
    assert s.final.mean == pytest.approx(_acc(4, 1.0, 7, ROUNDS))


def test_by_pools_other_keys(tree: dict) -> None:
    stats = report.aggregate(report.load_runs([tree["sweep"]]), by=["sampler.n"])
    assert [dict(s.key)["sampler.n"] for s in stats] == ["4", "8"]
    for s in stats:
        n = int(dict(s.key)["sampler.n"])
        assert s.n_seeds == len(KEEPS) * len(SEEDS)
        mean, se = _expected([_acc(n, k, seed, ROUNDS) for k in KEEPS for seed in SEEDS])
        assert (s.final.mean, s.final.se) == (pytest.approx(mean), pytest.approx(se))


@pytest.fixture(scope="module")
def written(tree: dict) -> Path:
    out = tree["root"] / "report_out"
    assert report.main([str(tree["sweep"]), str(tree["single"].parent), "--out", str(out)]) == 0
    return out


def test_report_md_rows_and_failed_section(tree: dict, written: Path) -> None:
    md = (written / "report.md").read_text()
    results = md.split("## Results")[1].split("\n## ")[0]
    rows = {line.split("|")[1].strip(" `"): line for line in results.splitlines() if line.startswith("| `")}
    for n in NS:
        for keep in KEEPS:
            label = f"experiment=sweep sampler.n={n} selector.keep_ratio={keep}"
            mean, se = _expected([_acc(n, keep, seed, ROUNDS) for seed in SEEDS])
            assert f"**{mean:.3f} ± {se:.3f}**" in rows[label]
            assert rows[label].split("|")[2].strip() == str(len(SEEDS))
    failed_section = md.split("## Failed or incomplete runs")[1]
    for name, path in tree["bad"].items():
        assert path.name in failed_section, name
    assert "CUDA OOM" in failed_section and "1/3 rounds" in failed_section
    assert "eval" not in failed_section


def test_report_md_sampling_diagnostics_per_round(written: Path) -> None:
    md = (written / "report.md").read_text()
    section = md.split("## Sampling diagnostics per round")[1].split("\n## ")[0]
    entropy = section.split("(`token_entropy`)")[1].split("**")[0]
    row = next(line for line in entropy.splitlines() if "sampler.n=8 selector.keep_ratio=0.5`" in line)
    for r in range(1, ROUNDS + 1):
        mean, se = _expected([1.0 / (r + seed) for seed in SEEDS])
        assert row.split("|")[1 + r].strip() == f"{mean:.3f} ± {se:.3f}"
    assert "(`mean_pass_rate`)" not in section  # absent from every summary: no empty table


def test_report_csv_one_row_per_run_per_round(written: Path) -> None:
    with (written / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == (len(NS) * len(KEEPS) * len(SEEDS) + 1) * ROUNDS
    for r in ok:
        if r["experiment"] == "sweep":
            want = _acc(int(r["sampler.n"]), float(r["selector.keep_ratio"]), int(r["seed"]), int(r["round"]))
            assert float(r["accuracy"]) == pytest.approx(want)
            assert float(r["token_entropy"]) == pytest.approx(1.0 / (int(r["round"]) + int(r["seed"])))
    assert "mean_pass_rate" not in rows[0]  # no run recorded it: no empty column
    assert {"generated_tokens", "flops", "trained_tokens", "wall_s", "acc_difficulty_1", "base_accuracy"} <= set(
        rows[0]
    )
    assert {r["status"] for r in rows} == {"ok", "failed", "incomplete"}  # partial rounds kept, flagged


def test_plots_load_and_are_not_blank(written: Path) -> None:
    import matplotlib.image

    names = {
        "accuracy_per_round.png",
        "frontier_generated_tokens.png",
        "frontier_flops.png",
        "acc_vs_keep_ratio.png",
        "acc_vs_n.png",
    }
    assert names <= {p.name for p in written.glob("*.png")}
    assert not list(written.glob(".*.tmp"))  # written to a temporary name, then renamed
    md = (written / "report.md").read_text()
    for name in names:
        img = matplotlib.image.imread(written / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0, name
        assert f"]({name})" in md


def test_sweep_plots_only_when_key_varies(tree: dict, tmp_path: Path) -> None:
    assert report.main([str(tree["single"]), "--out", str(tmp_path)]) == 0
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert "accuracy_per_round.png" in pngs and "acc_vs_n.png" not in pngs and "acc_vs_keep_ratio.png" not in pngs


def test_cli_errors(tmp_path: Path) -> None:
    assert report.main([str(tmp_path)]) == 2  # nothing to report: bad input
    assert report.main([str(tmp_path / "nope")]) == 2
    assert not (tmp_path / "report.md").exists()


# ------------------------------------------------------------------------------ paired differences (--baseline)

BASE_ACC = {0: 0.30, 1: 0.32, 2: 0.28, 3: 0.31, 4: 0.29}
SAGE_DIFF = {0: 0.02, 1: 0.03, 2: 0.01, 3: 0.04, 4: 0.00}  # all >= 0: the interval excludes 0
RANDOM_DIFF = {0: 0.01, 1: -0.02, 2: 0.03, 3: -0.01, 4: 0.00, 5: 0.5}  # seed 5 has no baseline partner
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 30: 2.0423}  # Student t tables, two-sided 95 %


def _two_round(acc: float, seed: int) -> dict:
    """A 2-round summary whose round 1 is 0.05 below its final accuracy `acc`."""
    s = _summary(4, 1.0, seed, rounds=2, experiment="cmp")
    s["rounds"][0]["eval"]["accuracy"] = acc - 0.05
    s["rounds"][1]["eval"]["accuracy"] = acc
    return s


@pytest.fixture(scope="module")
def paired_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Baseline = the experiment's default selector (no override; Hydra's choice says `full`), 5 seeds, plus a
    `selector=sage` and a `selector=random` arm with known per-seed differences."""
    root = tmp_path_factory.mktemp("paired")
    for seed, acc in BASE_ACC.items():
        d = _write_run(root / f"full_{seed}", ["experiment=cmp", f"seed={seed}"], _two_round(acc, seed), rounds=2)
        (d / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      selector: full\n")
    for name, diffs in (("sage", SAGE_DIFF), ("random", RANDOM_DIFF)):
        for seed, diff in diffs.items():
            acc = BASE_ACC.get(seed, 0.3) + diff
            _write_run(root / f"{name}_{seed}", ["experiment=cmp", f"selector={name}", f"seed={seed}"],
                       _two_round(acc, seed), rounds=2)
    return root


def _t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Hand-computed: mean ± t(0.975, n-1) * sd / sqrt(n), t from the printed table."""
    n, mean, sd = len(diffs), statistics.mean(diffs), statistics.stdev(diffs)
    half = T975[n - 1] * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def test_t_quantile_matches_tables() -> None:
    from alignlab.report.paired import t_quantile

    for df, t in T975.items():
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4), df
    assert t_quantile(0.95, 10) == pytest.approx(1.8125, abs=1e-4)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.975, 0)


def test_baseline_paired_ci_known_values(paired_tree: Path, tmp_path: Path) -> None:
    assert report.main([str(paired_tree), "--out", str(tmp_path), "--baseline", "selector=full"]) == 0
    with (tmp_path / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"baseline", "paired_seeds", "diff_mean", "ci95_low", "ci95_high"} <= set(rows[0])
    assert "boot95_low" not in rows[0]  # bootstrap is opt-in

    def final_row(name: str) -> dict:
        return next(r for r in rows if r["run_dir"] == f"../{paired_tree.name}/{name}_0" and r["round"] == "2")

    for name, diffs in (("sage", SAGE_DIFF), ("random", RANDOM_DIFF)):
        shared = [diffs[s] for s in BASE_ACC]  # seed 5 of random is not paired
        mean, low, high = _t_interval(shared)
        row = final_row(name)
        assert row["baseline"] == "selector=full" and row["paired_seeds"] == "5"
        assert float(row["diff_mean"]) == pytest.approx(mean, abs=1e-9)
        assert float(row["ci95_low"]) == pytest.approx(low, abs=2e-5)  # table t has 4 decimals
        assert float(row["ci95_high"]) == pytest.approx(high, abs=2e-5)
    sage_low = float(final_row("sage")["ci95_low"])
    assert 0 < sage_low < 0.001  # 0.02 - 2.7764 * 0.0158 / sqrt(5) = 0.00037: excludes 0, barely
    round1 = next(r for r in rows if r["run_dir"].endswith("sage_3") and r["round"] == "1")
    assert float(round1["diff_mean"]) == pytest.approx(statistics.mean(SAGE_DIFF.values()))  # same offsets in round 1
    assert {r["ci95_low"] for r in rows if "/full_" in r["run_dir"]} == {""}  # the baseline's own rows

    md = (tmp_path / "report.md").read_text()
    section = md.split("## Paired differences vs baseline `selector=full`")[1].split("\n## ")[0]
    sage = next(line for line in section.splitlines() if line.startswith("| `selector=sage"))
    rand = next(line for line in section.splitlines() if line.startswith("| `selector=random"))
    assert sage.split("|")[2].strip() == "0, 1, 2, 3, 4" and sage.rstrip(" |").endswith("yes")
    assert rand.rstrip(" |").endswith("no")
    mean, low, high = _t_interval(list(SAGE_DIFF.values()))
    assert f"| {mean:+.3f} | {low:+.3f} | {high:+.3f} |" in sage


def test_baseline_by_exact_label_picks_the_default_arm(paired_tree: Path, tmp_path: Path) -> None:
    """`experiment=cmp` matches every arm, but only the baseline is labelled by exactly that (no other override)."""
    assert report.main([str(paired_tree), "--out", str(tmp_path), "--baseline", "experiment=cmp"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "Baseline configuration: `experiment=cmp`." in md
    section = md.split("## Paired differences vs baseline `experiment=cmp`")[1].split("\n## ")[0]
    assert "| `selector=sage` | 0, 1, 2, 3, 4 |" in section and "| `selector=random` | 0, 1, 2, 3, 4 |" in section


def test_baseline_bootstrap_over_seeds(paired_tree: Path, tmp_path: Path) -> None:
    assert report.main([str(paired_tree), "--out", str(tmp_path), "--baseline", "selector=full",
                        "--bootstrap", "4000"]) == 0
    with (tmp_path / "report.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["run_dir"].endswith("sage_0") and r["round"] == "2")
    lo, hi = float(row["boot95_low"]), float(row["boot95_high"])
    # A resampled mean of the five differences lies within their range and brackets their mean.
    assert min(SAGE_DIFF.values()) <= lo < statistics.mean(SAGE_DIFF.values()) < hi <= max(SAGE_DIFF.values())
    assert "boot95_low" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--baseline", "selector=nope"], "no configuration matches; values found: selector in {full, random, sage}"),
        (["--baseline", "rounds=2"], "3 configurations match"),
        (["--baseline", "selector"], "expected KEY=VALUE"),
        (["--bootstrap", "100"], "--bootstrap needs --baseline"),
    ],
)
def test_baseline_errors_name_the_problem(paired_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          args: list[str], message: str) -> None:
    assert report.main([str(paired_tree), "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written before the arguments are known good


# -------------------------------------------------------------- corrupt or partial summary.json (issue: bad input)

CORRUPT = {  # dir name -> (summary.json bytes, expected status, words of the expected reason)
    "empty": (b"", "unreadable", "summary.json unreadable"),
    "binary": (bytes(range(256)), "unreadable", "summary.json unreadable"),
    "list": (b"[1, 2]", "malformed", "not an object (a list)"),
    "base_number": (b'{"base": 5, "rounds": []}', "malformed", "base is not an object"),
    "no_base": (b'{"rounds": []}', "incomplete", "0/3 rounds"),  # base_eval=false: no base, not malformed
    "rounds_string": (b'{"base": {"accuracy": 0.2}, "rounds": "x"}', "malformed", "rounds is not a list (a str)"),
    "round_number": (b'{"base": {"accuracy": 0.2}, "rounds": [7]}', "malformed", "rounds[0] is not an object"),
    "eval_list": (b'{"base": {"accuracy": 0.2}, "rounds": [{"round": 1, "eval": []}]}', "malformed",
                  "rounds[0].eval is not an object"),
    "ledger_str": (b'{"base": {"accuracy": 0.2}, "rounds": [{"round": 1, "eval": {"accuracy": 0.3}, "ledger": "x"}]}',
                   "malformed", "rounds[0].ledger is not an object"),
    "no_round_id": (b'{"base": {"accuracy": 0.2}, "rounds": [{"eval": {"accuracy": 0.3}}]}', "malformed",
                    "rounds[0] has no round number"),
    "acc_text": (b'{"base": {"accuracy": 0.2}, "rounds": [{"round": 1, "eval": {"accuracy": "high"}}]}',
                 "malformed", "rounds without eval.accuracy: [1]"),
    "partial_rounds": (json.dumps(_summary(4, 1.0, 0, rounds=1)).encode(), "incomplete", "1/3 rounds"),
}


def test_corrupt_or_partial_summaries_are_listed_and_the_rest_reported(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for s in SEEDS:
        _write_run(root / f"good_{s}", ["experiment=x", f"seed={s}"], _summary(4, 1.0, s))
    for name, (content, _, _) in CORRUPT.items():
        d = _write_run(root / name, ["experiment=x", "seed=9"], None)
        (d / "summary.json").write_bytes(content)
    as_dir = _write_run(root / "summary_is_dir", ["experiment=x", "seed=9"], None)
    (as_dir / "summary.json").mkdir()
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out)]) == 0

    md = (out / "report.md").read_text()
    results = md.split("## Results")[1].split("\n## ")[0]
    mean, se = _expected([_acc(4, 1.0, s, ROUNDS) for s in SEEDS])
    assert f"| `experiment=x` | {len(SEEDS)} |" in results and f"**{mean:.3f} ± {se:.3f}**" in results
    failed = md.split("## Failed or incomplete runs")[1]
    rows = {line.split("|")[1].strip(" `"): line for line in failed.splitlines() if line.startswith("| `")}
    for name, (_, status, reason) in CORRUPT.items():
        line = rows[f"../runs/{name}"]
        assert f"| {status} |" in line and reason in line, (name, line)
    assert "| unreadable | summary.json unreadable: [Errno 21] Is a directory" in rows["../runs/summary_is_dir"]
    assert len(rows) == len(CORRUPT) + 1 and all(f"good_{s}" not in failed for s in SEEDS)
    with (out / "report.csv").open() as f:
        statuses = {r["run_dir"]: r["status"] for r in csv.DictReader(f)}
    assert statuses["../runs/partial_rounds"] == "incomplete"  # its one round is kept, flagged
    assert {statuses[f"../runs/good_{s}"] for s in SEEDS} == {"ok"}


# ------------------------------------------- the committed study reports, regenerated from their own report.csv

STUDY_CSVS = sorted(Path(__file__).resolve().parents[1].glob("experiments/**/report.csv"))


def _typed(text: str) -> int | float | None:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def _rebuild_runs(csv_path: Path, out: Path) -> list[Path]:
    """Run dirs (summary.json + .hydra/) that hold exactly what `csv_path` says, placed where its run_dir column
    points relative to `out`. The study runs themselves are not committed; their report.csv is."""
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cols = list(rows[0])
    ledger_cols = cols[cols.index("selected") + 1: cols.index("base_accuracy")]
    override_cols = cols[cols.index("status") + 1: cols.index("round")]
    diag_cols = [c for c in cols if c in ("token_entropy", "distinct_answers", "pass_at_k", "mean_pass_rate")]
    by_run: dict[str, list[dict]] = {}
    for row in rows:
        by_run.setdefault(row["run_dir"], []).append(row)
    dirs = []
    for run_dir, rs in by_run.items():
        first = rs[0]
        rounds = [
            {"round": int(r["round"]), "pairs": _typed(r["pairs"]), "selected": _typed(r["selected"]),
             "eval": {"accuracy": _typed(r["accuracy"]), "se": _typed(r["se"]), "n": _typed(r["n"]),
                      "by_difficulty": {c.split("_", 2)[2]: _typed(r[c]) for c in cols
                                        if c.startswith("acc_difficulty_") and r[c] != ""}},
             "ledger": {c: _typed(r[c]) for c in ledger_cols},
             **({"diagnostics": {c: _typed(r[c]) for c in diag_cols if r[c] != ""}} if diag_cols else {})}
            for r in rs
        ]
        summary = {"experiment": first["experiment"], "seed": _typed(first["seed"]), "status": first["status"],
                   "base": {"accuracy": _typed(first["base_accuracy"]), "se": _typed(first["base_se"])},
                   "rounds": rounds}
        overrides = [f"experiment={first['experiment']}", f"seed={first['seed']}"]
        overrides += [f"{c}={first[c]}" for c in override_cols if first[c] != ""]
        d = (out / run_dir).resolve()
        _write_run(d, overrides, summary, rounds=len(rounds))
        dirs.append(d)
    return dirs


@pytest.mark.parametrize("csv_path", STUDY_CSVS, ids=lambda p: str(p.parent.relative_to(p.parents[2])))
def test_committed_study_report_is_reproduced(csv_path: Path, tmp_path: Path) -> None:
    """report.csv comes back byte for byte and report.md's results table line for line (the rest of report.md
    holds hand edits and diagnostics that report.csv does not carry)."""
    from alignlab.report.render import write_csv, write_markdown

    out = tmp_path / "a" / "b" / "c" / "d" / "e" / "f" / "out"  # deep enough for every run_dir's ../
    out.mkdir(parents=True)
    runs = report.load_runs(_rebuild_runs(csv_path, out))
    assert all(r.ok for r in runs)
    with csv_path.open(newline="") as f:
        committed = list(csv.DictReader(f))
    by = committed[0]["grouped_by"].split() if "grouped_by" in committed[0] else None  # made with --by
    stats = report.aggregate(runs, by=by)
    if "baseline" not in committed[0]:
        assert write_csv(runs, out).read_bytes() == csv_path.read_bytes()
    else:
        # A report made with --baseline: the paired t columns are recomputed from the rebuilt runs; the bootstrap
        # columns need the per-problem verdicts (eval.json `correct`) that report.csv does not carry, so they are
        # left out of the comparison.
        from alignlab.report.paired import BOOT_COLUMNS, find_baseline, paired_differences, parse_baseline

        label = committed[0]["baseline"]
        paired = paired_differences(stats, find_baseline(stats, parse_baseline(label.split())), label)
        with write_csv(runs, out, paired, by=by).open(newline="") as f:
            rebuilt = list(csv.DictReader(f))
        assert rebuilt == [{k: v for k, v in row.items() if k not in BOOT_COLUMNS} for row in committed]
    write_markdown(runs, stats, out, [])

    def results(md: str) -> str:
        table = md.split("## Results")[1].split("\n## ")[0]
        if by:  # a --by key that no run overrode is labelled from the saved config, which report.csv does not carry
            table = "\n".join(line.split(" | ", 1)[-1] for line in table.splitlines())
        return table

    assert results((out / "report.md").read_text()) == results((csv_path.parent / "report.md").read_text())


def test_bootstrap_resamples_problems_where_evals_record_verdicts(tmp_path: Path) -> None:
    """Every seed is evaluated on the same 200 problems, and each seed of `sage` solves the baseline's problems plus
    the same 20 more: every seed differs by exactly +0.1, so the t interval over seeds has zero width, while
    resampling problems shows the eval set's own noise. Problems are shared across seeds (crossed), so the seeds add
    no independent problem draws: about ±1.96·sqrt(0.1·0.9/200), not the ±1.96·sqrt(0.1·0.9/600) that drawing
    problems anew within each seed (nested) gives. `random` has one eval on other prompts: it resamples seeds only."""
    import random

    m, seeds = 200, (0, 1, 2)
    rng = random.Random(0)
    root = tmp_path / "runs"
    shared = [rng.random() < 0.3 for _ in range(m)]
    extra = rng.sample([j for j in range(m) if not shared[j]], 20)
    for seed in seeds:
        base = list(shared)
        better = list(base)
        for j in extra:
            better[j] = True
        for name, correct in (("full", base), ("sage", better), ("random", better)):
            s = _summary(4, 1.0, seed, rounds=1, experiment="cmp")
            sha = "other" if name == "random" and seed == 1 else "sha"
            s["rounds"][0]["eval"] |= {"accuracy": sum(correct) / m, "n": m, "prompts_sha1": sha,
                                       "correct": "".join("1" if c else "0" for c in correct)}
            _write_run(root / f"{name}_{seed}", ["experiment=cmp", f"selector={name}", f"seed={seed}"], s, rounds=1)
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out), "--baseline", "selector=full", "--bootstrap", "4000"]) == 0
    with (out / "report.csv").open() as f:
        rows = {r["run_dir"].split("/")[-1]: r for r in csv.DictReader(f)}
    sage, rand = rows["sage_0"], rows["random_0"]
    assert float(sage["diff_mean"]) == pytest.approx(0.1)
    assert float(sage["ci95_low"]) == pytest.approx(0.1) and float(sage["ci95_high"]) == pytest.approx(0.1)
    assert sage["bootstrap_over"] == "seeds x problems"
    half = 1.96 * math.sqrt(0.1 * 0.9 / m)
    assert float(sage["boot95_low"]) == pytest.approx(0.1 - half, abs=0.006)
    assert float(sage["boot95_high"]) == pytest.approx(0.1 + half, abs=0.006)
    assert rand["bootstrap_over"] == "seeds" and float(rand["boot95_low"]) == pytest.approx(0.1)
    assert "| seeds x problems |" in (out / "report.md").read_text()


def test_newer_ledger_fields_get_a_column_only_where_recorded(tmp_path: Path) -> None:
    new = _summary(4, 1.0, 0)
    for r in new["rounds"]:
        r["ledger"] |= {"forward_tokens": 1234 * r["round"], "stage_wall_s": {"sample": 1.0}}
    _write_run(tmp_path / "runs" / "new", ["experiment=x", "seed=0"], new)
    _write_run(tmp_path / "runs" / "old", ["experiment=x", "seed=1"], _summary(4, 1.0, 1))
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    with (tmp_path / "out" / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    cols = list(rows[0])
    assert cols.index("wall_s") + 1 == cols.index("forward_tokens") and "stage_wall_s" not in cols
    assert [r["forward_tokens"] for r in rows] == ["1234", "2468", "3702", "", "", ""]


def _crossed_exact(diffs) -> tuple[float, float]:
    """Brute force: the mean and variance of the replicate mean over every equally likely crossed resample (seed
    rows drawn with replacement, problem columns drawn with replacement, the same columns for every row)."""
    import itertools

    import numpy as np

    n, m = diffs.shape
    vals = [diffs[np.ix_(rows, cols)].mean() for rows in itertools.product(range(n), repeat=n)
            for cols in itertools.product(range(m), repeat=m)]
    return float(np.mean(vals)), float(np.var(vals))


def test_crossed_bootstrap_matches_brute_force_enumeration() -> None:
    """Problem 0 is won by every seed, problem 3 lost by every seed: problem effects shared across seeds. The
    bootstrap's replicate means have the exact crossed distribution's mean and variance (and a nested draw, problems
    anew within each seed, has a visibly smaller variance); the percentile interval is that of the replicates."""
    import numpy as np

    from alignlab.report.paired import _bootstrap_problems, crossed_means

    diffs = np.array([[1, 1, 0, -1, 0], [1, 0, 0, -1, 1], [1, 1, 0, -1, 0]], dtype=np.int8)
    mean, var = _crossed_exact(diffs)
    reps = crossed_means(diffs, 200_000, seed=3)
    assert reps.mean() == pytest.approx(mean, abs=0.003)
    assert reps.var() == pytest.approx(var, rel=0.03)
    rng = np.random.default_rng(3)  # nested, for contrast
    nested = [diffs[rng.integers(0, 3, 3)[:, None], rng.integers(0, 5, (3, 5))].mean() for _ in range(20_000)]
    assert np.var(nested) < 0.75 * var
    lo, hi = _bootstrap_problems(diffs, 200_000, seed=3)
    assert (lo, hi) == tuple(np.percentile(reps, [2.5, 97.5]))
    # the exact distribution's 2.5 / 97.5 % points, from the enumeration's atoms
    import itertools
    vals = np.sort([diffs[np.ix_(r, c)].mean() for r in itertools.product(range(3), repeat=3)
                    for c in itertools.product(range(5), repeat=5)])
    assert lo == pytest.approx(np.percentile(vals, 2.5), abs=0.02) and hi == pytest.approx(np.percentile(vals, 97.5), abs=0.02)


def test_mcnemar_exact_hand_computed() -> None:
    from alignlab.report.paired import mcnemar_exact

    # b = 8, c = 2: P(X <= 2 | n=10, 1/2) = (1 + 10 + 45) / 1024, two-sided doubles it
    assert mcnemar_exact(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024)
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 1) == pytest.approx(2 * 7 / 64)  # (1 + 6) / 64, doubled
    with pytest.raises(ValueError, match="discordant"):
        mcnemar_exact(-1, 2)


def _runner_like(seed: int, selector: str, base_eval: bool, correct: str | None = None, pairs: int = 40) -> dict:
    """summary.json as the runner writes it under switches that change its fields: base_eval (no ``base``), a
    per-step selector (train fields of the filter), a round without pairs (train steps 0), verdicts (``correct``)."""
    s = _summary(4, 1.0, seed, rounds=1, experiment="quickstart")
    if not base_eval:
        del s["base"]
    r = s["rounds"][0]
    train = {"steps": 0 if pairs == 0 else 5, "trained_tokens": 0 if pairs == 0 else 900,
             "trained_pairs": 0 if pairs == 0 else 30, "pairs_per_epoch": 0 if pairs == 0 else 15}
    if selector == "sage":
        train |= {"candidate_pairs": 60, "kept_pairs": 30, "score_forward_tokens": 1800, "kept_differ_pairs": 3,
                  "removed_unstable": 3, "spearman_stable_newton": 0.9, "curriculum_stage": 1}
    r |= {"pairs": pairs, "selected": train["pairs_per_epoch"], "train": train, "chosen_false_positive_rate": None}
    r["ledger"]["trained_pairs"] = train["trained_pairs"]
    if correct is not None:
        r["eval"] |= {"correct": correct, "prompts_sha1": "same", "n": len(correct),
                      "accuracy": correct.count("1") / len(correct)}
    s["final_accuracy"] = r["eval"]["accuracy"]
    return s


@pytest.mark.parametrize("base_eval", [False, True])
def test_report_and_baseline_over_every_kind_of_runner_summary(tmp_path: Path, base_eval: bool) -> None:
    """The issue's new-user sweep: `alignlab -m experiment=quickstart rounds=1 base_eval=false selector=full,sage
    seed=0,1`, then `alignlab report <sweep> --baseline selector=full`; plus a run whose round had no pairs."""
    root = tmp_path / "sweep"
    for seed in (0, 1):
        for sel in ("full", "sage", "random"):
            _write_run(root / f"{sel}_{seed}", ["experiment=quickstart", "rounds=1", f"base_eval={str(base_eval).lower()}",
                                                "data.train_prompts=128", f"selector={sel}", f"seed={seed}"],
                       _runner_like(seed, sel, base_eval, pairs=0 if sel == "random" and seed == 1 else 40), rounds=1)
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out), "--baseline", "selector=full"]) == 0
    runs = report.load_runs([root])
    assert [r.status for r in runs] == ["ok"] * 6
    md = (out / "report.md").read_text()
    assert "6 runs found, 6 complete" in md and "3 configurations" in md
    section = md.split("## Paired differences vs baseline `selector=full`")[1].split("\n## ")[0]
    assert "| `selector=sage` | 0, 1 |" in section and "| `selector=random` | 0, 1 |" in section
    results = md.split("## Results")[1].split("\n## ")[0]
    full_row = next(line for line in results.splitlines() if line.startswith("| `selector=full`"))
    assert (full_row.split("|")[3].strip() == "") != base_eval  # the base column: empty without a base eval
    with (out / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["base_accuracy"] for r in rows} == ({""} if not base_eval else {"0.25", "0.26"})


def test_single_seed_mcnemar_in_the_report(tmp_path: Path) -> None:
    """One seed, two checkpoints on the same 20 problems: b = 6 only the configuration solves, c = 1 only the
    baseline; p = 2 * (1 + 7) / 128 = 0.125 by hand."""
    base = "1" * 8 + "0" * 6 + "1" + "0" * 5
    mine = "1" * 8 + "1" * 6 + "0" + "0" * 5
    root = tmp_path / "runs"
    for sel, correct in (("full", base), ("sage", mine)):
        _write_run(root / sel, ["experiment=quickstart", f"selector={sel}", "seed=0"],
                   _runner_like(0, sel, False, correct), rounds=1)
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out), "--baseline", "selector=full"]) == 0
    md = (out / "report.md").read_text()
    assert "McNemar" in md and "| 6/1 | 0.125 |" in md
    with (out / "report.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["run_dir"].endswith("sage"))
    assert (row["mcnemar_b"], row["mcnemar_c"], float(row["mcnemar_p"])) == ("6", "1", pytest.approx(0.125))
