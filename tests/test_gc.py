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


def test_nothing_to_clean(env, capsys):
    _, _, store = env
    rc, out, _ = ftplan(capsys, "gc", "--store", store)
    assert rc == 0 and "nothing to clean up" in out


def _create(provider, run_id, store_id=""):
    return provider.create(InstanceRequest(run_id=run_id, instance_type="gpu_1x_a10", gpu="A10", gpu_count=1,
                                           region="us-east-1", ssh_public_key=PUB, store_id=store_id))


def test_own_tagged_instance_of_an_unknown_run_is_listed_then_terminated_with_yes(env, capsys, fake_lambda):  # noqa: F811
    provider, s, store = env
    inst = _create(provider, "ft-stray-0001", store_id=s.store_id)   # ours (tag), but its run row is lost
    rc, out, _ = ftplan(capsys, "gc", "--store", store, "--json")
    report = json.loads(out)
    assert rc == 0 and report["orphans"] == 1
    assert report["instances"][0]["id"] == inst.id and report["instances"][0]["action"] == "orphan"
    assert len(fake_lambda.live_instances()) == 1              # listing changes nothing
    rc, out, _ = ftplan(capsys, "gc", "--store", store, "--yes")
    assert rc == 0 and "terminated" in out
    assert fake_lambda.live_instances() == []


def test_gc_never_touches_another_stores_instances_without_the_flag(env, capsys, fake_lambda, tmp_path):  # noqa: F811
    """A colleague's (or CI's) live run on the same account: its store is elsewhere, so to this store its
    run is unknown. `gc --yes` lists it as foreign and leaves it running."""
    provider, _, store = env
    theirs = Store(tmp_path / "colleague.sqlite3")
    theirs.create_run("ft-theirs-0001", status="training")
    inst = _create(provider, "ft-theirs-0001", store_id=theirs.store_id)
    legacy = _create(provider, "ft-legacy-0001")               # untagged (older ftplan), run not in this store
    rc, out, err = ftplan(capsys, "gc", "--store", store, "--yes", "--json")
    report = json.loads(out)
    assert rc == 0 and report["terminated"] == 0 and report["foreign"] == 2
    assert {i["id"]: i["action"] for i in report["instances"]} == {inst.id: "foreign", legacy.id: "foreign"}
    assert len(fake_lambda.live_instances()) == 2
    rc, out, err = ftplan(capsys, "gc", "--store", store, "--yes")
    assert "another ftplan run store" in out and "not touched" in out and "another run store" in err
    assert len(fake_lambda.live_instances()) == 2


def test_include_foreign_asks_and_a_no_touches_nothing(env, capsys, fake_lambda, tmp_path, monkeypatch):  # noqa: F811
    import io

    provider, _, store = env
    theirs = Store(tmp_path / "colleague.sqlite3")
    _create(provider, "ft-theirs-0002", store_id=theirs.store_id)
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    rc, _, err = ftplan(capsys, "gc", "--store", store, "--yes", "--include-foreign")
    assert rc == 2 and "not confirmed" in err and len(fake_lambda.live_instances()) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    rc, out, err = ftplan(capsys, "gc", "--store", store, "--yes", "--include-foreign")
    assert rc == 0 and "someone else" in err and fake_lambda.live_instances() == []


def test_intent_row_stays_open_when_the_list_call_fails(env, capsys, fake_lambda):  # noqa: F811
    """An ambiguous create (no id came back) closes only on positive evidence: a listing that worked."""
    _, s, store = env
    s.create_run("ft-amb-0001", status="provisioning")
    s.update_run("ft-amb-0001", launcher_pid=_dead_pid())
    s.add_instance_intent("ft-amb-0001", "lambda", price_hour=0.75)
    fake_lambda.fail_next("list", kind="500", times=50)
    rc, out, err = ftplan(capsys, "gc", "--store", store, "--yes", "--json")
    report = json.loads(out)
    assert rc == 1 and "cannot list instances" in " ".join(report["errors"])
    assert [r.state for r in s.instances("ft-amb-0001")] == ["intent"]
    assert report["instances"][0]["action"] == "unconfirmed"
    fake_lambda.faults.clear()                                 # the API is back: a listing shows nothing
    rc, out, _ = ftplan(capsys, "gc", "--store", store, "--yes", "--json")
    assert rc == 0 and [r.state for r in s.instances("ft-amb-0001")] == ["create_failed"]


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
