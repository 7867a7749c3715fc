"""The fault matrix: a failure injected at every phase, SIGINT/SIGTERM at every phase, kill -9 + gc.

Real parts throughout: the Lambda adapter against the fake Lambda API server (tests/fakes), the SSH
runner against a real sshd on 127.0.0.1, the real bundle and bootstrap. The training job is the
one replaceable part: a small stand-in (`STUB_JOB`, shipped as job/train.py through the bundle's
override mechanism) that speaks the job's file protocol (heartbeat.json, checkpoints with COMPLETE,
STOP, summary.json) without importing torch, so 20+ cases stay cheap. The real job is covered by
test_launch_local_e2e.py and test_budget_guard.py.

After every case: zero live instances in the fake, a run record that says what happened, and the
artifacts pulled so far still on disk. `benchmarks/fault_matrix.py` runs the same cases as a table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import FTPLAN_PROCESS, ftplan

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "remote_job" / "examples" / "alpaca_small.json"

# The stand-in job. Behaviour comes from fault.json next to job.json (shipped in the bundle).
STUB_JOB = r'''
import json, os, shutil, sys, time
run = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cfg = json.load(open(os.path.join(run, "job.json")))
fault = json.load(open(os.path.join(run, "fault.json")))
out = os.path.join(run, cfg["output_dir"]); ck = os.path.join(out, "checkpoints")
os.makedirs(ck, exist_ok=True)
def dump(name, data):
    tmp = os.path.join(out, name + ".tmp"); json.dump(data, open(tmp, "w")); os.replace(tmp, os.path.join(out, name))
done = sorted(int(d.split("-")[1]) for d in os.listdir(ck) if os.path.exists(os.path.join(ck, d, "COMPLETE")))
start = done[-1] if done and cfg.get("resume") else 0
total = fault.get("steps", 6); step_s = fault.get("step_s", 0.1); t0 = time.time(); losses = []
if fault.get("evil_symlink"):
    os.symlink("/etc/passwd", os.path.join(out, "escape"))
if fault.get("fifo"):
    os.mkfifo(os.path.join(out, "a-fifo"))
token = os.environ.get("HF_TOKEN", "")
def ckpt(step):  # like the real job: written under a temporary name, then renamed; keeps the newest 3
    d = os.path.join(ck, "checkpoint-%d" % step); tmp = os.path.join(ck, ".tmp-checkpoint-%d" % step)
    if os.path.isdir(d): return
    os.makedirs(tmp, exist_ok=True)
    open(os.path.join(tmp, "trainable.bin"), "wb").write(os.urandom(2048)); open(os.path.join(tmp, "COMPLETE"), "w").close()
    os.rename(tmp, d)
    for old in sorted((int(x.split("-")[1]) for x in os.listdir(ck) if x.startswith("checkpoint-")))[:-3]:
        shutil.rmtree(os.path.join(ck, "checkpoint-%d" % old))
status = "succeeded"; step = start
for step in range(start + 1, total + 1):
    time.sleep(step_s)
    if fault.get("fail_at") == step:
        why = "RuntimeError: injected failure at step %d" % step + (" (401 for token %s)" % token if token else "")
        print(why, flush=True)
        dump("summary.json", {"status": "failed", "error": why, "steps": step - 1, "losses": losses, "token": token})
        sys.exit(1)
    losses.append([step, 5.0 / step])
    if step % cfg["checkpoint_every_steps"] == 0:
        ckpt(step)
    hb = {"status": "training", "step": step, "total_steps": total, "loss": 5.0 / step,
          "tokens_seen": 1000 * step, "tokens_per_s": 1000 / step_s, "elapsed_s": time.time() - t0}
    if fault.get("odd_heartbeat"):  # what a broken or hostile job may write
        hb.update(loss=["nan", "inf", token or "hf_x", {"a": 1}][step % 4], tokens_per_s="fast", elapsed_s=None,
                  tokens_seen="many", status={"nested": token})
    dump("heartbeat.json", hb)
    if os.path.exists(os.path.join(run, "STOP")):
        ckpt(step); status = "stopped"; break
dump("summary.json", {"status": status, "steps": step, "total_steps": total, "losses": losses,
                      "tokens_per_s": 1000 / step_s, "peak_mem_allocated_gib": 0.01, "resumed_from_step": start or None})
if fault.get("out_becomes_link"):  # a hostile machine answers the final pull with out -> .
    os.rename(out, out + ".real"); os.symlink(".", out)
if fault.get("rm_out"):  # the machine's out/ is gone by the final pull
    shutil.rmtree(out)
if fault.get("empty_out"):  # ... or empty
    for x in os.listdir(out):
        p = os.path.join(out, x); shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
print("stub job %s at step %d (resumed from %d)" % (status, step, start), flush=True)
'''

LAMBDA_KEY_ENV = "LAMBDA_API_KEY"
PHASES = ("provisioning", "waiting", "connecting", "uploading", "training", "pulling")


@dataclass
class Case:
    name: str
    expect: str | tuple[str, ...]                 # final run status (or any of several)
    fault: dict[str, Any] = field(default_factory=dict)   # stub job behaviour
    arm: Any = None                               # callable(fake) before launch
    signal_at: tuple[str, int] | None = None      # (phase, signal) delivered when the phase starts
    second_signal: bool = False                   # another SIGINT during teardown
    during_training: Any = None                   # callable(fake) once training reports a step
    project: dict[str, Any] = field(default_factory=dict)  # overrides of the project file
    expect_error: str = ""                        # substring of the run's error
    expect_artifacts: tuple[str, ...] = ()        # files under runs/<id>/ that must exist afterwards
    create_raises: Any = None                     # exception class raised by create AFTER the instance exists
    cut_at: tuple[str, str] | None = None         # (phase, "refuse"|"blackhole"): the SSH path dies then
    env: dict[str, str] = field(default_factory=dict)   # environment of the launcher for this case
    store_fault: bool = False                     # the run store refuses writes once teardown starts
    verify: Any = None                            # callable(got) -> list of problems (what a user would check)
    absent: tuple[str, ...] = ()                  # paths under runs/<id>/ that must NOT exist afterwards
    rig: Any = None                               # callable(tmp, sshd) -> a machine set-up (test_first_contact_matrix)


def _fail(op, kind, times=1):
    return lambda fake: fake.fail_next(op, kind=kind, times=times)


def cases() -> list[Case]:
    out = [
        Case("ok", "succeeded", expect_artifacts=("out/summary.json", "train.log", "out/checkpoints/checkpoint-6/COMPLETE")),
        Case("create: provider error", "failed", arm=_fail("create", "500", 5), expect_error="create on lambda failed"),
        Case("create: no capacity -> next offer", "succeeded",
             arm=lambda f: f.set_capacity("gpu_1x_a10", []), expect_artifacts=("out/summary.json",)),
        Case("create: no capacity anywhere", "failed",
             arm=lambda f: (f.set_capacity("gpu_1x_a10", []), f.set_capacity("gpu_1x_a100", [])),
             expect_error="no capacity"),
        Case("wait: API fails while booting", "failed", arm=_fail("get", "500", 50), expect_error="waiting"),
        Case("ssh: sshd never answers", "failed", project={"ssh_port": "closed"}, expect_error="connecting"),
        Case("upload: remote disk not writable", "failed", project={"remote_root": "/proc/ftplan-nope"},
             expect_error="uploading"),
        Case("training: job crashes", "failed", fault={"fail_at": 3}, expect_error="injected failure at step 3",
             expect_artifacts=("train.log", "out/summary.json")),
        Case("training: instance disappears", "failed", fault={"steps": 400, "step_s": 0.1},
             during_training=lambda f: [f.preempt(i["id"]) for i in f.live_instances()],
             expect_error="disappeared", expect_artifacts=("out/checkpoints",)),
        # Hostile streams: every safe file is kept, the unsafe entry is skipped; a good pull is never replaced by less.
        Case("pull: absolute symlink in out/", "succeeded", fault={"evil_symlink": True, "steps": 6, "step_s": 0.2},
             expect_artifacts=("out/summary.json", "out/checkpoints/checkpoint-6/COMPLETE"), absent=("out/escape",)),
        Case("pull: a FIFO in out/", "succeeded", fault={"fifo": True},
             expect_artifacts=("out/summary.json",), absent=("out/a-fifo",)),
        Case("pull: out/ turned into a link to .", ("succeeded", "failed"), fault={"out_becomes_link": True,
             "steps": 16, "step_s": 0.4}, expect_artifacts=("out/checkpoints",), verify=_kept_synced_checkpoint),
        # Money: a price that would switch the budget caps off, and the provider's own price.
        Case("price: first offer $0/h is refused", "succeeded", project={"price1": 0},
             verify=_only_type_created("gpu_1x_a100")),
        Case("price: every offer $0/h", "failed", project={"price1": 0, "price2": 0}, expect_error="refused",
             verify=_only_type_created(None)),
        Case("price: provider bills more than planned", "succeeded", project={"price1": 0.10},
             verify=_billed_at(0.75)),
        # Whatever the machine sends back is scrubbed and never kills the run.
        Case("heartbeat: odd values", "succeeded", fault={"odd_heartbeat": True},
             env={"HF_TOKEN": "hf_HEARTBEATsecret12345"}, verify=_token_nowhere("hf_HEARTBEATsecret12345")),
        Case("training: job error quotes HF_TOKEN", "failed", fault={"fail_at": 2},
             env={"HF_TOKEN": "hf_JOBERRORsecret123456"}, expect_error="injected failure at step 2",
             verify=_token_nowhere("hf_JOBERRORsecret123456")),
        Case("teardown: run store turns read-only", "failed", fault={"fail_at": 2}, store_fault=True,
             verify=_gc_closes_after_store_fault),
    ]
    # A create that fails AFTER the instance exists, for every class of exception: swept by tag, then
    # the next offer (capacity/quota) or a failed run (anything else); nothing left billing.
    from ftplan.providers import errors as perr

    for exc in (perr.CapacityError, perr.QuotaError, perr.OfferUnavailable, perr.AuthError, perr.BillingError,
                perr.ProviderError, perr.InstanceGone, TimeoutError, ConnectionResetError, RuntimeError, KeyError):
        moves_on = issubclass(exc, (perr.CapacityError, perr.QuotaError))
        out.append(Case(f"create: {exc.__name__} after the instance exists", "succeeded" if moves_on else "failed",
                        create_raises=exc, expect_error="" if moves_on else "create on lambda failed",
                        verify=_swept_ambiguous_create))
    # The machine becomes unreachable (nothing listens / packets vanish) at each phase after it was reached:
    # teardown gets one short reconnect, then terminates (max_teardown_s in the benchmark).
    for phase, mode in (("uploading", "refuse"), ("training", "refuse"), ("training", "blackhole"),
                        ("pulling", "refuse"), ("pulling", "blackhole")):
        out.append(Case(f"ssh: machine unreachable ({mode}) at {phase}", "failed", cut_at=(phase, mode),
                        fault={"steps": 300 if phase != "pulling" else 6, "step_s": 0.1}))
    for phase in PHASES:
        for sig in (signal.SIGINT, signal.SIGTERM):
            arts = ("out/heartbeat.json",) if phase in ("training", "pulling") else ()
            steps = 6 if phase == "pulling" else 300  # long jobs are ended by stop_leftover_jobs
            out.append(Case(f"{signal.Signals(sig).name} at {phase}", "cancelled", signal_at=(phase, sig),
                            fault={"steps": steps, "step_s": 0.1}, expect_error=f"interrupted by {signal.Signals(sig).name}",
                            expect_artifacts=arts))
    out.append(Case("SIGINT at training, SIGINT again in teardown", "cancelled", signal_at=("training", signal.SIGINT),
                    second_signal=True, fault={"steps": 300, "step_s": 0.1}, expect_error="interrupted by SIGINT"))
    return out


# ---- helpers of the money/data cases ---------------------------------------------------------------
def _only_type_created(instance_type: str | None):
    """Only offers with a usable price reached the provider."""
    def verify(got):
        made = {b.get("instance_type_name") for b in got["fake"].calls("POST", "/instance-operations/launch")}
        want = {instance_type} if instance_type else set()
        return [] if made == want else [f"created {sorted(made)}, expected only {sorted(want)}"]
    return verify


def _billed_at(price: float):
    def verify(got):
        store = got["store"]
        rows = store.instances(got["run_id"])
        costs = store.costs(got["run_id"])
        problems = []
        if not rows or rows[0].price_hour != price:
            problems.append(f"instance price {[r.price_hour for r in rows]} != provider's {price}")
        if not costs or any(abs(c.price_hour - price) > 1e-9 for c in costs):
            problems.append(f"cost rows billed at {[c.price_hour for c in costs]}, not the provider's {price}")
        if not store.events(got["run_id"], "price_mismatch"):
            problems.append("no price_mismatch event")
        return problems
    return verify


def _token_nowhere(token: str):
    """The secret is on the machine only: not in the store (nor its WAL), runs/<id>/ or anything shown."""
    def verify(got):
        leaks = [str(p) for p in got["tmp"].rglob("*") if p.is_file() and "remote" not in
                 p.relative_to(got["tmp"]).parts and token.encode() in p.read_bytes()]
        leaks += ["error/warnings"] if token in got["error"] + " ".join(got["warnings"]) else []
        return [f"{token} leaked into {leaks}"] if leaks else []
    return verify


def _kept_synced_checkpoint(got):
    ck = got["run_dir"] / "out" / "checkpoints"
    done = [d for d in ck.glob("checkpoint-*") if (d / "COMPLETE").is_file()] if ck.is_dir() else []
    problems = [] if done else ["the checkpoints pulled during training were lost"]
    if (got["run_dir"] / "out").is_symlink():
        problems.append("runs/<id>/out was replaced by a symlink")
    return problems


def _swept_ambiguous_create(got):
    store = got["store"]
    rows = store.instances(got["run_id"])
    problems = []
    if not store.events(got["run_id"], "swept"):
        problems.append("the instance made by the failed create was not swept by tag")
    if not rows or rows[0].state != "create_failed":
        problems.append(f"first row is {rows[0].state if rows else None}, not create_failed")
    return problems


def _gc_closes_after_store_fault(got):
    from ftplan.planner.launch.project_config import load_project
    from ftplan.planner.launch.teardown import collect_garbage

    problems = []
    if got["teardown_confirmed"]:
        problems.append("teardown reported confirmed although the store could not record it")
    if "could not record" not in got["error"] and "run 'ftplan gc --yes'" not in got["error"]:
        problems.append(f"error does not say what to do: {got['error']!r}")
    store = got["store"]
    store.db.execute("PRAGMA query_only = OFF")
    store.update_run(got["run_id"], launcher_pid=0)   # the launcher has exited by now
    collect_garbage(store, load_project(got["tmp"] / "ftplan.toml"), terminate=True)
    if store.instances(got["run_id"], open_only=True):
        problems.append("gc could not close the rows once the store was writable again")
    return problems


class CutProxy:
    """A TCP forwarder between the launcher and sshd that can die on demand, like a machine's network:
    `refuse` closes every connection and refuses new ones (nothing listens), `blackhole` keeps accepting
    but forwards nothing in either direction (packets vanish)."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self.target_port = target_port
        self.mode = "open"
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.conns: list = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "refuse":
                client.close()
                continue
            if self.mode == "blackhole":
                with self._lock:
                    self.conns.append(client)   # held open, never answered
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            while self.mode == "blackhole":     # swallow: the other side waits forever
                time.sleep(0.05)
            if self.mode != "open":
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        if self.mode != "blackhole":
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass

    def cut(self, mode: str) -> None:
        self.mode = mode
        if mode == "refuse":
            with self._lock:
                conns, self.conns = self.conns, []
            for sock in conns:
                try:
                    sock.shutdown(2)
                    sock.close()
                except OSError:
                    pass
            self.listener.close()   # connection refused from now on

    def close(self) -> None:
        self.mode = "closed"
        with self._lock:
            conns, self.conns = self.conns, []
        for sock in [*conns, self.listener]:
            try:
                sock.close()
            except OSError:
                pass


class _SignalDisplay:
    """Delivers a real signal to this process when the launcher enters a phase (and optionally in teardown);
    also cuts the SSH path (`cut`) or the store's writes (`store_fault`) at a phase, and times teardown."""

    def __init__(self, at: tuple[str, int] | None, second: bool, during_training, fake, cut=None, proxy=None,
                 store=None):
        self.at, self.second, self.during_training, self.fake = at, second, during_training, fake
        self.cut, self.proxy, self.store = cut, proxy, store
        self.fired = False
        self.warnings: list[str] = []
        self.teardown_t0: float | None = None
        self.rig = None

    def _maybe_cut(self, phase: str, step: int | None = None) -> None:
        if self.cut and self.proxy and self.proxy.mode == "open" and phase == self.cut[0]:
            if phase != "training" or (step or 0) >= 2:
                self.proxy.cut(self.cut[1])

    def phase(self, name, message=""):
        if name == "teardown" and self.teardown_t0 is None:
            self.teardown_t0 = time.monotonic()
            if self.store is not None:   # the disk under the run store fills / turns read-only
                self.store.db.execute("PRAGMA query_only = ON")
        if self.rig is not None:
            self.rig.hook(name, None)
        self._maybe_cut(name)
        if self.at and not self.fired and name == self.at[0]:
            if name == "training":
                return  # wait for the first progress line, so the job has really started
            self.fired = True
            os.kill(os.getpid(), self.at[1])
        if name == "teardown" and self.second and self.fired:
            os.kill(os.getpid(), signal.SIGINT)

    def progress(self, progress, **kw):
        if self.rig is not None:
            self.rig.hook("training", progress.step)
        self._maybe_cut("training", progress.step)
        if progress.step >= 2 and self.at and self.at[0] == "training" and not self.fired:
            self.fired = True
            os.kill(os.getpid(), self.at[1])
        if progress.step >= 3 and self.during_training:
            hook, self.during_training = self.during_training, None
            hook(self.fake)

    def warn(self, message):
        self.warnings.append(message)

    def log(self, line):
        pass

    def done(self, status, error):
        pass


def write_project(tmp: Path, fake, sshd, job_file: Path, fault_file: Path, **over) -> Path:
    remote = over.get("remote_root") or str(tmp / "remote")
    Path(tmp / "remote").mkdir(exist_ok=True)
    ssh_port = over.get("ssh_port", sshd.port)
    if ssh_port == "closed":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ssh_port = s.getsockname()[1]
    cfg = tmp / "ftplan.toml"
    cfg.write_text(f"""
[job]
model = "tiny-llama"
dataset = "{EXAMPLE}"
checkpoint_every_steps = 2
[launch]
providers = ["lambda"]
budget_usd = 5
poll_interval_s = 0.1
sync_every_min = 0.005
pull_margin_min = 0
ssh_connect_timeout_s = {over.get("ssh_timeout", 2)}
ssh_reconnect_s = {over.get("ssh_reconnect", 5)}
wait_ready_timeout_s = 10
max_offer_tries = 3
remote_python = "{sys.executable}"
[launch.bundle_extra_files]
"job/train.py" = "{job_file}"
"fault.json" = "{fault_file}"
[[launch.offers]]
provider = "lambda"
instance_type = "gpu_1x_a10"
gpu = "A10"
region = "us-east-1"
price_hour = {over.get("price1", 0.75)}
[[launch.offers]]
provider = "lambda"
instance_type = "gpu_1x_a100"
gpu = "A100"
region = "us-east-1"
price_hour = {over.get("price2", 1.29)}
[providers.lambda]
base_url = "{fake.url}"
ssh_port = {ssh_port}
ssh_user = "{sshd.user}"
poll_s = 0.02
remote_root = "{remote}"
""")
    return cfg


def stub_files(tmp: Path, fault: dict[str, Any]) -> tuple[Path, Path]:
    job = tmp / "stub_train.py"
    job.write_text(STUB_JOB)
    fault_file = tmp / "fault.json"
    fault_file.write_text(json.dumps({"steps": 6, "step_s": 0.05, **fault}))
    return job, fault_file


def _failing_create(exc_cls):
    """The real Lambda adapter whose create succeeds at the provider and then raises `exc_cls` (once): the
    ambiguous create of a flaky network, or of an SDK that swallows a failed cleanup."""
    from ftplan.planner.launch.launcher import _default_provider_factory
    from ftplan.providers.errors import ProviderError

    state = {"armed": True}

    def factory(name, **options):
        provider = _default_provider_factory(name, **options)
        real = provider.create

        def create(request):
            inst = real(request)
            if state["armed"]:
                state["armed"] = False
                msg = f"injected {exc_cls.__name__} after {inst.id} was created"
                raise exc_cls(msg, provider=name) if issubclass(exc_cls, ProviderError) else exc_cls(msg)
            return inst

        provider.create = create
        return provider

    return factory


def run_case(case: Case, tmp: Path, fake, sshd) -> dict[str, Any]:
    """Run one case in-process through the real plan builder and launcher; return what a user would check."""
    from ftplan.planner.commands.launch import build_plan
    from ftplan.planner.launch.launcher import Launcher
    from ftplan.planner.launch.project_config import load_project
    from ftplan.planner.runs.store import Store

    fake.reset()
    fake.ssh_host = "127.0.0.1"
    fake.boot_polls = 1
    os.environ[LAMBDA_KEY_ENV] = fake.api_key
    saved_env = {k: os.environ.get(k) for k in case.env}
    os.environ.update(case.env)
    proxy = CutProxy(sshd.port) if case.cut_at else None
    rig = case.rig(tmp, sshd) if case.rig else None   # its own sshd/proxy, runner and phase hook
    try:
        if case.arm:
            case.arm(fake)
        job, fault = stub_files(tmp, case.fault)
        project = dict(case.project, **({"ssh_port": proxy.port} if proxy else {}))
        project.update(rig.project if rig else {})
        cfg = load_project(write_project(tmp, fake, sshd, job, fault, **project))
        cfg.launch.runs_dir = str(tmp / "runs")
        plan = build_plan(cfg, EXAMPLE, identity=rig.identity if rig else sshd.client_key)
        store = Store(tmp / "runs.sqlite3")
        display = _SignalDisplay(case.signal_at, case.second_signal, case.during_training, fake, cut=case.cut_at,
                                 proxy=proxy, store=store if case.store_fault else None)
        display.rig = rig
        factory = _failing_create(case.create_raises) if case.create_raises else None
        t0 = time.monotonic()
        result = Launcher(store, plan, display=display, provider_factory=factory,
                          runner_factory=rig.runner_factory if rig else None).run()
        seconds = time.monotonic() - t0
        teardown_s = time.monotonic() - display.teardown_t0 if display.teardown_t0 else 0.0
    finally:
        if proxy:
            proxy.close()
        if rig:
            rig.close()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_leftover_jobs(tmp / "remote")
    run = store.get_run(result.run_id)
    run_dir = Path(result.artifacts_dir)
    got = {
        "case": case.name, "status": run.status, "error": run.error or result.error or "", "seconds": seconds,
        "teardown_s": teardown_s, "live_instances": len(fake.live_instances()),
        "open_rows": len(store.instances(result.run_id, open_only=True)),
        "artifacts_ok": all((run_dir / a).exists() for a in case.expect_artifacts),
        "absent_ok": not any((run_dir / a).exists() or (run_dir / a).is_symlink() for a in case.absent),
        "teardown_warned": any("tearing down" in w for w in display.warnings), "run_dir": run_dir,
        "warnings": display.warnings, "teardown_confirmed": result.teardown_confirmed,
        "store": store, "run_id": result.run_id, "tmp": tmp, "fake": fake, "rig": rig,
    }
    if case.store_fault:   # the store could not record the end: the result says what happened
        got["status"], got["error"] = result.status, result.error or ""
    got["verify_problems"] = list(case.verify(got)) if case.verify else []
    if case.store_fault:
        got["open_rows"] = len(store.instances(result.run_id, open_only=True))
    return got


def check(case: Case, got: dict[str, Any]) -> list[str]:
    problems = list(got.get("verify_problems", []))
    expect = case.expect if isinstance(case.expect, tuple) else (case.expect,)
    if got["status"] not in expect:
        problems.append(f"status {got['status']} not in {expect} ({got['error']})")
    if case.expect_error and case.expect_error not in got["error"]:
        problems.append(f"error {got['error']!r} lacks {case.expect_error!r}")
    if got["live_instances"]:
        problems.append(f"{got['live_instances']} instance(s) left running")
    if got["open_rows"]:
        problems.append(f"{got['open_rows']} instance row(s) not confirmed terminated")
    if not got["artifacts_ok"]:
        problems.append(f"missing artifacts {case.expect_artifacts}")
    if not got.get("absent_ok", True):
        problems.append(f"unsafe entries {case.absent} reached runs/<id>/")
    if case.second_signal and not got["teardown_warned"]:
        problems.append("second signal during teardown was not answered with 'tearing down'")
    return problems


# ---- pytest ------------------------------------------------------------------------------------
from fakes.lambda_api import fake_lambda  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_fault_case(case, tmp_path, fake_lambda, sshd, monkeypatch):  # noqa: F811
    monkeypatch.setenv(LAMBDA_KEY_ENV, fake_lambda.api_key)
    got = run_case(case, tmp_path, fake_lambda, sshd)
    assert check(case, got) == []


def test_gc_with_the_list_api_down_keeps_the_ambiguous_row(tmp_path, fake_lambda):  # noqa: F811
    got = gc_list_down(tmp_path, fake_lambda)
    assert got["problems"] == []


def test_gc_from_a_second_store_leaves_the_first_stores_run_alone(tmp_path, fake_lambda, sshd, monkeypatch):  # noqa: F811
    monkeypatch.setenv(LAMBDA_KEY_ENV, fake_lambda.api_key)   # the in-process gc's credential (no test leaks it)
    got = gc_second_store(tmp_path, fake_lambda, sshd)
    assert got["problems"] == []


@pytest.mark.parametrize("fail", [False, True], ids=["succeeded", "job fails"])
def test_secrets_env_is_removed_from_a_machine_ftplan_does_not_own(tmp_path, sshd, fail):
    got = local_secrets_removed(tmp_path, sshd, fail=fail)
    assert got["problems"] == []


def test_kill_9_then_gc_terminates_the_orphan(tmp_path, fake_lambda, sshd):  # noqa: F811
    """The launcher dies without any chance to clean up; `ftplan gc --yes` finds and ends its instance."""
    got = kill9_then_gc(tmp_path, fake_lambda, sshd)
    assert got["live_before_gc"] == 1
    assert got["gc_dry_run_lists_it"] and got["live_after_dry_run"] == 1
    assert got["live_after_gc"] == 0
    assert got["run_status"] == "failed" and "closed by ftplan gc" in got["run_error"]
    assert got["cost_recorded"]


def test_sigterm_to_the_real_cli_process_tears_down(tmp_path, fake_lambda, sshd):  # noqa: F811
    got = signal_cli_process(tmp_path, fake_lambda, sshd, signal.SIGTERM)
    assert got["rc"] == 130 and got["status"] == "cancelled"
    assert got["live_instances"] == 0
    assert "Traceback" not in got["stderr_tail"]


def stop_leftover_jobs(remote_root: Path) -> None:
    """A fake cloud instance is "terminated" but its job ran on this machine's sshd: end that job by the
    process group id its bootstrap wrote (never by name)."""
    for pid_file in remote_root.glob("*/pid"):
        try:
            os.killpg(int(pid_file.read_text().strip()), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


# ---- subprocess cases (shared with the benchmark) ------------------------------------------------
def _cli(tmp: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([*FTPLAN_PROCESS, *args], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _env(fake) -> dict[str, str]:
    env = dict(os.environ)
    env[LAMBDA_KEY_ENV] = fake.api_key
    env["PYTHONPATH"] = str(ROOT)
    return env


def _wait_for(store_path: Path, kind: str, timeout_s: float = 60) -> None:
    import sqlite3

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if store_path.exists():
            try:
                with sqlite3.connect(store_path, timeout=5) as db:
                    if db.execute("SELECT 1 FROM events WHERE kind = ? LIMIT 1", (kind,)).fetchone():
                        return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"no '{kind}' event within {timeout_s}s")


def start_launch(tmp: Path, fake, sshd, steps: int) -> tuple[subprocess.Popen, Path, Path]:
    """`ftplan launch` of the stand-in job (`steps` of 0.1 s) in its own process: (process, config, store)."""
    fake.reset()
    fake.ssh_host = "127.0.0.1"
    job, fault = stub_files(tmp, {"steps": steps, "step_s": 0.1})
    cfg = write_project(tmp, fake, sshd, job, fault)
    store = tmp / "runs.sqlite3"
    proc = _cli(tmp, "launch", "--config", str(cfg), "--identity", str(sshd.client_key), "--yes", "--json",
                "--store", str(store), "--runs-dir", str(tmp / "runs"), env=_env(fake))
    return proc, cfg, store


def kill9_then_gc(tmp: Path, fake, sshd) -> dict[str, Any]:
    proc, cfg, store = start_launch(tmp, fake, sshd, steps=400)
    env = _env(fake)
    try:
        _wait_for(store, "progress")
    finally:
        proc.kill()  # SIGKILL: no handler, no finally, no teardown
        proc.wait()
    out: dict[str, Any] = {"live_before_gc": len(fake.live_instances())}
    dry = subprocess.run([*FTPLAN_PROCESS, "gc", "--config", str(cfg), "--store", str(store),
                          "--json"], cwd=tmp, env=env, capture_output=True, text=True)
    listed = json.loads(dry.stdout)["instances"] if dry.returncode == 0 else []
    out["gc_dry_run_lists_it"] = any(i["action"] == "orphan" for i in listed)
    out["live_after_dry_run"] = len(fake.live_instances())
    # gc without --config: provider options come from the run store.
    gc = subprocess.run([*FTPLAN_PROCESS, "gc", "--yes", "--store", str(store), "--json"],
                        cwd=tmp, env=env, capture_output=True, text=True)
    out["gc_rc"] = gc.returncode
    out["live_after_gc"] = len(fake.live_instances())
    from ftplan.planner.runs.store import Store

    s = Store(store)
    run = s.list_runs()[0]
    out["run_status"], out["run_error"] = run.status, run.error or ""
    out["cost_recorded"] = bool(s.costs(run.id)) and (run.actual_usd or 0) > 0
    stop_leftover_jobs(tmp / "remote")
    return out


def signal_cli_process(tmp: Path, fake, sshd, sig: int) -> dict[str, Any]:
    proc, _, store = start_launch(tmp, fake, sshd, steps=400)
    _wait_for(store, "progress")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    res = json.loads(stdout)
    stop_leftover_jobs(tmp / "remote")
    return {"rc": proc.returncode, "status": res["status"], "live_instances": len(fake.live_instances()),
            "stderr_tail": stderr[-2000:]}


def test_secrets_never_reach_the_store_or_the_artifacts(tmp_path, fake_lambda, sshd, monkeypatch):  # noqa: F811
    token = "hf_SECRETsecret1234567890"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv(LAMBDA_KEY_ENV, fake_lambda.api_key)
    got = run_case(Case("ok", "succeeded"), tmp_path, fake_lambda, sshd)
    assert got["status"] == "succeeded"
    # Everything on the launcher's side: the store (and its WAL), runs/<id>/. Only the machine gets it.
    for path in tmp_path.rglob("*"):
        if path.is_file() and "remote" not in path.relative_to(tmp_path).parts:
            data = path.read_bytes()
            assert token.encode() not in data and fake_lambda.api_key.encode() not in data, path


def test_attach_takes_over_a_run_whose_launcher_was_killed(tmp_path, fake_lambda, sshd, monkeypatch,  # noqa: F811
                                                          capsys):
    """kill -9 mid-training, then `ftplan attach RUN`: it follows the job to the end, pulls, tears down."""
    from ftplan.planner.runs.store import Store

    proc, _, store = start_launch(tmp_path, fake_lambda, sshd, steps=40)
    try:
        _wait_for(store, "progress")
    finally:
        proc.kill()
        proc.wait()
    assert len(fake_lambda.live_instances()) == 1
    run_id = Store(store).list_runs()[0].id
    monkeypatch.setenv(LAMBDA_KEY_ENV, fake_lambda.api_key)
    try:
        rc, _, _ = ftplan(capsys, "attach", run_id, "--store", str(store), "--json")
    finally:
        stop_leftover_jobs(tmp_path / "remote")
    assert rc == 0
    run = Store(store).get_run(run_id)
    assert run.status == "succeeded"
    assert fake_lambda.live_instances() == []
    summary = json.loads((Path(run.artifacts_dir) / "out" / "summary.json").read_text())
    assert summary["steps"] == 40


# ---- cases that are not one launch (shared with the benchmark) ------------------------------------
def gc_list_down(tmp: Path, fake) -> dict[str, Any]:
    """A launcher died inside an ambiguous create (intent row, no id) and the provider's list call fails:
    gc must keep the row (no evidence) and the instance must stay findable; once the API is back, gc ends it."""
    from ftplan.planner.launch.project_config import load_project
    from ftplan.planner.launch.teardown import collect_garbage
    from ftplan.planner.runs.store import Store
    from ftplan.providers.base import InstanceRequest
    from ftplan.providers.lambda_cloud import LambdaProvider

    fake.reset()
    os.environ[LAMBDA_KEY_ENV] = fake.api_key
    store = Store(tmp / "runs.sqlite3")
    store.create_run("ft-ambiguous-0001", status="provisioning")
    store.update_run("ft-ambiguous-0001", launcher_pid=0)
    store.add_instance_intent("ft-ambiguous-0001", "lambda", price_hour=0.75, region="us-east-1")
    LambdaProvider(base_url=fake.url, poll_s=0.01).create(InstanceRequest(
        run_id="ft-ambiguous-0001", instance_type="gpu_1x_a10", gpu="A10", gpu_count=1, region="us-east-1",
        ssh_public_key=PUB_KEY, store_id=store.store_id))
    (tmp / "ftplan.toml").write_text(f'[providers.lambda]\nbase_url = "{fake.url}"\npoll_s = 0.01\n')
    cfg = load_project(tmp / "ftplan.toml")
    problems = []
    fake.fail_next("list", kind="500", times=100)
    report = collect_garbage(store, cfg, terminate=True)
    if not report["errors"]:
        problems.append("the failed list call was not reported")
    if [r.state for r in store.instances("ft-ambiguous-0001")] != ["intent"]:
        problems.append("gc closed the intent row without evidence")
    left_while_down = len(fake.live_instances())
    fake.faults.clear()
    collect_garbage(store, cfg, terminate=True)
    if fake.live_instances():
        problems.append("gc did not terminate the instance once the list API was back")
    if store.instances("ft-ambiguous-0001", open_only=True):
        problems.append("the row stayed open after the instance was terminated")
    return {"problems": problems, "live_instances": len(fake.live_instances()), "left_while_down": left_while_down}


def gc_second_store(tmp: Path, fake, sshd) -> dict[str, Any]:
    """A run launched from one store (a colleague, CI) is alive; `ftplan gc --yes` from ANOTHER store on
    the same account lists it as foreign and leaves it running."""
    from ftplan.planner.launch.project_config import load_project
    from ftplan.planner.launch.teardown import collect_garbage
    from ftplan.planner.runs.store import Store

    proc, cfg, store_path = start_launch(tmp, fake, sshd, steps=400)
    problems = []
    try:
        _wait_for(store_path, "progress")
        other = Store(tmp / "laptop-2.sqlite3")
        report = collect_garbage(other, load_project(cfg), terminate=True)
        if len(fake.live_instances()) != 1:
            problems.append("gc from the second store terminated the first store's live run")
        if [i["action"] for i in report["instances"]] != ["foreign"]:
            problems.append(f"actions {[i['action'] for i in report['instances']]} != ['foreign']")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
        stop_leftover_jobs(tmp / "remote")
    if fake.live_instances():
        problems.append("the first store's launcher did not tear down")
    return {"problems": problems, "live_instances": len(fake.live_instances())}


def local_secrets_removed(tmp: Path, sshd, *, fail: bool) -> dict[str, Any]:
    """`--provider local` (a machine ftplan does not own, so nothing terminates it): secrets.env with
    HF_TOKEN must be gone from the machine after the run, whether it succeeded or failed."""
    from ftplan.planner.commands.launch import build_plan
    from ftplan.planner.launch.launcher import Launcher
    from ftplan.planner.launch.project_config import load_project
    from ftplan.planner.runs.store import Store

    os.environ["HF_TOKEN"] = "hf_LOCALsecret1234567"
    try:
        job, fault = stub_files(tmp, {"fail_at": 2} if fail else {})
        remote = tmp / "remote"
        remote.mkdir(exist_ok=True)
        (tmp / "ftplan.toml").write_text(f"""
[job]
model = "tiny-llama"
dataset = "{EXAMPLE}"
checkpoint_every_steps = 2
[launch]
providers = ["local"]
budget_usd = 5
poll_interval_s = 0.1
pull_margin_min = 0
ssh_connect_timeout_s = 5
remote_python = "{sys.executable}"
[launch.bundle_extra_files]
"job/train.py" = "{job}"
"fault.json" = "{fault}"
[providers.local]
port = {sshd.port}
user = "{sshd.user}"
remote_root = "{remote}"
""")
        cfg = load_project(tmp / "ftplan.toml")
        cfg.launch.runs_dir = str(tmp / "runs")
        plan = build_plan(cfg, EXAMPLE, identity=sshd.client_key)
        t0 = time.monotonic()
        result = Launcher(Store(tmp / "runs.sqlite3"), plan).run()
        seconds = time.monotonic() - t0
    finally:
        os.environ.pop("HF_TOKEN", None)
        stop_leftover_jobs(tmp / "remote")
    problems = []
    if result.status != ("failed" if fail else "succeeded"):
        problems.append(f"status {result.status} ({result.error})")
    left = [str(p) for p in (tmp / "remote").rglob("secrets.env")]
    if left:
        problems.append(f"secrets.env left on the machine: {left}")
    return {"problems": problems, "status": result.status, "seconds": seconds}


PUB_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG2dHbM3nZtq9f5hG0wJtq1yV3N5YwS6gY0P3i1hMEZo ftplan"
