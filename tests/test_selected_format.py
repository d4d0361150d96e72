"""selected.jsonl is flat TRL format plus a score column: load_dataset gives the trained pairs (issue 33)."""

from __future__ import annotations

import json

import datasets

from alignlab.records import Pair, Selected, is_complete, read_jsonl, write_jsonl


def test_selected_rows_are_trl_pair_columns_plus_score_and_old_nested_files_still_read(tmp_path):
    sel = [Selected(Pair("a", "p1", "good", "bad", {"pass_rate": 0.5}), 0.25), Selected(Pair("b", "p2", "c", "r"), -1.0)]
    path = tmp_path / "selected.jsonl"
    write_jsonl(path, sel)
    assert is_complete(path)  # the .done sidecar stays
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"problem_id": "a", "prompt": "p1", "chosen": "good", "rejected": "bad",
                       "meta": {"pass_rate": 0.5}, "score": 0.25}  # written out by hand
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    assert ds.column_names == ["problem_id", "prompt", "chosen", "rejected", "meta", "score"]
    assert ds["prompt"] == ["p1", "p2"] and ds["chosen"] == ["good", "c"] and ds["score"] == [0.25, -1.0]
    assert read_jsonl(path, Selected) == sel
    old = tmp_path / "old.jsonl"  # a run from before: {"pair": {...}, "score": ...}
    write_jsonl(old, [{"pair": {"problem_id": "a", "prompt": "p1", "chosen": "good", "rejected": "bad",
                                "meta": {"pass_rate": 0.5}}, "score": 0.25}])
    assert read_jsonl(old, Selected) == sel[:1]
