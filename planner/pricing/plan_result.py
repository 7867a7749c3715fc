"""What a plan answers: ranked offers, rejections, and the lazy cost-ordered merge over groups of offers.

`optimizer.rank` builds a `PlanResult`; everything here is data and its presentation, no estimating.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from ftplan.planner.pricing import offers as O
from ftplan.planner.pricing.offers import OfferTable

if TYPE_CHECKING:  # pragma: no cover
    from ftplan.planner.pricing.optimizer import CostModel, Need


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

    def add(self, i: int, r: tuple) -> None:
        self.all_rows.append(i)
        if O.on_demand_ok(r):  # GCP A4 / A3 Ultra / A3 High 1-4g: reservation, spot or flex-start only
            self.od_rows.append(i)
        if O.spot_ok(r):
            self.spot_rows.append(i)

    def sort_by_price(self, rows: list[tuple]) -> None:
        """Once, after every row was added: each market's rows and prices in cost order."""
        self.all_rows.sort(key=lambda i: rows[i][O.PRICE])
        self.od_rows.sort(key=lambda i: rows[i][O.PRICE])
        self.od_prices = [rows[i][O.PRICE] for i in self.od_rows]
        self.spot_rows.sort(key=lambda i: rows[i][O.SPOT])
        self.spot_prices = [rows[i][O.SPOT] for i in self.spot_rows]


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


def suspect_spot(table: OfferTable) -> dict[int, str]:
    """Row index -> why its spot price looks unreal (cached on the table). See freshness.suspect_spot_rows."""
    cached = getattr(table, "_suspect", None)
    if cached is None:
        from ftplan.planner.pricing.freshness import suspect_spot_rows

        cached = table._suspect = suspect_spot_rows(table.rows)
    return cached
