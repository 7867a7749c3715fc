"""The launch state machine: provision -> wait -> connect -> ship -> train -> pull -> teardown.

Money safety is the design constraint, not a feature:
  * every instance gets an intent row in the store *before* `create`, its id right after, and is
    marked terminated only after `terminate` returned;
  * teardown runs in a `finally` with SIGINT/SIGTERM shielded, on every path, and also sweeps the
    provider for anything tagged with this run (an instance whose create call was interrupted);
  * artifacts are pulled into `runs/<run-id>/` before teardown starts, and checkpoints are pulled
    every `sync_every_s` during training, so a lost instance loses little.

Everything that talks to the outside world is injected (`provider_factory`, `runner_factory`), so the
same code runs against real clouds, the fake provider servers and `local` (sshd on this machine).
"""

from __future__ import annotations

import json
import os
import secrets as _secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from planner.budget import BudgetGuard, Progress
from planner.store import Store
from planner.teardown import Interrupted, interruptible, shielded

# Providers that reach a machine we do not rent: terminate() never touches it, so the launcher itself
# must stop the job there on every non-success path.
UNMANAGED_PROVIDERS = ("local", "ssh")


@dataclass
class Candidate:
    """One priced offer the launcher may provision, cheapest first."""

    provider: str
    instance_type: str
    gpu: str
    gpu_count: int = 1
    region: str = ""
    zone: str | None = None
    spot: bool = False
    price_hour: float = 0.0
    est_hours: float | None = None
    est_usd: float | None = None
    headroom_gib: float | None = None


@dataclass
class LaunchPlan:
    run_id: str
    job_config: dict[str, Any]              # what remote_job/train.py reads (no secrets)
    dataset: Path
    candidates: list[Candidate]
    model: str
    method: str
    runs_dir: Path
    budget_usd: float | None = None
    on_over_budget: str = "stop"
    spot_recovery: bool = True
    max_offer_tries: int = 3
    sync_every_s: float = 600.0
    poll_interval_s: float = 2.0
    wait_ready_timeout_s: float = 1200.0
    ssh_connect_timeout_s: float = 300.0
    pull_margin_s: float = 600.0
    identity: Path | None = None            # an already-authorized key (local/ssh); else a per-run key
    remote_python: str | None = None
    remote_root: str = "~/ftplan-runs"
    estimate: dict[str, Any] = field(default_factory=dict)  # hours, usd, peak_mem_gib, tokens_per_s
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    job_secrets: dict[str, str] = field(default_factory=dict)  # e.g. HF_TOKEN; never stored
    extra_files: dict[str, Path] = field(default_factory=dict)  # bundle extras (local model folder, job/ overrides)

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.run_id


@dataclass
class LaunchResult:
    run_id: str
    status: str                      # succeeded | failed | stopped_over_budget | cancelled
    artifacts_dir: str
    estimated: dict[str, float | None]
    actual: dict[str, float | None]
    error: str | None = None
    teardown_confirmed: bool = True
    instances: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class LaunchFailed(Exception):
    """A phase failed for a reason the run record should state (already scrubbed)."""


class NoCapacity(LaunchFailed):
    pass


class InstanceLost(Exception):
    """The instance vanished under a running job (spot preemption, deleted in the console)."""


class OverBudget(Exception):
    pass


def new_run_id() -> str:
    """Lowercase, <= 63 chars, no quotes: valid as a GCP label, AWS tag, RunPod/Lambda name."""
    return f"ft-{time.strftime('%Y%m%d-%H%M%S')}-{_secrets.token_hex(2)}"


def _noop(*_a: Any, **_k: Any) -> None:
    return None


class Launcher:
    def __init__(self, store: Store, plan: LaunchPlan, *, provider_factory: Callable[..., Any] | None = None,
                 runner_factory: Callable[..., Any] | None = None, bundle_builder: Callable[..., Path] | None = None,
                 display: Any = None):
        self.store = store
        self.plan = plan
        self.provider_factory = provider_factory or _default_provider_factory
        self.runner_factory = runner_factory or _default_runner_factory
        self.bundle_builder = bundle_builder or _default_bundle_builder
        self.display = display or _NullDisplay()
        self.guard = BudgetGuard(plan.budget_usd, pull_margin_s=plan.pull_margin_s)
        self.run_id = plan.run_id
        self.providers: dict[str, Any] = {}
        self.live: list[tuple[int, Any, Candidate]] = []   # (store row, Instance, offer) not yet terminated
        self.runner: Any = None
        self.runner_instance_row: int | None = None
        self.last_progress = Progress()
        self.job_finished = False
        self.pulled: list[str] = []
        self.tried: set[int] = set()

    # ---- public -------------------------------------------------------------------------------
    def run(self) -> LaunchResult:
        p = self.plan
        p.run_dir.mkdir(parents=True, exist_ok=True)
        first = p.candidates[0] if p.candidates else Candidate(provider="?", instance_type="?", gpu="?")
        self.store.create_run(
            self.run_id, model=p.model, method=p.method, provider=first.provider, instance_type=first.instance_type,
            gpu=first.gpu, gpu_count=first.gpu_count, region=first.region, spot=first.spot,
            price_hour=first.price_hour, budget_usd=p.budget_usd, est_hours=p.estimate.get("hours"),
            est_usd=p.estimate.get("usd"), est_peak_mem_gib=p.estimate.get("peak_mem_gib"),
            est_tokens_per_s=p.estimate.get("tokens_per_s"), artifacts_dir=str(p.run_dir.resolve()),
            config_json=p.job_config,
            provider_options_json={k: v for k, v in p.provider_options.items()},
        )
        self.store.add_event(self.run_id, "launch_context", "", data=self._context())
        return self._drive(self._run_phases)

    def take_over(self, row: int, inst: Any, offer: Candidate) -> LaunchResult:
        """`ftplan attach` after the launcher died: continue watching the job, pull, tear down."""
        self.store.update_run(self.run_id, launcher_pid=os.getpid(), launcher_host=socket.gethostname())
        self.store.add_event(self.run_id, "attached", f"taken over by pid {os.getpid()}")
        self.guard.start_billing(row, offer.price_hour, since=self.store.get_instance(row).created_at)
        self.live.append((row, inst, offer))
        # Spend of instances this run already lost counts against the budget too.
        self.guard.spent_before_usd = self.store.run_cost(self.run_id)[1]

        def phases() -> str:
            key_path, _ = self._ssh_key()
            endpoint = inst.ssh or self._wait_ready(row, inst)
            self._connect(row, inst, endpoint, key_path)
            outcome = self._train(row, inst, offer)
            self._enter("pulling", "pulling artifacts back")
            self._pull_all()
            if outcome == "over_budget":
                raise OverBudget(self._over_budget_message)
            return outcome

        return self._drive(phases)

    def _context(self) -> dict[str, Any]:
        p = self.plan
        return {"identity": str(p.identity) if p.identity else None, "remote_root": p.remote_root,
                "remote_python": p.remote_python, "on_over_budget": p.on_over_budget,
                "spot_recovery": p.spot_recovery, "sync_every_s": p.sync_every_s, "poll_interval_s": p.poll_interval_s,
                "pull_margin_s": p.pull_margin_s, "ssh_connect_timeout_s": p.ssh_connect_timeout_s,
                "wait_ready_timeout_s": p.wait_ready_timeout_s, "dataset": str(p.dataset),
                "runs_dir": str(p.runs_dir.resolve()), "max_offer_tries": p.max_offer_tries}

    def _drive(self, body: Callable[[], str]) -> LaunchResult:
        status, error = "failed", None
        teardown_ok = True
        with interruptible():
            try:
                status = body()
            except Interrupted as exc:
                status, error = "cancelled", f"interrupted by {exc} during {self._phase}"
            except OverBudget as exc:
                status, error = "stopped_over_budget", str(exc)
            except LaunchFailed as exc:
                status, error = "failed", _scrub(exc)
            except Exception as exc:  # noqa: BLE001 - any failure still ends in teardown and a record
                status, error = "failed", f"{self._phase}: {type(exc).__name__}: {_scrub(exc)}"
            finally:
                with shielded(self.display.warn):
                    teardown_ok = self._teardown(status)
        return self._finish(status, error, teardown_ok)

    # ---- phases -------------------------------------------------------------------------------
    _phase = "planning"

    def _enter(self, phase: str, message: str = "", **data: Any) -> None:
        self._phase = phase
        status = {"provisioning": "provisioning", "waiting": "provisioning", "connecting": "starting",
                  "uploading": "starting", "training": "training", "pulling": "pulling",
                  "recovering": "recovering", "teardown": "tearing_down"}.get(phase, phase)
        self.store.update_run(self.run_id, phase=phase, status=status)
        self.store.add_event(self.run_id, "phase", message, phase=phase, data=data or None)
        self.display.phase(phase, message)

    def _run_phases(self) -> str:
        p = self.plan
        if not p.candidates:
            raise NoCapacity("no offer to launch on; widen the filters or raise the budget (see 'ftplan plan')")
        key_path, public_key = self._ssh_key()
        bundle = self._bundle(resume=False)
        resume = False
        while True:
            row, inst, offer = self._provision(public_key)
            try:
                endpoint = self._wait_ready(row, inst)
                self._connect(row, inst, endpoint, key_path)
                self._enter("uploading", f"shipping the job to {endpoint.host}")
                self._upload(bundle, resume)
                outcome = self._train(row, inst, offer)
                self._enter("pulling", "pulling artifacts back")
                self._pull_all()
                if outcome == "over_budget":
                    raise OverBudget(self._over_budget_message)
                return outcome
            except InstanceLost as exc:
                self.store.add_event(self.run_id, "instance_lost", str(exc), phase=self._phase)
                self.display.warn(f"instance lost: {exc}")
                self._close_runner()
                self._terminate(row, inst, offer, lost=True)
                if not (offer.spot and p.spot_recovery):
                    raise LaunchFailed(f"instance {inst.id} disappeared during {self._phase}: {exc}") from None
                self._enter("recovering", "spot instance lost; resuming on the next offer from the last checkpoint")
                resume = self._have_checkpoint()
                bundle = self._bundle(resume=resume)

    def _provision(self, public_key: str) -> tuple[int, Any, Candidate]:
        from providers.base import InstanceRequest
        from providers.errors import CapacityError, ProviderError, QuotaError

        p = self.plan
        self._enter("provisioning", "looking for capacity")
        errors: list[str] = []
        attempts = 0
        for idx, offer in enumerate(p.candidates):
            if idx in self.tried and not offer.spot:
                continue
            if attempts >= p.max_offer_tries:
                break
            if not self.guard.affordable(offer.price_hour, self._remaining_hours(offer)):
                errors.append(f"{offer.provider}/{offer.instance_type}: over what is left of the budget")
                continue
            attempts += 1
            self.tried.add(idx)
            provider = self._provider(offer.provider)
            req = InstanceRequest(
                run_id=self.run_id, instance_type=offer.instance_type, gpu=offer.gpu, gpu_count=offer.gpu_count,
                region=offer.region, zone=offer.zone, spot=offer.spot, ssh_public_key=public_key,
                max_lifetime_s=int(self._hard_cap_s(offer.price_hour) or 24 * 3600) + int(p.pull_margin_s),
            )
            row = self.store.add_instance_intent(
                self.run_id, offer.provider, instance_type=offer.instance_type, gpu=offer.gpu, region=offer.region,
                zone=offer.zone, spot=offer.spot, price_hour=offer.price_hour,
            )
            self.display.phase("provisioning", f"{offer.provider} {offer.instance_type} in {offer.region or '-'} "
                                               f"at ${offer.price_hour:.2f}/h")
            try:
                inst = provider.create(req)
            except (CapacityError, QuotaError) as exc:
                self.store.set_instance_state(row, "create_failed", error=_scrub(exc))
                self.store.add_event(self.run_id, "no_capacity", _scrub(exc), phase="provisioning",
                                     data={"provider": offer.provider, "instance_type": offer.instance_type})
                errors.append(f"{offer.provider}/{offer.instance_type}: {_scrub(exc)}")
                continue
            except ProviderError as exc:
                # The call may have created something before failing: teardown sweeps by run tag.
                self.store.set_instance_state(row, "intent", error=_scrub(exc))
                raise LaunchFailed(f"create on {offer.provider} failed: {_scrub(exc)}") from None
            self.store.set_instance_created(row, inst.id, inst.to_dict())
            self.guard.start_billing(row, offer.price_hour)
            self.live.append((row, inst, offer))
            self.store.update_run(self.run_id, provider=offer.provider, instance_type=offer.instance_type,
                                  gpu=offer.gpu, gpu_count=offer.gpu_count, region=offer.region, spot=offer.spot,
                                  price_hour=offer.price_hour)
            self.store.add_event(self.run_id, "instance_created", inst.id, phase="provisioning",
                                 data={"provider": offer.provider, "instance_type": offer.instance_type})
            return row, inst, offer
        raise NoCapacity("no capacity on any offer tried (" + "; ".join(errors or ["none affordable"]) + ")")

    def _wait_ready(self, row: int, inst: Any) -> Any:
        from providers.errors import CapacityError, InstanceGone

        self._enter("waiting", f"waiting for {inst.id} to boot")
        provider = self._provider(inst.provider)
        try:
            endpoint = provider.wait_ready(inst, self.plan.wait_ready_timeout_s)
        except (InstanceGone, CapacityError) as exc:
            raise InstanceLost(_scrub(exc)) from None
        self.store.set_instance_state(row, "ready", instance=inst.to_dict())
        return endpoint

    def _connect(self, row: int, inst: Any, endpoint: Any, key_path: Path) -> None:
        self._enter("connecting", f"ssh {endpoint.user}@{endpoint.host}:{endpoint.port}")
        runner = self.runner_factory(
            host=endpoint.host, port=endpoint.port, user=endpoint.user, key_path=key_path,
            known_hosts=self.plan.run_dir / "known_hosts", remote_root=self.plan.remote_root,
            connect_timeout_s=self.plan.ssh_connect_timeout_s, log=self._log_line,
        )
        self.runner = runner
        self.runner_instance_row = row
        self._call_runner(lambda: runner.connect(), inst)

    def _upload(self, bundle: Path, resume: bool) -> None:
        runner = self.runner
        self._call_runner(lambda: runner.upload_bundle(bundle, self.run_id))
        cap = self._hard_cap_s(self.guard.price_hour())
        deadline = int(cap) if cap is not None else None
        self.store.add_event(self.run_id, "job_started", "", phase="uploading",
                             data={"deadline_s": deadline, "resume": resume})
        # The on-instance shutdown deadline is for rented machines only: never power off the user's own.
        owned = bool(self.live) and self.live[-1][2].provider in UNMANAGED_PROVIDERS
        self._call_runner(lambda: runner.start(self.run_id, remote_python=self.plan.remote_python,
                                               secrets=self.plan.job_secrets or None, deadline_s=deadline,
                                               shutdown="off" if owned else "arm"))

    def _train(self, row: int, inst: Any, offer: Candidate) -> str:
        p = self.plan
        runner = self.runner
        self._enter("training", "training")
        last_sync = time.time()
        last_describe = 0.0
        stopping = False
        while True:
            hb = self._call_runner(lambda: runner.read_json(self.run_id, "out/heartbeat.json"), inst)
            if hb:
                prog = Progress.from_heartbeat(hb)
                if prog.step != self.last_progress.step:
                    self.store.add_event(self.run_id, "progress", "", phase="training", data={
                        "step": prog.step, "total_steps": prog.total_steps, "loss": prog.loss,
                        "tokens_per_s": prog.tokens_per_s, "spent_usd": self.guard.spent_usd()})
                self.last_progress = prog
            projected = self.guard.projected_total_usd(self.last_progress)
            self.display.progress(self.last_progress, spent=self.guard.spent_usd(), projected=projected,
                                  budget=p.budget_usd, eta_s=self.last_progress.remaining_s())
            running = self._call_runner(lambda: runner.is_running(self.run_id), inst)
            if not running:
                code = self._call_runner(lambda: runner.exit_code(self.run_id), inst)
                if code is None:  # the job vanished without an exit code: did the machine go away?
                    self._check_alive(inst)
                return self._job_outcome(code, stopping)
            if not stopping and p.on_over_budget == "stop" and self.guard.over_budget(self.last_progress):
                stopping = True
                self._over_budget_message = (
                    f"projected total {projected:.4f} USD exceeds the budget {p.budget_usd:.4f} USD at the measured "
                    f"{self.last_progress.tokens_per_s or 0:.0f} tokens/s; stopped at a checkpoint")
                self.store.add_event(self.run_id, "over_budget", self._over_budget_message, phase="training",
                                     data={"projected_usd": projected, "budget_usd": p.budget_usd})
                self.display.warn("over budget: asking the job to checkpoint and stop")
                self._call_runner(lambda: runner.request_stop(self.run_id), inst)
            now = time.time()
            if now - last_sync >= p.sync_every_s:
                last_sync = now
                self._sync_checkpoints(inst)
            if now - last_describe >= p.poll_interval_s * 10:  # ask the provider too: SSH may outlive the VM
                last_describe = now
                self._check_alive(inst)
            time.sleep(p.poll_interval_s)

    _over_budget_message = ""

    def _job_outcome(self, code: Any, stopping: bool) -> str:
        summary = self._call_runner(lambda: self.runner.read_json(self.run_id, "out/summary.json")) or {}
        self.summary = summary
        self.job_finished = True
        status = summary.get("status")
        self.store.add_event(self.run_id, "job_exited", f"exit code {code}", phase="training",
                             data={"exit_code": code, "status": status})
        if stopping and status in ("stopped", "succeeded"):
            return "over_budget" if status == "stopped" else "succeeded"
        if code == 0 and status == "succeeded":
            return "succeeded"
        # Pull the log before failing: it says why.
        self._enter("pulling", "pulling logs of the failed job")
        self._pull_all()
        tail = _scrub(summary.get("error") or "")[:300] or self._log_tail()
        raise LaunchFailed(f"training job exited with code {code} ({status or 'no summary'})" +
                           (f": {tail}" if tail else ""))

    # ---- pulling ------------------------------------------------------------------------------
    def _pull(self, rel: str) -> list[Path]:
        """Remote `<run dir>/<rel>` -> local `runs/<id>/<rel>` (same relative layout)."""
        local_dir = self.plan.run_dir / Path(rel).parent
        local_dir.mkdir(parents=True, exist_ok=True)
        got = self.runner.pull(self.run_id, rel, local_dir)
        for path in got or []:
            self.pulled.append(str(path))
        return list(got or [])

    def _sync_checkpoints(self, inst: Any) -> None:
        """Pull the newest checkpoint the job should have written (once), so a lost instance loses little.

        Only that one folder: pulling all of out/ while the job writes and rotates checkpoints would
        race with it and move the same bytes again and again."""
        every = int(self.plan.job_config.get("checkpoint_every_steps") or 0)
        step = self.last_progress.step
        if every <= 0 or step < every:
            return
        name = f"checkpoint-{step // every * every}"
        local = self.plan.run_dir / "out" / "checkpoints" / name
        if (local / "COMPLETE").is_file():
            return
        try:
            got = self._call_runner(lambda: self._pull(f"out/checkpoints/{name}"), inst)
            self.store.add_event(self.run_id, "sync", f"{name}: {len(got)} files", phase="training")
        except InstanceLost:
            raise
        except Exception as exc:  # noqa: BLE001 - not written yet, or rotated away: the next sync tries again
            self.store.add_event(self.run_id, "sync_failed", _scrub(exc), phase="training")
            return
        if not (self.plan.run_dir / "out" / "tokenizer").exists():  # a resume needs the same tokenizer
            try:
                self._call_runner(lambda: self._pull("out/tokenizer"), inst)
            except InstanceLost:
                raise
            except Exception:  # noqa: BLE001 - jobs with a hub tokenizer write none
                pass

    def _pull_all(self) -> None:
        for rel in ("out", "train.log"):
            self._pull(rel)
        self.store.add_event(self.run_id, "pulled", f"{len(self.pulled)} files", phase="pulling")

    def _salvage(self) -> None:
        """Best effort on failure/cancel: what the job wrote so far. A job that is still running keeps
        rewriting its files (a checksummed pull would race with it), so then the JSON status files are
        read as they are, the log is tailed, and only the newest checkpoint is pulled."""
        if self.runner is None:
            return
        if self.job_finished:
            for rel in ("out", "train.log"):
                try:
                    self._pull(rel)
                except Exception:  # noqa: BLE001 - salvage never blocks teardown
                    pass
            return
        out = self.plan.run_dir / "out"
        out.mkdir(parents=True, exist_ok=True)
        for name in ("heartbeat.json", "summary.json"):
            try:
                data = self.runner.read_json(self.run_id, f"out/{name}")
                if data is not None:
                    (out / name).write_text(json.dumps(data, indent=1))
                    self.pulled.append(str(out / name))
            except Exception:  # noqa: BLE001
                pass
        try:
            text, _ = self.runner.tail_log(self.run_id, 0)
            (self.plan.run_dir / "train.log").write_text(text)
        except Exception:  # noqa: BLE001
            pass
        try:
            self._sync_checkpoints(None)
        except Exception:  # noqa: BLE001
            pass

    def _have_checkpoint(self) -> bool:
        return _newest_checkpoint(self.plan.run_dir / "out" / "checkpoints") is not None

    def _bundle(self, *, resume: bool) -> Path:
        """The job bundle; on recovery it also carries the newest pulled checkpoint to resume from."""
        cfg = dict(self.plan.job_config)
        extra = dict(self.plan.extra_files)
        cfg["resume"] = True  # the job resumes only if out/checkpoints has something
        if resume:
            ckpt = _newest_checkpoint(self.plan.run_dir / "out" / "checkpoints")
            if ckpt is not None:
                extra[f"out/checkpoints/{ckpt.name}"] = ckpt
                tok = self.plan.run_dir / "out" / "tokenizer"
                if tok.is_dir():
                    extra["out/tokenizer"] = tok
                self.store.add_event(self.run_id, "resume_from", ckpt.name, phase="recovering")
        return self.bundle_builder(cfg, self.plan.dataset, self.plan.run_dir / "bundle.tar.gz", extra_files=extra)

    # ---- teardown -----------------------------------------------------------------------------
    def _teardown(self, status: str) -> bool:
        """Pull what exists (non-success), stop the job on unmanaged hosts, terminate everything. Shielded."""
        self._phase_before_teardown = self._phase
        try:
            self._enter("teardown", "terminating instances")
        except Exception:  # noqa: BLE001
            pass
        if status != "succeeded" and self.runner is not None:
            if not self.job_finished and self.live and self.live[-1][2].provider in UNMANAGED_PROVIDERS:
                try:
                    self.runner.kill(self.run_id)
                except Exception:  # noqa: BLE001
                    pass
            self._salvage()
        self._close_runner()
        ok = True
        for row, inst, offer in list(self.live):
            ok = self._terminate(row, inst, offer) and ok
        ok = self._sweep_tagged() and ok
        return ok

    def _terminate(self, row: int, inst: Any, offer: Candidate, *, lost: bool = False) -> bool:
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
            self.store.set_instance_state(row, "terminating", error=f"terminate not confirmed: {_scrub(last_exc)}")
            self.store.add_event(self.run_id, "teardown_failed", _scrub(last_exc), phase="teardown")
            self.display.warn(f"could not confirm termination of {inst.id}: run 'ftplan gc --yes'")
            return False
        now = time.time()
        created = self.store.get_instance(row).created_at or now
        self.store.add_cost(self.run_id, row, created, now, offer.price_hour)
        self.guard.stop_billing(row, now)
        self.store.set_instance_terminated(row)
        self.store.add_event(self.run_id, "instance_terminated", inst.id, phase="teardown",
                             data={"lost": lost})
        self.live = [item for item in self.live if item[0] != row]
        return True

    def _sweep_tagged(self) -> bool:
        """Anything at the providers tagged with this run that we do not know about: an interrupted create."""
        ok = True
        for row in self.store.instances(self.run_id, open_only=True):
            if row.state != "intent":
                continue
            try:
                provider = self._provider(row.provider)
                found = provider.list_instances(self.run_id)
                for inst in found:
                    provider.terminate(inst)
                    self.store.add_event(self.run_id, "swept", inst.id, phase="teardown")
                self.store.set_instance_state(row.id, "create_failed", error=row.error or "create did not complete")
            except Exception as exc:  # noqa: BLE001
                ok = False
                self.store.add_event(self.run_id, "teardown_failed", _scrub(exc), phase="teardown")
        return ok

    def _finish(self, status: str, error: str | None, teardown_ok: bool) -> LaunchResult:
        hours, usd = self.store.run_cost(self.run_id)
        summary = getattr(self, "summary", None) or _read_json(self.plan.run_dir / "out" / "summary.json") or {}
        fields: dict[str, Any] = dict(actual_hours=hours, actual_usd=usd, summary_json=summary or None)
        if summary.get("tokens_per_s"):
            fields["measured_tokens_per_s"] = summary["tokens_per_s"]
        peak = summary.get("peak_mem_allocated_gib") or summary.get("peak_mem_reserved_gib")
        if peak:
            fields["measured_peak_mem_gib"] = peak
        if not teardown_ok:
            note = "teardown not confirmed; run 'ftplan gc --yes'"
            error = f"{error}; {note}" if error else note
        self.store.update_run(self.run_id, error=error, **fields)
        if teardown_ok:
            self.store.finish_run(self.run_id, status)
        self.display.done(status, error)
        return LaunchResult(
            run_id=self.run_id, status=status, artifacts_dir=str(self.plan.run_dir.resolve()),
            estimated={"hours": self.plan.estimate.get("hours"), "usd": self.plan.estimate.get("usd")},
            actual={"hours": hours, "usd": usd}, error=error, teardown_confirmed=teardown_ok,
            instances=[{"provider": r.provider, "id": r.provider_instance_id, "state": r.state}
                       for r in self.store.instances(self.run_id)],
        )

    # ---- helpers ------------------------------------------------------------------------------
    def _provider(self, name: str) -> Any:
        if name not in self.providers:
            self.providers[name] = self.provider_factory(name, **self.plan.provider_options.get(name, {}))
        return self.providers[name]

    def _ssh_key(self) -> tuple[Path, str]:
        """The key the runner logs in with and its public half for the instance."""
        if self.plan.identity:
            return self.plan.identity, public_key_of(self.plan.identity)
        return generate_run_key(self.plan.run_dir)

    def _call_runner(self, fn: Callable[[], Any], inst: Any = None) -> Any:
        """Run an SSH operation; if it fails, ask the provider whether the instance is still there."""
        try:
            return fn()
        except Interrupted:
            raise
        except Exception as exc:
            if inst is not None:
                self._check_alive(inst)
            raise LaunchFailed(f"{self._phase}: {_scrub(exc)}") from None

    def _check_alive(self, inst: Any) -> None:
        from providers.errors import ProviderError

        try:
            fresh = self._provider(inst.provider).describe(inst)
        except ProviderError:
            return  # the provider API is flaky; SSH decides
        if fresh.state.is_gone:
            raise InstanceLost(f"{inst.provider} reports {inst.id} as {fresh.state.value}")

    def _close_runner(self) -> None:
        if self.runner is not None:
            try:
                self.runner.close()
            except Exception:  # noqa: BLE001
                pass
            self.runner = None

    def _hard_cap_s(self, price_hour: float) -> float | None:
        return self.guard.deadline_s(price_hour)

    def _remaining_hours(self, offer: Candidate) -> float | None:
        if offer.est_hours is None:
            return None
        done = self.last_progress
        if done.total_steps and done.step:
            return offer.est_hours * max(0.0, 1 - done.step / done.total_steps)
        return offer.est_hours

    def _log_line(self, line: str) -> None:
        self.display.log(_scrub(line))

    def _log_tail(self) -> str:
        log = self.plan.run_dir / "train.log"
        if not log.exists():
            return ""
        lines = [ln for ln in log.read_text(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith("[ftplan-bootstrap")]
        return _scrub(lines[-1])[:300] if lines else ""


# ---- defaults wired to the real parts ---------------------------------------------------------
def _default_provider_factory(name: str, **options: Any) -> Any:
    from providers.base import get_provider

    return get_provider(name, **options)


def _default_runner_factory(**kwargs: Any) -> Any:
    from planner.ssh_runner import SSHRunner

    return SSHRunner(**kwargs)


def _default_bundle_builder(job_config: dict[str, Any], dataset: Path, out_path: Path,
                            extra_files: dict[str, Path] | None = None) -> Path:
    from planner.bundle import build_bundle

    return build_bundle(job_config, dataset, out_path, extra_files=extra_files)


class _NullDisplay:
    def phase(self, name: str, message: str = "") -> None: ...
    def progress(self, progress: Progress, **kw: Any) -> None: ...
    def warn(self, message: str) -> None: ...
    def log(self, line: str) -> None: ...
    def done(self, status: str, error: str | None) -> None: ...


def generate_run_key(run_dir: Path) -> tuple[Path, str]:
    """A fresh ed25519 key for this run only, private half 0600 under runs/<id>/."""
    import paramiko
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key_path = run_dir / "id_ed25519"
    if not key_path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
    pkey = paramiko.Ed25519Key.from_private_key_file(str(key_path))
    return key_path, f"{pkey.get_name()} {pkey.get_base64()} ftplan"


def public_key_of(identity: Path) -> str:
    import paramiko

    pub = Path(str(identity) + ".pub")
    if pub.exists():
        return pub.read_text().strip()
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            key = cls.from_private_key_file(str(identity))
            return f"{key.get_name()} {key.get_base64()} ftplan"
        except (paramiko.SSHException, ValueError):
            continue
    raise LaunchFailed(f"cannot read the SSH key {identity}")


def _newest_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    # Only finished checkpoints (the job's COMPLETE marker); a half-pulled one is useless.
    found = [d for d in ckpt_dir.iterdir() if d.is_dir() and d.name.startswith("checkpoint-")
             and (d / "COMPLETE").is_file()]
    found.sort(key=lambda d: int(d.name.rsplit("-", 1)[-1]) if d.name.rsplit("-", 1)[-1].isdigit() else -1)
    return found[-1] if found else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _scrub(exc: object) -> str:
    from providers.errors import scrub

    return " ".join(scrub(exc).split())


# ---- ftplan attach ------------------------------------------------------------------------------
def attach_run(store: Store, run_id: str, *, display: Any = None, provider_factory: Callable[..., Any] | None = None,
               runner_factory: Callable[..., Any] | None = None, follow_poll_s: float = 1.0) -> LaunchResult:
    """Follow a run whose launcher is alive, or take it over (watch, pull, tear down) if it died."""
    from planner.errors import UserError
    from planner.store import FINAL_STATUSES, pid_alive
    from providers.base import Instance

    run = store.get_run(run_id)
    if run is None:
        raise UserError(f"no run '{run_id}' in {store.path}; 'ftplan runs' lists the recorded runs")
    if run.status in FINAL_STATUSES:
        raise UserError(f"run {run.id} is already {run.status}; see 'ftplan report {run.id}'")
    display = display or _NullDisplay()
    if pid_alive(run.launcher_pid, run.launcher_host) and run.launcher_pid != os.getpid():
        return _follow(store, run.id, display, follow_poll_s)
    ctx = next((e.json("data_json") for e in reversed(store.events(run.id, "launch_context"))), None) or {}
    rows = [r for r in store.instances(run.id, open_only=True) if r.provider_instance_id]
    if not rows:
        raise UserError(f"run {run.id} has no live instance to attach to; 'ftplan gc --yes' closes it")
    row = rows[-1]
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
        identity=Path(ctx["identity"]) if ctx.get("identity") else None, remote_python=ctx.get("remote_python"),
        remote_root=ctx.get("remote_root", "~/ftplan-runs"),
        estimate={"hours": run.est_hours, "usd": run.est_usd},
        provider_options=run.json("provider_options_json") or {},
    )
    launcher = Launcher(store, plan, provider_factory=provider_factory, runner_factory=runner_factory, display=display)
    return launcher.take_over(row.id, inst, offer)


def _follow(store: Store, run_id: str, display: Any, poll_s: float) -> LaunchResult:
    """Read-only: mirror the store's progress events until the owning launcher closes the run."""
    from planner.store import FINAL_STATUSES

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
