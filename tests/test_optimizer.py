"""The optimizer: cost model, filters, Pareto frontier, and (hypothesis) cheapest-feasible == brute force."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftplan.planner.pricing import offers as O
from ftplan.planner.pricing import optimizer as opt
from ftplan.planner.pricing.offers import OfferTable

OVERHEADS = {
    "aws": opt.Overheads(4, 6, 2, 60), "gcp": opt.Overheads(4, 6, 2, 60), "runpod": opt.Overheads(2, 6, 2, 0),
    "lambda": opt.Overheads(5, 6, 2, 60), "paperspace": opt.Overheads(5, 6, 2, 3600),
}


def row(provider="aws", itype="x1", gpu="L4", count=1, mem=24.0, vcpus=8.0, ram=32.0, price=1.0, spot=None,
        region="r1", zone="", gran=1):
    return (provider, itype, gpu, count, mem, vcpus, ram, price, spot, region, zone, gran, "test", "2026-01-01")


def need_table(peak: float, hours: float):
    return lambda gpu, n: opt.Need(peak_gib=peak, train_hours=hours / n)


def test_billed_hours_rounds_up_to_granularity_and_minimum():
    assert opt.billed_hours(1.01, 3600) == 2.0                       # Paperspace: whole hours
    assert opt.billed_hours(10 / 60, 60) == pytest.approx(10 / 60)   # Lambda: exact minutes stay
    assert opt.billed_hours(10.5 / 60, 60) == pytest.approx(11 / 60)
    assert opt.billed_hours(30 / 3600, 1, 60) == pytest.approx(60 / 3600)  # AWS 60 s minimum
    assert opt.billed_hours(2.5, 1) == pytest.approx(2.5)


def test_total_is_price_times_billed_overheads_plus_training():
    table = OfferTable([row(provider="paperspace", price=2.0, gran=3600)])
    res = opt.rank(table, need_table(10, 1.0), cost=opt.CostModel(overheads=OVERHEADS))
    (o,) = res.offers
    # 5 + 6 + 2 minutes of overhead + 1 h training = 1.2167 h, billed as 2 whole hours
    assert o.hours == pytest.approx(1 + 13 / 60)
    assert o.billed_hours == 2.0 and o.total_usd == pytest.approx(4.0)
    assert (o.provision_min, o.setup_min, o.pull_min) == (5, 6, 2)


def test_spot_adds_expected_preemption_overhead():
    table = OfferTable([row(price=1.0, spot=0.3)])
    cost = opt.CostModel(overheads=OVERHEADS, preemption_rate=0.2, checkpoint_min=30)
    res = opt.rank(table, need_table(10, 5.0), cost=cost)
    spot = next(o for o in res.offers if o.spot)
    od = next(o for o in res.offers if not o.spot)
    # 0.2 preemptions/h x 5 h x (15 min lost work + 10 min re-provision and setup)
    assert spot.hours - od.hours == pytest.approx(0.2 * 5 * (15 + 10) / 60)
    assert spot.total_usd == pytest.approx(0.3 * spot.hours)
    assert spot.preemption_h == pytest.approx(spot.hours - od.hours)


def test_memory_margin_and_rejection_reason():
    table = OfferTable([row(itype="small", mem=16.0, price=0.5), row(itype="big", mem=24.0, price=1.0)])
    res = opt.rank(table, need_table(15.0, 1.0), cost=opt.CostModel(overheads=OVERHEADS, headroom=0.10))
    assert [o.instance_type for o in res.offers] == ["big"]
    assert res.offers[0].headroom_gib == pytest.approx(9.0)
    (rej,) = [r for r in res.rejected if r.kind == "memory"]
    assert rej.offer["instance_type"] == "small"
    assert rej.short_gib == pytest.approx(15 * 1.1 - 16)
    assert "short by 0.5 GiB" in rej.reason
    # the driver-reported size caps what an offer lists
    capped = opt.rank(table, lambda g, n: opt.Need(peak_gib=15, train_hours=1, usable_gib=16.4),
                      cost=opt.CostModel(overheads=OVERHEADS))
    assert not capped.offers


def test_budget_cut_is_exact_and_reported():
    table = OfferTable([row(itype="a", price=1.0), row(itype="b", price=2.0), row(itype="c", price=3.0)])
    hours = 1 - 12 / 60  # 1 h total with the 12 min of AWS overheads
    res = opt.rank(table, need_table(1, hours), cost=opt.CostModel(overheads=OVERHEADS), budget=2.0)
    assert [o.instance_type for o in res.offers] == ["a", "b"]  # b costs exactly the budget
    (over,) = [r for r in res.rejected if r.kind == "budget"]
    assert over.offer["instance_type"] == "c" and over.over_usd == pytest.approx(1.0)


def test_filters():
    table = OfferTable([
        row(provider="aws", itype="a", region="us-east-1", vcpus=4, ram=16, price=1.0, spot=0.5),
        row(provider="gcp", itype="g", region="us-central1", vcpus=16, ram=64, price=2.0, gpu="A100", mem=40),
        row(provider="runpod", itype="r", region="US", vcpus=None, ram=None, price=0.4),
    ])
    cost = opt.CostModel(overheads=OVERHEADS)

    def names(**kw):
        return sorted({(o.instance_type, o.spot) for o in opt.rank(table, need_table(1, 1), opt.Filters(**kw),
                                                                   cost).offers})

    assert names(providers=("aws",)) == [("a", False), ("a", True)]
    assert names(regions=("US", "us-central1")) == [("g", False), ("r", False)]
    assert names(gpus=("A100",)) == [("g", False)]
    assert names(market="spot") == [("a", True)]
    assert names(market="on-demand") == [("a", False), ("g", False), ("r", False)]
    assert names(min_vcpus=8) == [("g", False)]            # unknown vCPUs never pass a minimum
    assert names(min_ram_gib=32) == [("g", False)]
    assert names(max_hourly=1.0) == [("a", False), ("a", True), ("r", False)]


def test_gpu_the_job_cannot_use_is_rejected_with_its_reason():
    table = OfferTable([row(gpu="T4", mem=16, price=0.3), row(gpu="L4", price=0.8)])

    def ev(gpu, n):
        return opt.Need(reason="T4 has no bf16") if gpu == "T4" else opt.Need(peak_gib=5, train_hours=1)

    res = opt.rank(table, ev, cost=opt.CostModel(overheads=OVERHEADS))
    assert [o.gpu for o in res.offers] == ["L4"]
    assert [(r.kind, r.reason) for r in res.rejected] == [("gpu", "T4 has no bf16")]


def test_pareto_frontier_marks_cheaper_or_faster_offers():
    table = OfferTable([
        row(itype="slow-cheap", gpu="L4", price=0.5),
        row(itype="fast", gpu="H100", mem=80, count=8, price=30.0),
        row(itype="dominated", gpu="A10G", price=2.0),          # same speed as L4 here, dearer
    ])

    def ev(gpu, n):
        return opt.Need(peak_gib=5, train_hours={"L4": 4.0, "H100": 0.2, "A10G": 4.0}[gpu])

    res = opt.rank(table, ev, cost=opt.CostModel(overheads=OVERHEADS))
    flags = {o.instance_type: o.pareto for o in res.top(10)}
    assert flags == {"slow-cheap": True, "fast": True, "dominated": False}
    assert [o.instance_type for o in res.frontier()] == ["slow-cheap", "fast"]


def test_top_collapses_places_of_one_type_and_lists_them():
    table = OfferTable([row(itype="a", region=r, price=p) for r, p in (("r1", 1.0), ("r2", 1.0), ("r3", 1.5))]
                       + [row(itype="b", region="r1", price=1.2)])
    res = opt.rank(table, need_table(1, 1), cost=opt.CostModel(overheads=OVERHEADS))
    lines = res.top(10)
    assert [(o.instance_type, o.region, o.other_regions) for o in lines] == [("a", "r1", ["r2", "r3"]),
                                                                              ("b", "r1", [])]
    assert len(res.top(10, collapse=False)) == 4


# --------------------------------------------------------------------------- property: brute-force oracle

GPUS = ("L4", "A100", "H100", "T4")
ROW = st.builds(
    lambda prov, gpu, count, mem, price, spot_frac, region, gran, vcpus: row(
        provider=prov, itype=f"{gpu}x{count}", gpu=gpu, count=count, mem=mem, price=price,
        spot=None if spot_frac is None else round(price * spot_frac, 4), region=region, gran=gran, vcpus=vcpus),
    st.sampled_from(O.PROVIDERS), st.sampled_from(GPUS), st.sampled_from((1, 2, 4, 8)),
    st.sampled_from((16.0, 24.0, 40.0, 80.0)), st.floats(0.05, 60, allow_nan=False).map(lambda x: round(x, 4)),
    st.one_of(st.none(), st.floats(0.1, 0.99)), st.sampled_from(("r1", "r2", "r3")),
    st.sampled_from((1, 60, 3600)), st.one_of(st.none(), st.sampled_from((4.0, 8.0, 32.0))),
)
NEED = st.one_of(
    st.builds(lambda p, h, u: opt.Need(peak_gib=p, train_hours=h, usable_gib=u),
              st.floats(0.5, 90), st.floats(0.001, 40), st.one_of(st.none(), st.floats(10, 90))),
    st.just(opt.Need(reason="cannot run here")),
)


def oracle(rows, needs, f: opt.Filters, cost: opt.CostModel, budget):
    """Plainly restated spec: every (offer, market) that fits with the margin and passes every cap."""
    out = []
    for i, r in enumerate(rows):
        prov, _t, gpu, count, mem, vcpus, _ram, price, spot, region, _z, gran = r[:12]
        if f.providers and prov not in f.providers or f.regions and region not in f.regions:
            continue
        if f.min_vcpus is not None and (vcpus is None or vcpus < f.min_vcpus):
            continue
        need = needs[(gpu, count)]
        if need.reason:
            continue
        capacity = min(mem, need.usable_gib) if need.usable_gib else mem
        if need.peak_gib * (1 + cost.headroom) > capacity:
            continue
        ov = cost.overheads[prov]
        for is_spot, p in ((False, price), (True, spot)):
            if p is None or (f.market == "spot" and not is_spot) or (f.market == "on-demand" and is_spot):
                continue
            hours = (ov.provision_min + ov.setup_min + ov.pull_min) / 60 + need.train_hours
            if is_spot:
                hours += cost.preemption_rate * need.train_hours * (cost.checkpoint_min / 2 + ov.provision_min
                                                                     + ov.setup_min) / 60
            seconds = max(hours * 3600, ov.min_billed_s)
            billed = math.ceil(seconds / gran - 1e-9) * gran / 3600
            total = p * billed
            if f.max_hourly is not None and p > f.max_hourly:
                continue
            if budget is not None and total > budget:
                continue
            out.append((total, i, is_spot))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(ROW, min_size=1, max_size=40), needs=st.dictionaries(
    st.tuples(st.sampled_from(GPUS), st.sampled_from((1, 2, 4, 8))), NEED, min_size=16, max_size=16),
    budget=st.one_of(st.none(), st.floats(0.01, 500)), market=st.sampled_from(opt.MARKETS),
    max_hourly=st.one_of(st.none(), st.floats(0.1, 60)), regions=st.sampled_from(((), ("r1",), ("r2", "r3"))),
    min_vcpus=st.sampled_from((None, 8.0)), headroom=st.sampled_from((0.0, 0.1, 0.25)),
    rate=st.sampled_from((0.0, 0.1, 0.5)))
def test_chosen_offer_is_the_cheapest_feasible_one(rows, needs, budget, market, max_hourly, regions, min_vcpus,
                                                   headroom, rate):
    f = opt.Filters(regions=regions, market=market, max_hourly=max_hourly, min_vcpus=min_vcpus)
    cost = opt.CostModel(headroom=headroom, preemption_rate=rate, checkpoint_min=20, overheads=OVERHEADS)
    res = opt.rank(OfferTable(rows), lambda g, n: needs[(g, n)], f, cost, budget)
    expected = oracle(rows, needs, f, cost, budget)
    got = [(o.total_usd, o.spot) for o in res.offers]
    assert len(got) == len(expected) == len(res)
    if not expected:
        assert res.best is None
        return
    cheapest = min(t for t, _, _ in expected)
    assert res.best.total_usd == pytest.approx(cheapest)
    assert res.offers[0].total_usd == pytest.approx(cheapest)
    assert sorted(round(t, 9) for t, _ in got) == sorted(round(t, 9) for t, _, _ in expected)
    assert all(a.total_usd <= b.total_usd + 1e-12 for a, b in zip(res.offers, res.offers[1:], strict=False))
    for o in res.offers:  # nothing chosen fails to fit or breaks a cap
        assert o.peak_gib * (1 + headroom) <= min(o.gpu_memory_gib, o.headroom_gib + o.peak_gib) + 1e-9
        assert budget is None or o.total_usd <= budget
        assert max_hourly is None or o.price_hour <= max_hourly


# --------------------------------------------------------------------------- with the real estimator

def test_plan_offers_uses_the_estimate_and_shards_when_one_gpu_is_too_small(tmp_path, monkeypatch):
    from ftplan.planner.estimate.estimator import EstimateRequest, estimate
    from ftplan.planner.estimate.gpus import resolve_gpu
    from ftplan.planner.estimate.models import resolve_model

    monkeypatch.setenv("FTPLAN_CACHE_DIR", str(tmp_path))
    req = EstimateRequest(model=resolve_model("mistral-7b"), method="qlora", dataset_tokens=5_000_000)
    res = opt.plan_offers(req, opt.Filters(providers=("aws",)))
    best = res.best
    est = estimate(req, resolve_gpu(best.gpu), best.gpu_count)
    assert best.peak_gib == pytest.approx(est.memory.total)
    assert best.train_hours == pytest.approx(est.hours)
    assert best.peak_gib * 1.1 <= min(best.gpu_memory_gib, resolve_gpu(best.gpu).usable_gib)
    # the cheapest offer on the cheapest provider price list costs what its catalog row says, times hours
    assert best.total_usd == pytest.approx(best.price_hour * best.billed_hours)

    full = EstimateRequest(model=resolve_model("llama3.1-8b"), method="full", dataset_tokens=1_000_000)
    res = opt.plan_offers(full, opt.Filters(providers=("runpod",), gpus=("A100-80GB",)))
    assert res.offers, "8B full fine-tuning fits on several 80 GB GPUs with ZeRO-3"
    assert {o.gpu_count for o in res.offers} >= {4, 8} and all(o.gpu_count > 1 for o in res.offers)
    assert {o.strategy for o in res.offers} == {"zero3"}
    assert any(r.kind == "memory" and r.offer["gpu_count"] == 1 for r in res.rejected)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(ROW, min_size=1, max_size=30), data=st.data())
def test_budget_boundary_matches_brute_force(rows, data):
    """A budget exactly at, or a hair below, some offer's total keeps exactly the offers the oracle keeps."""
    needs = {(g, n): opt.Need(peak_gib=8, train_hours=2 / n) for g in GPUS for n in (1, 2, 4, 8)}
    cost = opt.CostModel(overheads=OVERHEADS)
    totals = sorted(t for t, _, _ in oracle(rows, needs, opt.Filters(), cost, None))
    pick = data.draw(st.sampled_from(totals))
    budget = data.draw(st.sampled_from((pick, pick * (1 - 1e-9), pick * (1 + 1e-9))))
    res = opt.rank(OfferTable(rows), lambda g, n: needs[(g, n)], opt.Filters(), cost, budget)
    assert len(res) == len(oracle(rows, needs, opt.Filters(), cost, budget))
    assert all(o.total_usd <= budget for o in res.offers)
