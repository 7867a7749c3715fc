"""`ftplan gc`: reconcile what the provider runs (tagged by ftplan) with the run store.

The Lambda adapter talks to the fake Lambda API server; instances are created through the real
adapter so they carry the real tags."""

from __future__ import annotations

import json
import os

import pytest
from cli_helpers import ftplan
from fakes.lambda_api import fake_lambda  # noqa: F401  (fixture)

from ftplan.planner.runs.store import Store
from ftplan.providers.base import InstanceRequest
from ftplan.providers.lambda_cloud import LambdaProvider

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG2dHbM3nZtq9f5hG0wJtq1yV3N5YwS6gY0P3i1hMEZo ftplan"


@pytest.fixture
def env(tmp_path, fake_lambda, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LAMBDA_API_KEY", fake_lambda.api_key)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ftplan.toml").write_text(f'[providers.lambda]\nbase_url = "{fake_lambda.url}"\npoll_s = 0.01\n')
    provider = LambdaProvider(base_url=fake_lambda.url, poll_s=0.01)
    store_path = tmp_path / "runs.sqlite3"
    return provider, Store(store_path), str(store_path)


def _create(provider, run_id):
    return provider.create(InstanceRequest(run_id=run_id, instance_type="gpu_1x_a10", gpu="A10", gpu_count=1,
                                           region="us-east-1", ssh_public_key=PUB))


def test_nothing_to_clean(env, capsys):
    _, _, store = env
    rc, out, _ = ftplan(capsys, "gc", "--store", store)
    assert rc == 0 and "nothing to clean up" in out


def test_unknown_tagged_instance_is_listed_then_terminated_with_yes(env, capsys, fake_lambda):  # noqa: F811
    provider, _, store = env
    inst = _create(provider, "ft-stray-0001")
    rc, out, _ = ftplan(capsys, "gc", "--store", store, "--json")
    report = json.loads(out)
    assert rc == 0 and report["orphans"] == 1
    assert report["instances"][0]["id"] == inst.id and report["instances"][0]["action"] == "orphan"
    assert len(fake_lambda.live_instances()) == 1              # listing changes nothing
    rc, out, _ = ftplan(capsys, "gc", "--store", store, "--yes")
    assert rc == 0 and "terminated" in out
    assert fake_lambda.live_instances() == []


def test_instance_of_a_live_launcher_is_kept(env, capsys, fake_lambda):  # noqa: F811
    provider, s, store = env
    s.create_run("ft-live-0001", status="training")             # launcher pid = this test process: alive
    inst = _create(provider, "ft-live-0001")
    row = s.add_instance_intent("ft-live-0001", "lambda", price_hour=0.75)
    s.set_instance_created(row, inst.id, inst.to_dict())
    rc, out, _ = ftplan(capsys, "gc", "--store", store, "--yes", "--json")
    report = json.loads(out)
    assert report["instances"][0]["action"] == "keep"
    assert len(fake_lambda.live_instances()) == 1
    assert s.get_run("ft-live-0001").status == "training"


def test_dead_launchers_instance_is_terminated_billed_and_its_run_closed(env, capsys, fake_lambda):  # noqa: F811
    provider, s, store = env
    s.create_run("ft-dead-0001", status="training")
    s.update_run("ft-dead-0001", launcher_pid=_dead_pid())
    inst = _create(provider, "ft-dead-0001")
    row = s.add_instance_intent("ft-dead-0001", "lambda", price_hour=0.75)
    s.set_instance_created(row, inst.id, inst.to_dict())
    rc, out, _ = ftplan(capsys, "gc", "--store", store, "--yes", "--json")
    assert rc == 0 and json.loads(out)["terminated"] == 1
    assert fake_lambda.live_instances() == []
    run = s.get_run("ft-dead-0001")
    assert run.status == "failed" and "closed by ftplan gc" in run.error
    assert s.instances(open_only=True) == []
    assert s.costs("ft-dead-0001")[0].price_hour == 0.75


def test_recorded_instance_already_gone_is_closed(env, capsys, fake_lambda):  # noqa: F811
    provider, s, store = env
    s.create_run("ft-gone-0001", status="training")
    s.update_run("ft-gone-0001", launcher_pid=_dead_pid())
    inst = _create(provider, "ft-gone-0001")
    row = s.add_instance_intent("ft-gone-0001", "lambda", price_hour=0.75)
    s.set_instance_created(row, inst.id, inst.to_dict())
    provider.terminate(inst)                                   # gone at the provider, store never heard
    rc, out, _ = ftplan(capsys, "gc", "--store", store, "--json")
    assert json.loads(out)["instances"][0]["action"] == "unconfirmed"
    rc, out, _ = ftplan(capsys, "gc", "--store", store, "--yes", "--json")
    assert rc == 0 and s.instances(open_only=True) == []
    assert s.get_run("ft-gone-0001").status == "failed"


def test_provider_errors_are_reported_not_fatal(env, capsys, fake_lambda):  # noqa: F811
    _, _, store = env
    fake_lambda.fail_next("list", kind="auth", times=5)
    rc, out, err = ftplan(capsys, "gc", "--store", store)
    assert rc == 1 and "lambda: cannot list instances" in err
    assert fake_lambda.api_key not in err


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid
