"""`ftplan catalog show|refresh`: where each provider's prices come from, how old they are, refresh them."""

from __future__ import annotations

import json
import sys

import click

from ftplan.planner.errors import UserError


@click.group("catalog")
def catalog():
    """Show or refresh the pricing catalogs."""


@catalog.command("show")
@click.option("--regions", "show_regions", is_flag=True, help="Also list each provider's regions.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(show_regions, as_json):
    """Each provider's price source, its age and how many offers it holds."""
    from ftplan.planner.pricing.offers import PROVIDERS, STALE_AFTER_DAYS, active_path, read_catalog_cached

    entries = []
    for p in PROVIDERS:
        path, origin = active_path(p)
        if not path.is_file():
            entries.append({"provider": p, "origin": "missing", "path": str(path), "offers": 0})
            continue
        cat = read_catalog_cached(p, path, origin)
        entries.append({
            "provider": p, "origin": origin, "path": str(path), "offers": len(cat.rows),
            "source": "; ".join(cat.sources), "retrieved_at": str(cat.oldest), "age_days": cat.age_days(),
            "stale": (cat.age_days() or 0) > STALE_AFTER_DAYS,
            "note": ("snapshot of SkyPilot's public catalog; retrieved_at is the import date, the upstream date is "
                     "unknown" if origin == "shipped" else "fetched from the provider's API by 'ftplan catalog refresh'"),
            "regions": sorted({r[9] for r in cat.rows}),
        })
    if as_json:
        if not show_regions:
            for e in entries:
                e.pop("regions", None)
        click.echo(json.dumps(entries, indent=2))
        return
    for e in entries:
        if e["origin"] == "missing":
            click.echo(f"{e['provider']:<11} no catalog ({e['path']})")
            continue
        stale = f"  STALE (> {STALE_AFTER_DAYS} d): run 'ftplan catalog refresh --provider {e['provider']}'" \
            if e["stale"] else ""
        click.echo(f"{e['provider']:<11} {e['origin']:<8} {e['offers']:>5} offers  retrieved {e['retrieved_at']} "
                   f"({e['age_days']} d old){stale}")
        click.echo(f"{'':<11} source: {e['source']} ({e['note']})")
        click.echo(f"{'':<11} file: {e['path']}")
        if show_regions:
            click.echo(f"{'':<11} regions: {', '.join(e['regions'])}")
    click.echo("Prices are snapshots, never live quotes; a refreshed cache file takes precedence over the "
               "shipped one.")


@catalog.command("refresh")
@click.option("--provider", "providers", multiple=True, help="Provider(s) to refresh (default: all).")
@click.option("--endpoint", default=None, help="Override the provider's API endpoint (proxies, test servers).")
def refresh(providers, endpoint):
    """Fetch current prices from the providers' APIs into the user cache."""
    from ftplan.planner.pricing.catalog_refresh import refresh as run_refresh
    from ftplan.planner.pricing.offers import PROVIDERS, check_provider

    names = [check_provider(v) for item in providers for v in item.split(",") if v.strip()] or list(PROVIDERS)
    if endpoint and len(names) != 1:
        raise UserError("--endpoint needs exactly one --provider")
    if len(names) == 1:
        _print(run_refresh(names[0], endpoint=endpoint))
        return
    failed = 0
    for name in names:
        try:
            _print(run_refresh(name))
        except UserError as exc:
            failed += 1
            click.echo(f"error: {exc}", err=True)
    if failed:
        sys.exit(1)


def _print(result) -> None:
    dropped = "".join(f"; dropped {n} ({why})" for why, n in sorted(result.dropped.items()))
    click.echo(f"{result.provider}: {result.rows} offers written to {result.path}{dropped}")
