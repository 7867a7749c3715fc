"""The plan's multi-node candidates: which node counts it keeps, how they are ranked, who never gets them."""

from __future__ import annotations

import json

import pytest
from cli_helpers import error_line, ftplan
from cli_helpers import ftplan as ftplan_cli

from ftplan.planner.estimate.estimator import EstimateRequest
from ftplan.planner.estimate.models import resolve_model
from ftplan.planner.pricing import evaluators
from ftplan.planner.pricing import optimizer as opt
from ftplan.planner.pricing.offers import OfferTable

OVERHEADS = {p: opt.Overheads(4, 6, 2, 60) for p in ("aws", "gcp", "runpod", "lambda", "paperspace")}
BIG_JOB = ["plan", "--model", "llama3.1-70b", "--method", "full", "--dataset-tokens", "100000000"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FTPLAN_CACHE_DIR", str(tmp_path))


def row(provider="aws", itype="p4de.24xlarge", gpu="A100-80GB", count=8, mem=80.0, price=40.0, spot=None,
        region="r1"):
    return (provider, itype, gpu, count, mem, 96.0, 1152.0, price, spot, region, "", 1, "test", "2026-01-01")


def job(peak_one_node: float, hours_one_gpu: float, speedup=lambda gpus: gpus):
    """Fake evaluators: peak per GPU shards over every GPU; hours shrink by `speedup(total GPUs)`."""
    def evaluate(gpu, count):
        return opt.Need(peak_gib=peak_one_node * 8 / count, train_hours=hours_one_gpu / speedup(count))

    def evaluate_nodes(gpu, count, nodes, network):
        n = count * nodes
        return opt.Need(peak_gib=peak_one_node * 8 / n, train_hours=hours_one_gpu / speedup(n), strategy="zero3",
                        bounding_link=f"{network.describe()} between nodes")
    return evaluate, evaluate_nodes


def rank(table, peak, hours, speedup=lambda g: g, **filters):
    evaluate, evaluate_nodes = job(peak, hours, speedup)
    return opt.rank(table, evaluate, opt.Filters(**filters), opt.CostModel(overheads=OVERHEADS),
                    evaluate_nodes=evaluate_nodes)


def test_too_big_for_one_node_gives_the_fewest_nodes_that_hold_it_with_total_over_every_node():
    res = rank(OfferTable([row()]), peak=140.0, hours=800.0)  # 140 GiB/GPU on 8 GPUs: 2 nodes hold 70 (+10 %)
    assert res.offers and {o.nodes for o in res.offers} >= {2}
    two = next(o for o in res.offers if o.nodes == 2)
    assert two.total_usd == pytest.approx(2 * 40.0 * two.billed_hours)
    assert two.network.startswith("EFA") and "between nodes" in two.bounding_link
    assert two.to_dict()["nodes"] == 2 and two.to_dict()["bounding_link"]
    assert not any(o.nodes == 1 for o in res.offers)


def test_more_nodes_kept_only_when_faster_for_about_the_same_total():
    linear = rank(OfferTable([row()]), peak=10.0, hours=800.0)                 # perfect scaling: same total
    assert sorted({o.nodes for o in linear.offers}) == [1, 2, 3, 4]
    poor = rank(OfferTable([row()]), peak=10.0, hours=800.0, speedup=lambda g: min(g, 8) + (g - 8) * 0.5)
    assert {o.nodes for o in poor.offers} == {1}                               # 2 nodes: 1.33x faster, 1.5x cost


def test_multinode_and_single_node_offers_share_one_ranking_by_total():
    """Same rules: one cost-ordered list, whatever the node count; prices decide, not the node count."""
    for b200_price in (30.0, 300.0):
        table = OfferTable([row(price=40.0), row(itype="p5.48xlarge", gpu="H100", price=98.0),
                            row(provider="runpod", itype="8x_B200", gpu="B200", mem=180.0, price=b200_price)])
        # 100 GiB per GPU on one 8-GPU node: only the B200 node holds it; A100/H100 need 2 nodes.
        res = rank(table, peak=100.0, hours=800.0)
        totals = [(o.total_usd, o.hours) for o in res.offers]
        assert totals == sorted(totals)
        by = {(o.instance_type, o.nodes): o for o in res.offers}
        assert ("8x_B200", 1) in by and ("p4de.24xlarge", 2) in by and ("p5.48xlarge", 2) in by
        assert not any(o.provider == "runpod" and o.nodes > 1 for o in res.offers)
        first = res.offers[0]
        assert first.instance_type == ("8x_B200" if b200_price == 30.0 else "p4de.24xlarge")


def test_budget_cuts_multinode_totals_and_names_them_when_rejected():
    table = OfferTable([row()])
    full = rank(table, peak=140.0, hours=800.0)
    two = min(full.offers, key=lambda o: o.total_usd)
    evaluate, evaluate_nodes = job(140.0, 800.0)
    res = opt.rank(table, evaluate, opt.Filters(), opt.CostModel(overheads=OVERHEADS), budget=two.total_usd - 1,
                   evaluate_nodes=evaluate_nodes)
    assert not len(res)
    (over,) = [r for r in res.rejected if r.kind == "budget" and r.offer["nodes"] == 2]
    assert over.offer["total_usd"] == pytest.approx(two.total_usd)


def test_pinned_nodes_rank_only_that_count():
    res = rank(OfferTable([row()]), peak=10.0, hours=800.0, nodes=3)
    assert res.offers and {o.nodes for o in res.offers} == {3}
    single = rank(OfferTable([row()]), peak=10.0, hours=800.0, nodes=1)
    assert {o.nodes for o in single.offers} == {1}


def test_providers_without_placement_are_never_multinode_and_the_plan_says_so_once():
    table = OfferTable([row(provider="runpod", itype="8x_A100", price=10.0),
                        row(provider="lambda", itype="gpu_8x_a100", price=12.0), row()])
    res = rank(table, peak=150.0, hours=800.0)
    assert {o.provider for o in res.offers} == {"aws"}
    (note,) = res.notes
    assert "lambda, runpod" in note and "placement" in note
    # Where one node of them holds the job, nothing needed several nodes: no note.
    assert not rank(table, peak=10.0, hours=800.0).notes


def test_plan_cli_lists_2_to_4_node_h100_and_a100_candidates_beside_single_node(capsys):
    rc, out, err = ftplan(capsys, *BIG_JOB, "--json", "--top", "60")
    assert rc == 0, err
    data = json.loads(out)
    multi = [o for o in data["offers"] if o["nodes"] > 1]
    assert any(o["nodes"] == 1 for o in data["offers"])
    assert {o["gpu"] for o in multi} >= {"H100"} and all(2 <= o["nodes"] <= 4 for o in multi)
    assert all(o["network"] and o["bounding_link"] and o["provider"] in ("aws", "gcp") for o in multi)
    assert all(o["total_usd"] == pytest.approx(o["nodes"] * o["price_hour"] * o["billed_hours"], rel=1e-3)
               for o in multi)
    a100 = json.loads(ftplan(capsys, *BIG_JOB, "--json", "--gpu", "A100-80GB")[1])
    assert {o["nodes"] for o in a100["offers"]} <= {2, 3, 4} and a100["offers"]
    rc, text, _ = ftplan(capsys, *BIG_JOB, "--wide")
    assert rc == 0 and "bounded by" in text and "between nodes" in text


def test_plan_cli_nodes_flag_and_runpod_only_refusal(capsys):
    rc, out, _ = ftplan(capsys, *BIG_JOB, "--json", "--nodes", "4", "--providers", "aws")
    assert rc == 0 and {o["nodes"] for o in json.loads(out)["offers"]} == {4}
    line = error_line(capsys, *BIG_JOB, "--providers", "runpod,lambda", "--gpu", "A100-80GB")
    assert "no placement primitive" in line and "aws, gcp" in line


def test_evaluator_shards_memory_over_every_node_and_names_the_link():
    from ftplan.planner.estimate.internode import node_network

    req = EstimateRequest(model=resolve_model("llama3.1-70b"), method="full", seq_len=2048, batch_size=1,
                          dataset_tokens=100_000_000)
    evaluate, evaluate_nodes = evaluators.estimate_evaluators(req)
    one = evaluate("H100", 8)
    three = evaluate_nodes("H100", 8, 3, node_network("aws", "p5.48xlarge"))
    assert three.peak_gib < one.peak_gib / 2 and three.strategy == "zero3"
    slow = evaluate_nodes("H100", 8, 3, node_network("gcp", "a2-ultragpu-8g"))
    assert slow.train_hours > three.train_hours and "Ethernet" in slow.bounding_link


def test_a_short_job_that_fits_one_node_is_never_estimated_on_several():
    """N nodes are never more than N times faster, so when their fixed hours alone break the 10 % rule
    the plan skips their estimates (what keeps `ftplan plan` fast on small jobs)."""
    calls = []
    evaluate, evaluate_nodes = job(10.0, 2.0)

    def counting(*args):
        calls.append(args)
        return evaluate_nodes(*args)

    res = opt.rank(OfferTable([row()]), evaluate, opt.Filters(), opt.CostModel(overheads=OVERHEADS),
                   evaluate_nodes=counting)
    assert {o.nodes for o in res.offers} == {1} and calls == []


def test_python_api_plan_carries_the_same_multinode_offers_and_note_as_the_cli(capsys):
    import ftplan

    api = ftplan.plan(model="llama3.1-70b", method="full", dataset_tokens=100_000_000).to_dict()
    rc, out, _ = ftplan_cli(capsys, *BIG_JOB, "--json")
    assert rc == 0 and api == json.loads(out)
    assert any(o["nodes"] > 1 for o in api["offers"]) and any("multi-node" in w for w in api["warnings"])


def test_the_launcher_takes_the_plans_multinode_offers_and_launch_nodes_pins_the_count(monkeypatch):
    from types import SimpleNamespace

    from ftplan.planner.launch import estimate_bridge

    req = EstimateRequest(model=resolve_model("llama3.1-70b"), method="full", seq_len=2048, batch_size=1,
                          dataset_tokens=100_000_000)
    monkeypatch.setattr(estimate_bridge, "request_from_config", lambda cfg, dataset: req)
    cfg = SimpleNamespace(launch=SimpleNamespace(providers=["aws", "gcp"], regions=[], spot=None, budget_usd=None,
                                                 nodes=None))
    offers = estimate_bridge.launch_offers(cfg, None)
    assert any(o.nodes > 1 for o in offers)          # no single H100/A100 node holds it: 2-4 nodes are launchable
    cfg.launch.nodes = 1
    single = estimate_bridge.launch_offers(cfg, None)
    assert single and all(o.nodes == 1 for o in single)
    cfg.launch.nodes = 3
    assert all(o.nodes == 3 for o in estimate_bridge.launch_offers(cfg, None))
