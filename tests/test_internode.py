"""Several nodes: per-GPU memory shards over every GPU of every node; the slower link bounds the step."""

from __future__ import annotations

import pytest

from ftplan.planner.estimate.estimator import EstimateRequest, estimate
from ftplan.planner.estimate.gpus import resolve_gpu
from ftplan.planner.estimate.internode import estimate_nodes, multinode_types, node_network
from ftplan.planner.estimate.models import resolve_model


def _req(name: str, method: str, **kw) -> EstimateRequest:
    return EstimateRequest(model=resolve_model(name), method=method, seq_len=2048, batch_size=1,
                           dataset_tokens=100_000_000, **kw)


def test_network_table_knows_the_multinode_types_and_refuses_others():
    assert node_network("aws", "p5.48xlarge").fabric.startswith("EFA")
    assert node_network("gcp", "a3-megagpu-8g").gbps == 1800
    assert node_network("runpod", "H100 SXM") is None   # no placement primitive in the public API
    assert node_network("ssh", "anything", ssh_gbps=25).gbps == 25
    assert ("aws", "p4d.24xlarge") in multinode_types()


def test_70b_full_finetune_fits_on_several_8xh100_nodes_but_not_one():
    req = _req("llama3.1-70b", "full", zero=3)
    h100 = resolve_gpu("H100")
    one = estimate(req, h100, 8)
    assert not one.fits
    four = estimate_nodes(req, h100, 8, 4, node_network("aws", "p5.48xlarge"))
    assert four.estimate.fits
    assert four.estimate.memory.total < one.memory.total / 3       # sharded over 32 GPUs instead of 8
    assert four.estimate.gpu.name == h100.name


def test_a_slow_network_bounds_the_step_and_the_output_says_so():
    req = _req("llama3.1-8b", "full", zero=3)
    a100 = resolve_gpu("A100-80GB")
    fast = estimate_nodes(req, a100, 8, 2, node_network("aws", "p4de.24xlarge"))   # 400 Gb/s EFA
    slow = estimate_nodes(req, a100, 8, 2, node_network("gcp", "a2-ultragpu-8g"))  # 100 Gb/s Ethernet
    assert "between nodes" in slow.bounding_link and "Ethernet" in slow.bounding_link
    assert slow.estimate.tokens_per_s < fast.estimate.tokens_per_s
    # The same memory per GPU: the network changes time, never what must fit.
    assert slow.estimate.memory.total == pytest.approx(fast.estimate.memory.total)
    assert slow.as_dict()["nodes"] == 2


def test_one_node_is_the_single_machine_estimate():
    req = _req("mistral-7b", "qlora")
    l4 = resolve_gpu("L4")
    single = estimate(req, l4, 1)
    same = estimate_nodes(req, l4, 1, 1, node_network("ssh", "x"))
    assert same.estimate.tokens_per_s == pytest.approx(single.tokens_per_s)
    assert "one node" in same.bounding_link
