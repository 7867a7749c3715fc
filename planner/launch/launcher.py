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

Where the rest lives: the plan and result types in `ftplan.planner.launch.launch_plan`, pulling/syncing/salvage in
`ftplan.planner.launch.run_artifacts`, teardown steps and `ftplan gc` in `ftplan.planner.launch.teardown`, `ftplan attach` in
`ftplan.planner.launch.attach`, the progress display in `ftplan.planner.launch.live_display`, choosing and creating the
instance in `ftplan.planner.launch.provision`, several machines as one run in `ftplan.planner.launch.node_group`.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftplan.planner.launch.budget import BudgetGuard, Progress, finite_number
from ftplan.planner.launch.detached import DetachSteps
from ftplan.planner.launch.launch_plan import (  # noqa: F401  (re-exported: the public names of this module before the split)
    Candidate,
    InstanceLost,
    LaunchFailed,
    LaunchPlan,
    LaunchResult,
    NoCapacity,
    OverBudget,
    new_run_id,
)
from ftplan.planner.launch.live_display import NullDisplay
from ftplan.planner.launch.node_group import NodeGroupSteps, node_remote_root
from ftplan.planner.launch.provision import ProvisionSteps
from ftplan.planner.launch.run_artifacts import ArtifactSteps, _read_json
from ftplan.planner.launch.teardown import (  # noqa: F401  (UNMANAGED_PROVIDERS: re-exported)
    UNMANAGED_PROVIDERS,
    Interrupted,
    TeardownSteps,
    interruptible,
    shielded,
)
from ftplan.planner.launch.teardown import scrubbed as _scrub
from ftplan.planner.runs.store import Store, scrub_data


class Launcher(NodeGroupSteps, ProvisionSteps, ArtifactSteps, TeardownSteps, DetachSteps):
    """One run, start to end; `run()` for a new launch, `take_over()` for `ftplan attach` after a crash."""

    def __init__(self, store: Store, plan: LaunchPlan, *, provider_factory: Callable[..., Any] | None = None,
                 runner_factory: Callable[..., Any] | None = None, bundle_builder: Callable[..., Path] | None = None,
                 display: Any = None):
        self.store = store
        self.plan = plan
        self.provider_factory = provider_factory or _default_provider_factory
        self.runner_factory = runner_factory or _default_runner_factory
        self.bundle_builder = bundle_builder or _default_bundle_builder
        self.display = display or NullDisplay()
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
        # several nodes (node_group.py): (row, Instance) and the SSH runner per node rank, the run's placements
        self.group: list[tuple[int, Any]] = []
        self.node_runners: list[Any] = []
        self.placements: list[tuple[str, dict[str, Any]]] = []
        self._nodes_done: set[int] = set()

    # ---- public -------------------------------------------------------------------------------
    def run(self) -> LaunchResult:
        p = self.plan
        if self.provider_factory is _default_provider_factory:
            # Missing SDK, key or a bad option is bad input: refused before anything is recorded.
            from ftplan.planner.launch.preflight import usable_candidates

            p.candidates = usable_candidates(p.candidates, p.provider_options)
        p.run_dir.mkdir(parents=True, exist_ok=True)
        first = p.candidates[0] if p.candidates else Candidate(provider="?", instance_type="?", gpu="?")
        self.store.create_run(
            self.run_id, model=p.model, method=p.method, provider=first.provider, instance_type=first.instance_type,
            gpu=first.gpu, gpu_count=first.gpu_count, region=first.region, spot=first.spot,
            price_hour=first.price_hour, budget_usd=p.budget_usd, est_hours=p.estimate.get("hours"),
            est_usd=p.estimate.get("usd"), est_peak_mem_gib=p.estimate.get("peak_mem_gib"),
            est_tokens_per_s=p.estimate.get("tokens_per_s"), artifacts_dir=str(p.run_dir.resolve()),
            config_json={**p.job_config, **({"bucket": p.bucket} if p.bucket else {})},  # bucket: for `ftplan pull`
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
                "ssh_reconnect_s": p.ssh_reconnect_s,
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
                if status != "detached":   # a detached run's machine stays: its watchdog and deadline guard it
                    with shielded(self.display.warn):
                        teardown_ok = self._teardown(status)
        if status == "detached":
            return self._detached_result()
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
            if offer.nodes > 1:   # created and booted together, all or nothing (node_group.py)
                return self._run_group(offer, key_path)
            try:
                endpoint = self._wait_ready(row, inst)
                offer = self._cross_check_price(row, inst, offer)  # booted: the provider's own price is known
                self._connect(row, inst, endpoint, key_path)
                self._enter("uploading", f"shipping the job to {endpoint.host}")
                self._upload(bundle, resume)
                if p.detach and self._training_started(inst):
                    return self._detach(inst)
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

    def _connect(self, row: int, inst: Any, endpoint: Any, key_path: Path, node: int | None = None) -> Any:
        """One SSH runner for the instance; it becomes `self.runner` (what progress, pulls and salvage use)
        unless it is node k > 0 of a multi-node run (kept in `self.node_runners`)."""
        where = "" if node is None else f"node {node}: "
        self._enter("connecting", f"{where}ssh {endpoint.user}@{endpoint.host}:{endpoint.port}")
        runner = self.runner_factory(
            host=endpoint.host, port=endpoint.port, user=endpoint.user, key_path=key_path,
            known_hosts=self.plan.run_dir / "known_hosts",
            remote_root=node_remote_root(self.plan.remote_root, node or 0),
            connect_timeout_s=self.plan.ssh_connect_timeout_s, reconnect_grace_s=self.plan.ssh_reconnect_s,
            log=self._log_line,
            **_runner_options(self._provider(inst.provider), inst, self._log_line),  # host keys, first boot
        )
        if node is not None:
            self.node_runners.append(runner)   # before connecting: teardown closes it whatever happens
        if not node:
            self.runner = runner
            self.runner_instance_row = row
        self._call_runner(lambda: runner.connect(), inst)
        return runner

    def _upload(self, bundle: Path, resume: bool, *, runner: Any = None, node: int | None = None,
                extra_env: dict[str, str] | None = None) -> None:
        """Ship the bundle and start the job (on `runner`: node k of a multi-node run; default the run's)."""
        runner = runner or self.runner
        if hasattr(runner, "preflight"):  # cloud-init done, GPU driver answering (planner/remote/ssh_options.py)
            self._call_runner(lambda: runner.preflight(**_preflight_options(self.live[-1][2] if self.live else None)))
        self._call_runner(lambda: runner.upload_bundle(bundle, self.run_id))
        cap = self._hard_cap_s(self.guard.price_hour())
        deadline = int(cap) if cap is not None else None
        self.store.add_event(self.run_id, "job_started", "" if node is None else f"node {node}", phase="uploading",
                             data={"deadline_s": deadline, "resume": resume, **({} if node is None else {"node": node})})
        # The on-instance shutdown deadline is for rented machines only: never power off the user's own.
        owned = bool(self.live) and self.live[-1][2].provider in UNMANAGED_PROVIDERS
        self._deadline_s = None if owned else deadline
        env = {**self._watchdog_env(owned), **(extra_env or {})}
        self._watchdog_env_sent = env
        secrets = {**self.plan.job_secrets, **self.plan.bucket_env}   # scoped bucket key: registered, scrubbed
        self._call_runner(lambda: runner.start(self.run_id, remote_python=self.plan.remote_python,
                                               secrets=secrets or None, deadline_s=deadline,
                                               shutdown="off" if owned else "arm", env=env or None))

    def _train(self, row: int, inst: Any, offer: Candidate) -> str:
        p = self.plan
        runner = self.runner
        self._enter("training", "training")
        last_sync = time.time()
        last_describe = 0.0
        stopping = False
        overshoot_noted = False
        while True:
            self._watch_nodes(describe=time.time() - last_describe >= p.poll_interval_s * 10)  # nodes 1.. (if any)
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
                                  budget=p.budget_usd, eta_s=self.last_progress.remaining_s(),
                                  margin=self.guard.pull_margin_s / 3600.0 * self.guard.price_hour())
            running = self._call_runner(lambda: runner.is_running(self.run_id), inst)
            if not running:
                code = self._call_runner(lambda: runner.exit_code(self.run_id), inst)
                if code is None:  # the job vanished without an exit code: did the machine go away?
                    self._check_alive(inst)
                return self._job_outcome(code, stopping)
            if not (stopping or overshoot_noted) and self.guard.over_budget(self.last_progress):
                projection = (f"projected total {projected:.4f} USD exceeds the budget {p.budget_usd:.4f} USD at the "
                              f"measured {self.last_progress.tokens_per_s or 0:.0f} tokens/s")
                data = {"projected_usd": projected, "budget_usd": p.budget_usd, "action": p.on_over_budget}
                if p.on_over_budget == "stop":
                    stopping = True
                    self._over_budget_message = f"{projection}; stopped at a checkpoint"
                    self.store.add_event(self.run_id, "over_budget", self._over_budget_message, phase="training",
                                         data=data)
                    self.display.warn("over budget: asking the job to checkpoint and stop")
                    self._call_runner(lambda: runner.request_stop(self.run_id), inst)
                else:  # "continue": say it once; the on-instance deadline stays the hard cap
                    overshoot_noted = True
                    self.store.add_event(self.run_id, "over_budget", f"{projection}; continuing (--on-over-budget "
                                         "continue), the instance's deadline still ends the job", phase="training",
                                         data=data)
                    self.display.warn(f"over budget: {projection}; continuing as asked")
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
        summary = scrub_data(summary) if isinstance(summary, dict) else {}   # it came from the machine
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


    def _finish(self, status: str, error: str | None, teardown_ok: bool) -> LaunchResult:
        self._scrub_local_copies()
        summary = getattr(self, "summary", None) or _read_json(self.plan.run_dir / "out" / "summary.json") or {}
        summary = scrub_data(summary) if isinstance(summary, dict) else {}
        problems = getattr(self, "_teardown_problems", [])
        if not teardown_ok:
            note = "teardown not confirmed; run 'ftplan gc --yes'"
            if problems:
                note += f" ({problems[0]})"
            error = f"{error}; {note}" if error else note
        try:
            hours, usd = self.store.run_cost(self.run_id)
            fields: dict[str, Any] = dict(actual_hours=hours, actual_usd=usd, summary_json=summary or None)
            # Calibration only from a run on the device that was paid for (a GPU offer's job on the CPU is not).
            calibrate = summary.get("device") == "cuda" or not self.plan.job_config.get("expect_gpu")
            if calibrate and finite_number(summary.get("tokens_per_s")):
                fields["measured_tokens_per_s"] = finite_number(summary["tokens_per_s"])
            # est_peak_mem_gib is the estimate's total (with fragmentation and CUDA context): the job's device
            # peak is its like (summary["mem_compare"]); allocated only where no device figure exists (CPU).
            peak = finite_number(summary.get("peak_mem_device_gib")) or finite_number(
                summary.get("peak_mem_allocated_gib")) or finite_number(summary.get("peak_mem_reserved_gib"))
            if calibrate and peak:
                fields["measured_peak_mem_gib"] = peak
            self.store.update_run(self.run_id, error=error, **fields)
            if teardown_ok:
                self.store.finish_run(self.run_id, status)
            instances = [{"provider": r.provider, "id": r.provider_instance_id, "state": r.state}
                         for r in self.store.instances(self.run_id)]
        except Exception as exc:  # noqa: BLE001 - the store is unwritable (disk full, read-only): say so in one line
            hours, usd, instances = 0.0, 0.0, []
            teardown_ok = False
            note = (f"the run store {self.store.path} could not record the end of the run ({type(exc).__name__}: "
                    f"{_scrub(exc)}); check the instances with 'ftplan gc' once the store is writable")
            error = f"{error}; {note}" if error else note
        self.display.done(status, error)
        return LaunchResult(
            run_id=self.run_id, status=status, artifacts_dir=str(self.plan.run_dir.resolve()),
            estimated={"hours": self.plan.estimate.get("hours"), "usd": self.plan.estimate.get("usd")},
            actual={"hours": hours, "usd": usd}, error=error, teardown_confirmed=teardown_ok,
            instances=instances,
        )

    def _scrub_local_copies(self) -> None:
        """Files pulled from the machine (the job's log, summary, heartbeat) may quote a secret (an error
        message with HF_TOKEN in it): rewrite them scrubbed before anyone reads them."""
        from ftplan.providers.errors import scrub

        for rel in ("train.log", "out/summary.json", "out/heartbeat.json"):
            path = self.plan.run_dir / rel
            try:
                if not path.is_file() or path.is_symlink():
                    continue
                text = path.read_text(errors="replace")
                clean = scrub(text)
                if clean != text:
                    path.write_text(clean)
            except OSError:
                continue

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
        from ftplan.providers.errors import ProviderError

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
    from ftplan.planner.launch.preflight import adapter_kwargs
    from ftplan.providers.base import get_provider

    return get_provider(name, **adapter_kwargs(name, options))


def _runner_options(provider: Any, inst: Any, log: Callable[[str], None]) -> dict[str, Any]:
    from ftplan.planner.remote.ssh_options import runner_options

    return runner_options(provider, inst, log)


def _preflight_options(offer: Any) -> dict[str, Any]:
    from ftplan.planner.remote.ssh_options import preflight_options

    return preflight_options(offer)


def _default_runner_factory(**kwargs: Any) -> Any:
    from ftplan.planner.remote.ssh_runner import SSHRunner

    return SSHRunner(**kwargs)


def _default_bundle_builder(job_config: dict[str, Any], dataset: Path, out_path: Path,
                            extra_files: dict[str, Path] | None = None) -> Path:
    from ftplan.planner.remote.bundle import build_bundle

    return build_bundle(job_config, dataset, out_path, extra_files=extra_files)


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
