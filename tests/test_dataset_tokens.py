"""Dataset token counting for the time estimate: JSONL and Alpaca's own JSON-array form."""

from __future__ import annotations

import json

import pytest

from ftplan.planner.errors import UserError
from ftplan.planner.estimate.dataset_tokens import count_dataset_tokens

RECORDS = [{"instruction": f"Summarise item {i}.", "input": "x " * i, "output": "A short answer."} for i in range(12)]


def test_json_array_and_jsonl_count_the_same(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(RECORDS, indent=2))
    lines = tmp_path / "a.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    tokens_arr, n_arr, _ = count_dataset_tokens(arr, 32000)
    tokens_lines, n_lines, _ = count_dataset_tokens(lines, 32000)
    assert n_arr == n_lines == len(RECORDS)
    assert tokens_arr == tokens_lines > 0


def test_broken_json_array_names_the_line(tmp_path):
    arr = tmp_path / "bad.json"
    arr.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", "output": }\n]\n')
    with pytest.raises(UserError, match=r"line 3"):
        count_dataset_tokens(arr, 32000)
