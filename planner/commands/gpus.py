"""`ftplan gpus [GPU]`: GPU types with memory and the cheapest on-demand and spot price per provider.

Like `sky show-gpus` / `dstack offer --group-by gpu`, from the same catalogs `ftplan plan` ranks.
Prices are per instance-hour divided by the GPU count, so 1x and 8x offers compare per GPU.
"""

from __future__ import annotations

import json

import click


def cheapest_by_gpu(rows: list[tuple]) -> dict[str, dict[str, list[float | None]]]:
    """card -> provider -> [cheapest on-demand $/GPU-h, cheapest spot $/GPU-h]."""
    from ftplan.planner.estimate.gpus import load_gpus
    from ftplan.planner.pricing import offers as O

    gpus = load_gpus()
    out: dict[str, dict[str, list[float | None]]] = {}
    for r in rows:
        g = gpus.get(r[O.GPU])
        card = (g.same_as or g.name) if g else r[O.GPU]
        cell = out.setdefault(card, {}).setdefault(r[O.PROVIDER], [None, None])
        n = r[O.GPU_COUNT]
        for k, price in ((0, r[O.PRICE]), (1, r[O.SPOT])):
            if price is not None and (cell[k] is None or price / n < cell[k]):
                cell[k] = price / n
    return out


@click.command("gpus")
@click.argument("gpu", required=False)
@click.option("--providers", "providers", multiple=True, help="Only these providers (comma-separated).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gpus(gpu, providers, as_json):
    """GPU types with memory and cheapest prices per provider."""
    from ftplan.planner.estimate.gpus import resolve_gpu, table_gpus
    from ftplan.planner.pricing.offers import PROVIDERS, OfferTable, check_provider, split_csv, stale_warning

    provs = tuple(dict.fromkeys(check_provider(p) for p in split_csv(providers))) or PROVIDERS
    table = OfferTable.load(provs)
    warning = stale_warning(table)
    if warning:
        click.echo(warning, err=True)
    prices = cheapest_by_gpu(table.rows)
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
            "providers": {p: {"on_demand_per_gpu_hour": v[0], "spot_per_gpu_hour": v[1]}
                          for p, v in sorted(per.items())},
        })
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not gpu:
        entries = [e for e in entries if e["providers"]]
    cols = list(provs)
    head = f"{'GPU':<20} {'GiB':>5} {'bf16':>4}  " + "  ".join(f"{p:>17}" for p in cols)
    click.echo(head)
    click.echo(f"{'':<20} {'':>5} {'':>4}  " + "  ".join(f"{'on-demand / spot':>17}" for _ in cols))
    for e in entries:
        cells = []
        for p in cols:
            v = e["providers"].get(p)
            if not v:
                cells.append(f"{'-':>17}")
                continue
            od = f"{v['on_demand_per_gpu_hour']:.2f}" if v["on_demand_per_gpu_hour"] is not None else "-"
            sp = f"{v['spot_per_gpu_hour']:.2f}" if v["spot_per_gpu_hour"] is not None else "-"
            cells.append(f"{od + ' / ' + sp:>17}")
        click.echo(f"{e['gpu']:<20} {e['memory_gib']:>5g} {'yes' if e['bf16'] else 'no':>4}  " + "  ".join(cells))
    click.echo("Cheapest $ per GPU-hour in any region (instance price / GPU count); snapshots, not live quotes.")
