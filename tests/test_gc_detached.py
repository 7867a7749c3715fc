"""`ftplan gc` and detached runs: the machine of a detached run is kept while its watchdog guards it (no launcher
is alive by design), and is no longer kept once the run's on-instance deadline passed long ago with the machine
still up: then it is flagged as over its own hard cap and terminated with --yes. The fake Lambda API serves."""

from __future__ import annotations

import os
import time

from fakes.lambda_api import fake_lambda  # noqa: F401  (fixture)
from test_fault_matrix import LAMBDA_KEY_ENV, PUB_KEY

from ftplan.planner.launch.project_config import load_project
from ftplan.planner.launch.teardown import collect_garbage
from ftplan.planner.runs.store import Store
from ftplan.providers.base import InstanceRequest
from ftplan.providers.lambda_cloud import LambdaProvider

RUN = "ft-detached-0001"


def _detached_run(tmp_path, fake, *, deadline_s: float, started_ago_s: float):
    fake.reset()
    os.environ[LAMBDA_KEY_ENV] = fake.api_key
    store = Store(tmp_path / "runs.sqlite3")
    store.create_run(RUN, status="training", provider="lambda")
    store.update_run(RUN, phase="detached", launcher_pid=None)
    row = store.add_instance_intent(RUN, "lambda", price_hour=0.75, region="us-east-1")
    inst = LambdaProvider(base_url=fake.url, poll_s=0.01).create(InstanceRequest(
        run_id=RUN, instance_type="gpu_1x_a10", gpu="A10", gpu_count=1, region="us-east-1",
        ssh_public_key=PUB_KEY, store_id=store.store_id))
    store.set_instance_created(row, inst.id, inst.to_dict())
    store.add_event(RUN, "job_started", "", phase="uploading", data={"deadline_s": deadline_s, "resume": False})
    store.db.execute("UPDATE events SET ts = ? WHERE kind = 'job_started'", (time.time() - started_ago_s,))
    (tmp_path / "ftplan.toml").write_text(f'[providers.lambda]\nbase_url = "{fake.url}"\npoll_s = 0.01\n')
    return store, load_project(tmp_path / "ftplan.toml")


def test_a_detached_run_under_its_deadline_is_kept(tmp_path, fake_lambda):  # noqa: F811
    store, cfg = _detached_run(tmp_path, fake_lambda, deadline_s=3600, started_ago_s=600)
    report = collect_garbage(store, cfg, terminate=True)
    (item,) = report["instances"]
    assert item["action"] == "keep" and "watchdog guards it" in item["reason"]
    assert len(fake_lambda.live_instances()) == 1 and store.get_run(RUN).status == "training"


def test_a_detached_run_long_past_its_deadline_is_flagged_and_terminated(tmp_path, fake_lambda):  # noqa: F811
    store, cfg = _detached_run(tmp_path, fake_lambda, deadline_s=3600, started_ago_s=3 * 3600)
    (item,) = collect_garbage(store, cfg, terminate=False)["instances"]
    assert item["action"] == "orphan" and "OVER ITS HARD CAP" in item["reason"] and "gc --yes" in item["reason"]
    assert len(fake_lambda.live_instances()) == 1          # a dry run touches nothing
    report = collect_garbage(store, cfg, terminate=True)
    assert [i["action"] for i in report["instances"]] == ["terminated"]
    assert fake_lambda.live_instances() == []
    run = store.get_run(RUN)
    assert run.status == "failed" and "over its hard cap" in run.error
    assert store.instances(RUN, open_only=True) == [] and store.costs(RUN)


def test_a_detached_run_without_a_deadline_stays_kept(tmp_path, fake_lambda):  # noqa: F811
    """No deadline armed (a machine ftplan does not own): nothing says it is over its cap."""
    store, cfg = _detached_run(tmp_path, fake_lambda, deadline_s=0, started_ago_s=10 * 3600)
    (item,) = collect_garbage(store, cfg, terminate=True)["instances"]
    assert item["action"] == "keep"


def test_a_detached_run_whose_watchdog_powered_off_is_no_longer_kept(tmp_path, fake_lambda):  # noqa: F811
    """`runs --refresh` recorded the watchdog's power-off, but the provider still lists the machine (Lambda bills a
    machine shut down from inside until it is terminated): gc ends it."""
    store, cfg = _detached_run(tmp_path, fake_lambda, deadline_s=3600, started_ago_s=600)
    store.add_event(RUN, "watchdog", "powering_off", data={"state": "powering_off", "actions": [
        {"at": time.time(), "action": "power_off", "reason": "no launcher pulled within the grace period"}]})
    (item,) = collect_garbage(store, cfg, terminate=False)["instances"]
    assert item["action"] == "orphan" and "powered the machine off" in item["reason"]
    collect_garbage(store, cfg, terminate=True)
    assert fake_lambda.live_instances() == []
    (cost,) = store.costs(RUN)
    assert cost.clock == "launcher"   # still listed: it billed until now, not until the power-off
