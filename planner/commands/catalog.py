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
    """Each provider's price sources, how old the prices are and how many offers it holds."""
    from ftplan.planner.commands.table_fit import terminal_width, wrap
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
            "source": "; ".join(cat.sources), "sources": _sources(cat.rows),
            "retrieved_at": str(cat.oldest), "age_days": cat.age_days(),
            "price_dates": list(cat.price_dates or ()), "price_age_days": cat.price_age_days(),
            "undated": cat.undated,
            "stale": (cat.age_days() or 0) > STALE_AFTER_DAYS,
            "note": _note(origin, cat),
            "regions": sorted({r[9] for r in cat.rows}),
        })
    if as_json:
        if not show_regions:
            for e in entries:
                e.pop("regions", None)
        click.echo(json.dumps(entries, indent=2))
        return
    width = terminal_width()
    for e in entries:
        if e["origin"] == "missing":
            click.echo(wrap(f"{e['provider']:<11} no catalog ({e['path']})", width))
            continue
        stale = f"  STALE (> {STALE_AFTER_DAYS} d): run 'ftplan catalog refresh --provider {e['provider']}'" \
            if e["stale"] else ""
        click.echo(wrap(f"{e['provider']:<11} {e['origin']:<8} {e['offers']:>5} offers{stale}", width))
        click.echo(wrap(f"prices: {e['note']}", width, indent=" " * 11))
        for src in e["sources"]:
            when = f"price date {src['price_date']}" if src["price_date"] else \
                f"imported {src['retrieved_at']} ({src['age_days']} d old; the upstream date is unknown)"
            click.echo(wrap(f"source ({src['rows']} rows, {when}): {src['source']}", width, indent=" " * 11))
        click.echo(wrap(f"file: {e['path']}", width, indent=" " * 11))
        if show_regions:
            click.echo(wrap(f"regions: {', '.join(e['regions'])}", width, indent=" " * 11))
    click.echo(wrap("Prices are snapshots, never live quotes; a refreshed cache file takes precedence over the "
                    "shipped one. Plans warn about on-demand prices older than 60 days and spot prices older "
                    "than 7 days (or of unknown date).", width))


def _sources(rows: list[tuple]) -> list[dict]:
    """Rows per (source, price date, retrieved date), largest first."""
    import collections
    import datetime as dt

    from ftplan.planner.pricing import offers as O

    count = collections.Counter((r[O.SOURCE], r[O.PRICE_DATE], r[O.RETRIEVED][:10]) for r in rows)
    today = dt.date.today()
    return [{"source": src, "price_date": pd or None, "retrieved_at": ret, "rows": n,
             "age_days": (today - O.parse_date(pd or ret)).days}
            for (src, pd, ret), n in sorted(count.items(), key=lambda kv: (-kv[1], kv[0]))]


def _note(origin: str, cat) -> str:
    """How old the prices are, saying when only the import date (not the upstream date) is known."""
    parts = []
    dated = len(cat.rows) - cat.undated
    if dated:
        lo, hi = cat.price_dates
        span = lo if lo == hi else f"{lo} .. {hi}"
        parts.append(f"{dated} dated {span} (oldest {cat.price_age_days()} d old)")
    if cat.undated:
        what = "imported" if origin == "shipped" else "fetched"
        parts.append(f"{cat.undated} of unknown date, {what} {cat.oldest} ({cat.age_days()} d ago): "
                     + ("retrieved_at is the import date, the upstream date is unknown"
                        if origin == "shipped" else "the fetch date is the price date"))
    return "; ".join(parts)


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
    for line in result.changes.lines():
        click.echo(f"  {line}")
