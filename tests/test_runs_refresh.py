"""`ftplan runs --refresh`: the live state of a detached run from the provider and the machine's watchdog, and
the run closed (cost from the provider's/watchdog's clock) once the machine is gone and the bucket holds the
artifacts. Real parts as in test_detach_laptop_free.py: the CLI in its own process, the fake Lambda API,
bootstrap + watchdog over a real sshd, moto's S3 server."""

from __future__ import annotations

import json
import subprocess
import time

from cli_helpers import FTPLAN_PROCESS
from fakes.lambda_api import fake_lambda  # noqa: F401  (fixture)
from test_detach_laptop_free import detached_launch, s3, wait_for  # noqa: F401  (s3 is a fixture)
from test_fault_matrix import stop_leftover_jobs


def _cli(tmp_path, env, *args):
    return subprocess.run([*FTPLAN_PROCESS, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)


def test_refresh_shows_the_detached_run_then_closes_it_when_the_machine_is_gone(
        tmp_path, fake_lambda, sshd, s3):  # noqa: F811
    try:
        launch, store, powered, env = detached_launch(tmp_path, fake_lambda, sshd, s3, {"steps": 12, "step_s": 0.3})
        assert launch.returncode == 0, launch.stderr[-2000:]
        run_id = json.loads(launch.stdout)["run_id"]
        wait_for(powered.exists, 120, "the watchdog's power-off command")

        # Without --refresh: the store only, no provider call.
        before = len(fake_lambda.requests)
        t0 = time.monotonic()
        plain = _cli(tmp_path, env, "runs", "--store", str(store), "--json")
        print(f"runs_plain_s: {time.monotonic() - t0:.2f}")
        assert plain.returncode == 0 and len(fake_lambda.requests) == before
        assert "live" not in json.loads(plain.stdout)[0]

        # The machine is still up (Lambda keeps a machine shut down from inside): live state over SSH.
        t0 = time.monotonic()
        up = _cli(tmp_path, env, "runs", "--refresh", "--store", str(store), "--json")
        print(f"refresh_up_s: {time.monotonic() - t0:.2f}")
        assert up.returncode == 0, up.stderr[-2000:]
        (row,) = json.loads(up.stdout)
        live = row["live"]
        assert live["machine"] == "up" and live["step"] == 12 and live["total_steps"] == 12, live
        assert live["watchdog"].startswith("powering_off") and "uploaded" in live["watchdog"], live
        assert live["spent_usd"] > 0 and not live["closed"] and row["status"] == "training"
        assert "gc --yes" in live["note"]   # Lambda bills a machine shut down from inside until it is terminated
        text = _cli(tmp_path, env, "runs", "--refresh", "--store", str(store))
        assert run_id in text.stdout and "machine up" in text.stdout and "step 12/12" in text.stdout, text.stdout

        # The provider ends the machine (as EC2 does on an instance-initiated shutdown); the user comes back later.
        (inst,) = fake_lambda.live_instances()
        inst["status"] = "terminated"
        time.sleep(1.5)
        t0 = time.monotonic()
        gone = _cli(tmp_path, env, "runs", "--refresh", "--store", str(store), "--json")
        print(f"refresh_gone_s: {time.monotonic() - t0:.2f}")
        assert gone.returncode == 0, gone.stderr[-2000:]
        (row,) = json.loads(gone.stdout)
        assert row["live"]["machine"] == "terminated" and row["live"]["closed"], row
        assert row["status"] == "succeeded"
        from ftplan.planner.runs.store import Store

        s = Store(store)
        assert s.instances(run_id, open_only=True) == []
        (cost,) = s.costs(run_id)
        power_off = max(a["at"] for e in s.events(run_id, "watchdog")
                        for a in e.json("data_json")["actions"] if a["action"] == "power_off")
        # billed to the watchdog's power-off, not to when the user came back
        assert cost.clock == "watchdog" and cost.ended_at == power_off
        run = s.get_run(run_id)
        assert 0 < run.actual_usd <= run.budget_usd
        gc = _cli(tmp_path, env, "gc", "--store", str(store), "--json")
        assert json.loads(gc.stdout)["instances"] == []
    finally:
        stop_leftover_jobs(tmp_path / "remote")


def test_attach_after_a_finished_detached_run_lost_its_machine_closes_it_without_a_new_machine(
        tmp_path, fake_lambda, sshd, s3):  # noqa: F811
    """The job finished and uploaded; the machine is gone by the time the user attaches: nothing is rerun."""
    try:
        launch, store, powered, env = detached_launch(tmp_path, fake_lambda, sshd, s3, {"steps": 8, "step_s": 0.3})
        assert launch.returncode == 0, launch.stderr[-2000:]
        run_id = json.loads(launch.stdout)["run_id"]
        wait_for(powered.exists, 120, "the watchdog's power-off command")
        (inst,) = fake_lambda.live_instances()
        inst["status"] = "terminated"
        attach = _cli(tmp_path, env, "attach", run_id, "--store", str(store), "--json")
        assert attach.returncode == 0, attach.stdout[-2000:] + attach.stderr[-2000:]
        assert json.loads(attach.stdout)["status"] == "succeeded"
        assert len(fake_lambda.calls("POST", "/instance-operations/launch")) == 1   # no second machine
        from ftplan.planner.runs.store import Store

        assert Store(store).instances(run_id, open_only=True) == []
    finally:
        stop_leftover_jobs(tmp_path / "remote")
