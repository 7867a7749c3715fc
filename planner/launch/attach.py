"""`ftplan attach RUN`: follow a run from another terminal, or take it over when its launcher died.

* Launcher alive (its pid on its host): follow read-only. The store is the only channel: phases and
  progress events are mirrored until the owning launcher closes the run. Nothing is taken over and
  nothing is torn down here; the launcher that owns the run does that.
* Launcher dead (kill -9, lost laptop): rebuild the plan from the run record and the `launch_context`
  event, then `Launcher.take_over` watches the job to its end, pulls and tears down. Before reconnecting
  to an AWS/GCP machine that does not answer, the SSH rule follows this machine's new egress address
  (with consent: `update_firewall` or `confirm`; see ssh_firewall.py).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftplan.planner.launch.budget import Progress
from ftplan.planner.launch.launch_plan import Candidate, LaunchFailed, LaunchPlan, LaunchResult
from ftplan.planner.launch.live_display import NullDisplay
from ftplan.planner.launch.node_group import recorded_nodes
from ftplan.planner.launch.teardown import UNMANAGED_PROVIDERS
from ftplan.planner.runs.store import Store


def attach_run(store: Store, run_id: str, *, display: Any = None, provider_factory: Callable[..., Any] | None = None,
               runner_factory: Callable[..., Any] | None = None, follow_poll_s: float = 1.0,
               update_firewall: bool | None = None, confirm: Callable[[str], bool] | None = None,
               probe: Callable[[str, int], bool] | None = None, ssh_cidr: str | None = None) -> LaunchResult:
    """Follow a run whose launcher is alive, or take it over (watch, pull, tear down) if it died.

    `update_firewall` True/False answers "move the SSH rule to this machine's new address?" up front;
    None asks `confirm(question)` (no `confirm`: no). `ssh_cidr` is the range to allow instead of the /32."""
    from ftplan.planner.errors import UserError
    from ftplan.planner.runs.store import FINAL_STATUSES, pid_alive
    from ftplan.providers.base import Instance

    run = store.get_run(run_id)
    if run is None:
        raise UserError(f"no run '{run_id}' in {store.path}; 'ftplan runs' lists the recorded runs")
    if run.status in FINAL_STATUSES:
        raise UserError(f"run {run.id} is already {run.status}; see 'ftplan report {run.id}'")
    display = display or NullDisplay()
    if pid_alive(run.launcher_pid, run.launcher_host) and run.launcher_pid != os.getpid():
        return _follow(store, run.id, display, follow_poll_s)
    ctx = next((e.json("data_json") for e in reversed(store.events(run.id, "launch_context"))), None) or {}
    rows = [r for r in store.instances(run.id, open_only=True) if r.provider_instance_id]
    if not rows:
        raise UserError(f"run {run.id} has no live instance to attach to; 'ftplan gc --yes' closes it")
    nodes = recorded_nodes(store, run.id, rows)   # a multi-node run: its open rows in node order
    multinode = nodes is not None and any(nodes)
    if multinode and rows[0].provider in UNMANAGED_PROVIDERS:
        raise UserError(f"run {run.id} runs on {len(nodes)} machines of your own, and attach takes over cloud nodes "
                        f"only: stop its job on each host (pkill -f {run.id}), remove its secrets.env there, then "
                        f"'ftplan gc --yes' closes the run")
    row = (nodes[0] or next(r for r in nodes if r)) if multinode else rows[-1]
    inst = Instance.from_dict(row.json("instance_json"))
    offer = Candidate(provider=row.provider, instance_type=row.instance_type or "", gpu=row.gpu or "",
                      region=row.region or "", zone=row.zone, spot=bool(row.spot), price_hour=row.price_hour or 0.0)
    artifacts = Path(run.artifacts_dir)
    plan = LaunchPlan(
        run_id=run.id, job_config=run.json("config_json") or {}, dataset=Path(ctx.get("dataset") or "."),
        candidates=[offer], model=run.model, method=run.method, runs_dir=artifacts.parent,
        budget_usd=run.budget_usd, on_over_budget=ctx.get("on_over_budget", "stop"),
        spot_recovery=False, sync_every_s=ctx.get("sync_every_s", 600.0), poll_interval_s=ctx.get("poll_interval_s", 2.0),
        ssh_connect_timeout_s=ctx.get("ssh_connect_timeout_s", 300.0), pull_margin_s=ctx.get("pull_margin_s", 600.0),
        ssh_reconnect_s=ctx.get("ssh_reconnect_s", 300.0),
        identity=Path(ctx["identity"]) if ctx.get("identity") else None, remote_python=ctx.get("remote_python"),
        remote_root=ctx.get("remote_root", "~/ftplan-runs"),
        estimate={"hours": run.est_hours, "usd": run.est_usd},
        provider_options=run.json("provider_options_json") or {},
        bucket=(run.json("config_json") or {}).get("bucket"),
        extra_files={k: Path(v) for k, v in (next((e.json("data_json") for e in reversed(
            store.events(run.id, "bundle_files"))), None) or {}).get("extra_files", {}).items()},
        wait_ready_timeout_s=ctx.get("wait_ready_timeout_s", 900.0),
    )
    from ftplan.planner.launch.launcher import Launcher

    launcher = Launcher(store, plan, provider_factory=provider_factory, runner_factory=runner_factory, display=display)
    if multinode:
        _adopt_other_nodes(store, run.id, launcher, [r for r in nodes if r and r.id != row.id])
        if nodes[0] is None or _machine_gone(launcher._provider(row.provider), inst):
            def node_0_gone() -> str:
                raise LaunchFailed(f"node 0 of the {len(nodes)}-node run is gone; every node was "
                                   "terminated (a multi-node run is not resumed on new machines yet)")
            launcher.live.insert(0, (row.id, inst, offer))
            launcher.guard.start_billing(row.id, offer.price_hour, since=row.created_at)
            return launcher._drive(node_0_gone)
    elif _machine_gone(launcher._provider(row.provider), inst):
        from ftplan.planner.launch.refresh import final_outcome

        if final_outcome(store, run.id, launcher._run_bucket()) is not None:   # it finished: close, do not rerun
            return _close_finished(store, run.id, provider_factory, display)
        return _resume_on_a_new_machine(store, launcher, row, inst, offer, display)
    _follow_the_user(store, run.id, row, inst, launcher._provider(row.provider), display,
                     update_firewall=update_firewall, confirm=confirm, probe=probe, ssh_cidr=ssh_cidr)
    return launcher.take_over(row.id, inst, offer)


def _adopt_other_nodes(store: Store, run_id: str, launcher: Any, rows: list[Any]) -> None:
    """Nodes 1..N-1 of a multi-node run: billed and terminated with node 0 by the take-over's teardown, and the
    run's placement deleted after them. Node 0 is watched and pulled from (it holds rank 0's artifacts)."""
    from ftplan.providers.base import Instance

    for r in rows:
        other = Candidate(provider=r.provider, instance_type=r.instance_type or "", gpu=r.gpu or "",
                          region=r.region or "", zone=r.zone, spot=bool(r.spot), price_hour=r.price_hour or 0.0)
        launcher.live.append((r.id, Instance.from_dict(r.json("instance_json")), other))
        launcher.guard.start_billing(r.id, other.price_hour, since=r.created_at)
    deleted = {e.message for e in store.events(run_id, "placement_deleted")}
    for e in store.events(run_id, "placement_created"):
        data = e.json("data_json") or {}
        placement = data.get("placement") or {}
        if placement and e.message not in deleted:
            launcher.placements.append((data.get("provider"), placement))


def _machine_gone(provider: Any, inst: Any) -> bool:
    """The provider says the run's machine no longer exists (spot reclaimed, or ended while nobody watched).
    A describe that fails or hangs proves nothing: then attach reconnects as before."""
    from ftplan.planner.launch.billed_span import describe_bounded

    seen = describe_bounded(provider, inst, 15.0)
    return seen is not None and seen.state.is_gone


def _close_finished(store: Store, run_id: str, provider_factory: Callable[..., Any] | None, display: Any) -> LaunchResult:
    """The machine is gone and the job's final artifacts are in the bucket: close the run as `runs --refresh` does."""
    from ftplan.planner.launch.refresh import refresh_run

    live = refresh_run(store, run_id, provider_factory=provider_factory)
    run = store.get_run(run_id)
    display.phase("done", live.get("note") or "")
    display.done(run.status, run.error)
    return LaunchResult(run_id=run.id, status=run.status, artifacts_dir=run.artifacts_dir or "",
                        estimated={"hours": run.est_hours, "usd": run.est_usd},
                        actual={"hours": run.actual_hours, "usd": run.actual_usd}, error=run.error)


def _resume_on_a_new_machine(store: Store, launcher: Any, row: Any, inst: Any, offer: Any, display: Any) -> LaunchResult:
    """The machine is gone: close its billing (provider's clock), then run the job again on the same offer from the
    newest checkpoint, the bucket's when it is newer than what was pulled (run_artifacts `_have_checkpoint`)."""
    from ftplan.planner.errors import UserError

    run_id = launcher.run_id
    launcher._teardown_problems = []
    if not launcher._have_checkpoint():
        raise UserError(f"run {run_id}: its machine {inst.id} is gone and no checkpoint was pulled or reached a "
                        f"bucket; 'ftplan runs --refresh' shows what is left, 'ftplan gc --yes' closes the run")
    store.update_run(run_id, launcher_pid=os.getpid(), launcher_host=socket.gethostname())
    store.add_event(run_id, "attached", f"machine {inst.id} gone; resuming on a new one, taken over by pid {os.getpid()}")
    display.phase("recovering", f"machine {inst.id} is gone; resuming from the newest checkpoint on a new machine")
    launcher._terminate(row.id, inst, offer, lost=True)   # idempotent at the provider; records the billed span
    launcher.guard.spent_before_usd = store.run_cost(run_id)[1]
    launcher._resume_after_loss = True
    return launcher._drive(launcher._run_phases)


def _follow_the_user(store: Store, run_id: str, row: Any, inst: Any, provider: Any, display: Any, *,
                     update_firewall: bool | None, confirm: Callable[[str], bool] | None,
                     probe: Callable[[str, int], bool] | None, ssh_cidr: str | None) -> None:
    """The firewall step of a take-over: recorded as an event and in the instance row, so `gc` and a later
    attach see the rule as it is now."""
    from ftplan.planner.launch.ssh_firewall import reopen_if_moved, sshd_answers
    from ftplan.providers.errors import ProviderError

    def note(message: str, data: dict[str, Any]) -> None:
        store.add_event(run_id, "firewall_updated", message, phase="attaching", data=data)
        display.phase("attaching", message)

    try:
        new = reopen_if_moved(provider, inst, update_firewall=update_firewall, confirm=confirm,
                              probe=probe or sshd_answers, note=note, wanted_cidr=ssh_cidr)
    except ProviderError as exc:
        from ftplan.planner.errors import UserError

        raise UserError(f"could not update the SSH rule of {inst.id}: {exc}; the run keeps going, "
                        f"retry 'ftplan attach {run_id}'") from None
    if new:
        import json

        store.db.execute("UPDATE instances SET instance_json = ? WHERE id = ?", (json.dumps(inst.to_dict()), row.id))


def _follow(store: Store, run_id: str, display: Any, poll_s: float) -> LaunchResult:
    """Read-only: mirror the store's progress events until the owning launcher closes the run."""
    from ftplan.planner.runs.store import FINAL_STATUSES

    seen = 0
    while True:
        run = store.get_run(run_id)
        events = store.events(run_id)
        for ev in events[seen:]:
            if ev.kind == "phase":
                display.phase(ev.phase, ev.message or "")
            elif ev.kind == "progress":
                d = ev.json("data_json") or {}
                display.progress(Progress(step=d.get("step") or 0, total_steps=d.get("total_steps") or 0,
                                          loss=d.get("loss"), tokens_per_s=d.get("tokens_per_s")),
                                 spent=d.get("spent_usd") or 0.0, projected=None, budget=run.budget_usd, eta_s=None)
        seen = len(events)
        if run.status in FINAL_STATUSES:
            display.done(run.status, run.error)
            return LaunchResult(run_id=run.id, status=run.status, artifacts_dir=run.artifacts_dir or "",
                                estimated={"hours": run.est_hours, "usd": run.est_usd},
                                actual={"hours": run.actual_hours, "usd": run.actual_usd}, error=run.error)
        time.sleep(poll_s)
