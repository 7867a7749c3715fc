"""HTML pages a person would send to a colleague: one run (`ftplan report RUN --html`) and a period of
runs (`ftplan report --html [--since/--until] [--by provider|month]`).

Self-contained (inline CSS and SVG, no script, nothing fetched), responsive (a grid that reflows from two
columns to one, charts that scale to their column, wide tables that drop secondary columns on narrow
screens). Every number shown comes from the report dict (`ftplan.planner.runs.reports`), and carries it
in `data-value`, so a test can compare the page with the store.
"""

from __future__ import annotations

import html
import json
from typing import Any

from ftplan.planner.runs.report_charts import BLUE, GREY, ORANGE, bar_chart, line_chart
from ftplan.planner.runs.reports import error_pct, human_bytes

esc = html.escape

CSS = """
:root{--fg:#111827;--muted:#6b7280;--line:#e5e7eb;--card:#fff}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--fg);
  margin:0;background:#f6f7f9}
main{max-width:1120px;margin:0 auto;padding:24px 20px 40px}
h1{font-size:1.45rem;margin:0 0 2px;overflow-wrap:anywhere}
h2{font-size:1.1rem;margin:28px 0 10px}
.sub{color:var(--muted);overflow-wrap:anywhere}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:12px;margin:18px 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px}
.card .k{color:var(--muted);font-size:.85rem}.card .v{font-size:1.35rem;font-weight:600}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,440px),1fr));gap:16px}
figure{margin:0;background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 12px;min-width:0}
figcaption{font-weight:600;margin-bottom:4px}figcaption small{font-weight:400;color:var(--muted)}
svg.chart{width:100%;height:auto;display:block}
svg .tick{font-size:13px;fill:#4b5563}svg .axis-label{font-size:13px;fill:#374151}
svg .grid{stroke:#eceef1}svg .axis{stroke:#9ca3af}
.panel{background:var(--card);border:1px solid var(--line);border-radius:8px;overflow-x:auto}
table{border-collapse:collapse;width:100%}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
tr:last-child td{border-bottom:0}
th{font-weight:600;color:#374151;background:#fafafb}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.over{color:#b91c1c}.under{color:#15803d}.muted{color:var(--muted)}
.status{display:inline-block;padding:0 8px;border-radius:999px;font-size:.85rem;background:#e5e7eb}
.status.succeeded{background:#dcfce7;color:#166534}.status.failed{background:#fee2e2;color:#991b1b}
.status.stopped_over_budget{background:#fef3c7;color:#92400e}
.why{background:#fef2f2;border:1px solid #fecaca;border-radius:8px;padding:8px 12px;margin:12px 0;overflow-wrap:anywhere}
.artifacts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,300px),1fr));gap:12px}
.artifacts ul{margin:0;padding:0 12px 10px 12px;list-style:none}
.artifacts li{display:flex;justify-content:space-between;gap:12px;padding:2px 0;border-bottom:1px dotted var(--line)}
.artifacts li span:first-child{overflow-wrap:anywhere;min-width:0}
.artifacts h3{font-size:1rem;margin:0;padding:10px 12px 6px}
code{font-size:.9em;overflow-wrap:anywhere}
footer{color:var(--muted);font-size:.85rem;margin-top:28px}
@media (max-width:900px){.wide-only{display:none}}
"""


def _page(title: str, body: str, summary: dict[str, Any]) -> str:
    from ftplan import __version__

    data = esc(json.dumps(summary, sort_keys=True))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>"
            f'<body data-summary="{data}"><main>{body}'
            f"<footer>ftplan {esc(__version__)} · estimates are the plan's at launch; actuals are billed time × price"
            "</footer></main></body></html>\n")


# ---- formatting -----------------------------------------------------------------------------------
def usd(x: float | None) -> str:
    """Cents, except below 10 cents where a demo run's $0.0347 would otherwise read as $0.03."""
    if x is None:
        return "-"
    return f"${x:,.4f}" if abs(x) < 0.1 else f"${x:,.2f}"


def when(iso: str | None) -> str:
    return "-" if not iso else iso[:16].replace("T", " ") + " UTC"


def hours(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 60:.1f} min" if x < 1 else f"{x:.2f} h"


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} GiB"


def tps(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f} tok/s"


def _cell(key: str, value: float | None, text: str, cls: str = "num") -> str:
    dv = "" if value is None else f' data-value="{value!r}"'
    return f'<td class="{cls}" data-key="{esc(key)}"{dv}>{esc(text)}</td>'


def _diff(key: str, est: float | None, act: float | None, fmt, higher_is_better: bool = False) -> str:
    pct = error_pct(est, act)
    if est is None or act is None:
        return f'<td class="num muted" data-key="{esc(key)}">-</td>'
    delta = act - est
    sign = "+" if delta >= 0 else "-"
    worse = (delta < 0) if higher_is_better else (delta > 0)
    cls = "over" if worse and abs(pct or 0) >= 5 else ("under" if abs(pct or 0) >= 5 else "muted")
    text = f"{sign}{fmt(abs(delta))}" + (f" ({pct:+.0f} %)" if pct is not None else "")
    return f'<td class="num {cls}" data-key="{esc(key)}" data-value="{delta!r}">{esc(text)}</td>'


def _status(status: str) -> str:
    return f'<span class="status {esc(status)}">{esc(status.replace("_", " "))}</span>'


# ---- one run -------------------------------------------------------------------------------------
def run_page(rep: dict[str, Any]) -> str:
    est, act = rep["estimated"], rep["actual"]
    mem, speed = rep["peak_mem_gib"], rep["tokens_per_s"]
    rows = [
        ("time", "hours", est["hours"], act["hours"], hours, False),
        ("cost", "usd", est["usd"], act["usd"], usd, False),
        ("peak GPU memory", "peak_mem_gib", mem["estimated"], mem["actual"], gib, False),
        ("training throughput", "tokens_per_s", speed["estimated"], speed["actual"], tps, True),
    ]
    comparison = "".join(
        f"<tr><th>{esc(label)}</th>{_cell('estimated.' + key, e, fmt(e))}{_cell('actual.' + key, a, fmt(a))}"
        f"{_diff('difference.' + key, e, a, fmt, better)}</tr>" for label, key, e, a, fmt, better in rows)
    budget = rep.get("budget_usd")
    used = None if not budget or act["usd"] is None else act["usd"] / budget * 100
    cards = "".join([
        _card("actual cost", "actual.usd", act["usd"], usd(act["usd"])),
        _card("budget", "budget_usd", budget, usd(budget) + ("" if used is None else f" ({used:.1f} % used)")),
        _card("billed time", "actual.hours", act["hours"], hours(act["hours"])),
        _card("price", "price_hour", rep.get("price_hour"), f"{usd(rep.get('price_hour'))}/h"),
    ])
    losses = [(float(p["step"]), float(p["loss"])) for p in rep["losses"] if p.get("loss") is not None]
    spend = [(p["t_s"] / 60.0, float(p["usd"])) for p in rep["spend"] if p.get("usd") is not None]
    phases = [p for p in rep["phases"] if p["seconds"] > 0]
    loss_note = (f"{losses[0][1]:.4f} → {losses[-1][1]:.4f} over {len(losses)} points" if losses else "")
    charts = (
        _figure("Training loss", loss_note,
                line_chart([("loss", losses, BLUE)], title="training loss by step", x_label="optimizer step",
                           y_label="loss", kind="loss")),
        _figure("Spend over time", f"{usd(act['usd'])} billed" if act["usd"] is not None else "",
                line_chart([("spend", spend, ORANGE)], title="spend over time", x_label="minutes since launch",
                           y_label="spent (USD)", kind="spend", y_unit="$", y_zero=True)),
        _figure("Where the time went", "minutes per phase",
                bar_chart([p["phase"] for p in phases], [("minutes", [p["seconds"] / 60 for p in phases], GREY)],
                          title="minutes per phase", x_label="phase", y_label="minutes", kind="phases")),
    )
    phase_rows = "".join(
        f"<tr><td>{esc(p['phase'])}</td>{_cell('phase.' + p['phase'], p['seconds'], _secs(p['seconds']))}"
        f"<td>{esc(p['message'] or '')}</td></tr>" for p in rep["phases"])
    instances = "".join(
        f"<tr><td>{esc(i['provider'])}</td><td><code>{esc(i['id'] or '-')}</code></td>"
        f"<td>{esc(i['instance_type'] or '-')}</td><td>{esc(i['region'] or '-')}{' spot' if i['spot'] else ''}</td>"
        f"<td>{esc(i['state'] or '-')}</td><td>{esc(i['error'] or '')}</td></tr>" for i in rep["instances"])
    events = "".join(f"<tr><td class=\"num\">{esc(e['at'] or '')}</td><td>{esc(e['kind'])}</td>"
                     f"<td>{esc(e['message'] or '')}</td></tr>" for e in rep["events"])
    where = " · ".join(x for x in (
        f"{rep['provider'] or '-'} {rep['instance_type'] or ''}".strip(), rep.get("gpu") or "",
        (rep.get("region") or "") + (" (spot)" if rep.get("spot") else ""),
        f"started {when(rep['created_at'])}", f"finished {when(rep['finished_at'])}" if rep.get("finished_at") else "",
    ) if x)
    body = [
        f"<h1>Run <code>{esc(rep['run_id'])}</code> {_status(rep['status'])}</h1>",
        f'<div class="sub">{esc(rep["model"] or "-")} · {esc(rep["method"] or "-")} · {esc(where)}</div>',
        f'<div class="why">why: {esc(rep["error"])}</div>' if rep.get("error") else "",
        f'<div class="cards">{cards}</div>',
        "<h2>Estimated vs actual</h2>",
        '<div class="panel"><table class="compare"><thead><tr><th></th><th class="num">estimated</th>'
        f'<th class="num">actual</th><th class="num">difference</th></tr></thead><tbody>{comparison}</tbody></table></div>',
        "<h2>Charts</h2>", f'<div class="charts">{"".join(charts)}</div>',
        "<h2>Artifacts</h2>", _artifacts(rep),
        "<h2>Phases</h2>",
        f'<div class="panel"><table><thead><tr><th>phase</th><th class="num">duration</th><th>note</th></tr></thead>'
        f"<tbody>{phase_rows}</tbody></table></div>",
        "<h2>Instances</h2>",
        '<div class="panel"><table><thead><tr><th>provider</th><th>id</th><th>type</th><th>where</th><th>state</th>'
        f"<th>error</th></tr></thead><tbody>{instances}</tbody></table></div>",
    ]
    if events:
        body += ["<h2>Events</h2>", '<div class="panel"><table><thead><tr><th class="num">at (UTC)</th><th>kind</th>'
                 f"<th>message</th></tr></thead><tbody>{events}</tbody></table></div>"]
    summary = {k: rep[k] for k in ("run_id", "status", "estimated", "actual", "peak_mem_gib", "tokens_per_s")}
    return _page(f"ftplan run {rep['run_id']}", "".join(body), summary)


def _card(label: str, key: str, value: float | None, text: str) -> str:
    dv = "" if value is None else f' data-value="{value!r}"'
    return f'<div class="card"><div class="k">{esc(label)}</div><div class="v" data-key="{esc(key)}"{dv}>{esc(text)}</div></div>'


def _figure(caption: str, note: str, svg: str) -> str:
    small = f" <small>{esc(note)}</small>" if note else ""
    return f"<figure><figcaption>{esc(caption)}{small}</figcaption>{svg}</figure>"


def _secs(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _common_folder(names: list[str]) -> str:
    """'out/adapter/' for out/adapter/a and out/adapter/b; '' when they share no folder."""
    parts = [n.split("/")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common) + "/" if common else ""


def _count(files: int) -> str:
    return "" if files == 1 else f" ({files} files)"


def _artifacts(rep: dict[str, Any]) -> str:
    groups = rep.get("artifact_groups") or []
    where = f'<p class="sub">in <code>{esc(rep["artifacts_dir"] or "-")}</code></p>'
    if not groups:
        return where + '<p class="muted">nothing was pulled back</p>'
    titles = {"adapter": "Adapter and model files", "checkpoints": "Checkpoints", "logs": "Logs and records",
              "other": "Other files"}
    out = []
    for g in groups:
        folder = _common_folder([i["name"] for i in g["items"]])
        items = "".join(
            f'<li title="{esc(i["name"])}"><span>{esc(i["name"][len(folder):])}{_count(i["files"])}</span>'
            f'<span class="num" data-bytes="{i["bytes"]}">{human_bytes(i["bytes"])}</span></li>' for i in g["items"])
        where_g = f' in <code>{esc(folder)}</code>' if folder else ""
        out.append(f'<div class="panel" data-group="{esc(g["group"])}"><h3>{esc(titles[g["group"]])} '
                   f'<small class="muted">{g["files"]} files, {human_bytes(g["bytes"])}{where_g}</small></h3>'
                   f"<ul>{items}</ul></div>")
    return where + f'<div class="artifacts">{"".join(out)}</div>'


# ---- a period of runs ------------------------------------------------------------------------------
def runs_page(ov: dict[str, Any]) -> str:
    runs = ov["runs"]
    labels = [f"#{i}" for i in range(1, len(runs) + 1)]
    period = " to ".join(x for x in (ov.get("since") or "the first run", ov.get("until") or "today"))
    errs = [abs(r["error_pct"]["usd"]) for r in runs if r["error_pct"]["usd"] is not None]
    mean_err = sum(errs) / len(errs) if errs else None
    total = ov["total"]
    cards = "".join([
        _card("runs", "total.runs", total["runs"], str(total["runs"])),
        _card("spent", "total.actual_usd", total["actual_usd"], usd(total["actual_usd"])),
        _card("estimated", "total.est_usd", total["est_usd"], usd(total["est_usd"])),
        _card("mean cost error", "mean_abs_error_pct", mean_err,
              "-" if mean_err is None else f"{mean_err:.0f} % off"),
    ])
    charts = (
        _figure("Cost per run", "estimated vs actual",
                bar_chart(labels, [("estimated", [r["estimated"]["usd"] for r in runs], GREY),
                                   ("actual", [r["actual"]["usd"] for r in runs], BLUE)],
                          title="cost per run", x_label="run", y_label="USD", kind="cost", y_unit="$")),
        _figure("Cumulative spend", usd(total["actual_usd"]) + " in all",
                line_chart([("spent", [(float(i), r["cumulative_usd"]) for i, r in enumerate(runs, 1)], ORANGE)],
                           title="cumulative spend", x_label="run #", y_label="spent (USD)", kind="cumulative",
                           y_unit="$", y_zero=True)),
        _figure("Estimate error per run", "actual vs estimated cost; red = over the estimate",
                bar_chart(labels, [("cost error", [r["error_pct"]["usd"] for r in runs], BLUE)],
                          title="estimate error per run", x_label="run", y_label="error (%)", kind="error",
                          y_unit="%", signed_colours=True)),
    )
    table_rows = []
    for i, r in enumerate(runs, 1):
        e = r["error_pct"]["usd"]
        ecls = "muted" if e is None or abs(e) < 5 else ("over" if e > 0 else "under")
        table_rows.append(
            f'<tr data-run="{esc(r["run_id"])}"><td class="num">{i}</td><td><code>{esc(r["run_id"])}</code></td>'
            f'<td class="wide-only">{esc((r["created_at"] or "")[:16].replace("T", " "))}</td>'
            f'<td>{esc(r["model"] or "-")} {esc(r["method"] or "")}</td>'
            f'<td>{esc(r["provider"] or "-")}<span class="wide-only"> {esc(r["instance_type"] or "")}</span></td>'
            f"<td>{_status(r['status'])}</td>"
            f"{_cell('estimated.usd', r['estimated']['usd'], usd(r['estimated']['usd']))}"
            f"{_cell('actual.usd', r['actual']['usd'], usd(r['actual']['usd']))}"
            f'<td class="num {ecls}" data-key="error_pct.usd">{"-" if e is None else f"{e:+.0f} %"}</td>'
            f"{_cell('actual.hours', r['actual']['hours'], hours(r['actual']['hours']), 'num wide-only')}"
            f"{_cell('cumulative_usd', r['cumulative_usd'], usd(r['cumulative_usd']))}</tr>")
    body = [
        f"<h1>ftplan runs <small class=\"muted\">{esc(period)}</small></h1>",
        f'<div class="sub">{total["runs"]} runs · estimated vs actual cost, cumulative spend, estimate error</div>',
        f'<div class="cards">{cards}</div>',
        f'<div class="charts">{"".join(charts)}</div>',
    ]
    if ov.get("by") and ov.get("groups"):
        by = ov["by"]
        grows = "".join(
            f"<tr><td>{esc(g[by])}</td><td class=\"num\">{g['runs']}</td>"
            f"{_cell('group.est_usd', g['est_usd'], usd(g['est_usd']))}"
            f"{_cell('group.actual_usd', g['actual_usd'], usd(g['actual_usd']))}"
            f"{_cell('group.actual_hours', g['actual_hours'], hours(g['actual_hours']))}</tr>" for g in ov["groups"])
        body += [f"<h2>By {esc(by)}</h2>",
                 f'<div class="panel"><table class="groups"><thead><tr><th>{esc(by)}</th><th class="num">runs</th>'
                 '<th class="num">estimated</th><th class="num">actual</th><th class="num">billed time</th></tr>'
                 f"</thead><tbody>{grows}</tbody></table></div>"]
    body += ["<h2>Runs</h2>",
             '<div class="panel"><table class="runs"><thead><tr><th class="num">#</th><th>run</th>'
             '<th class="wide-only">started (UTC)</th><th>model</th><th>provider</th><th>status</th>'
             '<th class="num">est. $</th><th class="num">actual $</th><th class="num">error</th>'
             '<th class="num wide-only">billed</th><th class="num">cumulative</th></tr></thead>'
             f"<tbody>{''.join(table_rows)}</tbody></table></div>"]
    if not runs:
        body.append('<p class="muted">no runs in this period</p>')
    summary = {"runs": [r["run_id"] for r in runs], "total": total}
    return _page("ftplan runs", "".join(body), summary)
