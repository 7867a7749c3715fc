"""The budget guard: projection arithmetic, the on-instance deadline, and a real (deliberately slowed)
QLoRA job on tiny-llama that is stopped at a checkpoint, pulled back and torn down before it overshoots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import ftplan
from test_launch_local_e2e import local_project

from ftplan.planner.launch.budget import BudgetGuard, Progress


def test_projection_uses_measured_throughput_not_load_time():
    guard = BudgetGuard(budget_usd=10.0, pull_margin_s=0)
    guard.start_billing(1, price_hour=36.0, since=1000.0)          # $0.01 per second
    # 10 of 100 steps done, 500 tokens/step at 50 tokens/s -> 10 s/step -> 900 s left; 100 s spent.
    p = Progress(step=10, total_steps=100, elapsed_s=400.0, tokens_seen=5000, tokens_per_s=50.0)
    assert p.remaining_s() == pytest.approx(900.0)
    assert guard.spent_usd(now=1100.0) == pytest.approx(1.0)
    assert guard.projected_total_usd(p, now=1100.0) == pytest.approx(10.0)
    assert not guard.over_budget(p, now=1100.0)
    assert guard.over_budget(p, now=1101.0)                        # one more second and it would overshoot


def test_no_projection_before_the_first_step():
    guard = BudgetGuard(budget_usd=1.0)
    guard.start_billing(1, 100.0)
    assert guard.projected_total_usd(Progress(step=0, total_steps=10)) is None
    assert not guard.over_budget(Progress(step=0, total_steps=10))


def test_deadline_is_what_is_left_of_the_budget_minus_the_pull_margin():
    guard = BudgetGuard(budget_usd=3.0, pull_margin_s=600)
    guard.spent_before_usd = 1.0                                    # a lost spot instance already cost $1
    assert guard.deadline_s(price_hour=2.0) == pytest.approx(3600 - 600)
    assert guard.deadline_s(price_hour=0.0) is None                 # free machine: nothing to cap
    assert BudgetGuard(budget_usd=None).deadline_s(2.0) is None


def test_offers_that_cannot_finish_within_what_is_left_are_not_affordable():
    guard = BudgetGuard(budget_usd=5.0, pull_margin_s=0)
    assert guard.affordable(price_hour=2.0, est_hours=2.0)
    assert not guard.affordable(price_hour=2.0, est_hours=3.0)


def test_stopping_spends_into_spent_before():
    guard = BudgetGuard(budget_usd=5.0)
    guard.start_billing(7, price_hour=3600.0, since=0.0)
    assert guard.stop_billing(7, until=2.0) == pytest.approx(2.0)
    assert guard.spent_usd(now=100.0) == pytest.approx(2.0) and guard.price_hour() == 0


@pytest.mark.slow
def test_slowed_real_job_is_stopped_at_a_checkpoint_and_pulled_back(tmp_path, capsys, monkeypatch, sshd):
    """$60/h and $1: training 200 steps at >= 1 s/step would cost > $3, so the guard must stop it."""
    monkeypatch.chdir(tmp_path)
    cfg = local_project(tmp_path, sshd, price_hour=60.0, max_steps=200, checkpoint_every=100,
                        extra_job="throttle_s_per_step = 1.0\n")
    store = tmp_path / "runs.sqlite3"
    rc, out, err = ftplan(capsys, "launch", "--config", str(cfg), "--identity", str(sshd.client_key), "--yes",
                          "--json", "--store", str(store), "--runs-dir", str(tmp_path / "runs"))
    assert out, err
    res = json.loads(out)
    assert res["status"] == "stopped_over_budget", res
    assert rc == 3
    assert "exceeds the budget" in res["error"]
    run_dir = Path(res["artifacts_dir"])
    summary = json.loads((run_dir / "out" / "summary.json").read_text())
    assert summary["status"] == "stopped" and 0 < summary["steps"] < 200
    # The checkpoint written at the stop is here, complete, before teardown.
    ckpt = run_dir / "out" / "checkpoints" / f"checkpoint-{summary['steps']}"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "trainable.safetensors").is_file()
    assert res["actual"]["usd"] < 1.0
    assert all(i["state"] == "terminated" for i in res["instances"])
    rc, out, _ = ftplan(capsys, "report", res["run_id"], "--json", "--store", str(store))
    assert json.loads(out)["status"] == "stopped_over_budget"
