"""`ftplan runs --refresh`: live state of the runs no launcher is watching (detached, or launcher dead).

For each such run: ask the provider about its machine (bounded describe), read what the machine's watchdog did
(watchdog.json over SSH while the machine is up, else the copy the watchdog keeps in the run's bucket), and
work out the spend so far from the provider's clock. When the provider says the machine is gone, its billing is
closed in the store (provider times, else the watchdog's power-off); when the bucket also holds the final
artifacts, the run is closed with the job's own outcome. Nothing is terminated here: that is `attach`/`gc`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SSH_BUDGET_S = 10.0       # one connect attempt per refresh of a run: a sleeping machine costs seconds, not minutes
DESCRIBE_S = 10.0


def refresh_runs(store: Any, *, limit: int | None = None, provider_factory: Callable[..., Any] | None = None,
                 runner_factory: Callable[..., Any] | None = None) -> list[dict[str, Any]]:
    """One dict per run (newest first): the store's row plus, for runs no launcher watches, the live view."""
    from ftplan.planner.runs.reports import run_row
    from ftplan.planner.runs.store import FINAL_STATUSES, pid_alive

    out = []
    for run in store.list_runs(limit):
        row = run_row(run)
        if run.status not in FINAL_STATUSES:
            if pid_alive(run.launcher_pid, run.launcher_host) and run.phase != "detached":
                row["live"] = {"machine": "?", "note": "its launcher is running (see 'ftplan attach')"}
            else:
                row["live"] = refresh_run(store, run.id, provider_factory=provider_factory,
                                          runner_factory=runner_factory)
                row.update({k: v for k, v in run_row(store.get_run(run.id)).items() if k in ("status", "actual")})
        out.append(row)
    return out


def refresh_run(store: Any, run_id: str, *, provider_factory: Callable[..., Any] | None = None,
                runner_factory: Callable[..., Any] | None = None) -> dict[str, Any]:
    """The live view of one run, and the store updated with what it proved (never raises for a provider,
    SSH or bucket failure: those become the `note`)."""
    from ftplan.providers.errors import scrub

    run = store.get_run(run_id)
    rows = [r for r in store.instances(run.id, open_only=True) if r.provider_instance_id]
    live: dict[str, Any] = {"machine": "none", "instance": None, "step": None, "total_steps": None,
                            "watchdog": None, "spent_usd": None, "billed_from": None, "closed": False, "note": ""}
    bucket = _bucket(run, run.id)
    if not rows:
        live["note"] = "no open instance recorded"
        return live
    from ftplan.planner.launch.node_group import recorded_nodes

    nodes = recorded_nodes(store, run.id, rows)    # a multi-node run: node 0 has rank 0's heartbeat and watchdog
    row = next((r for r in nodes if r), rows[-1]) if nodes else rows[-1]
    try:
        inst, provider = _describe(store, run, row, provider_factory)
    except Exception as exc:  # noqa: BLE001 - no adapter / no credentials: say so, keep the rest
        inst, provider = None, None
        live["note"] = f"cannot ask {row.provider}: {scrub(exc)}"
    live["instance"] = row.provider_instance_id
    state = getattr(getattr(inst, "state", None), "value", None)
    live["machine"] = _MACHINE.get(state or "", "unknown")
    doc = None
    if live["machine"] == "up" and inst is not None and getattr(inst, "ssh", None):
        doc, hb = _read_over_ssh(store, run, inst, provider, runner_factory)
        if hb:
            live["step"], live["total_steps"] = hb.get("step"), hb.get("total_steps")
    if doc is None and bucket:
        doc = _bucket_json(f"{bucket}/watchdog.json")
    if doc:
        _record_watchdog(store, run.id, doc)
        from ftplan.planner.launch.run_artifacts import watchdog_summary

        live["watchdog"] = scrub(watchdog_summary(doc))
        if live["step"] is None:
            live["step"], live["total_steps"] = doc.get("step"), doc.get("total_steps")
    live.update(_spend(store, run, row, inst, provider))
    if live["machine"] in ("up", "powered off") and doc and any(
            isinstance(a, dict) and a.get("action") == "power_off" for a in doc.get("actions") or []):
        live["note"] = (f"the watchdog ran its power-off, yet {row.provider} still lists the machine (it may bill "
                        "until terminated): 'ftplan gc --yes' terminates it")
    if live["machine"] == "terminated" and inst is not None:
        live.update(_close(store, run, rows, inst, provider, bucket))
    return live


_MACHINE = {"running": "up", "pending": "up", "stopping": "powering off", "stopped": "powered off",
            "terminating": "terminated", "terminated": "terminated", "preempted": "terminated"}


def _bucket(run: Any, run_id: str) -> str | None:
    bucket = (run.json("config_json") or {}).get("bucket")
    return f"{str(bucket).rstrip('/')}/{run_id}" if bucket else None


def _bucket_json(url: str) -> dict | None:
    try:
        from ftplan.remote_job import job_bucket

        return job_bucket.get_json(url)
    except Exception:  # noqa: BLE001 - no boto3, no credentials, no bucket: nothing known from there
        return None


def _provider(store: Any, run: Any, name: str, provider_factory: Callable[..., Any] | None) -> Any:
    from ftplan.planner.launch.preflight import adapter_kwargs
    from ftplan.providers.base import get_provider

    opts = (run.json("provider_options_json") or {}).get(name, {})
    return (provider_factory or get_provider)(name, **adapter_kwargs(name, opts))


def _describe(store: Any, run: Any, row: Any, provider_factory: Callable[..., Any] | None) -> tuple[Any, Any]:
    from ftplan.planner.launch.billed_span import describe_bounded
    from ftplan.providers.base import Instance, InstanceState

    provider = _provider(store, run, row.provider, provider_factory)
    known = Instance.from_dict(row.json("instance_json"))
    seen = describe_bounded(provider, known, DESCRIBE_S)
    if seen is None:
        known.state = InstanceState.UNKNOWN
        return known, provider
    return seen, provider


def _read_over_ssh(store: Any, run: Any, inst: Any, provider: Any,
                   runner_factory: Callable[..., Any] | None) -> tuple[dict | None, dict | None]:
    """watchdog.json and out/heartbeat.json of the run's folder, one bounded connect; (None, None) on failure."""
    from ftplan.planner.remote.ssh_options import runner_options

    ctx = next((e.json("data_json") for e in reversed(store.events(run.id, "launch_context"))), None) or {}
    run_dir = Path(run.artifacts_dir or ".")
    key = Path(ctx["identity"]) if ctx.get("identity") else run_dir / "id_ed25519"
    if not key.is_file():
        return None, None
    try:
        if runner_factory is None:
            from ftplan.planner.remote.ssh_runner import SSHRunner as runner_factory  # noqa: N813
        opts = runner_options(provider, inst)
        opts["first_boot_s"] = None
        runner = runner_factory(host=inst.ssh.host, port=inst.ssh.port, user=inst.ssh.user, key_path=key,
                                known_hosts=run_dir / "known_hosts", remote_root=ctx.get("remote_root", "~/ftplan-runs"),
                                connect_timeout_s=SSH_BUDGET_S, reconnect_grace_s=0.0, **opts)
    except Exception:  # noqa: BLE001
        return None, None
    try:
        runner.connect(SSH_BUDGET_S, single_attempt=True)
        return runner.read_json(run.id, "watchdog.json"), runner.read_json(run.id, "out/heartbeat.json")
    except Exception:  # noqa: BLE001 - asleep, firewalled, moved: the bucket's copy is the fallback
        return None, None
    finally:
        try:
            runner.close()
        except Exception:  # noqa: BLE001
            pass


def _record_watchdog(store: Any, run_id: str, doc: dict) -> None:
    """A `watchdog` event when the doc is newer than the last one recorded (gc and billing read its power-off)."""
    from ftplan.planner.launch.run_artifacts import watchdog_summary
    from ftplan.planner.runs.store import scrub_data
    from ftplan.providers.errors import scrub

    doc = scrub_data(doc)
    last = next((e.json("data_json") for e in reversed(store.events(run_id, "watchdog"))), None) or {}
    if last.get("updated_unix") == doc.get("updated_unix") and last.get("actions"):
        return
    store.add_event(run_id, "watchdog", scrub(watchdog_summary(doc)), phase="refresh",
                    data={"state": doc.get("state"), "actions": (doc.get("actions") or [])[-10:],
                          "updated_unix": doc.get("updated_unix")})


def _spend(store: Any, run: Any, row: Any, inst: Any, provider: Any) -> dict[str, Any]:
    """Spend so far: closed cost rows plus the open machine from the provider's clock (no extra API call)."""
    from ftplan.planner.launch.billed_span import billed_span
    from ftplan.planner.launch.teardown import watchdog_powered_off_at

    _, closed = store.run_cost(run.id)
    if inst is None or row.price_hour is None or not row.created_at:
        return {"spent_usd": round(closed, 4)}
    span = billed_span(provider, inst, row.created_at, time.time(), describe=False,
                       powered_off_at=watchdog_powered_off_at(store, run.id))
    open_usd = (span.billed_hours if span.billed_hours is not None else (span[1] - span[0]) / 3600) * row.price_hour
    from ftplan.planner.runs.reports import clock_words

    return {"spent_usd": round(closed + open_usd, 4), "billed_from": clock_words(span.clock)}


def _close(store: Any, run: Any, rows: list, inst: Any, provider: Any, bucket: str | None) -> dict[str, Any]:
    """The machine is gone: its billing is over. Close its rows from the provider's clock; close the run when the
    bucket holds the final artifacts (the job's own outcome), else leave it to `attach` (resume) or `gc`."""
    from ftplan.planner.launch.billed_span import billed_span
    from ftplan.planner.launch.teardown import watchdog_powered_off_at

    for row in rows:
        if row.provider_instance_id != inst.id:
            continue
        if row.created_at and row.price_hour is not None:
            span = billed_span(provider, inst, row.created_at, time.time(), describe=False,
                               powered_off_at=watchdog_powered_off_at(store, run.id))
            store.add_cost(run.id, row.id, *span, row.price_hour, **span.cost_fields())
        store.set_instance_terminated(row.id)
        store.add_event(run.id, "instance_terminated", inst.id, phase="refresh",
                        data={"by": "provider", "seen_by": "ftplan runs --refresh"})
    hours, usd = store.run_cost(run.id)
    store.update_run(run.id, actual_hours=hours, actual_usd=usd)
    final = f"{bucket}/final" if bucket else None
    summary = final_summary(bucket)
    if store.instances(run.id, open_only=True):
        return {"closed": False, "note": "another instance of the run is still open"}
    status = _outcome(store, run.id, summary) if summary is not None else None
    if status is None:
        return {"closed": False, "note": "machine gone before the job ended: 'ftplan attach "
                                         f"{run.id}' resumes from the bucket's last checkpoint, 'ftplan gc --yes' closes it"}
    store.add_event(run.id, "refreshed", f"machine gone; artifacts in {final}; closed as {status}", phase="done")
    store.finish_run(run.id, status, **({"error": str(summary.get("error"))[:500]} if status == "failed" else {}))
    return {"closed": True, "note": f"closed: {status}; 'ftplan pull {run.id}' fetches {final}"}


def final_summary(bucket: str | None) -> dict | None:
    """summary.json of the final upload at <bucket>/<run id>/final, once its manifest is there (upload complete)."""
    if not bucket or _bucket_json(f"{bucket}/final/MANIFEST.sha256.json") is None:
        return None
    return _bucket_json(f"{bucket}/final/summary.json")


def final_outcome(store: Any, run_id: str, bucket: str | None) -> str | None:
    """The run's final status from the bucket's final upload; None when the job did not end on its own terms
    (no final upload, or stopped at a spot notice): then a resume is what the run needs."""
    summary = final_summary(bucket)
    return _outcome(store, run_id, summary) if summary is not None else None


def _outcome(store: Any, run_id: str, summary: dict) -> str | None:
    said = str(summary.get("status") or "")
    if said == "succeeded":
        return "succeeded"
    if said == "stopped":
        reasons = [str(a.get("reason", "")) for e in store.events(run_id, "watchdog")
                   for a in (e.json("data_json") or {}).get("actions") or [] if isinstance(a, dict)
                   and a.get("action") == "stop_requested"]
        if any("budget" in r for r in reasons):
            return "stopped_over_budget"
        if any("spot" in r or "preempted" in r for r in reasons):
            return None      # reclaimed, not finished: resume
        return "cancelled"
    return "failed"


def render_refresh_text(rows: list[dict[str, Any]]) -> str:
    """One line per run: id, status, and for refreshed runs the machine, step, spend and what the watchdog did."""
    lines = []
    for r in rows:
        live = r.get("live")
        line = f"{r['run_id']}  {r['status']:<19}"
        if live is None:
            usd = (r.get("actual") or {}).get("usd")
            line += f"  actual ${usd:.4f}" if isinstance(usd, (int, float)) else ""
        else:
            step = (f"step {live['step']:g}/{live['total_steps']:g}" if isinstance(live.get("step"), (int, float))
                    and isinstance(live.get("total_steps"), (int, float)) else "step ?")
            money = f"${live['spent_usd']:.4f} so far" if isinstance(live.get("spent_usd"), (int, float)) else "$?"
            line += f"  machine {live['machine']}  {step}  {money}"
            if live.get("billed_from"):
                line += f" ({live['billed_from']})"
            if live.get("watchdog"):
                line += f"  watchdog: {live['watchdog']}"
            if live.get("note"):
                line += f"  [{live['note']}]"
        lines.append(line)
    return "\n".join(lines) + "\n"
