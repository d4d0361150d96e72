"""Architecture contracts: a component is added from outside the package through Hydra's search path, and the
quickstart's numbers for a seed do not move when the code is reorganised."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import TINY_RUN, alignlab

BUILDER = '''
from alignlab.pairs import group_by_problem, make_pair


class LongestWrongPairBuilder:
    """One pair per prompt: the first correct sample against the longest wrong one."""

    def __init__(self, min_wrong_chars: int = 0) -> None:
        self.min_wrong_chars = min_wrong_chars

    def build(self, problems, rollouts, prompts, seed):
        groups = group_by_problem(rollouts)
        pairs = []
        for p in problems:
            rs = groups.get(p.id, [])
            good = [r for r in rs if r.verdict]
            bad = [r for r in rs if r.verdict is False and len(r.text) >= self.min_wrong_chars]
            if good and bad:
                pairs.append(make_pair(prompts[p.id], good[0], max(bad, key=lambda r: len(r.text)), "longest_wrong"))
        return pairs
'''


def test_a_pair_builder_added_from_a_directory_outside_the_package_runs_a_round(tmp_path):
    """One class plus one yaml file, found through hydra.searchpath and PYTHONPATH: no alignlab file changes."""
    plug = tmp_path / "plugin"
    (plug / "pair_builder").mkdir(parents=True)
    (plug / "my_builders.py").write_text(BUILDER)
    (plug / "pair_builder" / "longest_wrong.yaml").write_text(
        "_target_: my_builders.LongestWrongPairBuilder\nmin_wrong_chars: 1\n")
    out = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(plug), os.environ.get("PYTHONPATH")]))}
    alignlab(f"hydra.searchpath=[file://{plug}]", "pair_builder=longest_wrong", "rounds=1", "base_eval=false",
             *TINY_RUN, f"hydra.run.dir={out}", env=env)
    rollouts = [json.loads(line) for line in (out / "round_1" / "verdicts.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "round_1" / "pairs.jsonl").read_text().splitlines()]
    assert pairs, "the reduced round made no pair: the test says nothing"
    for p in pairs:
        wrong = [r["text"] for r in rollouts if r["problem_id"] == p["problem_id"] and r["verdict"] is False]
        assert p["meta"]["kind"] == "longest_wrong" and len(p["rejected"]) == max(map(len, wrong))
    train = json.loads((out / "round_1" / "train.json").read_text())
    assert train["trained_pairs"] == len(pairs) and (out / "round_1" / "checkpoint" / "config.json").exists()
    assert json.loads((out / "summary.json").read_text())["rounds"][0]["pairs"] == len(pairs)


# A REGRESSION GOLDEN: recorded with the code before the runner/training-core refactor (commit 24f0343), same
# command as below. Its point is "the numbers did not move", not bit-exactness: another CPU type may round a logit
# differently and flip a sampled token, so it is compared with tolerances (exact equality of two runs on one machine,
# the determinism claim, is tests/test_reliability.py::test_same_seed_gives_identical_artifacts...).
QUICKSTART_BEFORE = {
    "base": 0.125,
    "rounds": [  # (accuracy, pairs, selected, generated tokens, trained tokens, forward tokens, final train loss)
        (0.16666666666666666, 7, 7, 3847, 1036, 6844, 0.6931161085764568),
        (0.125, 7, 7, 3825, 954, 6638, 0.6936730146408081),
    ],
}


@pytest.mark.slow
def test_reduced_quickstart_numbers_did_not_move_since_the_refactor(tmp_path):
    out = tmp_path / "run"
    alignlab("experiment=quickstart", "rounds=2", "data.train_prompts=24", "data.eval_problems=24", "sampler.n=4",
             "trainer.epochs=1", "trainer.batch_size=4", "logger=none", "threads=1", f"hydra.run.dir={out}")
    s = json.loads((out / "summary.json").read_text())
    one = 1 / 24  # one held-out problem
    assert s["base"]["accuracy"] == pytest.approx(QUICKSTART_BEFORE["base"], abs=one + 1e-9)
    for r, row in zip(s["rounds"], QUICKSTART_BEFORE["rounds"], strict=True):
        acc, pairs, selected, gen, trained, forward, loss = row
        assert r["eval"]["accuracy"] == pytest.approx(acc, abs=one + 1e-9)
        assert abs(r["pairs"] - pairs) <= 1 and abs(r["selected"] - selected) <= 1
        for key, want in (("generated_tokens", gen), ("trained_tokens", trained), ("forward_tokens", forward)):
            assert r["ledger"][key] == pytest.approx(want, rel=0.03), key  # a flipped sample or two, no more
        assert r["train"]["loss"] == pytest.approx(loss, abs=1e-3)


def test_a_private_api_at_an_untested_version_fails_naming_library_version_and_range(monkeypatch):
    import transformers

    from alignlab import _compat

    monkeypatch.setitem(_compat.TESTED, "transformers", ("0.1", "0.2"))
    with pytest.raises(_compat.UntestedVersion, match=rf"transformers {transformers.__version__} .*>=0.1,<0.2"):
        _compat.dynamic_layer_base()
    monkeypatch.undo()
    assert _compat.dynamic_layer_base().__name__ == "DynamicLayer"  # the installed version is in the tested range


def test_one_training_core_one_private_api_module_and_a_runner_that_knows_only_protocols():
    """The layout the code relies on to stay small: each of these exists in exactly one place."""
    import re

    from conftest import ROOT

    sources = {p.relative_to(ROOT).as_posix(): p.read_text() for p in (ROOT / "alignlab").rglob("*.py")}

    def where(pattern: str) -> list[str]:
        return sorted(f for f, s in sources.items() if re.search(pattern, s))

    assert where(r"layer_class_to_replicate|build_shm_op|_zero3_consolidated|engine_core") == ["alignlab/_compat.py"]
    assert sum(s.count("AdamW(") for s in sources.values()) == 1 and where(r"AdamW\(") == ["alignlab/train/core.py"]
    assert sum(s.count("save_pretrained(") for s in sources.values()) == 1
    runner = sources["alignlab/runner.py"]
    assert len(runner.splitlines()) <= 200
    assert not re.search(r"\b(isinstance|getattr|hasattr)\(", runner)
    assert not re.search(r"^\s*(from|import) alignlab\.train", runner, re.M)


# The layers, from the ground up: a module may import its own layer or a lower one, never a higher one. report/ and
# dynamics/ (and the SFT warm-start recipe) are side apps: they use the components, nothing below imports them.
LAYERS = {
    0: {"", "records", "config", "ledger", "statejson", "spec", "_compat", "preempt", "runlock", "hub", "logging",
        "checks", "dist"},
    1: {"models"},
    2: {"data", "generation", "sampling", "verify", "pairs", "select", "losses", "reference", "train", "eval"},
    3: {"stages", "report", "dynamics", "sft_base"},
    4: {"runner"},
    5: {"cli", "precheck"},
}
LAYER_OF = {name: level for level, names in LAYERS.items() for name in names}


def import_graph(root: Path) -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every ``alignlab`` import in ``root/alignlab``, at module level or inside a
    function, read from the import statements themselves (nothing is imported)."""
    import ast

    pkg = root / "alignlab"

    def name_of(p: Path) -> str:
        parts = list(p.relative_to(root).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    mods = {name_of(p): p for p in pkg.rglob("*.py")}
    edges = []
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != m and t.startswith("alignlab"):
                    edges.append((m, t, node.lineno))
    return sorted(set(edges))


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    assert top in LAYER_OF, f"{module}: not placed in a layer (tests/test_architecture.py LAYERS)"
    return LAYER_OF[top]


def upward(edges: list[tuple[str, str, int]]) -> list[str]:
    return [f"{a}:{line} imports {b}" for a, b, line in edges if _layer(b) > _layer(a)]


def a_cycle(edges: list[tuple[str, str, int]]) -> list[str] | None:
    """One import cycle (as a path of modules), or None (depth-first search)."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [m, n] if n in path else [m, n]
            if n not in state and (found := visit(n, path + [m])):
                return found
        state[m] = 2
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m, []))), None)


def test_the_import_graph_has_no_cycles_and_no_upward_imports():
    """From the modules' own import statements (inside functions too): every import points down or sideways
    within a layer, and no set of modules imports itself round a cycle."""
    from conftest import ROOT

    edges = import_graph(ROOT)
    assert len(edges) > 100  # the parse found the package's imports
    assert not upward(edges), "upward imports:\n" + "\n".join(upward(edges))
    assert a_cycle(edges) is None, f"import cycle: {' -> '.join(a_cycle(edges) or [])}"


def test_the_import_check_catches_a_planted_upward_import_and_a_cycle(tmp_path):
    """The checks above, on a copy of the package with one import planted inside a function."""
    import shutil

    from conftest import ROOT

    shutil.copytree(ROOT / "alignlab", tmp_path / "alignlab", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    f = tmp_path / "alignlab" / "models" / "__init__.py"
    f.write_text(f.read_text() + "\n\ndef planted():\n    from alignlab.runner import run\n\n    return run\n")
    edges = import_graph(tmp_path)
    assert [u.split(":")[0] + " " + u.split(" imports ")[1] for u in upward(edges)] == ["alignlab.models alignlab.runner"]
    cycle = a_cycle(edges)
    assert cycle is not None and "alignlab.models" in cycle and "alignlab.runner" in cycle


def test_one_table_of_groups_names_the_schema_the_defaults_and_the_run():
    """config.GROUPS is the table; the schema, conf/config.yaml's defaults and stages.Run's fields use its names."""
    import dataclasses

    import yaml
    from conftest import ROOT

    from alignlab import config as C
    from alignlab.stages import Run

    schema = [f.name for f in dataclasses.fields(C.RunSchema)]
    assert [g for g in schema if g in C.GROUPS] == list(C.GROUPS)
    defaults = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())["defaults"]
    assert [next(iter(d)) for d in defaults if isinstance(d, dict) and next(iter(d)) != "experiment"] == list(C.GROUPS)
    fields = {f.name: f.type for f in dataclasses.fields(Run)}
    assert [f for f in fields if f in C.GROUPS] == list(C.GROUPS)
    assert all(fields[g] != "Any" for g in C.GROUPS)  # each typed by its group's protocol
