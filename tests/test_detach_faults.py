"""Detached fault cases (issue 14): no launcher is alive while the run ends, and the machine guards itself.

Shaped like tests/test_fault_matrix.py so `benchmarks/fault_matrix.py` can run them as rows: `detached_cases()`,
`run_detached_case(case, tmp, fake, sshd, bucket)` and `check_detached(case, got)`. Real parts throughout: the CLI
in its own processes (launch, then `runs --refresh` and `gc` as a user runs them), the fake Lambda API, the real
bundle, bootstrap and watchdog over a real sshd, moto's S3 server as the bucket, and a fake instance-metadata
server speaking IMDSv2 for the spot notice. The stand-in job of the fault matrix keeps each case short.

The watchdog's power-off is the configured observable command (`touch powered_off`); when it runs, the harness
ends the instance at the fake provider, as EC2 does for an instance-initiated shutdown. Then `ftplan runs
--refresh` closes the run from the provider's answer and the watchdog's record, with no launcher ever back.

Each case reports `idle_after_finish_s` (the watchdog's own record: training ended -> power-off command) and the
recorded spend against the budget; the issue's bar is idle <= grace + 60 s and spend <= budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import FTPLAN_PROCESS
from test_fault_matrix import LAMBDA_KEY_ENV, _wait_for, stop_leftover_jobs, stub_files, write_project

ROOT = Path(__file__).resolve().parent.parent
GRACE_MIN = 0.05   # 3 s of waiting for a pull after training ended


@dataclass
class DetachedCase:
    name: str
    fault: dict[str, Any]                 # the stand-in job's behaviour
    budget: float = 5.0
    kill9: bool = False                   # launch attached, then kill -9 the launcher once training reports
    spot_notice: bool = False             # the metadata server announces an interruption once training runs
    stop_reason: str = ""                 # substring of the watchdog's stop reason ("" = no stop expected)
    in_bucket: str = "/final/MANIFEST.sha256.json"   # a key (suffix pattern) the bucket must hold afterwards
    job_status: str = "succeeded"         # summary.json's status as the run's record ends
    closed: bool = True                   # refresh closes the run (a reclaimed one waits for `attach` to resume)


def detached_cases() -> list[DetachedCase]:
    return [
        DetachedCase("kill -9 after training starts; the job finishes", {"steps": 16, "step_s": 0.3}, kill9=True),
        DetachedCase("budget hit with no launcher: stop at a checkpoint", {"steps": 1000, "step_s": 0.2},
                     budget=0.02, stop_reason="budget", in_bucket="/final/checkpoints/checkpoint-",
                     job_status="stopped"),
        DetachedCase("spot notice with no launcher: checkpoint uploaded", {"steps": 400, "step_s": 0.2},
                     spot_notice=True, stop_reason="spot", in_bucket="/checkpoints/checkpoint-",
                     job_status="stopped", closed=False),
    ]


# ---- real servers that are not fixtures (the benchmark runs outside pytest) ------------------------------
class S3Bucket:
    """moto's S3 server with bucket `runs`; `laptop` is the laptop's environment for it, `scoped` the variables
    that hold the scoped key the project names in bucket_env (what reaches the machine's secrets.env)."""

    def start(self, tmp: Path) -> S3Bucket:
        import boto3
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.laptop = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_CONFIG_FILE": str(tmp / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none")}
        self.scoped = {"RUN_BUCKET_URL": self.url, "RUN_BUCKET_KEY_ID": "testing", "RUN_BUCKET_SECRET": "testing",
                       "RUN_BUCKET_REGION": "us-east-1"}
        self.client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")
        self.client.create_bucket(Bucket="runs")
        return self

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        self.server.stop()


class IMDSv2:
    """AWS instance metadata (IMDSv2): PUT /latest/api/token gives a token; GET .../spot/instance-action with it
    answers 404 until `notice()` arms it, then the documented JSON {"action", "time"}."""

    def start(self) -> IMDSv2:
        self.armed = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # noqa: D102 - quiet
                pass

            def do_PUT(self):  # noqa: N802
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self._send(200, b"tok-123")
                else:
                    self._send(400, b"")

            def do_GET(self):  # noqa: N802
                if self.headers.get("X-aws-ec2-metadata-token") != "tok-123":
                    self._send(401, b"")
                elif self.path == "/latest/meta-data/spot/instance-action" and outer.armed:
                    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
                    self._send(200, json.dumps({"action": "terminate", "time": at}).encode())
                else:
                    self._send(404, b"")

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def notice(self) -> None:
        self.armed = True

    def stop(self) -> None:
        self.server.shutdown()


# ---- one case --------------------------------------------------------------------------------------------
def _project(tmp: Path, fake, sshd, case: DetachedCase, powered: Path, imds: IMDSv2 | None) -> Path:
    job, fault = stub_files(tmp, case.fault)
    cfg = write_project(tmp, fake, sshd, job, fault)
    extra = ""
    if imds is not None:   # the machine's watchdog asks this metadata server (a Lambda offer names none itself)
        extra = ', FTPLAN_WATCHDOG_METADATA = "IMDS_KIND", FTPLAN_WATCHDOG_METADATA_URL = "IMDS_URL"'
    bucket_env = ('bucket_env = { AWS_ENDPOINT_URL = "RUN_BUCKET_URL", AWS_ACCESS_KEY_ID = "RUN_BUCKET_KEY_ID", '
                  'AWS_SECRET_ACCESS_KEY = "RUN_BUCKET_SECRET", AWS_DEFAULT_REGION = "RUN_BUCKET_REGION"' + extra + " }")
    text = cfg.read_text().replace("budget_usd = 5\n", f"budget_usd = {case.budget}\n", 1)
    cfg.write_text(text.replace("[launch]\n", f'[launch]\npoweroff_cmd = "touch {powered}"\n{bucket_env}\n', 1))
    return cfg


def _wait(pred, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def run_detached_case(case: DetachedCase, tmp: Path, fake, sshd, bucket: S3Bucket) -> dict[str, Any]:
    """Launch, lose the launcher, let the machine end the run on its own, then refresh as the user would."""
    fake.reset()
    fake.ssh_host = "127.0.0.1"
    imds = IMDSv2().start() if case.spot_notice else None
    powered = tmp / "powered_off"
    cfg = _project(tmp, fake, sshd, case, powered, imds)
    store = tmp / "runs.sqlite3"
    env = {**os.environ, LAMBDA_KEY_ENV: fake.api_key, "PYTHONPATH": str(ROOT), **bucket.laptop, **bucket.scoped,
           **({"IMDS_KIND": "aws", "IMDS_URL": imds.url} if imds else {})}
    args = [*FTPLAN_PROCESS, "launch", "--config", str(cfg), "--identity", str(sshd.client_key), "--yes", "--json",
            "--bucket", "s3://runs/ftplan", "--grace-minutes", str(GRACE_MIN), "--store", str(store),
            "--runs-dir", str(tmp / "runs")]
    t0 = time.monotonic()
    got: dict[str, Any] = {"case": case.name, "problems": []}
    try:
        if case.kill9:
            proc = subprocess.Popen(args, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                _wait_for(store, "progress", 120)
            finally:
                proc.kill()   # SIGKILL: no handler, no teardown, never restarted
                proc.communicate()
        else:
            launch = subprocess.run([*args, "--detach"], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
            if launch.returncode != 0:
                raise AssertionError(f"launch failed: {launch.stderr[-1500:]}")
        from ftplan.planner.runs.store import Store

        run_id = Store(store).list_runs()[0].id
        remote = tmp / "remote" / run_id
        if imds is not None:
            _wait(lambda: (remote / "out" / "heartbeat.json").exists(), 60, "training")
            imds.notice()
        _wait(powered.exists, 240, "the watchdog's power-off command")
        for inst in fake.live_instances():   # the provider ends the machine on its shutdown (as EC2 does)
            inst["status"] = "terminated"
        status = json.loads((remote / "watchdog.json").read_text())
        refresh = subprocess.run([*FTPLAN_PROCESS, "runs", "--refresh", "--json", "--store", str(store)], cwd=tmp,
                                 env=env, capture_output=True, text=True, timeout=180)
        got["refresh"] = json.loads(refresh.stdout)[0] if refresh.returncode == 0 else {"error": refresh.stderr[-800:]}
        gc = subprocess.run([*FTPLAN_PROCESS, "gc", "--yes", "--json", "--store", str(store)], cwd=tmp, env=env,
                            capture_output=True, text=True, timeout=180)
        got["gc_instances"] = json.loads(gc.stdout)["instances"] if gc.returncode == 0 else [{"error": gc.stderr}]
        s = Store(store)
        run = s.get_run(run_id)
        at = {a["action"]: a["at"] for a in status["actions"]}
        got.update(
            run_id=run_id, status=run.status, actual_usd=run.actual_usd, budget_usd=run.budget_usd,
            watchdog=status, keys=bucket.keys(f"ftplan/{run_id}/"), live_instances=len(fake.live_instances()),
            open_rows=len(s.instances(run_id, open_only=True)), clocks=[c.clock for c in s.costs(run_id)],
            idle_after_finish_s=(at["power_off"] - at["training_ended"]) if "training_ended" in at and
            "power_off" in at else None,
            summary=_summary(bucket, run_id))
    except Exception as exc:  # noqa: BLE001 - a crashed case is a failed case, with what it got so far
        got["problems"].append(f"{type(exc).__name__}: {exc}")
        got.setdefault("live_instances", len(fake.live_instances()))
    finally:
        got["seconds"] = time.monotonic() - t0
        if imds is not None:
            imds.stop()
        stop_leftover_jobs(tmp / "remote")
    return got


def _summary(bucket: S3Bucket, run_id: str) -> dict | None:
    try:
        body = bucket.client.get_object(Bucket="runs", Key=f"ftplan/{run_id}/final/summary.json")["Body"].read()
        return json.loads(body)
    except Exception:  # noqa: BLE001
        return None


def check_detached(case: DetachedCase, got: dict[str, Any]) -> list[str]:
    """What a user would check afterwards: nothing bills, the money stayed within the budget, the watchdog acted
    within the grace period, the artifacts (or the checkpoint) are in the bucket, the run is closed."""
    problems = list(got.get("problems", []))
    if problems:
        return problems
    if got["live_instances"] or got["open_rows"]:
        problems.append(f"{got['live_instances']} instance(s) live, {got['open_rows']} row(s) open")
    if case.closed and got["status"] not in ("succeeded", "stopped_over_budget"):
        problems.append(f"run is {got['status']} after refresh ({got['refresh']})")
    if not case.closed and "attach" not in str((got["refresh"].get("live") or {}).get("note")):
        problems.append(f"a reclaimed run should wait for 'ftplan attach' to resume: {got['refresh']}")
    if got["actual_usd"] is None or got["actual_usd"] > got["budget_usd"]:
        problems.append(f"recorded spend {got['actual_usd']} over the budget {got['budget_usd']}")
    if "launcher" in got["clocks"]:
        problems.append(f"billed from the launcher's clock: {got['clocks']}")
    idle = got["idle_after_finish_s"]
    if idle is None or idle > GRACE_MIN * 60 + 60:
        problems.append(f"idle_after_finish_s {idle} over grace + 60 s")
    if not any(case.in_bucket in k for k in got["keys"]):
        problems.append(f"no {case.in_bucket} in the bucket")
    stops = [a.get("reason", "") for a in got["watchdog"]["actions"] if a["action"] == "stop_requested"]
    if case.stop_reason and not any(case.stop_reason in r for r in stops):
        problems.append(f"no stop for {case.stop_reason!r}: {stops}")
    if not case.stop_reason and stops:
        problems.append(f"unexpected stop: {stops}")
    if case.spot_notice:
        ckpts = [a.get("what", "") for a in got["watchdog"]["actions"] if a["action"] == "uploaded"
                 and str(a.get("what", "")).startswith("checkpoints/")]
        last = got["watchdog"].get("step")
        if not ckpts or (isinstance(last, (int, float)) and ckpts[-1] != f"checkpoints/checkpoint-{int(last)}"):
            problems.append(f"the checkpoint made at the notice (step {last}) was not uploaded: {ckpts}")
    if (got["summary"] or {}).get("status") != case.job_status:
        problems.append(f"job status {(got['summary'] or {}).get('status')} != {case.job_status}")
    return problems


# ---- pytest ------------------------------------------------------------------------------------------------
from fakes.lambda_api import fake_lambda  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.slow


@pytest.fixture()
def bucket(tmp_path):
    b = S3Bucket().start(tmp_path)
    yield b
    b.stop()


@pytest.mark.parametrize("case", detached_cases(), ids=lambda c: c.name)
def test_detached_fault_case(case, tmp_path, fake_lambda, sshd, bucket):  # noqa: F811
    got = run_detached_case(case, tmp_path, fake_lambda, sshd, bucket)
    print(f"idle_after_finish_s: {got.get('idle_after_finish_s')}  spend: {got.get('actual_usd')} "
          f"of {got.get('budget_usd')}")
    assert check_detached(case, got) == []


