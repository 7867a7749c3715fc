"""`ftplan estimate --nodes N`: memory per GPU over N x gpus, the network stated or assumed, the bounding link."""

from __future__ import annotations

import json

import pytest
from cli_helpers import error_line, ftplan

JOB = ["estimate", "--model", "llama3.1-70b", "--method", "full", "--dataset-tokens", "100000000", "--zero", "3"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FTPLAN_CACHE_DIR", str(tmp_path))


def as_json(capsys, *args) -> dict:
    rc, out, err = ftplan(capsys, *JOB, "--json", *args)
    assert rc == 0, err
    return json.loads(out)


def test_more_nodes_shard_memory_and_the_default_network_is_stated(capsys):
    one = as_json(capsys, "--gpu", "H100", "--gpus", "8")
    four = as_json(capsys, "--gpu", "H100", "--gpus", "8", "--nodes", "4")
    assert not one["fits"] and four["fits"]
    assert four["memory_gib"]["total"] < one["memory_gib"]["total"] / 2
    assert four["nodes"] == 4 and four["gpus_per_node"] == 8 and four["gpu_count"] == 32
    assert four["network"] == "Ethernet 10 Gb/s" and "assumed" in four["network_source"]
    assert "between nodes" in four["bounding_link"]


def test_a_faster_network_speeds_the_step_and_text_names_the_link(capsys):
    slow = as_json(capsys, "--gpu", "H100", "--gpus", "8", "--nodes", "4")
    fast = as_json(capsys, "--gpu", "H100", "--gpus", "8", "--nodes", "4", "--node-gbps", "3200")
    assert fast["throughput_tokens_per_s"] > 5 * slow["throughput_tokens_per_s"]
    assert fast["memory_gib"]["total"] == pytest.approx(slow["memory_gib"]["total"])
    rc, text, _ = ftplan(capsys, *JOB, "--gpu", "H100", "--gpus", "8", "--nodes", "2")
    assert rc == 0
    assert "Ethernet 10 Gb/s (assumed" in text and "bounding link: Ethernet 10 Gb/s between nodes" in text
    assert "DOES NOT FIT" in text and "--nodes 3" in text   # the fewest nodes that would hold it


def test_all_gpus_table_over_nodes(capsys):
    data = as_json(capsys, "--gpus", "8", "--nodes", "3", "--node-gbps", "400")
    h100 = next(g for g in data["gpus"] if g["gpu"] == "H100")
    assert h100["fits"] and "between nodes" in h100["bounding_link"] and data["network"] == "Ethernet 400 Gb/s"
    rc, text, _ = ftplan(capsys, *JOB, "--gpus", "8", "--nodes", "3")
    assert rc == 0 and "3 nodes x 8 GPUs each" in text and "the network bounds the step" in text


@pytest.mark.parametrize("flag, value", [("--nodes", "0"), ("--node-gbps", "-5")])
def test_bad_node_flags_are_one_line_errors(capsys, flag, value):
    assert flag in error_line(capsys, *JOB, "--gpu", "H100", flag, value)
