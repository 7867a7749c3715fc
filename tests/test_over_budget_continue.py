"""`--on-over-budget continue`: the guard records the projected overshoot once, as an event, and the run goes
on to `succeeded`; the on-instance deadline stays the hard cap. The same setup with `stop` is stopped at a
checkpoint, which shows the projection really crossed the budget.

Real parts: `ftplan launch` (click, in process), the `local` provider over a real sshd on 127.0.0.1, the real
bundle and runner; the job is the fault-matrix stand-in (5 steps/s, no torch). At $3600/h
($1 per second) against a $1 budget, the first measured step projects past the budget.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_fault_matrix import stub_files
from test_launch_local_e2e import local_project

from ftplan.planner.cli import cli
from ftplan.planner.runs.store import Store

pytestmark = pytest.mark.slow
STEPS = 20


def _launch(tmp_path, sshd, policy: str) -> tuple[int, dict, Store]:
    job, fault = stub_files(tmp_path, {"steps": STEPS, "step_s": 0.2})
    cfg = local_project(tmp_path, sshd, price_hour=3600.0, checkpoint_every=4, extra_launch=(
        f'[launch.bundle_extra_files]\n"job/train.py" = "{job}"\n"fault.json" = "{fault}"\n'))
    store = tmp_path / "runs.sqlite3"
    res = CliRunner().invoke(cli, [
        "launch", "--config", str(cfg), "--identity", str(sshd.client_key), "--yes", "--json",
        "--on-over-budget", policy, "--store", str(store), "--runs-dir", str(tmp_path / "runs")],
        catch_exceptions=False)
    return res.exit_code, json.loads(res.stdout), Store(store)


def test_continue_records_the_overshoot_and_finishes(tmp_path, sshd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, res, store = _launch(tmp_path, sshd, "continue")
    assert (rc, res["status"]) == (0, "succeeded"), res
    [event] = store.events(res["run_id"], "over_budget")              # said once, not every poll
    data = event.json("data_json")
    assert data["action"] == "continue" and data["projected_usd"] > data["budget_usd"] == 1.0
    assert "continuing" in event.message
    summary = json.loads((tmp_path / "runs" / res["run_id"] / "out" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps"] == STEPS   # the job was never asked to stop
    assert res["actual"]["usd"] > 1.0                                    # the overshoot was allowed, and billed
    # The hard cap still went to the machine: a deadline from what was left of the budget (floor 60 s).
    [started] = store.events(res["run_id"], "job_started")
    assert started.json("data_json")["deadline_s"] == 60
    assert all(i["state"] == "terminated" for i in res["instances"])


def test_stop_in_the_same_setup_stops_at_a_checkpoint(tmp_path, sshd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, res, store = _launch(tmp_path, sshd, "stop")
    assert (rc, res["status"]) == (3, "stopped_over_budget"), res
    [event] = store.events(res["run_id"], "over_budget")
    assert event.json("data_json")["action"] == "stop"
    summary = json.loads((tmp_path / "runs" / res["run_id"] / "out" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] < STEPS
