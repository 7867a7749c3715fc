"""Signals during a launch: Ctrl-C / SIGTERM become an exception in the main thread, and teardown
cannot be interrupted.

Why: the default SIGTERM handler kills Python without running `finally` blocks, and a second Ctrl-C
during teardown would abort the very code that stops the billing. So:

    with interruptible():          # SIGINT/SIGTERM -> raise Interrupted (once)
        try:
            ...work...
        finally:
            with shielded(echo):   # further signals print "tearing down, please wait" and are ignored
                teardown()
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The user (SIGINT) or the system (SIGTERM) asked the launcher to stop. BaseException so that
    `except Exception` in phase code cannot swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into `Interrupted` raised in the main thread; restore the old handlers after."""
    if not _in_main_thread():
        yield
        return
    fired = {"n": 0}

    def handler(signum, frame):  # noqa: ARG001
        fired["n"] += 1
        if fired["n"] == 1:
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in HANDLED}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextmanager
def shielded(echo: Callable[[str], None] | None = None) -> Iterator[list[int]]:
    """Ignore SIGINT/SIGTERM for the duration (telling the user why); yields the signals received."""
    received: list[int] = []
    if not _in_main_thread():
        yield received
        return

    def handler(signum, frame):  # noqa: ARG001
        received.append(signum)
        if echo:
            try:
                echo("tearing down, please wait (the instance is being terminated)")
            except Exception:  # noqa: BLE001 - never let printing abort teardown
                pass

    previous = {s: signal.signal(s, handler) for s in HANDLED}
    try:
        yield received
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


# ---- ftplan gc: the reconciler for launchers that died (kill -9, power loss, lost laptop) ------------
def collect_garbage(store, cfg, *, terminate: bool, only: list[str] | None = None) -> dict:
    """Match what the providers say is running (tagged by ftplan) against the run store.

    An instance is an orphan when its run is unknown, finished, or driven by a launcher that is no
    longer alive. Store rows not confirmed terminated are checked too (a create that never returned an
    id is found by the run tag). With `terminate`, orphans are terminated, billing is recorded up to
    now and the run is closed; without it nothing changes.
    """
    import json
    import time

    from planner.store import FINAL_STATUSES, pid_alive
    from providers.base import Instance, get_provider
    from providers.errors import ProviderError, scrub

    report: dict = {"instances": [], "errors": [], "orphans": 0, "terminated": 0}
    open_rows = store.instances(open_only=True)
    names = set(cfg.providers) | {r.provider for r in open_rows}
    names = sorted(n for n in names if not only or n in only)

    def run_is_live(run_id: str | None) -> bool:
        run = store.get_run(run_id) if run_id else None
        return bool(run and run.status not in FINAL_STATUSES and pid_alive(run.launcher_pid, run.launcher_host))

    def options_for(name: str, run_id: str | None) -> dict:
        opts = dict(cfg.provider_options(name)) if name in cfg.providers else {}
        run = store.get_run(run_id) if run_id else None
        stored = (run.json("provider_options_json") or {}).get(name, {}) if run else {}
        return {**stored, **opts}

    providers: dict[tuple, object] = {}

    def provider(name: str, run_id: str | None):
        opts = options_for(name, run_id)
        key = (name, json.dumps(opts, sort_keys=True))
        if key not in providers:
            providers[key] = get_provider(name, **opts)
        return providers[key]

    def close_rows(provider_name: str, instance_id: str | None, run_id: str | None) -> None:
        if not run_id:
            return
        now = time.time()
        for row in store.instances(run_id, open_only=True):
            if row.provider != provider_name or (instance_id and row.provider_instance_id not in (None, instance_id)):
                continue
            if row.created_at and row.price_hour is not None:
                store.add_cost(row.run_id, row.id, row.created_at, now, row.price_hour)
            store.set_instance_state(row.id, "terminated" if row.provider_instance_id else "create_failed",
                                     error=row.error or "closed by ftplan gc")
        run = store.get_run(run_id) if run_id else None
        if run and run.status not in FINAL_STATUSES and not store.instances(run.id, open_only=True):
            hours, usd = store.run_cost(run.id)
            store.add_event(run.id, "gc", "launcher gone; instances terminated by ftplan gc", phase="teardown")
            store.update_run(run.id, actual_hours=hours, actual_usd=usd,
                             error=(run.error + "; " if run.error else "") + "launcher died; closed by ftplan gc")
            store.finish_run(run.id, "failed")

    seen: set[tuple[str, str]] = set()
    # 1. Everything the providers report as tagged by ftplan.
    for name in names:
        if name in ("local", "ssh"):
            continue  # machines we do not rent: nothing bills
        try:
            found = provider(name, None).list_instances()
        except (ProviderError, TypeError) as exc:
            report["errors"].append(f"{name}: cannot list instances: {scrub(exc)}")
            continue
        for inst in found:
            seen.add((name, inst.id))
            live = run_is_live(inst.run_id)
            item = {"provider": name, "id": inst.id, "run_id": inst.run_id, "state": inst.state.value,
                    "action": "keep" if live else ("terminated" if terminate else "orphan"),
                    "reason": "its launcher is running" if live else _orphan_reason(store, inst.run_id)}
            if not live:
                report["orphans"] += 1
                if terminate:
                    try:
                        provider(name, inst.run_id).terminate(inst)
                        report["terminated"] += 1
                        close_rows(name, inst.id, inst.run_id)
                    except ProviderError as exc:
                        item["action"] = "failed"
                        report["errors"].append(f"{name} {inst.id}: terminate failed: {scrub(exc)}")
            report["instances"].append(item)
    # 2. Store rows nobody confirmed terminated, whose provider did not list them (already gone?).
    for row in open_rows:
        if row.provider not in names or (row.provider, row.provider_instance_id) in seen or run_is_live(row.run_id):
            continue
        if row.provider in ("local", "ssh"):
            if terminate:
                close_rows(row.provider, row.provider_instance_id, row.run_id)
            continue
        item = {"provider": row.provider, "id": row.provider_instance_id, "run_id": row.run_id, "state": row.state,
                "action": "closed" if terminate else "unconfirmed",
                "reason": "recorded but not confirmed terminated; the provider no longer lists it"}
        if terminate and row.provider_instance_id:
            try:
                inst = Instance.from_dict(row.json("instance_json") or {
                    "provider": row.provider, "id": row.provider_instance_id, "run_id": row.run_id,
                    "region": row.region or ""})
                provider(row.provider, row.run_id).terminate(inst)  # idempotent: gone is success
            except ProviderError as exc:
                item["action"] = "failed"
                report["errors"].append(f"{row.provider} {row.provider_instance_id}: {scrub(exc)}")
                report["instances"].append(item)
                continue
        if terminate:
            close_rows(row.provider, row.provider_instance_id, row.run_id)
        report["instances"].append(item)
    return report


def _orphan_reason(store, run_id: str | None) -> str:
    run = store.get_run(run_id) if run_id else None
    if run is None:
        return "no run with this id in the store"
    if run.status in ("succeeded", "failed", "stopped_over_budget", "cancelled"):
        return f"its run is {run.status}"
    return f"its launcher is gone (pid {run.launcher_pid})"
