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
        print("RuntimeError: injected failure at step %d" % step, flush=True)
        dump("summary.json", {"status": "failed", "error": "RuntimeError: injected failure at step %d" % step, "steps": step - 1, "losses": losses})
        sys.exit(1)
    losses.append([step, 5.0 / step])
    if step % cfg["checkpoint_every_steps"] == 0:
        ckpt(step)
    dump("heartbeat.json", {"status": "training", "step": step, "total_steps": total, "loss": 5.0 / step,
                            "tokens_seen": 1000 * step, "tokens_per_s": 1000 / step_s, "elapsed_s": time.time() - t0})
    if os.path.exists(os.path.join(run, "STOP")):
        ckpt(step); status = "stopped"; break
dump("summary.json", {"status": status, "steps": step, "total_steps": total, "losses": losses,
                      "tokens_per_s": 1000 / step_s, "peak_mem_allocated_gib": 0.01, "resumed_from_step": start or None})
print("stub job %s at step %d (resumed from %d)" % (status, step, start), flush=True)
'''

LAMBDA_KEY_ENV = "LAMBDA_API_KEY"
PHASES = ("provisioning", "waiting", "connecting", "uploading", "training", "pulling")


@dataclass
class Case:
    name: str
    expect: str                                   # final run status
    fault: dict[str, Any] = field(default_factory=dict)   # stub job behaviour
    arm: Any = None                               # callable(fake) before launch
    signal_at: tuple[str, int] | None = None      # (phase, signal) delivered when the phase starts
    second_signal: bool = False                   # another SIGINT during teardown
    during_training: Any = None                   # callable(fake) once training reports a step
    project: dict[str, Any] = field(default_factory=dict)  # overrides of the project file
    expect_error: str = ""                        # substring of the run's error
    expect_artifacts: tuple[str, ...] = ()        # files under runs/<id>/ that must exist afterwards


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
        Case("pull: unsafe archive", "failed", fault={"evil_symlink": True, "steps": 6, "step_s": 0.2},
             expect_error="pulling", expect_artifacts=("out/checkpoints",)),
    ]
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


class _SignalDisplay:
    """Delivers a real signal to this process when the launcher enters a phase (and optionally in teardown)."""

    def __init__(self, at: tuple[str, int] | None, second: bool, during_training, fake):
        self.at, self.second, self.during_training, self.fake = at, second, during_training, fake
        self.fired = False
        self.warnings: list[str] = []

    def phase(self, name, message=""):
        if self.at and not self.fired and name == self.at[0]:
            if name == "training":
                return  # wait for the first progress line, so the job has really started
            self.fired = True
            os.kill(os.getpid(), self.at[1])
        if name == "teardown" and self.second and self.fired:
            os.kill(os.getpid(), signal.SIGINT)

    def progress(self, progress, **kw):
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
price_hour = 0.75
[[launch.offers]]
provider = "lambda"
instance_type = "gpu_1x_a100"
gpu = "A100"
region = "us-east-1"
price_hour = 1.29
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
    if case.arm:
        case.arm(fake)
    job, fault = stub_files(tmp, case.fault)
    cfg = load_project(write_project(tmp, fake, sshd, job, fault, **case.project))
    cfg.launch.runs_dir = str(tmp / "runs")
    plan = build_plan(cfg, EXAMPLE, identity=sshd.client_key)
    store = Store(tmp / "runs.sqlite3")
    display = _SignalDisplay(case.signal_at, case.second_signal, case.during_training, fake)
    t0 = time.monotonic()
    result = Launcher(store, plan, display=display).run()
    stop_leftover_jobs(tmp / "remote")
    run = store.get_run(result.run_id)
    run_dir = Path(result.artifacts_dir)
    return {
        "case": case.name, "status": run.status, "error": run.error or "", "seconds": time.monotonic() - t0,
        "live_instances": len(fake.live_instances()), "open_rows": len(store.instances(result.run_id, open_only=True)),
        "artifacts_ok": all((run_dir / a).exists() for a in case.expect_artifacts),
        "teardown_warned": any("tearing down" in w for w in display.warnings), "run_dir": run_dir,
    }


def check(case: Case, got: dict[str, Any]) -> list[str]:
    problems = []
    if got["status"] != case.expect:
        problems.append(f"status {got['status']} != {case.expect} ({got['error']})")
    if case.expect_error and case.expect_error not in got["error"]:
        problems.append(f"error {got['error']!r} lacks {case.expect_error!r}")
    if got["live_instances"]:
        problems.append(f"{got['live_instances']} instance(s) left running")
    if got["open_rows"]:
        problems.append(f"{got['open_rows']} instance row(s) not confirmed terminated")
    if not got["artifacts_ok"]:
        problems.append(f"missing artifacts {case.expect_artifacts}")
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
