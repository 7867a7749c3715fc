"""`ftplan gpus [GPU]`: GPU types with memory and the cheapest on-demand and spot price per provider.

Like `sky show-gpus` / `dstack offer --group-by gpu`, from the same catalogs `ftplan plan` ranks.
Prices are per instance-hour divided by the GPU count, so 1x and 8x offers compare per GPU.
"""

from __future__ import annotations

import json

import click


def cheapest_by_gpu(rows: list[tuple], suspect: dict[int, str] | None = None) -> dict[str, dict[str, dict]]:
    """card -> provider -> {od, spot: cheapest $/GPU-h; od_cloud: RunPod cloud of that on-demand price;
    spot_suspect: why that spot price looks unreal}. Only ways an offer can really be bought count
    (no on-demand price for GCP A4 / A3 Ultra / A3 High 1-4g)."""
    from ftplan.planner.estimate.gpus import load_gpus
    from ftplan.planner.pricing import offers as O

    gpus = load_gpus()
    suspect = suspect or {}
    out: dict[str, dict[str, dict]] = {}
    for i, r in enumerate(rows):
        g = gpus.get(r[O.GPU])
        card = (g.same_as or g.name) if g else r[O.GPU]
        cell = out.setdefault(card, {}).setdefault(r[O.PROVIDER], {"od": None, "spot": None, "od_cloud": None,
                                                                   "spot_suspect": None})
        n = r[O.GPU_COUNT]
        if O.on_demand_ok(r) and (cell["od"] is None or r[O.PRICE] / n < cell["od"]):
            cell["od"], cell["od_cloud"] = r[O.PRICE] / n, r[O.CLOUD] or None
        if O.spot_ok(r) and (cell["spot"] is None or r[O.SPOT] / n < cell["spot"]):
            cell["spot"], cell["spot_suspect"] = r[O.SPOT] / n, suspect.get(i)
    return out


@click.command("gpus")
@click.argument("gpu", required=False)
@click.option("--providers", "providers", multiple=True, help="Only these providers (comma-separated).")
@click.option("--secure-only", is_flag=True, help="Leave out RunPod community-cloud prices.")
@click.option("--on-demand", "market", flag_value="on-demand", help="Only on-demand prices.")
@click.option("--spot", "market", flag_value="spot", help="Only spot prices.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gpus(gpu, providers, secure_only, market, as_json):
    """GPU types with memory and cheapest prices per provider."""
    from ftplan.planner.commands.table_fit import Column, render, terminal_width, wrap
    from ftplan.planner.estimate.gpus import resolve_gpu, table_gpus
    from ftplan.planner.pricing import offers as O
    from ftplan.planner.pricing.freshness import suspect_spot_rows
    from ftplan.planner.pricing.offers import PROVIDERS, OfferTable, check_provider, split_csv, stale_warning

    provs = tuple(dict.fromkeys(check_provider(p) for p in split_csv(providers))) or PROVIDERS
    table = OfferTable.load(provs)
    width = terminal_width()
    warning = stale_warning(table)
    if warning:
        click.echo(wrap(warning, width), err=True)
    rows = [r for r in table.rows if not (secure_only and r[O.CLOUD] == "community")]
    prices = cheapest_by_gpu(rows, suspect_spot_rows(rows))
    cards = table_gpus()
    if gpu:
        want = resolve_gpu(gpu)
        cards = [c for c in cards if c.name == (want.same_as or want.name)]
    entries = []
    for c in cards:
        per = prices.get(c.name, {})
        entries.append({
            "gpu": c.name, "memory_gib": c.memory_gib, "usable_gib": round(c.usable_gib, 2), "bf16": c.supports_bf16,
            "vendor": c.vendor,
            "providers": {p: {"on_demand_per_gpu_hour": v["od"], "spot_per_gpu_hour": v["spot"],
                              "on_demand_cloud": v["od_cloud"], "spot_suspect": v["spot_suspect"]}
                          for p, v in sorted(per.items())},
        })
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not gpu:
        entries = [e for e in entries if e["providers"]]
    cols = list(provs)
    if gpu and market and len(entries) == 1:  # one GPU, one market: providers cheapest first
        key = "on_demand_per_gpu_hour" if market == "on-demand" else "spot_per_gpu_hour"
        per = entries[0]["providers"]
        cols.sort(key=lambda p: (per.get(p, {}).get(key) is None, per.get(p, {}).get(key) or 0))
    columns = [Column("GPU", shrink=True, min_width=8), Column("GiB", right=True), Column("bf16", drop=1)]
    columns += [Column(p, right=True) for p in cols]
    body = []
    for e in entries:
        cells = [e["gpu"], f"{e['memory_gib']:g}", "yes" if e["bf16"] else "no"]
        for p in cols:
            v = e["providers"].get(p)
            cells.append(_cell(v, market) if v else "-")
        body.append(cells)
    click.echo(render(columns, body, width))
    what = {"on-demand": "on-demand", "spot": "spot"}.get(market, "on-demand / spot")
    notes = [f"Cheapest $ per GPU-hour in any region, {what} (instance price / GPU count); snapshots, "
             "not live quotes."]
    if market != "spot" and any(v.get("on_demand_cloud") == "community"
                                for e in entries for v in e["providers"].values()):
        notes.append("c = RunPod community cloud (third-party hosts, no SLA); --secure-only leaves it out.")
    if market != "on-demand" and any(v.get("spot_suspect") for e in entries for v in e["providers"].values()):
        notes.append("? = suspect spot price: at AWS's 10 % floor or far below the same type's other zones.")
    for note in notes:
        click.echo(wrap(note, width))


def _cell(v: dict, market: str | None = None) -> str:
    od = "-" if v["on_demand_per_gpu_hour"] is None else f"{v['on_demand_per_gpu_hour']:.2f}"
    if v.get("on_demand_cloud") == "community":
        od += "c"
    sp = "-" if v["spot_per_gpu_hour"] is None else f"{v['spot_per_gpu_hour']:.2f}"
    if v.get("spot_suspect"):
        sp += "?"
    return {"on-demand": od, "spot": sp}.get(market or "", f"{od}/{sp}")
