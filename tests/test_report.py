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
    assert report.main([str(tmp_path)]) == 1  # nothing to report
    assert report.main([str(tmp_path / "nope")]) == 2
    assert not (tmp_path / "report.md").exists()
