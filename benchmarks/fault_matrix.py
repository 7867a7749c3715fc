"""The launcher's fault matrix as a table: every case of tests/test_fault_matrix.py, plus kill -9 + gc.

    .venv/bin/python benchmarks/fault_matrix.py

Starts its own sshd on 127.0.0.1, the fake Lambda API server, moto's EC2 server and the fake Compute server
(the first-contact cases of tests/test_first_contact_matrix.py and the adapter cases of
tests/test_first_contact_adapters.py run here too); prints one line per case
(case, outcome, instances left, seconds, teardown seconds) and ends with `key: value` lines: `cases: N`,
`leaked_instances: 0` when every path ended with the instance terminated, and `max_teardown_s` (from the
teardown phase's start to the run's end, measured; `max_teardown_unreachable_s` for the cases whose machine
stopped answering), and `idle_after_finish_s` (max over the detached cases: the job's end to the watchdog's
power-off with no launcher alive). The multi-node cases (tests/test_multinode_launch_faults.py) run on two
sshd's of their own on 127.0.0.2/.3; the cloud multi-node cases are tests/test_multinode_cloud_launch.py.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_detach_faults as df  # noqa: E402
import test_fault_matrix as fm  # noqa: E402
import test_first_contact_adapters as fa  # noqa: E402
import test_first_contact_matrix as fc  # noqa: E402
import test_multinode_launch_faults as mf  # noqa: E402
from fakes.lambda_api import shared_fake_lambda  # noqa: E402
from sshd_fixture import SSHD  # noqa: E402

_STOP: list = []


def _adapter_cases(work: Path) -> list:
    """moto's EC2 and the fake Compute, set up as the tests' fixtures do (planted credentials, ADC)."""
    import json

    import pytest
    from fakes.aws_moto import MotoEC2, isolate_aws_env
    from fakes.gcp_compute import FakeCompute

    mp = pytest.MonkeyPatch()
    _STOP.append(mp.undo)
    (work / "aws-home").mkdir()
    isolate_aws_env(mp, work / "aws-home", "AKIABENCH00000000001", "planted/bench+secret+000000000000000000")
    moto = MotoEC2().start()
    _STOP.append(moto.stop)
    import boto3

    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto.url)
    adc = work / "adc.json"
    adc.write_text(json.dumps({"type": "authorized_user", "client_id": "ftplan-bench.apps.googleusercontent.com",
                               "client_secret": "planted", "refresh_token": "planted",
                               "token": "ya29.planted-bench-token", "expiry": "2099-01-01T00:00:00Z"}))
    mp.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    mp.setenv("GOOGLE_CLOUD_PROJECT", fa.PROJECT)

    def aws(fn):
        def run(tmp, sshd):
            moto.reset()
            return fn(tmp, moto, ec2, sshd)
        return run

    def gcp(tmp, sshd):
        fake = FakeCompute()
        fake.start()
        try:
            return fa.gcp_reservation_only_next(tmp, fake, sshd)
        finally:
            fake.stop()

    return [("aws: EC2 hides the new instance (2 calls) and group (1)", aws(fa.aws_hidden_instance)),
            ("aws: type not offered here -> next offer", aws(fa.aws_not_offered_next)),
            ("aws: billing refusal stops, names the page", aws(fa.aws_billing_refused)),
            ("gcp: on-demand A3 High 1g refused -> next offer", gcp),
            ("local: nothing listening", fa.local_nothing_listening)]


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="ftplan-fault-matrix-"))
    sshd = SSHD(work / "sshd").start()
    fake = shared_fake_lambda()
    os.environ[fm.LAMBDA_KEY_ENV] = fake.api_key
    rows, leaked, failures = [], 0, 0
    idle_after_finish: list[float] = []
    teardown_s: list[float] = []
    unreachable_s: list[float] = []
    t_all = time.monotonic()
    try:
        for i, case in enumerate(fm.cases() + fc.first_contact_cases()):
            tmp = work / f"case{i}"
            tmp.mkdir()
            got = fm.run_case(case, tmp, fake, sshd)
            problems = fm.check(case, got)
            leaked += got["live_instances"]
            failures += bool(problems)
            teardown_s.append(got["teardown_s"])
            if case.cut_at:
                unreachable_s.append(got["teardown_s"])
            rows.append((case.name, got["status"], got["live_instances"], got["seconds"], got["teardown_s"],
                         "ok" if not problems else "; ".join(problems)))
        # Each returns {"problems", "status", "live_instances"}; the multi-node ones (issue 13) run on two sshd's
        # of their own on 127.0.0.2/.3 (and a provider with placements for the all-or-nothing case).
        for name, fn in (("gc with the list API down", lambda t: fm.gc_list_down(t, fake)),
                         ("gc from a second store", lambda t: fm.gc_second_store(t, fake, sshd)),
                         ("local: secrets.env removed (succeeded)", lambda t: fm.local_secrets_removed(t, sshd, fail=False)),
                         ("local: secrets.env removed (job fails)", lambda t: fm.local_secrets_removed(t, sshd, fail=True)),
                         ("multi-node: one host unreachable at start", mf.unreachable_host_at_start),
                         ("multi-node: node 1 killed mid-training", mf.node_killed_mid_training),
                         ("multi-node: Ctrl-C while node 1 connects", mf.ctrl_c_while_second_node_connects),
                         ("multi-node: 2nd create out of capacity -> next offer", mf.capacity_on_second_create)):
            tmp = Path(tempfile.mkdtemp(dir=work, prefix="case-"))
            t0 = time.monotonic()
            try:
                got = fn(tmp)
            except Exception as exc:  # noqa: BLE001 - a crashed check is a failed check
                got = {"problems": [f"{type(exc).__name__}: {exc}"]}
            left = got.get("live_instances", 0)
            leaked += left
            failures += bool(got["problems"])
            rows.append((name, got.get("status", "-"), left, time.monotonic() - t0, 0.0,
                         "ok" if not got["problems"] else "; ".join(got["problems"])))
        for name, fn in _adapter_cases(work):
            tmp = work / name.split(":")[0].replace(" ", "-")
            tmp.mkdir(exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=tmp))
            try:
                got = fn(tmp, sshd)
                problems = fa.verdict(got)
            except Exception as exc:  # noqa: BLE001 - a crashed check is a failed check
                got, problems = {"status": "-", "live_instances": 0, "seconds": 0.0}, [f"{type(exc).__name__}: {exc}"]
            leaked += got["live_instances"]
            failures += bool(problems)
            rows.append((name, got["status"], got["live_instances"], got["seconds"], 0.0,
                         "ok" if not problems else "; ".join(problems)))
        # Issue 14: no launcher alive at the end; the machine's watchdog finishes the run on its own.
        bucket = df.S3Bucket().start(work)
        _STOP.append(bucket.stop)
        for case in df.detached_cases():
            tmp = Path(tempfile.mkdtemp(dir=work, prefix="detached-"))
            got = df.run_detached_case(case, tmp, fake, sshd, bucket)
            problems = df.check_detached(case, got)
            leaked += got.get("live_instances", 0)
            failures += bool(problems)
            if got.get("idle_after_finish_s") is not None:
                idle_after_finish.append(got["idle_after_finish_s"])
            rows.append((f"detached: {case.name}", got.get("status", "-"), got.get("live_instances", 0),
                         got["seconds"], 0.0, "ok" if not problems else "; ".join(problems)))
        tmp = work / "kill9"
        tmp.mkdir()
        t0 = time.monotonic()
        k = fm.kill9_then_gc(tmp, fake, sshd)
        ok = k["live_before_gc"] == 1 and k["live_after_gc"] == 0 and k["run_status"] == "failed"
        leaked += k["live_after_gc"]
        failures += not ok
        rows.append(("kill -9 launcher, then ftplan gc --yes", f"gc: {k['run_status']}", k["live_after_gc"],
                     time.monotonic() - t0, 0.0, "ok" if ok else f"unexpected: {k}"))
    finally:
        sshd.stop()
        for stop in _STOP:
            stop()
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  {'outcome':<22} {'left':>4} {'seconds':>8} {'teardown':>8}  check")
    for name, status, left, secs, down, verdict in rows:
        print(f"{name:<{width}}  {status:<22} {left:>4} {secs:>8.2f} {down:>8.2f}  {verdict}")
    print(f"total_seconds: {time.monotonic() - t_all:.1f}")
    print(f"failed_checks: {failures}")
    print(f"cases: {len(rows)}")
    print(f"leaked_instances: {leaked}")
    print(f"max_teardown_s: {max(teardown_s, default=0.0):.1f}")
    print(f"max_teardown_unreachable_s: {max(unreachable_s, default=0.0):.1f}")
    print(f"idle_after_finish_s: {max(idle_after_finish, default=float('nan')):.1f}  "
          f"(max over the detached cases; grace {df.GRACE_MIN * 60:.0f} s)")
    return 0 if failures == 0 and leaked == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
