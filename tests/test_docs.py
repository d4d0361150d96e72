"""The docs a user reads: links that resolve, nothing that points outside the repository or at one machine,
experiments that exist, papers cited by title and arXiv id."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT

TEXT = (".md", ".py", ".yaml", ".json", ".toml", ".txt", ".cfg", ".sh", ".csv")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
OUTSIDE = re.compile(r"shared/papers|\bDESIGN\.md|\banchors\.md|papers/\w+\.md")  # ../shared/data: optional data root
ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:work|home|root|Users|mnt|scratch)/\w")
EXPERIMENT = re.compile(r"experiment=([\w.-]+)")


def _tracked(*suffixes: str) -> list:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    return [ROOT / f for f in files if f.endswith(suffixes) and (ROOT / f).is_file() and not f.startswith("tests/")]


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
