"""Multi-node candidates for the optimizer: one instance type rented as 2..4 nodes of one training job.

Only the instance types in catalogs/networks.json qualify: their providers have a placement primitive
(AWS cluster placement group, GCP compact placement policy) and a published inter-node bandwidth.
RunPod, Lambda and Paperspace have neither in their public APIs, so their offers stay single-node.

Which node counts join the ranking, per instance type and market (a rule on hours and billed hours
only, so it never depends on which region's price is cheapest):
- the fewest nodes that hold the job (one, if one does), and
- any larger count that finishes sooner for at most MAX_EXTRA (10 %) more in total.
With `--nodes k` only k-node offers are ranked. Totals are k x price x billed hours; the budget cut,
the markets and the merge are the single-node ones (optimizer.rank).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

from ftplan.planner.estimate.internode import multinode_types, node_network
from ftplan.planner.pricing import offers as O

MAX_NODES = 4
MAX_EXTRA = 0.10  # a faster multi-node candidate may cost this much more than the fewest nodes that fit


def families(table) -> list:
    """Rows of the multi-node instance types, grouped like optimizer.group_rows but per instance type
    (each type has its own network); cached on the table."""
    from ftplan.planner.pricing.plan_result import _Group

    cached = getattr(table, "_mn_families", None)
    if cached is not None:
        return cached
    allowed = set(multinode_types())
    index: dict[tuple, _Group] = {}
    rows = table.rows
    for i, r in enumerate(rows):
        if (r[O.PROVIDER], r[O.INSTANCE_TYPE]) not in allowed:
            continue
        key = (r[O.PROVIDER], r[O.INSTANCE_TYPE], r[O.GPU], r[O.GPU_COUNT], r[O.GPU_MEM], r[O.GRANULARITY])
        grp = index.get(key)
        if grp is None:
            grp = index[key] = _Group(r[O.PROVIDER], r[O.GPU], r[O.GPU_COUNT], r[O.GPU_MEM], r[O.GRANULARITY],
                                      network=node_network(r[O.PROVIDER], r[O.INSTANCE_TYPE]))
        grp.add(i, r)
    for grp in index.values():
        grp.sort_by_price(rows)
    out = list(index.values())
    table._mn_families = out
    return out


def _fits(need, capacity: float, margin: float) -> bool:
    return need.reason is None and need.peak_gib * margin <= capacity


def _cannot_pay(base: tuple, n: int, fixed_h: float, spot: bool) -> bool:
    """True when n nodes cannot cost within MAX_EXTRA of `base` even at perfect scaling: n nodes are
    never more than n/base-nodes times faster (the estimate only adds communication), so n x billed hours
    >= n x fixed + base nodes x base training hours."""
    grp, ev = base
    floor = n * fixed_h + grp.nodes * ev.need.train_hours
    return floor > grp.nodes * (ev.billed_spot if spot else ev.billed_od) * (1 + MAX_EXTRA)


def candidates(table, need_of: Callable, evaluate_nodes: Callable, f, cost, margin: float,
               timed: Callable) -> Iterator[tuple]:
    """(group with nodes = n, its evaluation) for every multi-node candidate the rule keeps."""
    providers, gpus = set(f.providers), set(f.gpus)
    cache: dict[tuple, object] = {}
    spot_rule = f.market == "spot"
    for fam in families(table):
        if (providers and fam.provider not in providers) or (gpus and fam.gpu not in gpus):
            continue
        ov = cost.overheads.get(fam.provider)
        one = need_of(fam.gpu, fam.count)
        if ov is None or one.reason is not None:
            continue
        usable = one.usable_gib
        capacity = min(fam.mem, usable) if usable else fam.mem
        kept: list[tuple] = []
        if _fits(one, capacity, margin):
            kept.append((replace(fam, nodes=1), timed(one, capacity, replace(fam, nodes=1), ov)))
        for n in range(2, MAX_NODES + 1):
            if f.nodes is not None and n != f.nodes:
                continue
            if f.nodes is None and kept and _cannot_pay(kept[0], n, ov.fixed_h, spot_rule):
                break  # and no larger n can: skip their estimates (this keeps `ftplan plan` fast)
            key = (fam.gpu, fam.count, n, fam.network.gbps)
            need = cache.get(key)
            if need is None:
                need = cache[key] = evaluate_nodes(fam.gpu, fam.count, n, fam.network)
            if not _fits(need, capacity, margin):
                continue
            grp = replace(fam, nodes=n)
            ev = timed(need, capacity, grp, ov)
            if f.nodes is not None or not kept:
                kept.append((grp, ev))
                continue
            base_grp, base = kept[0]
            base_total = base_grp.nodes * (base.billed_spot if spot_rule else base.billed_od)
            total = n * (ev.billed_spot if spot_rule else ev.billed_od)
            if ev.hours_od < base.hours_od and total <= base_total * (1 + MAX_EXTRA):
                kept.append((grp, ev))
        yield from (item for item in kept if item[0].nodes > 1)


def no_placement_note(groups: list, evals: dict, streams: list, providers: set, margin: float) -> list[str]:
    """One line when a provider without a placement primitive has offers but no single machine of it holds
    the job (the case where several nodes would have been needed there)."""
    can = {p for p, _ in multinode_types()}
    feasible = {groups[s.group].provider for s in streams}
    short: list[str] = []
    for g, ev in evals.items():
        grp = groups[g]
        p = grp.provider
        if p in can or p in feasible or p in short or (providers and p not in providers) or grp.nodes > 1:
            continue
        if ev.need.reason is None and ev.need.peak_gib * margin > ev.capacity_gib:
            short.append(p)
    if not short:
        return []
    return [f"multi-node: no single machine of {', '.join(sorted(short))} holds this job, and "
            f"{'it has' if len(short) == 1 else 'they have'} no placement primitive for several nodes in the "
            f"public API; multi-node is planned on {', '.join(sorted(can))} only"]
