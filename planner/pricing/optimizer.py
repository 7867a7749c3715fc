"""Rank offers by expected total cost of the whole run: the cheapest instance that holds the job.

Cost of one candidate = hourly price x billed hours, where billed hours = provisioning + setup +
training + artifact pull, rounded up to the provider's billing granularity (and its minimum charge).
Spot adds the expected preemption overhead: rate/h x training hours x (half a checkpoint interval of
lost work + a restart = provisioning + setup again).

Speed: the estimate depends only on (GPU type, GPU count, listed memory), a few dozen combinations,
so it is computed once per group; the per-offer work is a single pass of float arithmetic over
plain tuples. Groups that cannot hold the job are rejected without touching their rows.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from ftplan.catalogs import data_path
from ftplan.planner.errors import UserError
from ftplan.planner.pricing import offers as O
from ftplan.planner.pricing.offers import OfferTable
from ftplan.planner.pricing.plan_result import PlanResult, Rejected, _Group, _GroupEval, _Stream

if TYPE_CHECKING:  # pragma: no cover
    from ftplan.planner.estimate.estimator import EstimateRequest

MARKETS = ("any", "spot", "on-demand")


# --------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Overheads:
    """Billed minutes besides training, per provider (catalogs/provider_overheads.json)."""

    provision_min: float
    setup_min: float
    pull_min: float
    min_billed_s: int = 0
    # Of setup_min, the environment install: the bootstrap downloads the weights during it, so only a download
    # longer than this adds time. download_gib_per_min: the catalog's rate when no run measured one.
    env_min: float = 0.0
    download_gib_per_min: float = 6.0

    @property
    def fixed_h(self) -> float:
        return (self.provision_min + self.setup_min + self.pull_min) / 60

    @property
    def restart_h(self) -> float:
        """A spot restart provisions and sets up a new instance before training resumes."""
        return (self.provision_min + self.setup_min) / 60


@lru_cache(maxsize=1)
def load_overheads() -> dict[str, Overheads]:
    raw = json.loads(data_path("provider_overheads.json").read_text())
    out = {}
    for name, d in raw["providers"].items():
        ov = Overheads(float(d["provision_min"]), float(d["setup_min"]), float(d["pull_min"]), int(d["min_billed_s"]),
                       float(d.get("env_min", 0.0)), float(d.get("download_gib_per_min", 6.0)))
        if min(ov.provision_min, ov.setup_min, ov.pull_min, ov.min_billed_s, ov.env_min) < 0 \
                or not ov.download_gib_per_min > 0 or ov.env_min > ov.setup_min:
            raise ValueError(f"provider_overheads.json: negative value, zero rate or env_min > setup_min for {name}")
        out[name] = ov
    return out


@dataclass(frozen=True)
class Need:
    """What the job needs on one (GPU type, GPU count): per-GPU peak and training hours.

    `reason` set = this GPU type cannot run the job at all (precision unsupported, not CUDA, unknown)."""

    peak_gib: float = 0.0
    train_hours: float = 0.0
    usable_gib: float | None = None   # what the driver reports; caps the memory an offer lists
    reason: str | None = None
    strategy: str = "single"          # single | ddp | zero3: how the GPUs share the job
    bounding_link: str = ""           # several nodes: the link that bounds the collectives


# evaluate(gpu, gpu_count) -> Need; called once per (gpu, count) pair present in the catalog.
Evaluator = Callable[[str, int], Need]
# evaluate_nodes(gpu, gpus_per_node, nodes, network) -> Need over nodes x gpus_per_node GPUs (see multinode.py).
NodesEvaluator = Callable[[str, int, int, object], Need]


@dataclass
class Filters:
    providers: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    gpus: tuple[str, ...] = ()        # canonical GPU names
    market: str = "any"               # any | spot | on-demand
    min_vcpus: float | None = None
    min_ram_gib: float | None = None
    max_hourly: float | None = None   # $/h cap on the instance price
    clouds: tuple[str, ...] = ()      # RunPod "secure"/"community"; empty = both (other providers have none)
    nodes: int | None = None          # None: one node, plus several where that helps (multinode.py); k: k only


@dataclass
class CostModel:
    headroom: float = 0.10            # safety margin on the estimated peak
    preemption_rate: float = 0.1      # expected spot preemptions per hour of training
    checkpoint_min: float = 30.0      # work lost per preemption is half an interval on average
    overheads: dict[str, Overheads] = field(default_factory=lambda: dict(load_overheads()))

    def spot_extra_h(self, train_h: float, ov: Overheads) -> float:
        return self.preemption_rate * train_h * (self.checkpoint_min / 120 + ov.restart_h)


def billed_hours(hours: float, granularity_s: int, min_billed_s: int = 0) -> float:
    """Hours the provider charges for `hours` of running: rounded up to its granularity and minimum."""
    seconds = max(hours * 3600, float(min_billed_s))
    return math.ceil(seconds / granularity_s - 1e-9) * granularity_s / 3600


# --------------------------------------------------------------------------- ranking

def group_rows(table: OfferTable) -> list[_Group]:
    """Index the table once (cached on it): rows sharing what the estimate and billing depend on,
    each group's rows sorted by on-demand price and by spot price."""
    cached = getattr(table, "_groups", None)
    if cached is not None:
        return cached
    index: dict[tuple, _Group] = {}
    rows = table.rows
    for i, r in enumerate(rows):
        key = (r[O.PROVIDER], r[O.GPU], r[O.GPU_COUNT], r[O.GPU_MEM], r[O.GRANULARITY])
        grp = index.get(key)
        if grp is None:
            grp = index[key] = _Group(*key)
        grp.add(i, r)
    for grp in index.values():
        grp.sort_by_price(rows)
    groups = list(index.values())
    table._groups = groups
    return groups


def _offer_brief(r: tuple, spot: bool, total: float | None = None, nodes: int = 1) -> dict:
    d = {"provider": r[O.PROVIDER], "instance_type": r[O.INSTANCE_TYPE], "gpu": r[O.GPU],
         "gpu_count": r[O.GPU_COUNT], "region": r[O.REGION], "zone": r[O.ZONE], "spot": spot,
         "price_hour": r[O.SPOT] if spot else r[O.PRICE], "cloud": r[O.CLOUD] or None, "nodes": nodes}
    if total is not None:
        d["total_usd"] = round(total, 4)
    return d


def _cut(prices: list[float], billed: float, cap: float, hi: int) -> int:
    """How many leading prices keep price x billed within `cap` (exact at the boundary)."""
    if cap == math.inf or billed <= 0:
        return hi
    k = bisect.bisect_right(prices, cap / billed, 0, hi)
    while k > 0 and prices[k - 1] * billed > cap:
        k -= 1
    while k < hi and prices[k] * billed <= cap:
        k += 1
    return k


def rank(
    table: OfferTable,
    evaluate: Evaluator,
    filters: Filters | None = None,
    cost: CostModel | None = None,
    budget: float | None = None,
    rejected_per_kind: int = 5,
    evaluate_nodes: NodesEvaluator | None = None,
) -> PlanResult:
    """Rank every offer of `table` that passes `filters` by expected total cost (see module docstring).

    With `evaluate_nodes`, instance types that can be rented as several nodes (catalogs/networks.json) add
    2..4-node candidates where multinode.py's rule keeps them; they join the same cost-ordered merge."""
    f = filters or Filters()
    cost = cost or CostModel()
    if f.market not in MARKETS:
        raise UserError(f"unknown market '{f.market}'; use --spot, --on-demand or --any")
    rows = table.rows
    groups = group_rows(table)
    providers, gpus, regions = set(f.providers), set(f.gpus), set(f.regions)
    min_vcpus, min_ram = f.min_vcpus, f.min_ram_gib
    clouds = set(f.clouds)
    max_hourly = f.max_hourly if f.max_hourly is not None else math.inf
    cap = budget if budget is not None else math.inf
    markets = [spot for spot, on in ((False, f.market != "spot"), (True, f.market != "on-demand")) if on]
    margin = 1.0 + cost.headroom
    row_filter = bool(regions) or bool(clouds) or min_vcpus is not None or min_ram is not None
    single = f.nodes is None or f.nodes == 1

    def row_ok(r: tuple) -> bool:
        if regions and r[O.REGION] not in regions:
            return False
        if clouds and r[O.CLOUD] and r[O.CLOUD] not in clouds:
            return False
        if min_vcpus is not None and (r[O.VCPUS] is None or r[O.VCPUS] < min_vcpus):
            return False
        return not (min_ram is not None and (r[O.RAM] is None or r[O.RAM] < min_ram))

    needs: dict[tuple[str, int], Need] = {}
    evals: dict[int, _GroupEval] = {}
    streams: list[_Stream] = []
    over: list[tuple] = []
    hourly: list[tuple] = []
    group_rejects: list[tuple] = []
    considered = 0
    limit = rejected_per_kind

    def need_of(gpu: str, count: int) -> Need:
        need = needs.get((gpu, count))
        if need is None:
            need = needs[(gpu, count)] = evaluate(gpu, count)
        return need

    def timed(need: Need, capacity: float, grp: _Group, ov: Overheads) -> _GroupEval:
        """Hours and billed hours of one group; spot preemptions scale with the nodes (any one stops all)."""
        ev = _GroupEval(need, capacity)
        ev.hours_od = ov.fixed_h + need.train_hours
        ev.hours_spot = ev.hours_od + cost.spot_extra_h(need.train_hours, ov) * grp.nodes
        ev.billed_od = billed_hours(ev.hours_od, grp.granularity, ov.min_billed_s)
        ev.billed_spot = billed_hours(ev.hours_spot, grp.granularity, ov.min_billed_s)
        return ev

    def add_streams(g: int, grp: _Group, ev: _GroupEval) -> None:
        n = grp.nodes
        for spot in markets:
            idx, prices = (grp.spot_rows, grp.spot_prices) if spot else (grp.od_rows, grp.od_prices)
            if row_filter:
                keep = [k for k, i in enumerate(idx) if row_ok(rows[i])]
                idx, prices = [idx[k] for k in keep], [prices[k] for k in keep]
            billed = (ev.billed_spot if spot else ev.billed_od) * n   # every node is billed
            hi = bisect.bisect_right(prices, max_hourly)
            k = _cut(prices, billed, cap, hi)
            if k:
                streams.append(_Stream([p * billed for p in prices[:k]], idx[:k],
                                       ev.hours_spot if spot else ev.hours_od, spot, g))
            over.extend((prices[j] * billed, idx[j], spot, n) for j in range(k, min(hi, k + limit)))
            hourly.extend((prices[j], idx[j], spot, n) for j in range(hi, min(len(idx), hi + limit)))

    for g, grp in enumerate(groups):
        if (providers and grp.provider not in providers) or (gpus and grp.gpu not in gpus):
            continue
        ov = cost.overheads.get(grp.provider)
        if ov is None:
            raise UserError(f"no overheads configured for provider '{grp.provider}' in provider_overheads.json")
        need = need_of(grp.gpu, grp.count)
        capacity = min(grp.mem, need.usable_gib) if need.usable_gib else grp.mem
        ev = evals[g] = _GroupEval(need, capacity)
        if need.reason is not None or need.peak_gib * margin > capacity:
            idx = [i for i in grp.all_rows if row_ok(rows[i])] if row_filter else grp.all_rows
            considered += len(idx)
            # The cheapest of this group in a market the user asked for (--spot: never an on-demand offer).
            for spot in markets:
                cand = [i for i in (grp.spot_rows if spot else grp.od_rows) if not row_filter or row_ok(rows[i])]
                if cand:
                    group_rejects.append((rows[cand[0]][O.SPOT if spot else O.PRICE], g, cand[0], spot))
                    break
            continue
        ev = evals[g] = timed(need, capacity, grp, ov)
        if row_filter:
            considered += sum(1 for i in grp.all_rows if row_ok(rows[i]))
        else:
            considered += len(grp.all_rows)
        if single:
            add_streams(g, grp, ev)
    notes: list[str] = []
    if evaluate_nodes is not None and f.nodes != 1:
        from ftplan.planner.pricing import multinode

        groups = list(groups)
        for grp, ev in multinode.candidates(table, need_of, evaluate_nodes, f, cost, margin, timed):
            groups.append(grp)
            evals[len(groups) - 1] = ev
            add_streams(len(groups) - 1, grp, ev)
        notes += multinode.no_placement_note(groups, evals, streams, providers, margin)
    rejected = _rejections(rows, groups, evals, group_rejects, over, hourly, cost.headroom, budget,
                           max_hourly, limit)
    return PlanResult(table, streams, evals, groups, cost, rejected, considered, budget, notes)


def _distinct(items: Iterable[tuple], key, limit: int) -> list[tuple]:
    seen, out = set(), []
    for it in items:
        k = key(it)
        if k in seen:
            continue
        seen.add(k)
        out.append(it)
        if len(out) >= limit:
            break
    return out


def _rejections(rows, groups, evals, group_rejects, over, hourly, headroom, budget, max_hourly,
                limit) -> list[Rejected]:
    """The cheapest offers that do not fit (by how many GiB) or break a cap (by how much)."""
    out: list[Rejected] = []
    group_rejects.sort()
    by_kind: dict[str, list[Rejected]] = {"memory": [], "gpu": []}
    seen: set[tuple] = set()
    for _price, g, i, spot in group_rejects:
        grp, ev = groups[g], evals[g]
        kind = "gpu" if ev.need.reason is not None else "memory"
        key = (kind, grp.gpu, grp.count if kind == "memory" else 0)
        if key in seen or len(by_kind[kind]) >= limit:
            continue
        seen.add(key)
        if kind == "gpu":
            by_kind[kind].append(Rejected(_offer_brief(rows[i], spot), "gpu", ev.need.reason))
            continue
        want = ev.need.peak_gib * (1 + headroom)
        short = want - ev.capacity_gib
        by_kind[kind].append(Rejected(
            _offer_brief(rows[i], spot), "memory",
            f"needs {want:.1f} GiB per GPU ({ev.need.peak_gib:.1f} GiB peak + {headroom:.0%} margin), "
            f"{grp.gpu} has {ev.capacity_gib:.1f}: short by {short:.1f} GiB",
            short_gib=short))
    out += by_kind["memory"] + by_kind["gpu"]

    def brief_key(t: tuple) -> tuple:
        return rows[t[1]][O.PROVIDER], rows[t[1]][O.INSTANCE_TYPE], t[2], t[3]

    for total, i, spot, nodes in _distinct(sorted(over), brief_key, limit):
        out.append(Rejected(_offer_brief(rows[i], spot, total, nodes), "budget",
                            f"total ${total:,.2f} exceeds the ${budget:,.2f} budget by ${total - budget:,.2f}",
                            over_usd=total - budget))
    for price, i, spot, nodes in _distinct(sorted(hourly), brief_key, limit):
        out.append(Rejected(_offer_brief(rows[i], spot, nodes=nodes), "max_hourly",
                            f"${price:,.2f}/h exceeds --max-hourly ${max_hourly:,.2f}"))
    return out


# --------------------------------------------------------------------------- from an estimate request

def plan_offers(
    request: EstimateRequest,
    filters: Filters | None = None,
    budget: float | None = None,
    *,
    headroom: float = 0.10,
    preemption_rate: float = 0.1,
    checkpoint_min: float = 30.0,
    download_gib_per_min: float | None = None,
    overheads: dict[str, Overheads] | None = None,
    table: OfferTable | None = None,
    corrections: dict | None = None,
    measured: dict | None = None,
) -> PlanResult:
    """The launcher's entry point: every feasible offer for `request`, cheapest expected total first.

    Setup and download minutes per provider: from the bootstraps earlier runs measured (`measured`:
    corrections.MeasuredOverheads by provider; by default read from the run store unless `overheads` is
    given), else the catalog's; `download_gib_per_min` forces one rate everywhere. A note names the source.
    """
    if budget is not None and not budget > 0:
        raise UserError(f"--budget must be a positive number of dollars, got {budget:g}")
    if not 0 <= headroom < 10:
        raise UserError(f"--headroom must be a fraction such as 0.1 (10 %), got {headroom:g}")
    from ftplan.planner.pricing.evaluators import download_minutes, estimate_evaluators

    if measured is None:
        from ftplan.planner.runs.corrections import stored_overheads

        measured = {} if overheads is not None else stored_overheads()
    base = overheads or load_overheads()
    wanted = set(filters.providers) if filters and filters.providers else set(base)
    used = {p: m for p, m in measured.items() if p in base and p in wanted}
    setup = {}
    for p, ov in base.items():
        m = used.get(p)
        if m is not None:
            ov = replace_overheads(ov, setup_min=m.setup_min, env_min=min(m.env_min, m.setup_min),
                                   download_gib_per_min=m.download_gib_per_min or ov.download_gib_per_min)
        download = download_minutes(request, download_gib_per_min or ov.download_gib_per_min)
        setup[p] = replace_overheads(ov, setup_min=ov.setup_min + max(0.0, download - ov.env_min))
    cost = CostModel(headroom=headroom, preemption_rate=preemption_rate, checkpoint_min=checkpoint_min,
                     overheads=setup)
    table = table if table is not None else OfferTable.load(tuple(filters.providers) if filters else None)
    evaluate, evaluate_nodes = estimate_evaluators(request, headroom, corrections)
    result = rank(table, evaluate, filters, cost, budget, evaluate_nodes=evaluate_nodes)
    if used:
        rest = sorted(wanted & set(base) - set(used))
        result.notes.append("setup and weight download from earlier runs' bootstraps: "
                            + "; ".join(used[p].note() for p in sorted(used))
                            + (f"; {', '.join(rest)}: catalog defaults (provider_overheads.json)" if rest else ""))
    return result


def replace_overheads(ov: Overheads, **changes) -> Overheads:
    from dataclasses import replace

    return replace(ov, **changes)
