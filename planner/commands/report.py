"""`ftplan runs` and `ftplan report`: what runs cost, estimated vs actual, from the run store."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ftplan.planner.errors import UserError


def _store(path: str | None):
    from ftplan.planner.runs.store import Store, default_store_path

    p = Path(path) if path else default_store_path()
    if not p.exists():
        raise UserError(f"no run store at {p} yet; launch a run first, or pass --store FILE")
    return Store(p)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.option("--limit", type=int, help="Only the newest N runs.")
@click.option("--wide", is_flag=True, help="Every column, whatever the terminal's width.")
@click.option("--refresh", is_flag=True, help="Ask the providers and the machines' watchdogs about the runs no "
              "launcher is watching (detached, or launcher gone): machine state, step, spend from the provider's "
              "clock; a run whose machine is gone and whose artifacts are in its bucket is closed.")
@click.option("--store", "store_path", type=click.Path(dir_okay=False))
def runs(as_json, limit, wide, refresh, store_path):
    """List recorded runs: estimated vs actual time and cost."""
    from ftplan.planner.runs.reports import render_runs_text, runs_table

    if limit is not None and limit <= 0:
        raise UserError("--limit must be a positive integer")
    if refresh:
        from ftplan.planner.launch.refresh import refresh_runs, render_refresh_text

        rows = refresh_runs(_store(store_path), limit=limit)
        if as_json:
            click.echo(json.dumps(rows, indent=2))
        elif not rows:
            click.echo("no runs recorded yet")
        else:
            click.echo(render_refresh_text(rows), nl=False)
        return
    rows = runs_table(_store(store_path), limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo("no runs recorded yet; 'ftplan launch --dry-run' shows what a run would cost")
    else:
        from ftplan.planner.commands.table_fit import terminal_width

        click.echo(render_runs_text(rows, None if wide else terminal_width()), nl=False)


@click.command()
@click.argument("run_id", required=False)
@click.option("--by", type=click.Choice(["provider", "month"]), help="Totals per provider or per month.")
@click.option("--since", help="Only runs started on or after this UTC date (YYYY-MM-DD).")
@click.option("--until", help="Only runs started on or before this UTC date (YYYY-MM-DD).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Write a self-contained HTML page: one run's, or (without RUN) the period's runs.")
@click.option("--store", "store_path", type=click.Path(dir_okay=False))
def report(run_id, by, since, until, as_json, html_path, store_path):
    """Report of one run, or totals by provider or month; --html writes a page to send."""
    from ftplan.planner.runs import reports

    if run_id and (by or since or until):
        raise UserError("give either a RUN id, or --by provider|month / --since / --until for many runs "
                        "(see 'ftplan runs' for ids)")
    if not run_id and not by and not html_path:
        raise UserError("give either a RUN id or --by provider|month, or --html FILE for a page of all runs "
                        "(see 'ftplan runs' for ids)")
    store = _store(store_path)
    if not run_id:
        ov = reports.overview(store, since=since, until=until, by=by)
        if html_path:
            from ftplan.planner.runs.report_html import runs_page

            _write(html_path, runs_page(ov))
            if not as_json:
                click.echo(f"wrote {html_path} ({len(ov['runs'])} runs)")
        if as_json:
            click.echo(json.dumps(ov if html_path or not by else ov["groups"], indent=2))
        elif by and not html_path:
            click.echo(reports.render_totals_text(ov["groups"], by), nl=False)
        return
    rep = reports.run_report(store, run_id)
    if html_path:
        _write(html_path, reports.render_report_html(rep))
        if not as_json:
            click.echo(f"wrote {html_path}")
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    elif not html_path:
        click.echo(reports.render_report_text(rep), nl=False)


def _write(path: str, page: str) -> None:
    try:
        Path(path).write_text(page, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}; pick a writable path") from None
