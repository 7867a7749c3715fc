"""`ftplan plan`: the cheapest instance that holds the job, across providers, with the run's total cost.

Takes every `ftplan estimate` option plus budget and offer filters; prints a ranked table with the
cost-vs-time Pareto frontier marked, then the cheapest offers that were rejected and why.
Plain text output on purpose: importing rich would cost more than the whole ranking.
"""

from __future__ import annotations

import copy
import json
import math

import click

from ftplan.planner.commands import estimate as estimate_command
from ftplan.planner.commands.table_fit import Column, render, terminal_width, wrap
from ftplan.planner.errors import UserError
from ftplan.planner.pricing.offers import split_csv

# Every `ftplan estimate` option except the single-GPU choice and --json is a `plan` option too: the same
# click.Option objects, so the two commands can never drift apart.
_NOT_SHARED = {"gpu_name", "gpu_count", "as_json", "nodes", "node_gbps"}
ESTIMATE_PARAMS = [p for p in estimate_command.estimate.params if p.name not in _NOT_SHARED]


def _launch_loss(param):
    """`plan` prices what `ftplan launch` would run: its --loss defaults to the job's loss, not `standard`."""
    from ftplan.planner.launch.estimate_bridge import LAUNCH_LOSS

    if param.name != "loss":
        return param
    own = copy.copy(param)
    own.default = LAUNCH_LOSS
    return own


ESTIMATE_PARAMS = [_launch_loss(p) for p in ESTIMATE_PARAMS]


def build_request(model_arg: str, **opts):
    request, _how = estimate_command._request(model_arg, opts)
    return request


def _fmt_money(x: float) -> str:
    return f"{x:,.2f}"


def resolve_filters(providers, regions, gpus, market, min_vcpus, min_ram, max_hourly, clouds=()):
    """Validate filter flags against what exists (suggesting close names) and build optimizer.Filters.
    `clouds`: RunPod clouds to keep ("secure", "community"); empty = both."""
    from ftplan.planner.estimate.gpus import load_gpus, resolve_gpu
    from ftplan.planner.pricing.offers import OfferTable, check_provider, suggest
    from ftplan.planner.pricing.optimizer import Filters

    provs = tuple(dict.fromkeys(check_provider(p) for p in split_csv(providers)))
    names: list[str] = []
    for g in split_csv(gpus):
        gpu = resolve_gpu(g)
        card = gpu.same_as or gpu.name  # a provider's other spelling of the same card counts too
        names += [x.name for x in load_gpus().values() if x.name == card or x.same_as == card]
    for flag, value in (("--min-vcpus", min_vcpus), ("--min-ram", min_ram), ("--max-hourly", max_hourly)):
        if value is not None and not value > 0:
            raise UserError(f"{flag} must be a positive number, got {value:g}")
    table = OfferTable.load(provs or None)
    regs = tuple(split_csv(regions))
    if regs:
        known = {r[9] for r in table.rows}
        for reg in regs:
            if reg not in known:
                where = f" for {', '.join(provs)}" if provs else ""
                raise UserError(f"unknown region '{reg}'{where}{suggest(reg, sorted(known))}; "
                                "'ftplan catalog show --regions' lists them")
    return Filters(providers=provs, regions=regs, gpus=tuple(dict.fromkeys(names)), market=market,
                   min_vcpus=min_vcpus, min_ram_gib=min_ram, max_hourly=max_hourly,
                   clouds=tuple(clouds)), table


def nothing_fits(result, request_label: str) -> UserError:
    """The one-line error when no offer survives: over budget (name the cheapest that fits) or too big."""
    over = [r for r in result.rejected if r.kind == "budget"]
    if over:
        o = min(over, key=lambda r: r.over_usd)
        market = "spot" if o.offer["spot"] else "on-demand"
        total = result.budget + o.over_usd
        enough = math.ceil(total * 100) / 100  # whole cents, rounded up, so the hint always works
        return UserError(
            f"nothing fits within the ${result.budget:,.2f} budget; the cheapest offer that fits is "
            f"{o.offer['provider']} {o.offer['instance_type']} ({o.offer['gpu']} x{o.offer['gpu_count']}, "
            f"{market}, {o.offer['region']}) at ${total:,.4f} total; raise --budget to at least {enough:.2f}")
    hourly = [r for r in result.rejected if r.kind == "max_hourly"]
    if hourly:
        o = hourly[0]
        return UserError(f"every offer that fits costs more than --max-hourly; the cheapest is "
                         f"{o.offer['provider']} {o.offer['instance_type']} at ${o.offer['price_hour']:,.2f}/h")
    mem = sorted((r for r in result.rejected if r.kind == "memory"), key=lambda r: r.short_gib)
    if mem:
        return UserError(
            f"no offer can hold {request_label}: closest is {mem[0].offer['provider']} "
            f"{mem[0].offer['instance_type']}, which {mem[0].reason}; try --method qlora, a smaller --seq-len "
            "or --batch-size, or more GPUs")
    if result.considered == 0:
        return UserError("no offers match these filters; loosen --providers/--regions/--gpu/--min-vcpus/--min-ram")
    gpu = [r for r in result.rejected if r.kind == "gpu"]
    reason = f": {gpu[0].reason}" if gpu else ""
    return UserError(f"no offer can run {request_label}{reason}")


@click.command("plan")
@click.option("--budget", type=float, default=None, help="Most you will spend on the whole run, USD.")
@click.option("--max-hourly", type=float, default=None, help="Most you will pay per instance-hour, USD.")
@click.option("--headroom", type=float, default=0.10, show_default=True,
              help="Safety margin on the estimated peak memory (0.10 = 10 %).")
@click.option("--providers", "providers", multiple=True, help="Only these providers (comma-separated).")
@click.option("--regions", "regions", multiple=True, help="Only these regions (comma-separated).")
@click.option("--gpu", "gpus", multiple=True, help="Only these GPU types (comma-separated).")
@click.option("--spot", "market", flag_value="spot", help="Spot/preemptible offers only.")
@click.option("--on-demand", "market", flag_value="on-demand", help="On-demand offers only.")
@click.option("--any", "market", flag_value="any", default=True, help="Spot and on-demand (default).")
@click.option("--min-vcpus", type=float, default=None, help="At least this many host vCPUs.")
@click.option("--min-ram", type=float, default=None, help="At least this much host RAM, GiB.")
@click.option("--preemption-rate", type=float, default=0.1, show_default=True,
              help="Expected spot preemptions per hour of training.")
@click.option("--checkpoint-minutes", type=float, default=30.0, show_default=True,
              help="Checkpoint interval; a preemption loses half of it on average.")
@click.option("--top", type=int, default=10, show_default=True, help="How many offers to list.")
@click.option("--all-regions", is_flag=True, help="One line per place instead of one per instance type.")
@click.option("--secure-only", is_flag=True,
              help="Leave out RunPod community-cloud offers (third-party hosts, no SLA).")
@click.option("--wide", is_flag=True, help="Every column, whatever the terminal width; no host-size grouping.")
@click.option("--nodes", type=click.IntRange(1, 4), default=None,
              help="Only offers of this many nodes (default: one node, and 2-4 where that is needed or pays).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan(budget, max_hourly, headroom, providers, regions, gpus, market, min_vcpus, min_ram, preemption_rate,
         checkpoint_minutes, top, all_regions, secure_only, wide, nodes, as_json, **estimate_kwargs):
    """Cheapest instance that fits, across providers, with total cost."""
    from ftplan.planner.pricing.freshness import stale_summary
    from ftplan.planner.pricing.offers import stale_warning
    from ftplan.planner.pricing.optimizer import plan_offers

    if budget is not None and not budget > 0:
        raise UserError(f"--budget must be a positive number of dollars, got {budget:g}")
    if top <= 0:
        raise UserError(f"--top must be a positive number, got {top}")
    if preemption_rate < 0 or checkpoint_minutes <= 0:
        raise UserError("--preemption-rate must be >= 0 and --checkpoint-minutes > 0")
    request = build_request(**estimate_kwargs)
    filters, table = resolve_filters(providers, regions, gpus, market, min_vcpus, min_ram, max_hourly,
                                     ("secure",) if secure_only else ())
    filters.nodes = nodes
    width = None if wide or as_json else terminal_width()
    warning = stale_warning(table)
    if warning:
        click.echo(wrap(warning, width), err=True)
    from ftplan.planner.runs.corrections import stored_corrections

    corrections = stored_corrections(request.model.name, request.method)
    result = plan_offers(request, filters, budget, headroom=headroom, preemption_rate=preemption_rate,
                         checkpoint_min=checkpoint_minutes, table=table, corrections=corrections)
    label = f"{request.model.name} ({request.method})"
    if not len(result):
        err = nothing_fits(result, label)
        raise UserError("; ".join([str(err), *result.notes])) if result.notes else err
    # Offers that differ only by host size fold into their cheapest line unless the host was asked for.
    group_hosts = not (wide or all_regions or min_vcpus is not None or min_ram is not None)
    lines = result.top(top, collapse=not all_regions, group_hosts=group_hosts)
    frontier = result.frontier()
    age_lines = stale_summary(lines, table)
    if as_json:  # the JSON is ftplan.plan()'s result, so the CLI and the API cannot drift apart
        from ftplan.results import PlanResult

        click.echo(json.dumps(PlanResult.build(
            request, result, table, lines, budget=budget, headroom=headroom, market=market, secure_only=secure_only,
            warnings=([warning] if warning else []) + age_lines + result.notes,
            corrections=corrections).to_dict(), indent=2))
        return
    for line in age_lines:
        click.echo(wrap(line, width), err=True)
    best = lines[0]
    click.echo(wrap(f"{label}: {len(result)} feasible prices (spot and on-demand counted apart) among "
                    f"{result.considered} offers; peak {best.peak_gib:.1f} GiB per GPU on the cheapest, "
                    f"+{headroom:.0%} margin required", width))
    pairs = [(_line(n, o), o) for n, o in enumerate(lines, 1)]
    shown = {o.hardware_key() if group_hosts else (o.provider, o.instance_type, o.spot, o.nodes) for o in lines}
    for o in frontier:
        key = o.hardware_key() if group_hosts else (o.provider, o.instance_type, o.spot, o.nodes)
        if key not in shown:
            shown.add(key)
            pairs.append((_line("", o), o))
    click.echo(_render_plan(pairs, width))
    for row, o in pairs:
        if o.nodes > 1:
            where = f"#{row[0]} " if row[0] else ""
            net = "" if "between nodes" in o.bounding_link else f"{o.network} between nodes; "
            click.echo(wrap(f"{where}{o.nodes}x {o.instance_type} ({o.strategy} over {o.nodes * o.gpu_count} "
                            f"GPUs): {net}bounded by {o.bounding_link}", width, indent="  "))
    for note in result.notes:
        click.echo(wrap(note, width))
    for c in corrections.values():
        click.echo(wrap(f"note: {c.note()}", width))
    notes = ["* = on the cost-vs-time Pareto frontier (no other offer is both cheaper and faster); rows without "
             "# are faster frontier offers beyond the top list."]
    if group_hosts and any(o.more_hosts for o in lines):
        notes.append("'+N sizes': the same GPUs on bigger hosts cost more; --min-vcpus/--min-ram or --wide "
                     "list them.")
    if any(o.cloud == "community" for o, in [(x,) for x in lines] + [(x,) for x in frontier]):
        notes.append("community = RunPod community cloud (third-party hosts, no SLA); --secure-only leaves it out.")
    if any(o.suspect for o in lines):
        notes.append("suspect spot (? after the price): at AWS's 10 % floor or far below the same type's other "
                     "zones: an indication, not a price.")
    if any(o.nodes > 1 for _, o in pairs):
        notes.append("nodes > 1: one run over several machines of that type in one placement group; $/h and "
                     "total count every node.")
    notes.append(estimate_command.loss_note(request.loss))
    notes.append("Hours include provisioning, setup, model download and the artifact pull; spot adds expected "
                 "preemption time. Prices are catalog snapshots, not live quotes; availability is not checked.")
    for note in notes:
        click.echo(wrap(note, width))
    if result.rejected:
        click.echo("\nrejected (cheapest first):")
        for r in result.rejected:
            o = r.offer
            market_ = ("spot" if o["spot"] else "on-demand") + (", community" if o.get("cloud") == "community" else "")
            click.echo(wrap(f"{o['provider']} {o['instance_type']} ({o['gpu']} x{o['gpu_count']}, {market_}, "
                            f"${o['price_hour']:,.3f}/h): {r.reason}", width, indent="  "))


# Wide: every column. Compact (when wide does not fit): provider and instance merged, the hidden host sizes as
# "+N", RunPod community cloud named in the market column, headroom dropped first, long names cut with "~".
WIDE_COLUMNS = [
    Column("#", right=True), Column("provider"), Column("instance"), Column("nodes", right=True),
    Column("GPU x n"), Column("region"),
    Column("market"), Column("$/h", right=True), Column("est. h", right=True), Column("est. total $", right=True),
    Column("headroom GiB", right=True), Column("frontier"), Column("notes"),
]
COMPACT_COLUMNS = [
    Column("#", right=True), Column("offer", shrink=True, min_width=14), Column("GPUs", shrink=True, min_width=7),
    Column("region", shrink=True, min_width=9), Column("market", shrink=True, min_width=6),
    Column("$/h", right=True), Column("hours", right=True), Column("total $", right=True),
    Column("free GiB", right=True, drop=1),
]


def _market(o) -> str:
    if o.cloud == "community":
        return "community spot" if o.spot else "community"
    return "spot" if o.spot else "on-demand"


def _line(n, o) -> list[str]:
    """One wide row."""
    region = o.region + (f" (+{len(o.other_regions)})" if o.other_regions else "")
    notes = []
    if o.more_hosts:
        notes.append(f"+{len(o.more_hosts)} sizes")
    if o.suspect:
        notes.append(f"suspect spot: {o.suspect}")
    mark = "*" if o.pareto else ""
    return [str(n), o.provider, o.instance_type, str(o.nodes), f"{o.gpu} x{o.gpu_count}", region,
            _market(o), f"{o.hourly_all_nodes:,.3f}", f"{o.hours:.2f}", _fmt_money(o.total_usd),
            f"{o.headroom_gib:.1f}", mark, "; ".join(notes)]


def _compact(row: list[str], o) -> list[str]:
    name = o.instance_type
    if o.provider == "runpod":  # the market column already names the cloud
        name = name.removesuffix("_SECURE").removesuffix("_COMMUNITY")
    offer = f"{o.provider} {name}" + (f" +{len(o.more_hosts)}" if o.more_hosts else "")
    region = o.region + (f" +{len(o.other_regions)}" if o.other_regions else "")
    if o.nodes > 1:
        offer = f"{o.provider} {o.nodes}x {name}"
    price = row[7] + ("?" if o.suspect else "")
    mark = "*" if o.pareto else ""  # no frontier column here: the mark rides on '#'
    return [row[0] + mark, offer, f"{o.gpu} x{o.gpu_count}", region, row[6], price, row[8], row[9], row[10]]


def _render_plan(pairs: list[tuple[list[str], object]], width: int | None) -> str:
    wide = render(WIDE_COLUMNS, [r for r, _ in pairs], None)
    if width is None or max(len(line) for line in wide.splitlines()) <= width:
        return wide
    return render(COMPACT_COLUMNS, [_compact(r, o) for r, o in pairs], width)


plan.params[:0] = ESTIMATE_PARAMS
