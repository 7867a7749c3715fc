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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ftplan.planner.launch.billed_span import billed_span

HANDLED = (signal.SIGINT, signal.SIGTERM)
# Providers that reach a machine we do not rent: terminate() never touches it, so the launcher itself
# must stop the job there on every non-success path.
UNMANAGED_PROVIDERS = ("local", "ssh")


def scrubbed(exc: object) -> str:
    """An exception (or text) as one line with every registered secret removed: fit for the run record."""
    from ftplan.providers.errors import scrub

    return " ".join(scrub(exc).split())


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


# ---- the launcher's own teardown (a mixin of ftplan.planner.launch.launcher.Launcher) -----------------------------
class TeardownSteps:
    """Terminate what this run started, confirm it, record the cost; sweep an interrupted create by run tag."""

    def _teardown(self, status: str) -> bool:
        """Pull what exists (non-success), stop the job on unmanaged hosts, terminate everything. Shielded."""
        self._phase_before_teardown = self._phase
        self._teardown_problems: list[str] = []
        try:
            self._enter("teardown", "terminating instances")
        except Exception:  # noqa: BLE001
            pass
        unmanaged = bool(self.live) and self.live[-1][2].provider in UNMANAGED_PROVIDERS
        with self._ssh_bounded():  # SSH gone: one short reconnect, then on to terminate (run_artifacts.py)
            if status != "succeeded" and self._runner_reached():
                if not self.job_finished and unmanaged:
                    try:
                        self.runner.kill(self.run_id)
                    except Exception:  # noqa: BLE001
                        pass
                self._salvage()
            if unmanaged and self._runner_reached():
                self._remove_remote_secrets()
        stop_other_nodes = getattr(self, "_stop_other_nodes", None)   # multi-node runs: nodes 1.. (node_group.py)
        if stop_other_nodes is not None:
            stop_other_nodes(status, unmanaged)
        self._close_runner()
        ok = True
        for row, inst, offer in list(self.live):
            ok = self._guarded(lambda r=row, i=inst, o=offer: self._terminate(r, i, o),
                               f"recording the end of {inst.id}") and ok
        ok = self._guarded(self._sweep_tagged, "sweeping by run tag") and ok
        ok = self._guarded(self._release_placements, "deleting the run's placement") and ok
        return ok

    def _release_placements(self) -> bool:
        """Multi-node runs delete their placement group/policy here, after every node is gone (overridden by
        the multi-node steps). True when nothing is left."""
        return True

    def _guarded(self, step: Callable[[], bool], what: str) -> bool:
        """A teardown step whose store write fails (disk full, read-only store) must not end teardown with a
        traceback: say it in one line and report teardown as unconfirmed, so the user runs `ftplan gc`."""
        try:
            return step()
        except Exception as exc:  # noqa: BLE001
            self._teardown_problems.append(f"{what}: {type(exc).__name__}: {scrubbed(exc)}")
            try:
                self.display.warn(f"teardown: {what} failed ({scrubbed(exc)}); run 'ftplan gc --yes'")
            except Exception:  # noqa: BLE001
                pass
            return False

    def _remove_remote_secrets(self) -> None:
        """secrets.env (HF_TOKEN) must not outlive the run on a machine ftplan does not own (ssh/local):
        nobody terminates that machine. Best effort, on every path; the job is over or killed by now."""
        remove = getattr(self.runner, "remove_secrets", None) or getattr(self.runner, "cleanup_secrets", None)
        try:
            if remove is not None:
                remove(self.run_id)
            self.store.add_event(self.run_id, "secrets_removed", "", phase="teardown")
        except Exception as exc:  # noqa: BLE001
            try:
                self.store.add_event(self.run_id, "secrets_not_removed", scrubbed(exc), phase="teardown")
                self.display.warn(f"could not remove secrets.env from the machine: {scrubbed(exc)}")
            except Exception:  # noqa: BLE001
                pass

    def _terminate(self, row: int, inst: Any, offer: Any, *, lost: bool = False) -> bool:
        provider = self._provider(offer.provider)
        last_exc: Exception | None = None
        for attempt in range(3):
            try:
                provider.terminate(inst)
                break
            except Exception as exc:  # noqa: BLE001
                last_exc = exc
                time.sleep(0.5 * (attempt + 1))
        else:
            self.store.set_instance_state(row, "terminating", error=f"terminate not confirmed: {scrubbed(last_exc)}")
            self.store.add_event(self.run_id, "teardown_failed", scrubbed(last_exc), phase="teardown")
            self.display.warn(f"could not confirm termination of {inst.id}: run 'ftplan gc --yes'")
            return False
        now = time.time()
        created = self.store.get_instance(row).created_at or now
        span = billed_span(provider, inst, created, now)   # the provider's clock where it reports one
        self.store.add_cost(self.run_id, row, *span, offer.price_hour, **span.cost_fields())
        self.guard.stop_billing(row, now)
        self.store.set_instance_terminated(row)
        self.store.add_event(self.run_id, "instance_terminated", inst.id, phase="teardown",
                             data={"lost": lost})
        self.live = [item for item in self.live if item[0] != row]
        return True

    def _sweep_tagged(self) -> bool:
        """Anything at a provider tagged with this run that we do not know about: a create that was interrupted
        or failed after the instance existed (rows left `intent`, or marked `create_failed`). One listing per
        such provider; an `intent` row closes only when that listing succeeded (positive evidence)."""
        rows = [r for r in self.store.instances(self.run_id)
                if r.state in ("intent", "create_failed") and r.provider not in UNMANAGED_PROVIDERS]
        ok = True
        for name in sorted({r.provider for r in rows}):
            if not self._sweep_provider(name):
                ok = False
                continue
            for row in rows:
                if row.provider == name and row.state == "intent":
                    self.store.set_instance_state(row.id, "create_failed", error=row.error or "create did not complete")
        return ok

    def _sweep_provider(self, name: str, keep: tuple[str, ...] = ()) -> bool:
        """Terminate every instance `name` lists under this run's tag except `keep` (ids still in use).
        True only when the listing and every terminate succeeded."""
        try:
            provider = self._provider(name)
            found = provider.list_instances(self.run_id)
        except Exception as exc:  # noqa: BLE001 - whatever the class: no listing, no evidence
            self.store.add_event(self.run_id, "teardown_failed", f"cannot list {name} instances of this run: "
                                 f"{scrubbed(exc)}", phase=self._phase)
            return False
        ok = True
        for inst in found:
            if inst.id in keep:
                continue
            try:
                provider.terminate(inst)
                self.store.add_event(self.run_id, "swept", inst.id, phase=self._phase, data={"provider": name})
            except Exception as exc:  # noqa: BLE001
                ok = False
                self.store.add_event(self.run_id, "teardown_failed", f"cannot terminate swept {inst.id}: "
                                     f"{scrubbed(exc)}", phase=self._phase)
        return ok


# ---- ftplan gc: the reconciler for launchers that died (kill -9, power loss, lost laptop) ------------
def collect_garbage(store, cfg, *, terminate: bool, only: list[str] | None = None,
                    include_foreign: bool = False, provider_factory: Callable[..., Any] | None = None) -> dict:
    """Match what the providers say is running (tagged by ftplan) against the run store.

    Only this store's instances are candidates: tagged with this store's id, or (untagged, older ftplan)
    belonging to a run recorded here. Anything else is *foreign* (a colleague's laptop, a CI job on the
    same account): listed, never touched unless `include_foreign`. One of ours is an orphan when its run
    is unknown, finished, or driven by a launcher that is no longer alive. Store rows not confirmed
    terminated are checked too, and closed only on positive evidence: a terminate that succeeded, or a
    listing that succeeded and shows nothing of their run. With `terminate`, orphans are terminated,
    billing is recorded up to now and the run is closed; without it nothing changes.
    """
    import json
    import time

    from ftplan.planner.runs.store import FINAL_STATUSES, pid_alive
    from ftplan.providers.base import Instance, get_provider
    from ftplan.providers.errors import scrub

    report: dict = {"instances": [], "side_resources": [], "errors": [], "orphans": 0, "terminated": 0,
                    "side_orphans": 0, "side_deleted": 0, "foreign": 0, "store_id": store.store_id}
    def make_provider(name: str, **opts: Any) -> Any:
        from ftplan.planner.launch.preflight import adapter_kwargs

        return (provider_factory or get_provider)(name, **adapter_kwargs(name, opts))
    listed_ok: set[str] = set()     # providers whose list call succeeded: the only evidence that closes a row
    open_rows = store.instances(open_only=True)
    names = set(cfg.providers) | {r.provider for r in open_rows}
    names = sorted(n for n in names if not only or n in only)

    def run_is_live(run_id: str | None) -> bool:
        run = store.get_run(run_id) if run_id else None
        if not run or run.status in FINAL_STATUSES:
            return False
        if pid_alive(run.launcher_pid, run.launcher_host):
            return True
        # detached: its watchdog guards it until attach / runs --refresh closes it, unless it is over its own cap
        # or the watchdog already ran its power-off (a machine still listed then bills with nothing guarding it)
        return (run.phase == "detached" and over_cap_since(store, run.id) is None
                and watchdog_powered_off_at(store, run.id) is None)

    def options_for(name: str, run_id: str | None) -> dict:
        opts = dict(cfg.provider_options(name)) if name in cfg.providers else {}
        run = store.get_run(run_id) if run_id else None
        stored = (run.json("provider_options_json") or {}).get(name, {}) if run else {}
        return {**stored, **opts}

    providers: dict[tuple, object] = {}

    # AWS lists per region: a sweep covers every region a run was ever recorded in, not just the default.
    aws_regions = sorted({r.region for r in store.instances() if r.provider == "aws" and r.region})

    def provider(name: str, run_id: str | None):
        opts = options_for(name, run_id)
        if name == "aws" and run_id is None and "regions" not in opts and aws_regions:
            opts["regions"] = sorted(set(aws_regions) | {opts.get("region", "us-east-1")})
        key = (name, json.dumps(opts, sort_keys=True))
        if key not in providers:
            providers[key] = make_provider(name, **opts)
        return providers[key]

    def close_rows(provider_name: str, instance_id: str | None, run_id: str | None, inst: Any = None,
                   billed_by: Any = None) -> None:
        """Close the run's open rows; each is billed from the provider's clock where it reports one (a detached
        run's machine powered itself off long before the user came back), else to now. The watchdog's power-off
        ends the span only for a machine the provider no longer listed (`inst` None): one still listed billed on."""
        if not run_id:
            return
        now = time.time()
        for row in store.instances(run_id, open_only=True):
            if row.provider != provider_name or (instance_id and row.provider_instance_id not in (None, instance_id)):
                continue
            if row.created_at and row.price_hour is not None:
                known = inst if inst is not None else (Instance.from_dict(row.json("instance_json"))
                                                       if row.json("instance_json") else None)
                if known is not None and billed_by is not None:
                    span = billed_span(billed_by, known, row.created_at, now, powered_off_at=None
                                       if inst is not None else watchdog_powered_off_at(store, row.run_id))
                    store.add_cost(row.run_id, row.id, *span, row.price_hour, **span.cost_fields())
                else:
                    store.add_cost(row.run_id, row.id, row.created_at, now, row.price_hour)
            store.set_instance_state(row.id, "terminated" if row.provider_instance_id else "create_failed",
                                     error=row.error or "closed by ftplan gc")
        run = store.get_run(run_id) if run_id else None
        if run and run.status not in FINAL_STATUSES and not store.instances(run.id, open_only=True):
            hours, usd = store.run_cost(run.id)
            why = ("detached run over its hard cap" if run.phase == "detached"
                   and over_cap_since(store, run.id) is not None else "launcher died")
            store.add_event(run.id, "gc", f"{why}; instances terminated by ftplan gc", phase="teardown")
            store.update_run(run.id, actual_hours=hours, actual_usd=usd,
                             error=(run.error + "; " if run.error else "") + f"{why}; closed by ftplan gc")
            store.finish_run(run.id, "failed")

    seen: set[tuple[str, str]] = set()
    with_instance: set[tuple[str, str]] = set()   # (provider, run id) that still has an instance there
    # 1. Everything the providers report as tagged by ftplan.
    for name in names:
        if name in ("local", "ssh"):
            continue  # machines we do not rent: nothing bills
        try:
            found = provider(name, None).list_instances()
        except Exception as exc:  # noqa: BLE001 - whatever the class, nothing is known about this provider
            report["errors"].append(f"{name}: cannot list instances: {scrub(exc)}")
            continue
        listed_ok.add(name)
        for inst in found:
            seen.add((name, inst.id))
            foreign = _foreign_reason(store, inst)
            live = not foreign and run_is_live(inst.run_id)
            if foreign:
                report["foreign"] += 1
                action = ("terminated" if terminate else "orphan") if include_foreign else "foreign"
                reason = foreign + ("" if include_foreign else "; not touched (see 'ftplan gc --include-foreign')")
            else:
                action = "keep" if live else ("terminated" if terminate else "orphan")
                reason = _live_reason(store, inst.run_id) if live else _orphan_reason(store, inst.run_id)
            item = {"provider": name, "id": inst.id, "run_id": inst.run_id, "state": inst.state.value,
                    "store_id": getattr(inst, "store_id", ""), "foreign": bool(foreign), "action": action,
                    "reason": reason}
            if action in ("terminated", "orphan"):
                report["orphans"] += 1
            if action == "terminated":
                try:
                    provider(name, inst.run_id).terminate(inst)
                    report["terminated"] += 1
                    if not foreign:
                        close_rows(name, inst.id, inst.run_id, inst, provider(name, inst.run_id))
                except Exception as exc:  # noqa: BLE001
                    item["action"] = "failed"
                    report["errors"].append(f"{name} {inst.id}: terminate failed: {scrub(exc)}")
            report["instances"].append(item)
            if item["action"] != "terminated":
                with_instance.add((name, inst.run_id))
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
        if not row.provider_instance_id and (row.provider not in listed_ok or (row.provider, row.run_id) in with_instance):
            # A create that never returned an id: only a listing that worked and shows nothing of its run
            # proves nothing bills. Without that, the row stays open for the next gc.
            item["action"] = "unconfirmed"
            item["reason"] = ("its create never returned an id and the provider's list call failed; kept until "
                              "a listing shows nothing of its run" if row.provider not in listed_ok else
                              "an instance of its run is still listed")
            report["instances"].append(item)
            continue
        if terminate and row.provider_instance_id:
            try:
                inst = Instance.from_dict(row.json("instance_json") or {
                    "provider": row.provider, "id": row.provider_instance_id, "run_id": row.run_id,
                    "region": row.region or ""})
                provider(row.provider, row.run_id).terminate(inst)  # idempotent: gone is success
            except Exception as exc:  # noqa: BLE001
                item["action"] = "failed"
                report["errors"].append(f"{row.provider} {row.provider_instance_id}: {scrub(exc)}")
                report["instances"].append(item)
                continue
        if terminate:
            close_rows(row.provider, row.provider_instance_id, row.run_id, None,
                       provider(row.provider, row.run_id) if row.provider_instance_id else None)
        report["instances"].append(item)
    # 3. Side resources (key pairs, security groups, firewall rules) of a create that never returned: no
    #    instance owns them, so no terminate deletes them. Kept while their run's launcher lives (it may be
    #    inside `create` right now) or while an instance of their run is still up (its terminate deletes them).
    for name in names:
        if name in ("local", "ssh"):
            continue
        try:
            found = provider(name, None).list_side_resources()
        except Exception as exc:  # noqa: BLE001
            report["errors"].append(f"{name}: cannot list side resources: {scrub(exc)}")
            continue
        for res in found:
            run_id = res.get("run_id") or None
            if not store.has_run(run_id) and not include_foreign:
                action, reason = "foreign", ("its run is not in this store (another store's?); not touched "
                                             "(see 'ftplan gc --include-foreign')")
            elif run_is_live(run_id):
                action, reason = "keep", "its launcher is running"
            elif (name, res.get("run_id")) in with_instance:
                action, reason = "keep", "an instance of its run is still up; terminating that deletes it"
            else:
                action = "deleted" if terminate else "orphan"
                reason = _orphan_reason(store, run_id) + "; no instance of its run is left"
            item = {"provider": name, "kind": res.get("kind"), "id": res.get("id"), "name": res.get("name"),
                    "run_id": run_id, "action": action, "reason": reason}
            if action in ("deleted", "orphan"):
                report["side_orphans"] += 1
            if action == "deleted":
                try:
                    provider(name, run_id).delete_side_resource(res)
                    report["side_deleted"] += 1
                    if run_id and store.get_run(run_id):
                        store.add_event(run_id, "gc", f"deleted {res.get('kind')} {res.get('name')}",
                                        phase="teardown", data={"provider": name, "kind": res.get("kind"),
                                                                "id": res.get("id")})
                except Exception as exc:  # noqa: BLE001
                    item["action"] = "failed"
                    report["errors"].append(f"{name} {res.get('kind')} {res.get('name')}: {scrub(exc)}")
            report["side_resources"].append(item)
    return report


def _foreign_reason(store, inst: Any) -> str:
    """Why an instance is not this store's to touch ("" when it is ours)."""
    tag = getattr(inst, "store_id", "") or ""
    if tag:
        return "" if tag == store.store_id else f"launched from another ftplan run store ({tag})"
    if store.has_run(inst.run_id):
        return ""
    return "no store tag and its run is not in this store (another store's, or an older ftplan's)"


def _orphan_reason(store, run_id: str | None) -> str:
    run = store.get_run(run_id) if run_id else None
    if run is None:
        return "no run with this id in the store"
    if run.status in ("succeeded", "failed", "stopped_over_budget", "cancelled"):
        return f"its run is {run.status}"
    off = watchdog_powered_off_at(store, run.id) if run.phase == "detached" else None
    if off is not None:
        import datetime as dt

        at = dt.datetime.fromtimestamp(off, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (f"detached run whose watchdog powered the machine off at {at}, yet the provider still lists it "
                "(it may bill until terminated); nothing guards it now")
    since = over_cap_since(store, run.id) if run.phase == "detached" else None
    if since is not None:
        import datetime as dt

        at = dt.datetime.fromtimestamp(since, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (f"OVER ITS HARD CAP: detached run whose on-instance deadline passed at {at} and the machine is "
                "still up (its shutdown did not happen); terminate it with 'ftplan gc --yes'")
    return f"its launcher is gone (pid {run.launcher_pid})"


def _live_reason(store, run_id: str | None) -> str:
    run = store.get_run(run_id) if run_id else None
    if run is not None and run.phase == "detached":
        return ("detached: its watchdog guards it until 'ftplan attach' or 'ftplan runs --refresh' closes the run "
                "(or its on-instance deadline passes)")
    return "its launcher is running"


OVER_CAP_SLACK_S = 30 * 60   # after the on-instance deadline: its shutdown, the provider's own stop, a late pull


def over_cap_since(store, run_id: str) -> float | None:
    """When a detached run's on-instance deadline passed (the `job_started` event's time + its deadline), if that
    was more than OVER_CAP_SLACK_S ago: the machine should be off, so it is no longer kept. None otherwise or
    when no deadline was armed (a free machine, the user's own)."""
    import time

    started = store.events(run_id, "job_started")
    if not started:
        return None
    deadline = (started[-1].json("data_json") or {}).get("deadline_s")
    if not isinstance(deadline, (int, float)) or isinstance(deadline, bool) or deadline <= 0:
        return None
    at = started[-1].ts + float(deadline)
    return at if time.time() > at + OVER_CAP_SLACK_S else None


def watchdog_powered_off_at(store, run_id: str | None) -> float | None:
    """When the run's machine-side watchdog ran its power-off, from the newest `watchdog` event recorded
    (attach, `runs --refresh`); None when none was seen."""
    if not run_id:
        return None
    for ev in reversed(store.events(run_id, "watchdog")):
        for act in reversed((ev.json("data_json") or {}).get("actions") or []):
            if isinstance(act, dict) and act.get("action") == "power_off" and isinstance(act.get("at"), (int, float)):
                return float(act["at"])
    return None
