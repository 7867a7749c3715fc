"""What the launcher tells the machine's watchdog (FTPLAN_WATCHDOG_* in secrets.env), per provider, and that the
watchdog reads those settings as its defaults: the power-off is the real one on rented machines, runpodctl on
RunPod, none on the user's own machine unless configured; the budget is what earlier machines left."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftplan.planner.launch.launch_plan import Candidate, LaunchPlan
from ftplan.planner.launch.launcher import Launcher
from ftplan.planner.runs.store import Store

ROOT = Path(__file__).resolve().parent.parent


def settings(tmp_path: Path, provider: str, **plan_fields) -> dict[str, str]:
    store = Store(tmp_path / f"{provider}.sqlite3")
    offer = Candidate(provider=provider, instance_type="t", gpu="A10", price_hour=2.0)
    plan = LaunchPlan(run_id="r-1", job_config={}, dataset=tmp_path, candidates=[offer], model="m", method="qlora",
                      runs_dir=tmp_path, budget_usd=10.0, grace_minutes=7, **plan_fields)
    store.create_run("r-1")
    row = store.add_instance_intent("r-1", provider, price_hour=2.0)
    store.set_instance_created(row, "i-1", {})
    launcher = Launcher(store, plan)
    launcher.guard.start_billing(row, 2.0)
    launcher.guard.spent_before_usd = 3.0       # a spot machine lost earlier in the run
    launcher.live.append((row, object(), offer))
    return launcher._watchdog_env(owned=provider in ("local", "ssh"))


@pytest.mark.parametrize(("provider", "metadata", "poweroff"), [
    ("aws", "aws", "shutdown -h now"), ("gcp", "gcp", "shutdown -h now"), ("lambda", "none", "shutdown -h now"),
    ("runpod", "none", "runpodctl stop pod $RUNPOD_POD_ID"), ("local", "none", ""), ("ssh", "none", ""),
])
def test_power_off_and_metadata_follow_the_provider(tmp_path, provider, metadata, poweroff):
    env = settings(tmp_path, provider, bucket="s3://bkt/runs/")
    assert env["FTPLAN_WATCHDOG_METADATA"] == metadata
    assert poweroff in env["FTPLAN_WATCHDOG_POWEROFF_CMD"] if poweroff else env["FTPLAN_WATCHDOG_POWEROFF_CMD"] == ""
    assert "FTPLAN_WATCHDOG_POWEROFF_CONFIGURED" not in env
    assert float(env["FTPLAN_WATCHDOG_BUDGET_USD"]) == 7.0      # 10 budget - 3 spent on the lost machine
    assert float(env["FTPLAN_WATCHDOG_PRICE_HOUR"]) == 2.0
    assert float(env["FTPLAN_WATCHDOG_GRACE_MINUTES"]) == 7.0
    assert env["FTPLAN_WATCHDOG_BUCKET"] == "s3://bkt/runs/r-1"  # `ftplan pull` reads <bucket>/<run id>/final
    assert abs(float(env["FTPLAN_WATCHDOG_STARTED_AT"]) - time.time()) < 3600


def test_a_configured_power_off_runs_even_on_a_machine_with_the_shutdown_opt_out(tmp_path):
    env = settings(tmp_path, "local", poweroff_cmd="touch /tmp/x")
    assert env["FTPLAN_WATCHDOG_POWEROFF_CMD"] == "touch /tmp/x"
    assert env["FTPLAN_WATCHDOG_POWEROFF_CONFIGURED"] == "1"
    assert "FTPLAN_WATCHDOG_BUCKET" not in env


def test_continue_over_budget_leaves_the_cap_to_the_deadline(tmp_path):
    assert "FTPLAN_WATCHDOG_BUDGET_USD" not in settings(tmp_path, "aws", on_over_budget="continue")


def test_the_watchdog_takes_its_settings_from_the_environment(tmp_path):
    """The real script, run as bootstrap runs it (no arguments but the run dir): FTPLAN_NO_SHUTDOWN=1 stops
    the built-in power-off, a configured command still runs."""
    run = tmp_path / "run"
    (run / "out").mkdir(parents=True)
    (run / "exit_code").write_text("0\n")
    marker = tmp_path / "off"
    base = {"PATH": "/usr/bin:/bin", "FTPLAN_WATCHDOG_PRICE_HOUR": "1.5", "FTPLAN_WATCHDOG_GRACE_MINUTES": "0",
            "FTPLAN_WATCHDOG_POLL_S": "0.1", "FTPLAN_WATCHDOG_POWEROFF_CMD": f"touch {marker}",
            "FTPLAN_NO_SHUTDOWN": "1"}
    cmd = [sys.executable, str(ROOT / "remote_job" / "watchdog.py"), "--run-dir", str(run)]
    subprocess.run(cmd, env=base, timeout=60, check=True)
    assert not marker.exists()
    subprocess.run(cmd, env={**base, "FTPLAN_WATCHDOG_POWEROFF_CONFIGURED": "1"}, timeout=60, check=True)
    assert marker.exists()


def test_every_provider_says_what_a_powered_off_machine_still_bills():
    """catalogs/provider_overheads.json `poweroff` is known for every provider the planner prices, and the
    detach summary says so except where power-off terminates (AWS's shutdown behaviour)."""
    import json

    from ftplan.catalogs import data_path
    from ftplan.planner.launch.detached import poweroff_note

    raw = json.loads(data_path("provider_overheads.json").read_text())
    kinds = {name: d.get("poweroff") for name, d in raw["providers"].items()}
    assert set(kinds.values()) <= {"terminates", "stops_compute", "unverified"} and None not in kinds.values()
    assert poweroff_note("aws") == ""
    assert "disk" in poweroff_note("gcp") and "'ftplan gc --yes'" in poweroff_note("gcp")
    assert "until terminated" in poweroff_note("lambda")
