"""The docs a user reads: links that resolve, nothing that points outside the repository or at one machine,
experiments that exist, papers cited by title and arXiv id."""

from __future__ import annotations

import csv
import re
import subprocess

import yaml

from alignlab.report.render import format_table
from tests.conftest import ROOT

TEXT = (".md", ".py", ".yaml", ".json", ".toml", ".txt", ".cfg", ".sh", ".csv")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
OUTSIDE = re.compile(r"shared/papers|\bDESIGN\.md|\banchors\.md|papers/\w+\.md")  # ../shared/data: optional data root
ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:work|home|root|Users|mnt|scratch)/\w")
EXPERIMENT = re.compile(r"experiment=([\w.-]+)")
NOTES = re.compile(r"\b(?:pace|sage|ipo_dynamics|anchors)\.md\b"  # the private paper notes outside the repository,
                   r"|\b[Nn]otes\s+\u00a7")  # or a section of them (written so this line does not match itself)


def _tracked(*suffixes: str, tests: bool = False) -> list:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    return [ROOT / f for f in files if f.endswith(suffixes) and (ROOT / f).is_file()
            and (tests or not f.startswith("tests/"))]


def test_relative_links_in_markdown_resolve():
    bad = []
    for md in _tracked(".md"):
        for target in LINK.findall(md.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#")[0]
            if path and not (md.parent / path).exists():
                bad.append(f"{md.relative_to(ROOT)}: {target}")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_nothing_points_outside_the_repository_or_at_one_machine():
    bad = []
    for f in _tracked(*TEXT):
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for pat, why in ((OUTSIDE, "a file outside the repository"), (ABSOLUTE, "an absolute path")):
                m = pat.search(line)
                if m:
                    bad.append(f"{f.relative_to(ROOT)}:{i}: {why}: {m.group(0)!r}")
    assert not bad, "\n".join(bad)


def test_no_private_paper_notes_are_cited():
    """Papers are cited by title and arXiv id, never by the private note files about them (the pace, sage,
    ipo_dynamics and anchors notes outside the repository) nor by a section number of those notes ("notes" followed
    by a section sign): not in the docs, the code, the configs or the tests."""
    bad = [f"{f.relative_to(ROOT)}:{i}: {m.group(0)!r}"
           for f in _tracked(".md", ".py", ".yaml", tests=True)
           if not {".venv", "outputs"} & set(f.relative_to(ROOT).parts)
           for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if (m := NOTES.search(line))]
    assert not bad, "cite the paper (title, arXiv id) instead of its note file or a section of it:\n" + "\n".join(bad)


def test_experiments_named_in_docs_exist():
    have = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    bad = [f"{md.relative_to(ROOT)}: experiment={name}" for md in _tracked(".md")
           for name in EXPERIMENT.findall(md.read_text()) if name not in have and not name.startswith("<")]
    assert not bad, f"no such conf/experiment/*.yaml: {bad}"


def test_papers_are_cited_by_title_and_arxiv_id():
    """Wherever a reproduced method's paper is cited, its arXiv id is there, and the README names each title."""
    papers = {"2602.05370": "PACE: Defying the Scaling Hypothesis of Exploration",
              "2602.01207": "Not All Preferences Are Created Equal",
              "2602.12180": "How Sampling Shapes LLM Alignment"}
    readme = " ".join((ROOT / "README.md").read_text().split())  # titles may wrap
    for arxiv, title in papers.items():
        assert arxiv in readme and title in readme, (arxiv, title)


def _readme_make_run_table() -> str:
    """The indented per-round table the README shows under `make run` (the block whose first line is its header)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, s in enumerate(lines) if s.split() == ["round", "accuracy", "pairs", "selected", "gen",
                                                                  "tokens", "trained", "tokens", "FLOPs", "wall", "s"])
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return "\n".join(s[4:].rstrip() for s in lines[start:end])


def test_readme_make_run_table_is_the_recorded_quickstart_seed_0_run():
    """The README's `make run` table is format_table (what `make run` prints at the end) of the recorded quickstart
    run with the default seed 0 (experiments/quickstart/report.csv), digit for digit. Refresh both together."""
    seed = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())["seed"]
    with open(ROOT / "experiments" / "quickstart" / "report.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["experiment"] == "quickstart" and int(r["seed"]) == seed]
    assert [int(r["round"]) for r in rows] == [1, 2, 3], "report.csv lacks the default seed's three rounds"
    summary = {"base": {"accuracy": float(rows[0]["base_accuracy"]), "se": float(rows[0]["base_se"])},
               "rounds": [{"round": int(r["round"]), "eval": {"accuracy": float(r["accuracy"]), "se": float(r["se"])},
                           "pairs": int(r["pairs"]), "selected": int(r["selected"]),
                           "ledger": {"generated_tokens": int(r["generated_tokens"]),
                                      "trained_tokens": int(r["trained_tokens"]), "flops": float(r["flops"]),
                                      "wall_s": float(r["wall_s"])}} for r in rows]}
    want = "\n".join(s.rstrip() for s in format_table(summary).splitlines())
    assert _readme_make_run_table() == want, f"README's make run table:\n{_readme_make_run_table()}\nrecorded:\n{want}"


def test_every_path_the_architecture_page_names_exists():
    """docs/architecture.md's file lists match the tree: each backticked repository path (``alignlab/...``,
    ``conf/...``, ``tests/...``, ``docs/...``) exists, and every alignlab package and top-level module appears."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:alignlab|conf|tests|docs)/[^`\s<>*]*)`", text))
    assert len(named) > 30
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"
    pkg = ROOT / "alignlab"
    parts = {f"alignlab/{p.name}/" if p.is_dir() else f"alignlab/{p.name}" for p in pkg.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    unplaced = sorted(parts - named)
    assert not unplaced, f"docs/architecture.md does not place these in a layer: {unplaced}"
