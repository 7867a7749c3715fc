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
import heapq
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING

from ftplan.catalogs import data_path
from ftplan.planner.errors import UserError
from ftplan.planner.pricing import offers as O
from ftplan.planner.pricing.offers import OfferTable

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
        ov = Overheads(float(d["provision_min"]), float(d["setup_min"]), float(d["pull_min"]), int(d["min_billed_s"]))
        if min(ov.provision_min, ov.setup_min, ov.pull_min, ov.min_billed_s) < 0:
            raise ValueError(f"provider_overheads.json: negative value for {name}")
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


# --------------------------------------------------------------------------- outputs

@dataclass
class RankedOffer:
    provider: str
    instance_type: str
    gpu: str
    gpu_count: int
    gpu_memory_gib: float
    vcpus: float | None
    ram_gib: float | None
    region: str
    zone: str
    spot: bool
    price_hour: float
    hours: float                # expected wall-clock hours incl. overheads (and preemptions, for spot)
    train_hours: float
    billed_hours: float
    total_usd: float
    peak_gib: float
    headroom_gib: float
    strategy: str
    provision_min: float
    setup_min: float
    pull_min: float
    preemption_h: float
    pareto: bool = False
    other_regions: list[str] = field(default_factory=list)
    cloud: str = ""             # RunPod "secure" | "community"; "" elsewhere
    purchase: str = ""
    price_date: str = ""        # the price's own date where known
    retrieved_at: str = ""      # when it was imported or fetched
    suspect: str = ""           # why a spot price looks unreal ("at the 10 % floor", ...), else ""
    more_hosts: list[str] = field(default_factory=list)  # same GPUs, bigger hosts, folded into this line
    row: int = -1               # index in the offer table
    nodes: int = 1              # machines of this type in one run; price_hour is one machine's, total all of them
    network: str = ""           # between the nodes (catalogs/networks.json), when nodes > 1
    network_source: str = ""
    bounding_link: str = ""     # what bounds the collectives, when nodes > 1

    @property
    def hourly_all_nodes(self) -> float:
        return self.price_hour * self.nodes

    def key(self) -> tuple:
        """Offers of one type and market are one line in tables: the cheapest place, with the others listed."""
        return (self.provider, self.instance_type, self.gpu, self.gpu_count, self.spot, self.nodes)

    def hardware_key(self) -> tuple:
        """Offers that differ only by host size (vCPUs, RAM) share this key: same GPUs, market and cloud."""
        return (self.provider, self.gpu, self.gpu_count, self.gpu_memory_gib, self.spot, self.cloud, self.nodes)

    def market(self) -> str:
        m = "spot" if self.spot else "on-demand"
        return f"{m}, {self.cloud}" if self.cloud == "community" else m

    def label(self) -> str:
        nodes = f"{self.nodes} x " if self.nodes > 1 else ""
        return (f"{self.provider} {nodes}{self.instance_type} ({self.gpu} x{self.gpu_count}, {self.market()}, "
                f"{self.region})")

    def to_dict(self) -> dict:
        return {
            "provider": self.provider, "instance_type": self.instance_type, "gpu": self.gpu,
            "gpu_count": self.gpu_count, "gpu_memory_gib": self.gpu_memory_gib, "vcpus": self.vcpus,
            "ram_gib": self.ram_gib, "region": self.region, "zone": self.zone, "spot": self.spot,
            "price_hour": self.price_hour, "hours": round(self.hours, 4), "train_hours": round(self.train_hours, 4),
            "billed_hours": round(self.billed_hours, 4), "total_usd": round(self.total_usd, 4),
            "peak_gib": round(self.peak_gib, 2), "headroom_gib": round(self.headroom_gib, 2),
            "strategy": self.strategy, "pareto": self.pareto, "cloud": self.cloud or None,
            "purchase": self.purchase or None, "price_date": self.price_date or None,
            "retrieved_at": self.retrieved_at, "suspect_spot": self.suspect or None, "more_hosts": self.more_hosts,
            "overheads": {"provision_min": round(self.provision_min, 2), "setup_min": round(self.setup_min, 2),
                          "pull_min": round(self.pull_min, 2), "preemption_h": round(self.preemption_h, 4)},
            "other_regions": self.other_regions,
            "nodes": self.nodes, "network": self.network or None, "network_source": self.network_source or None,
            "bounding_link": self.bounding_link or None,
        }


@dataclass
class Rejected:
    offer: dict                 # provider, instance_type, gpu, gpu_count, region, spot, price_hour (+ total_usd)
    kind: str                   # memory | gpu | budget | max_hourly
    reason: str
    short_gib: float | None = None
    over_usd: float | None = None

    def to_dict(self) -> dict:
        d = {"offer": self.offer, "kind": self.kind, "reason": self.reason}
        if self.short_gib is not None:
            d["short_gib"] = round(self.short_gib, 2)
        if self.over_usd is not None:
            d["over_usd"] = round(self.over_usd, 4)
        return d



@dataclass
class _Group:
    """Offers sharing provider, GPU type, count, listed memory and granularity: one evaluation each.

    Row indices are pre-sorted by on-demand and by spot price, once per table, so a budget or an hourly
    cap is a bisection and every group yields its offers already in cost order."""

    provider: str
    gpu: str
    count: int
    mem: float
    granularity: int
    all_rows: list[int] = field(default_factory=list)
    od_rows: list[int] = field(default_factory=list)
    od_prices: list[float] = field(default_factory=list)
    spot_rows: list[int] = field(default_factory=list)
    spot_prices: list[float] = field(default_factory=list)
    nodes: int = 1              # > 1: one instance type rented as several nodes (multinode.py)
    network: object = None      # its internode.NodeNetwork


@dataclass
class _GroupEval:
    need: Need
    capacity_gib: float
    hours_od: float = 0.0
    hours_spot: float = 0.0
    billed_od: float = 0.0
    billed_spot: float = 0.0


@dataclass
class _Stream:
    """Feasible offers of one group in one market, cheapest first: totals[k] belongs to rows[k]."""

    totals: list[float]
    rows: list[int]
    hours: float
    spot: bool
    group: int

    def items(self):
        h, s, g = self.hours, self.spot, self.group
        return ((t, h, i, s, g) for t, i in zip(self.totals, self.rows, strict=True))

    def head(self) -> tuple:
        return self.totals[0], self.hours, self.rows[0], self.spot, self.group


@dataclass
class PlanResult:
    """Every feasible offer, ranked by expected total (cheapest first), plus the most useful rejections.

    Each group's offers are already in cost order, so the global ranking is a lazy k-way merge:
    `iter_ranked()` yields the cheapest first without sorting all offers; `offers` materialises them all."""

    table: OfferTable
    streams: list[_Stream]
    evals: dict[int, _GroupEval]
    groups: list[_Group]
    cost: CostModel
    rejected: list[Rejected]
    considered: int             # offers (rows) that passed the filters
    budget: float | None = None
    notes: list[str] = field(default_factory=list)   # e.g. providers that cannot run several nodes

    def __len__(self) -> int:
        return sum(len(s.rows) for s in self.streams)

    def iter_ranked(self):
        """(total_usd, hours, row index, spot, group) tuples, cheapest first (ties: faster first)."""
        return heapq.merge(*(s.items() for s in self.streams))

    def materialize(self, item: tuple) -> RankedOffer:
        total, hours, i, spot, g = item
        r, grp, ev = self.table.rows[i], self.groups[g], self.evals[g]
        ov = self.cost.overheads[grp.provider]
        need = ev.need
        return RankedOffer(
            provider=r[O.PROVIDER], instance_type=r[O.INSTANCE_TYPE], gpu=r[O.GPU], gpu_count=r[O.GPU_COUNT],
            gpu_memory_gib=r[O.GPU_MEM], vcpus=r[O.VCPUS], ram_gib=r[O.RAM], region=r[O.REGION], zone=r[O.ZONE],
            spot=spot, price_hour=r[O.SPOT] if spot else r[O.PRICE], hours=hours, train_hours=need.train_hours,
            billed_hours=ev.billed_spot if spot else ev.billed_od, total_usd=total, peak_gib=need.peak_gib,
            headroom_gib=ev.capacity_gib - need.peak_gib, strategy=need.strategy,
            provision_min=ov.provision_min, setup_min=ov.setup_min, pull_min=ov.pull_min,
            preemption_h=ev.hours_spot - ev.hours_od if spot else 0.0,
            cloud=r[O.CLOUD], purchase=r[O.PURCHASE], price_date=r[O.PRICE_DATE], retrieved_at=r[O.RETRIEVED],
            suspect=suspect_spot(self.table).get(i, "") if spot else "", row=i, nodes=grp.nodes,
            network=grp.network.describe() if grp.nodes > 1 else "",
            network_source=grp.network.source if grp.nodes > 1 else "",
            bounding_link=need.bounding_link if grp.nodes > 1 else "",
        )

    def iter_offers(self):
        return (self.materialize(item) for item in self.iter_ranked())

    @cached_property
    def offers(self) -> list[RankedOffer]:
        """All feasible offers, ranked (what the launcher walks when an offer has no capacity)."""
        return list(self.iter_offers())

    @property
    def best(self) -> RankedOffer | None:
        heads = [s.head() for s in self.streams if s.rows]
        return self.materialize(min(heads)) if heads else None

    def frontier_points(self) -> set[tuple[float, float]]:
        """(total, hours) points of the cost-vs-time Pareto frontier over all feasible offers.

        Within a stream the hours are constant, so only its cheapest offer can be on the frontier."""
        points, best_h = set(), math.inf
        for total, hours in sorted((s.totals[0], s.hours) for s in self.streams if s.rows):
            if hours < best_h:
                points.add((total, hours))
                best_h = hours
        return points

    def top(self, n: int = 10, collapse: bool = True, group_hosts: bool = False) -> list[RankedOffer]:
        """The best `n` lines for display; with `collapse`, one line per provider/type/market (its cheapest
        place), listing the other regions where the same type is also feasible. With `group_hosts`, offers
        that differ only by host size (g6.xlarge ... g6.8xlarge: one L4 each) fold into their cheapest line,
        the others listed in `more_hosts`."""
        lines: list[RankedOffer] = []
        seen: set[tuple] = set()
        shown_hw: set[tuple] = set()
        frontier = self.frontier_points()
        rows = self.table.rows
        for item in self.iter_ranked():
            if len(lines) >= n:
                break
            r, spot, nodes = rows[item[2]], item[3], self.groups[item[4]].nodes
            if collapse:
                key = (r[O.PROVIDER], r[O.INSTANCE_TYPE], r[O.GPU], r[O.GPU_COUNT], spot, nodes)
                if key in seen:
                    continue
                seen.add(key)
            if group_hosts:  # same key as RankedOffer.hardware_key, from the row (no object per offer)
                hw = (r[O.PROVIDER], r[O.GPU], r[O.GPU_COUNT], r[O.GPU_MEM], spot, r[O.CLOUD], nodes)
                if hw in shown_hw:
                    continue
                shown_hw.add(hw)
            o = self.materialize(item)
            if collapse:
                o.other_regions = self._other_regions(o, item[4])
            if group_hosts:
                o.more_hosts = self._other_hosts(o, item[4])
            o.pareto = (item[0], item[1]) in frontier
            lines.append(o)
        return lines

    def _other_hosts(self, o: RankedOffer, group: int) -> list[str]:
        """Feasible instance types with the same GPUs, market and cloud but another host size, cheapest first."""
        rows = self.table.rows
        types = {rows[i][O.INSTANCE_TYPE]: None for s in self.streams if s.group == group and s.spot == o.spot
                 for i in s.rows if rows[i][O.CLOUD] == o.cloud}
        types.pop(o.instance_type, None)
        return list(types)

    def _other_regions(self, o: RankedOffer, group: int) -> list[str]:
        rows = self.table.rows
        regions = {rows[i][O.REGION] for s in self.streams if s.group == group and s.spot == o.spot
                   for i in s.rows if rows[i][O.INSTANCE_TYPE] == o.instance_type}
        regions.discard(o.region)
        return sorted(regions)

    def frontier(self) -> list[RankedOffer]:
        """One offer per Pareto point, cheapest first: the faster options worth paying more for."""
        points = self.frontier_points()
        best: dict[tuple, tuple] = {}
        for s in self.streams:
            if s.rows and (s.totals[0], s.hours) in points:
                item = s.head()
                key = item[:2]
                if key not in best or item < best[key]:
                    best[key] = item
        lines = [self.materialize(item) for _, item in sorted(best.items())]
        for o in lines:
            o.pareto = True
        return lines


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
        grp.all_rows.append(i)
        if O.on_demand_ok(r):  # GCP A4 / A3 Ultra / A3 High 1-4g: reservation, spot or flex-start only
            grp.od_rows.append(i)
        if O.spot_ok(r):
            grp.spot_rows.append(i)
    for grp in index.values():
        grp.all_rows.sort(key=lambda i: rows[i][O.PRICE])
        grp.od_rows.sort(key=lambda i: rows[i][O.PRICE])
        grp.od_prices = [rows[i][O.PRICE] for i in grp.od_rows]
        grp.spot_rows.sort(key=lambda i: rows[i][O.SPOT])
        grp.spot_prices = [rows[i][O.SPOT] for i in grp.spot_rows]
    groups = list(index.values())
    table._groups = groups
    return groups


def suspect_spot(table: OfferTable) -> dict[int, str]:
    """Row index -> why its spot price looks unreal (cached on the table). See freshness.suspect_spot_rows."""
    cached = getattr(table, "_suspect", None)
    if cached is None:
        from ftplan.planner.pricing.freshness import suspect_spot_rows

        cached = table._suspect = suspect_spot_rows(table.rows)
    return cached


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

def _strategy(count: int, zero: int) -> str:
    if count == 1:
        return "single" if zero == 0 else f"zero{zero}"
    return "ddp" if zero == 0 else f"zero{zero}"


def estimate_evaluator(request: EstimateRequest, headroom: float = 0.10,
                       corrections: dict | None = None) -> Evaluator:
    return estimate_evaluators(request, headroom, corrections)[0]


def estimate_evaluators(request: EstimateRequest, headroom: float = 0.10,
                        corrections: dict | None = None) -> tuple[Evaluator, NodesEvaluator]:
    """Evaluator backed by the estimator (ftplan.planner.estimate.memory + ftplan.planner.estimate.throughput) for one job.

    Several GPUs run data-parallel when one GPU holds the job; when it does not (and the user did not
    pin --zero), the same instance is tried with ZeRO-3 sharding, the slower but leaner layout.
    Peak memory does not depend on the GPU type, only on count and sharding, so it is computed once per
    (count, ZeRO stage): this is what keeps a plan over ~120 (GPU, count) pairs fast.
    `corrections` (lower-case GPU name -> ftplan.planner.runs.corrections.Correction) scales throughput and peak by
    what finished runs of the same model and method measured on that GPU.
    The second evaluator is the same job over several nodes (internode.node_link: the slower of NVLink and
    the node's network bounds the collectives); memory shards over every GPU of every node."""
    from dataclasses import replace

    from ftplan.planner.estimate.estimator import training_tokens
    from ftplan.planner.estimate.gpus import resolve_gpu
    from ftplan.planner.estimate.internode import node_link
    from ftplan.planner.estimate.memory import estimate_memory
    from ftplan.planner.estimate.throughput import tokens_per_second

    tokens = training_tokens(request)
    if tokens is None:
        raise UserError("planning needs the dataset size: pass --dataset FILE or --dataset-tokens N")
    # GPUs without bf16 (T4, V100, P100, K80) run the job in fp16 autocast (as `estimate` and the launched job
    # do), so they are estimated that way rather than rejected.
    fp16 = replace(request, precision="fp16-mixed") if request.precision.startswith("bf16") else request
    peaks: dict[tuple[str, int, bool], float] = {}

    def peak(req: EstimateRequest, count: int, sharded: bool) -> float:
        key = (req.precision, count, sharded)
        if key not in peaks:
            peaks[key] = estimate_memory(replace(req, zero=3) if sharded else req, count).total
        return peaks[key]

    def card(gpu_name: str):
        """The GPU, or the Need that says why it cannot run the job."""
        try:
            gpu = resolve_gpu(gpu_name)
        except UserError:
            return Need(reason=f"{gpu_name} is not in the GPU table")
        if gpu.vendor != "NVIDIA":
            return Need(reason=f"{gpu.name} is a {gpu.vendor} GPU; the training job needs CUDA")
        return gpu

    def need(gpu, count: int, link_gpu=None, bound: str = "") -> Need:
        base = request if gpu.supports_bf16 else fp16
        req = base
        total = peak(base, count, False)
        if (count > 1 and request.zero is None and request.resolved_zero(count) != 3
                and total * (1 + headroom) > gpu.usable_gib):
            req = replace(base, zero=3)
            total = peak(base, count, True)
        tps = tokens_per_second(req, link_gpu or gpu, count)
        corr = (corrections or {}).get(gpu.name.lower())
        if corr is not None:
            tps *= corr.throughput_factor or 1.0
            total *= corr.memory_factor or 1.0
        hours = tokens / tps / 3600
        return Need(peak_gib=total, train_hours=hours, usable_gib=gpu.usable_gib,
                    strategy=_strategy(count, req.resolved_zero(count)) + ("" if base is request else " fp16"),
                    bounding_link=bound)

    def evaluate(gpu_name: str, count: int) -> Need:
        gpu = card(gpu_name)
        return gpu if isinstance(gpu, Need) else need(gpu, count)

    def evaluate_nodes(gpu_name: str, count: int, nodes: int, network) -> Need:
        gpu = card(gpu_name)
        if isinstance(gpu, Need):
            return gpu
        linked, bound = node_link(gpu, count, nodes, network)
        return need(gpu, count * nodes, linked, bound)

    return evaluate, evaluate_nodes


def download_minutes(request: EstimateRequest, gib_per_min: float) -> float:
    """Minutes to fetch the base model's 16-bit weights on the instance (part of setup and of every restart)."""
    return request.model.params_total() * 2 / 2**30 / gib_per_min


def plan_offers(
    request: EstimateRequest,
    filters: Filters | None = None,
    budget: float | None = None,
    *,
    headroom: float = 0.10,
    preemption_rate: float = 0.1,
    checkpoint_min: float = 30.0,
    download_gib_per_min: float = 6.0,
    overheads: dict[str, Overheads] | None = None,
    table: OfferTable | None = None,
    corrections: dict | None = None,
) -> PlanResult:
    """The launcher's entry point: every feasible offer for `request`, cheapest expected total first."""
    if budget is not None and not budget > 0:
        raise UserError(f"--budget must be a positive number of dollars, got {budget:g}")
    if not 0 <= headroom < 10:
        raise UserError(f"--headroom must be a fraction such as 0.1 (10 %), got {headroom:g}")
    base = overheads or load_overheads()
    extra = download_minutes(request, download_gib_per_min)
    cost = CostModel(
        headroom=headroom, preemption_rate=preemption_rate, checkpoint_min=checkpoint_min,
        overheads={p: replace_overheads(ov, setup_min=ov.setup_min + extra) for p, ov in base.items()},
    )
    table = table if table is not None else OfferTable.load(tuple(filters.providers) if filters else None)
    evaluate, evaluate_nodes = estimate_evaluators(request, headroom, corrections)
    return rank(table, evaluate, filters, cost, budget, evaluate_nodes=evaluate_nodes)


def replace_overheads(ov: Overheads, **changes) -> Overheads:
    from dataclasses import replace

    return replace(ov, **changes)
