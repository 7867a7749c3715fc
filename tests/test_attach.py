"""`ftplan attach RUN` while the run's launcher is alive: a read-only follow.

Real parts: `ftplan launch` in its own process (Lambda adapter -> fake Lambda API, real sshd on 127.0.0.1,
real bundle and runner, the fault-matrix stand-in job); `ftplan attach` in this process through click. The
follower must show the progress, end when the run ends, and neither take the run over nor tear anything down:
the launcher that owns the run does its own teardown. (Taking over after kill -9 is in test_fault_matrix.py.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import FTPLAN_PROCESS, error_line
from click.testing import CliRunner
from fakes.lambda_api import fake_lambda  # noqa: F401  (fixture)
from test_fault_matrix import stop_leftover_jobs, stub_files, write_project

from ftplan.planner.cli import cli
from ftplan.planner.runs.store import Store

ROOT = Path(__file__).resolve().parent.parent
STEPS = 25


def _wait_for_event(store: Store, kind: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in store.list_runs() if store.path.exists() else []:
            if store.events(run.id, kind):
                return run.id
        time.sleep(0.1)
    raise AssertionError(f"no '{kind}' event within {timeout_s}s")


@pytest.mark.slow
def test_attach_follows_a_live_launcher_without_taking_over(tmp_path, fake_lambda, sshd):  # noqa: F811
    job, fault = stub_files(tmp_path, {"steps": STEPS, "step_s": 0.1})
    cfg = write_project(tmp_path, fake_lambda, sshd, job, fault)
    store_path = tmp_path / "runs.sqlite3"
    env = {**os.environ, "LAMBDA_API_KEY": fake_lambda.api_key, "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen([*FTPLAN_PROCESS, "launch", "--config", str(cfg), "--identity", str(sshd.client_key), "--yes",
                                 "--json", "--store", str(store_path), "--runs-dir", str(tmp_path / "runs")],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        store = Store(store_path)
        run_id = _wait_for_event(store, "progress")
        follow = CliRunner().invoke(cli, ["attach", run_id, "--store", str(store_path)], catch_exceptions=False)
        status_when_follow_ended = store.get_run(run_id).status
        out, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        stop_leftover_jobs(tmp_path / "remote")

    # The follower: progress lines up to the last step, the outcome, and only once the run had ended.
    assert follow.exit_code == 0, follow.output
    assert f"run {run_id}: succeeded" in follow.stdout
    shown = [int(m) for m in re.findall(rf"^\[training\] step (\d+)/{STEPS}", follow.stderr, re.MULTILINE)]
    recorded = [e.json("data_json")["step"] for e in store.events(run_id, "progress")]
    assert shown == recorded and len(shown) >= 2 and shown[-1] > shown[0]   # every update the launcher made
    assert "[teardown]" in follow.stderr
    assert status_when_follow_ended == "succeeded"
    # The owner: finished the run itself and tore down; nobody took it over.
    assert launcher.returncode == 0, err[-2000:]
    assert json.loads(out)["status"] == "succeeded"
    run = store.get_run(run_id)
    assert run.launcher_pid == launcher.pid
    assert store.events(run_id, "attached") == []
    assert len(store.events(run_id, "instance_terminated")) == 1
    assert fake_lambda.live_instances() == []


def test_attach_to_a_finished_run_is_a_one_line_error(tmp_path, capsys):
    store = Store(tmp_path / "runs.sqlite3")
    store.create_run("ft-done-0001", status="training")
    store.finish_run("ft-done-0001", "succeeded")
    line = error_line(capsys, "attach", "ft-done-0001", "--store", str(tmp_path / "runs.sqlite3"))
    assert line == "error: run ft-done-0001 is already succeeded; see 'ftplan report ft-done-0001'"


def test_attach_to_an_unknown_run_is_a_one_line_error(tmp_path, capsys):
    line = error_line(capsys, "attach", "ft-nope-0001", "--store", str(tmp_path / "runs.sqlite3"))
    assert line.startswith("error: no run 'ft-nope-0001'") and "ftplan runs" in line
