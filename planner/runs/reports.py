"""Reports over the run store: the runs table, one run's report, totals, and a self-contained HTML page.

All functions return plain dicts/lists (what `--json` prints); the text and HTML renderers format
those, so the three outputs can never disagree.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from typing import Any

from ftplan.planner.runs.store import Row, Store

PHASE_ORDER = ("provisioning", "waiting", "connecting", "uploading", "training", "pulling", "recovering", "teardown")


def _iso(ts: float | None) -> str | None:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds") if ts else None


def run_row(run: Row) -> dict[str, Any]:
    return {
        "run_id": run.id, "created_at": _iso(run.created_at), "model": run.model, "method": run.method,
        "provider": run.provider, "instance_type": run.instance_type, "gpu": run.gpu, "status": run.status,
        "estimated": {"hours": run.est_hours, "usd": run.est_usd},
        "actual": {"hours": run.actual_hours, "usd": run.actual_usd},
        "budget_usd": run.budget_usd,
    }


def runs_table(store: Store, limit: int | None = None) -> list[dict[str, Any]]:
    return [run_row(r) for r in store.list_runs(limit)]


def phase_durations(events: list[Row], end_ts: float | None) -> list[dict[str, Any]]:
    """Consecutive `phase` events -> [{phase, started_at, seconds}]; a phase entered twice is listed twice."""
    phases = [e for e in events if e.kind == "phase"]
    out = []
    for i, ev in enumerate(phases):
        nxt = phases[i + 1].ts if i + 1 < len(phases) else (end_ts or ev.ts)
        out.append({"phase": ev.phase, "started_at": _iso(ev.ts), "seconds": round(max(0.0, nxt - ev.ts), 3),
                    "message": ev.message})
    return out


def run_report(store: Store, run_id: str) -> dict[str, Any]:
    from ftplan.planner.errors import UserError

    run = store.get_run(run_id)
    if run is None:
        raise UserError(f"no run '{run_id}' in {store.path}; 'ftplan runs' lists the recorded runs")
    events = store.events(run.id)
    summary = run.json("summary_json") or {}
    losses = summary.get("losses") or [
        {"step": e.json("data_json")["step"], "loss": e.json("data_json")["loss"]}
        for e in events if e.kind == "progress" and (e.json("data_json") or {}).get("loss") is not None
    ]
    losses = [_loss_point(x, i) for i, x in enumerate(losses)]
    spend = [{"t_s": round(e.ts - run.created_at, 3), "usd": e.json("data_json").get("spent_usd")}
             for e in events if e.kind == "progress" and e.json("data_json")]
    costs = store.costs(run.id)
    if costs:  # the confirmed end of billing is the last point
        spend.append({"t_s": round(max(c.ended_at for c in costs) - run.created_at, 3), "usd": run.actual_usd})
    report = run_row(run)
    report.update({
        "finished_at": _iso(run.finished_at),
        "error": run.error,
        "region": run.region, "spot": bool(run.spot), "price_hour": run.price_hour,
        "phases": phase_durations(events, run.finished_at or run.updated_at),
        "peak_mem_gib": {"estimated": run.est_peak_mem_gib, "actual": run.measured_peak_mem_gib},
        "tokens_per_s": {"estimated": run.est_tokens_per_s, "actual": run.measured_tokens_per_s},
        "losses": losses,
        "spend": spend,
        "instances": [
            {"provider": i.provider, "id": i.provider_instance_id, "instance_type": i.instance_type,
             "region": i.region, "spot": bool(i.spot), "state": i.state, "price_hour": i.price_hour,
             "created_at": _iso(i.created_at), "terminated_at": _iso(i.terminated_at), "error": i.error}
            for i in store.instances(run.id)
        ],
        "artifacts_dir": run.artifacts_dir,
        "artifacts": _artifacts(run.artifacts_dir),
        "events": [{"at": _iso(e.ts), "kind": e.kind, "phase": e.phase, "message": e.message}
                   for e in events if e.kind not in ("progress", "phase")],
    })
    return report


def _loss_point(x: Any, i: int) -> dict[str, Any]:
    """The job writes [step, loss] pairs; progress events give {step, loss}; plain numbers are per step."""
    if isinstance(x, dict):
        return {"step": x.get("step", i + 1), "loss": x.get("loss")}
    if isinstance(x, (list, tuple)) and len(x) == 2:
        return {"step": x[0], "loss": x[1]}
    return {"step": i + 1, "loss": x}


def _artifacts(artifacts_dir: str | None) -> list[str]:
    from pathlib import Path

    if not artifacts_dir or not Path(artifacts_dir).is_dir():
        return []
    root = Path(artifacts_dir)
    keep = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in ("id_ed25519", "bundle.tar.gz", "known_hosts"):
            keep.append(str(p.relative_to(root)))
    return keep


def totals(store: Store, by: str) -> list[dict[str, Any]]:
    """Sum of estimated and actual hours/dollars per provider or per calendar month (UTC)."""
    groups: dict[str, dict[str, Any]] = {}
    for run in store.list_runs():
        if by == "provider":
            key = run.provider or "-"
        else:
            key = _dt.datetime.fromtimestamp(run.created_at, _dt.timezone.utc).strftime("%Y-%m")
        g = groups.setdefault(key, {by: key, "runs": 0, "est_hours": 0.0, "est_usd": 0.0, "actual_hours": 0.0,
                                    "actual_usd": 0.0})
        g["runs"] += 1
        for col, src in (("est_hours", run.est_hours), ("est_usd", run.est_usd),
                         ("actual_hours", run.actual_hours), ("actual_usd", run.actual_usd)):
            g[col] += src or 0.0
    return [groups[k] for k in sorted(groups)]


# ---- text --------------------------------------------------------------------------------------
def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _usd(x: float | None) -> str:
    if x is None:
        return "-"
    return f"${x:.4f}" if abs(x) < 1 else f"${x:.2f}"


def render_runs_text(rows: list[dict[str, Any]]) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ftplan runs", show_lines=False)
    for col in ("run", "model", "method", "provider", "instance", "status", "est h", "act h", "est $", "act $"):
        table.add_column(col, justify="right" if col.endswith(("h", "$")) else "left")
    for r in rows:
        table.add_row(r["run_id"], r["model"] or "-", r["method"] or "-", r["provider"] or "-",
                      r["instance_type"] or "-", r["status"], _num(r["estimated"]["hours"], ".3f"),
                      _num(r["actual"]["hours"], ".3f"), _usd(r["estimated"]["usd"]), _usd(r["actual"]["usd"]))
    return _render(table, Console)


def _render(renderable: Any, console_cls: Any) -> str:
    console = console_cls(width=140, record=True, file=_Sink(), color_system=None)
    console.print(renderable)
    return console.export_text()


class _Sink:
    def write(self, _s: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def render_report_text(rep: dict[str, Any]) -> str:
    lines = [
        f"run {rep['run_id']}  {rep['status']}  {rep['model']} {rep['method']}  "
        f"{rep['provider']}/{rep['instance_type']} ({rep['gpu'] or '-'})  {_usd(rep['price_hour'])}/h",
    ]
    if rep.get("error"):
        lines.append(f"  why: {rep['error']}")
    lines.append(f"  time:    estimated {_num(rep['estimated']['hours'], '.3f')} h, actual "
                 f"{_num(rep['actual']['hours'], '.3f')} h")
    lines.append(f"  cost:    estimated {_usd(rep['estimated']['usd'])}, actual {_usd(rep['actual']['usd'])}"
                 f"  (budget {_usd(rep['budget_usd'])})")
    lines.append(f"  peak memory: estimated {_num(rep['peak_mem_gib']['estimated'], '.2f')} GiB, measured "
                 f"{_num(rep['peak_mem_gib']['actual'], '.2f')} GiB")
    lines.append(f"  tokens/s:    estimated {_num(rep['tokens_per_s']['estimated'], '.0f')}, measured "
                 f"{_num(rep['tokens_per_s']['actual'], '.0f')}")
    lines.append("  phases:")
    for ph in rep["phases"]:
        lines.append(f"    {ph['phase']:<13} {ph['seconds']:>9.1f} s  {ph['message'] or ''}".rstrip())
    if rep["losses"]:
        first, last = rep["losses"][0], rep["losses"][-1]
        lines.append(f"  loss: {_num(first['loss'], '.4f')} (step {first['step']}) -> {_num(last['loss'], '.4f')} "
                     f"(step {last['step']}), {len(rep['losses'])} points")
    lines.append("  instances:")
    for inst in rep["instances"]:
        lines.append(f"    {inst['provider']} {inst['id'] or '-'} {inst['instance_type']} {inst['state']}"
                     + (f"  ({inst['error']})" if inst["error"] else ""))
    lines.append(f"  artifacts: {rep['artifacts_dir']} ({len(rep['artifacts'])} files)")
    for a in rep["artifacts"][:20]:
        lines.append(f"    {a}")
    return "\n".join(lines) + "\n"


def render_totals_text(rows: list[dict[str, Any]], by: str) -> str:
    lines = [f"{by:<12} {'runs':>5} {'est h':>9} {'act h':>9} {'est $':>10} {'act $':>10}"]
    for r in rows:
        lines.append(f"{r[by]:<12} {r['runs']:>5} {r['est_hours']:>9.3f} {r['actual_hours']:>9.3f} "
                     f"{_usd(r['est_usd']):>10} {_usd(r['actual_usd']):>10}")
    return "\n".join(lines) + "\n"


# ---- HTML --------------------------------------------------------------------------------------
def svg_line_chart(points: list[tuple[float, float]], *, title: str, x_label: str, y_label: str,
                   width: int = 560, height: int = 240) -> str:
    """A dependency-free inline SVG polyline chart (no JS, no external assets)."""
    pad_l, pad_b, pad_t, pad_r = 60, 36, 24, 12
    esc = html.escape
    if not points:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
                f'<title>{esc(title)}</title><text x="{width // 2}" y="{height // 2}" text-anchor="middle">'
                f"no data</text></svg>")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return pad_t + ph - (y - y0) / (y1 - y0) * ph

    poly = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2"/>' for x, y in points)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'class="chart"><title>{esc(title)}</title>'
        f'<line x1="{pad_l}" y1="{pad_t + ph}" x2="{pad_l + pw}" y2="{pad_t + ph}" stroke="#888"/>'
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + ph}" stroke="#888"/>'
        f'<text x="{pad_l - 4}" y="{pad_t + 4}" text-anchor="end" font-size="10">{y1:.4g}</text>'
        f'<text x="{pad_l - 4}" y="{pad_t + ph}" text-anchor="end" font-size="10">{y0:.4g}</text>'
        f'<text x="{pad_l}" y="{height - 18}" font-size="10">{x0:.4g}</text>'
        f'<text x="{pad_l + pw}" y="{height - 18}" text-anchor="end" font-size="10">{x1:.4g}</text>'
        f'<text x="{pad_l + pw / 2}" y="{height - 4}" text-anchor="middle" font-size="11">{esc(x_label)}</text>'
        f'<text x="12" y="{pad_t + ph / 2}" font-size="11" transform="rotate(-90 12 {pad_t + ph / 2})" '
        f'text-anchor="middle">{esc(y_label)}</text>'
        f'<polyline fill="none" stroke="#2563eb" stroke-width="2" points="{poly}"/>'
        f'<g fill="#2563eb">{dots}</g></svg>'
    )


def render_report_html(rep: dict[str, Any]) -> str:
    esc = html.escape
    loss_pts = [(float(p["step"]), float(p["loss"])) for p in rep["losses"] if p.get("loss") is not None]
    spend_pts = [(p["t_s"] / 60.0, float(p["usd"])) for p in rep["spend"] if p.get("usd") is not None]
    rows = [
        ("status", rep["status"]), ("model", f"{rep['model']} ({rep['method']})"),
        ("instance", f"{rep['provider']} {rep['instance_type']} {rep['gpu'] or ''} {rep['region'] or ''}"),
        ("price", f"{_usd(rep['price_hour'])}/h"),
        ("time", f"estimated {_num(rep['estimated']['hours'], '.3f')} h / actual "
                 f"{_num(rep['actual']['hours'], '.3f')} h"),
        ("cost", f"estimated {_usd(rep['estimated']['usd'])} / actual {_usd(rep['actual']['usd'])} "
                 f"(budget {_usd(rep['budget_usd'])})"),
        ("peak memory", f"estimated {_num(rep['peak_mem_gib']['estimated'], '.2f')} GiB / measured "
                        f"{_num(rep['peak_mem_gib']['actual'], '.2f')} GiB"),
    ]
    if rep.get("error"):
        rows.append(("why", rep["error"]))
    info = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in rows)
    phases = "".join(f"<tr><td>{esc(p['phase'])}</td><td>{p['seconds']:.1f} s</td><td>{esc(p['message'] or '')}"
                     f"</td></tr>" for p in rep["phases"])
    arts = "".join(f"<li>{esc(a)}</li>" for a in rep["artifacts"])
    data = esc(json.dumps({k: rep[k] for k in ("run_id", "status", "estimated", "actual")}))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ftplan run {esc(rep['run_id'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
th,td{{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd}}.charts{{display:flex;gap:2em;flex-wrap:wrap}}
</style></head><body data-summary="{data}">
<h1>Run {esc(rep['run_id'])}</h1>
<table>{info}</table>
<div class="charts">
<figure><figcaption>Training loss</figcaption>
{svg_line_chart(loss_pts, title="loss by step", x_label="step", y_label="loss")}</figure>
<figure><figcaption>Spend over time</figcaption>
{svg_line_chart(spend_pts, title="spend over time", x_label="minutes since launch", y_label="USD")}</figure>
</div>
<h2>Phases</h2><table>{phases}</table>
<h2>Artifacts</h2><p>{esc(rep['artifacts_dir'] or '')}</p><ul>{arts}</ul>
</body></html>
"""
