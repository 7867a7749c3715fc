"""Reports over the run store: the runs table, one run's report, totals, a multi-run overview.

All functions return plain dicts/lists (what `--json` prints, floats rounded to what they mean); the text
renderers here and the HTML pages (`ftplan.planner.runs.report_html`) format those, so the outputs can
never disagree.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

from ftplan.planner.runs.store import Row, Store

PHASE_ORDER = ("provisioning", "waiting", "connecting", "uploading", "training", "pulling", "recovering", "teardown")


def _r(x: float | None, digits: int = 4) -> float | None:
    """JSON rounding: hours and dollars to 4 decimals (a 0.01 cent / 0.36 s resolution), GiB to 2."""
    from ftplan.planner.launch.budget import finite_number

    x = finite_number(x)  # odd values in an older store are no number, not a traceback
    return None if x is None else round(x, digits)


def _iso(ts: float | None) -> str | None:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds") if ts else None


def run_row(run: Row) -> dict[str, Any]:
    return {
        "run_id": run.id, "created_at": _iso(run.created_at), "model": run.model, "method": run.method,
        "provider": run.provider, "instance_type": run.instance_type, "gpu": run.gpu, "status": run.status,
        "estimated": {"hours": _r(run.est_hours), "usd": _r(run.est_usd)},
        "actual": {"hours": _r(run.actual_hours), "usd": _r(run.actual_usd)},
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
    spend = [{"t_s": round(e.ts - run.created_at, 3), "usd": _r(e.json("data_json").get("spent_usd"), 6)}
             for e in events if e.kind == "progress" and e.json("data_json")]
    costs = store.costs(run.id)
    if costs:  # billing starts at zero when the first instance was created; its confirmed end is the last point
        spend.insert(0, {"t_s": round(min(c.started_at for c in costs) - run.created_at, 3), "usd": 0.0})
        spend.append({"t_s": round(max(c.ended_at for c in costs) - run.created_at, 3),
                      "usd": _r(run.actual_usd, 6)})
    report = run_row(run)
    files = _artifacts(run.artifacts_dir)
    report.update({
        "finished_at": _iso(run.finished_at),
        "error": run.error,
        "region": run.region, "spot": bool(run.spot), "price_hour": _r(run.price_hour),
        "phases": phase_durations(events, run.finished_at or run.updated_at),
        "peak_mem_gib": {"estimated": _r(run.est_peak_mem_gib, 2), "actual": _r(run.measured_peak_mem_gib, 2)},
        "tokens_per_s": {"estimated": _r(run.est_tokens_per_s, 2), "actual": _r(run.measured_tokens_per_s, 2)},
        "losses": losses,
        "spend": spend,
        "billed_from": billed_from(costs),
        "instances": [
            {"provider": i.provider, "id": i.provider_instance_id, "instance_type": i.instance_type,
             "region": i.region, "spot": bool(i.spot), "state": i.state, "price_hour": i.price_hour,
             "created_at": _iso(i.created_at), "terminated_at": _iso(i.terminated_at), "error": i.error}
            for i in store.instances(run.id)
        ],
        "artifacts_dir": run.artifacts_dir,
        "artifacts": [a["path"] for a in files],
        "artifact_groups": group_artifacts(files),
        "events": [{"at": _iso(e.ts), "kind": e.kind, "phase": e.phase, "message": e.message}
                   for e in events if e.kind not in ("progress", "phase")],
    })
    return report


_CLOCK_WORDS = {"provider": "the provider's clock", "provider start": "the provider's launch time to the teardown",
                "provider end": "the launch to the provider's end time", "watchdog":
                "the launch to the watchdog's power-off (the provider gave no end time)",
                "launcher": "the launcher's clock"}


def billed_from(costs: list[Row]) -> str | None:
    """Whose clock the run's cost rows came from, in words ("the provider's clock"); None with no cost rows."""
    clocks = sorted({c.data.get("clock") or "launcher" for c in costs})
    return "; ".join(clock_words(c) for c in clocks) if clocks else None


def clock_words(clock: str) -> str:
    return _CLOCK_WORDS.get(clock, clock)


def _loss_point(x: Any, i: int) -> dict[str, Any]:
    """The job writes [step, loss] pairs; progress events give {step, loss}; plain numbers are per step.
    The values came from the machine: anything that is not a finite number becomes None (no point)."""
    from ftplan.planner.launch.budget import finite_number

    if isinstance(x, dict):
        step, loss = x.get("step", i + 1), x.get("loss")
    elif isinstance(x, (list, tuple)) and len(x) == 2:
        step, loss = x[0], x[1]
    else:
        step, loss = i + 1, x
    step = finite_number(step)
    return {"step": int(step) if step is not None else i + 1, "loss": finite_number(loss)}


def _artifacts(artifacts_dir: str | None) -> list[dict[str, Any]]:
    """Files pulled into the run's folder with their sizes (the run's own key and bundle left out)."""
    from pathlib import Path

    if not artifacts_dir or not Path(artifacts_dir).is_dir():
        return []
    root = Path(artifacts_dir)
    keep = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name not in _NOT_ARTIFACTS:
            keep.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size})
    return keep


_NOT_ARTIFACTS = ("id_ed25519", "id_ed25519.pub", "bundle.tar.gz", "known_hosts")
_CHECKPOINT = re.compile(r"(?:^|/)(checkpoint-\d+)/")
_LOG_NAMES = ("heartbeat.json", "summary.json", "job.json", "manifest.json", "progress.json")
ARTIFACT_GROUPS = ("adapter", "checkpoints", "logs", "other")


def group_artifacts(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a person looks for: the adapter (weights, config, tokenizer), one line per checkpoint (not per
    shard), and the logs/records; each item with its size in bytes and file count."""
    groups: dict[str, dict[str, dict[str, Any]]] = {g: {} for g in ARTIFACT_GROUPS}
    for f in files:
        path = f["path"]
        ckpt = _CHECKPOINT.search(path)
        name = path.rsplit("/", 1)[-1]
        if ckpt:
            group, item = "checkpoints", path[:ckpt.end(1)]
        elif name.endswith((".log", ".txt", ".jsonl")) or name in _LOG_NAMES:
            group, item = "logs", path
        elif "adapter" in path or "merged" in path or "tokenizer" in path or name.endswith(
                (".safetensors", ".bin", ".pt", ".model")) or name == "config.json":
            group, item = "adapter", path
        else:
            group, item = "other", path
        entry = groups[group].setdefault(item, {"name": item, "files": 0, "bytes": 0})
        entry["files"] += 1
        entry["bytes"] += f["bytes"]
    out = []
    for g in ARTIFACT_GROUPS:
        items = sorted(groups[g].values(), key=lambda e: _natural(e["name"]))
        if items:
            out.append({"group": g, "files": sum(i["files"] for i in items), "bytes": sum(i["bytes"] for i in items),
                        "items": items})
    return out


def _natural(name: str) -> list[Any]:
    """checkpoint-2 before checkpoint-10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def group_key(run: Row, by: str) -> str:
    if by == "provider":
        return run.provider or "-"
    return _dt.datetime.fromtimestamp(run.created_at, _dt.timezone.utc).strftime("%Y-%m")


def totals(store: Store, by: str, runs: list[Row] | None = None) -> list[dict[str, Any]]:
    """Sum of estimated and actual hours/dollars per provider or per calendar month (UTC).

    A column none of the group's runs knows stays None (shown "-"), not 0: "no estimate" is not "free"."""
    groups: dict[str, dict[str, Any]] = {}
    for run in store.list_runs() if runs is None else runs:
        key = group_key(run, by)
        g = groups.setdefault(key, {by: key, "runs": 0, "est_hours": None, "est_usd": None, "actual_hours": None,
                                    "actual_usd": None})
        g["runs"] += 1
        for col, src in (("est_hours", run.est_hours), ("est_usd", run.est_usd),
                         ("actual_hours", run.actual_hours), ("actual_usd", run.actual_usd)):
            if src is not None:
                g[col] = (g[col] or 0.0) + src
    for g in groups.values():
        for col in ("est_hours", "est_usd", "actual_hours", "actual_usd"):
            g[col] = _r(g[col])
    return [groups[k] for k in sorted(groups)]


def _day(text: str | None, flag: str) -> float | None:
    if not text:
        return None
    from ftplan.planner.errors import UserError

    try:
        day = _dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a date; use YYYY-MM-DD, e.g. {flag} 2026-01-31") from None
    return day.timestamp()


def error_pct(estimated: float | None, actual: float | None) -> float | None:
    """(actual - estimated) / estimated in %, None when either is unknown (or the estimate is 0)."""
    if estimated is None or actual is None or estimated <= 0:
        return None
    return round((actual - estimated) / estimated * 100, 1)


def overview(store: Store, *, since: str | None = None, until: str | None = None,
             by: str | None = None) -> dict[str, Any]:
    """Runs of a period, oldest first, with cumulative spend and each run's estimate error; totals by group.

    `since`/`until` are UTC dates (YYYY-MM-DD, `until` inclusive)."""
    lo, hi = _day(since, "--since"), _day(until, "--until")
    rows = [r for r in store.list_runs() if (lo is None or r.created_at >= lo)
            and (hi is None or r.created_at < hi + 86400)]
    rows.sort(key=lambda r: (r.created_at, r.id))
    runs, cumulative = [], 0.0
    for r in rows:
        cumulative += r.actual_usd or 0.0
        d = run_row(r)
        d["error_pct"] = {"hours": error_pct(r.est_hours, r.actual_hours), "usd": error_pct(r.est_usd, r.actual_usd)}
        d["cumulative_usd"] = _r(cumulative)
        runs.append(d)
    known = [x for x in runs if x["actual"]["usd"] is not None]
    return {
        "since": since, "until": until, "by": by, "runs": runs,
        "total": {"runs": len(runs), "actual_usd": _r(sum(x["actual"]["usd"] for x in known)),
                  "est_usd": _r(sum(x["estimated"]["usd"] or 0.0 for x in runs)),
                  "actual_hours": _r(sum(x["actual"]["hours"] or 0.0 for x in runs))},
        "groups": totals(store, by, rows) if by else [],
    }


# ---- text --------------------------------------------------------------------------------------
def human_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _usd(x: float | None) -> str:
    """Cents, except below 10 cents where a demo run's $0.0347 would read as $0.03."""
    if x is None:
        return "-"
    return f"${x:.4f}" if abs(x) < 0.1 else f"${x:.2f}"


def render_runs_text(rows: list[dict[str, Any]], width: int | None = None) -> str:
    """The runs table; with `width` (the terminal's), no line longer: the instance and estimated hours go
    first, then model names are shortened (ftplan.planner.commands.table_fit)."""
    from ftplan.planner.commands.table_fit import Column, render

    columns = [Column("run"), Column("model", shrink=True, min_width=8), Column("method"),
               Column("provider", shrink=True, min_width=6), Column("instance", drop=1, shrink=True, min_width=8),
               Column("status", shrink=True, min_width=9), Column("est h", right=True, drop=2),
               Column("act h", right=True), Column("est $", right=True), Column("act $", right=True)]
    cells = [[r["run_id"], r["model"] or "-", r["method"] or "-", r["provider"] or "-", r["instance_type"] or "-",
              r["status"], _num(r["estimated"]["hours"], ".2f"), _num(r["actual"]["hours"], ".2f"),
              _usd(r["estimated"]["usd"]), _usd(r["actual"]["usd"])] for r in rows]
    return render(columns, cells, width) + "\n"


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
    if rep.get("billed_from"):
        lines.append(f"  billed from {rep['billed_from']}")
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
        lines.append(f"    {inst['provider']} {inst['id'] or '-'} {inst['instance_type'] or '-'} {inst['state']}"
                     + (f"  ({inst['error']})" if inst["error"] else ""))
    lines.append(f"  artifacts: {rep['artifacts_dir']} ({len(rep['artifacts'])} files)")
    for g in rep["artifact_groups"]:
        lines.append(f"    {g['group']:<12} {human_bytes(g['bytes']):>9}  "
                     + ", ".join(i["name"].rsplit("/", 1)[-1] for i in g["items"][:6])
                     + (f" (+{len(g['items']) - 6} more)" if len(g["items"]) > 6 else ""))
    return "\n".join(lines) + "\n"


def render_totals_text(rows: list[dict[str, Any]], by: str) -> str:
    lines = [f"{by:<12} {'runs':>5} {'est h':>9} {'act h':>9} {'est $':>10} {'act $':>10}"]
    for r in rows:
        lines.append(f"{r[by]:<12} {r['runs']:>5} {_num(r['est_hours'], '.3f'):>9} {_num(r['actual_hours'], '.3f'):>9} "
                     f"{_usd(r['est_usd']):>10} {_usd(r['actual_usd']):>10}")
    return "\n".join(lines) + "\n"


# ---- HTML --------------------------------------------------------------------------------------
def render_report_html(rep: dict[str, Any]) -> str:
    """One run's page (see ftplan.planner.runs.report_html)."""
    from ftplan.planner.runs.report_html import run_page

    return run_page(rep)
