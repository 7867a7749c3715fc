"""Cost from the provider's clock (issue 14 item 4): the span billed is the provider's launch -> end where its API
reports them, rounded to the provider's billing granularity; a failing or hung describe falls back to the
launcher's clock without raising; the store records which clock was used."""

from __future__ import annotations

import time

import pytest
from fakes import paperspace_api

from ftplan.planner.launch.billed_span import billed_span, charged_hours
from ftplan.planner.runs.store import Store
from ftplan.providers.base import Instance, InstanceRequest, InstanceState
from ftplan.providers.errors import ProviderError
from ftplan.providers.paperspace import PaperspaceProvider

fake_paperspace = paperspace_api.fake_paperspace
PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPaperPaperPaperPaperPaperPaperPaperPaper ftplan"


class _Stub:
    """A provider whose describe answers, fails or hangs: the only part billed_span needs."""

    name = "lambda"

    def __init__(self, answer=None, fail=False, hang_s=0.0):
        self.answer, self.fail, self.hang_s = answer, fail, hang_s

    def describe(self, inst):
        if self.hang_s:
            time.sleep(self.hang_s)
        if self.fail:
            raise ProviderError("describe: HTTP 500", provider="lambda")
        for key, value in (self.answer or {}).items():
            setattr(inst, key, value)
        return inst


def _inst(**kw) -> Instance:
    return Instance(provider="lambda", id="i-1", run_id="r", region="us-east-1", **kw)


def test_paperspace_reports_creation_and_deletion_times_and_they_are_billed(fake_paperspace):  # noqa: F811
    p = PaperspaceProvider(api_key=fake_paperspace.api_key, base_url=fake_paperspace.url, poll_s=0.0,
                           client_options={"backoff_s": 0.0, "sleep": lambda s: None})
    created = time.time() + 30          # the launcher's row, later than the provider's own creation time
    inst = p.create(InstanceRequest(run_id="r", instance_type="A100-80G", gpu="A100-80GB", gpu_count=1,
                                    region="East Coast (NY2)", ssh_public_key=PUB))
    p.wait_ready(inst, timeout_s=5)
    assert inst.launched_at is not None and abs(inst.launched_at - time.time()) < 60
    p.terminate(inst)
    assert inst.ended_at is not None and inst.ended_at >= inst.launched_at
    span = billed_span(p, inst, created, created + 3600)
    assert span.clock == "provider"
    assert tuple(span) == (inst.launched_at, inst.ended_at)   # not the launcher's hour


def test_a_failing_describe_falls_back_to_the_launchers_clock():
    span = billed_span(_Stub(fail=True), _inst(), 1000.0, 1600.0)
    assert tuple(span) == (1000.0, 1600.0) and span.clock == "launcher"


def test_a_hung_describe_is_bounded():
    t0 = time.monotonic()
    span = billed_span(_Stub(hang_s=5), _inst(), 1000.0, 1600.0, timeout_s=0.2)
    assert time.monotonic() - t0 < 3
    assert span.clock == "launcher"


def test_provider_launch_time_and_a_future_end_that_is_no_time():
    now = time.time()
    span = billed_span(_Stub({"launched_at": now - 500, "ended_at": now + 10 * 3600}), _inst(), now - 400, now)
    assert span[0] == now - 500 and span[1] == now and span.clock == "provider start"


def test_gone_without_an_end_time_ends_at_the_watchdogs_power_off():
    """A detached run: the machine powered itself off at T; the user came back an hour later."""
    now = time.time()
    stub = _Stub({"state": InstanceState.TERMINATED})
    span = billed_span(stub, _inst(), now - 7200, now, powered_off_at=now - 3600)
    assert span[1] == now - 3600 and span.clock == "watchdog"
    # still running (Lambda keeps billing a machine shut down from inside): billed to now
    span = billed_span(_Stub({"state": InstanceState.RUNNING}), _inst(), now - 7200, now, powered_off_at=now - 3600)
    assert span[1] == now and span.clock == "launcher"


def test_billing_granularity_and_minimum_of_the_provider():
    assert charged_hours("lambda", 10) == pytest.approx(60 / 3600)        # one-minute increments
    assert charged_hours("lambda", 61) == pytest.approx(120 / 3600)
    assert charged_hours("aws", 10) == pytest.approx(60 / 3600)           # per second, 60 s minimum
    assert charged_hours("aws", 61.2) == pytest.approx(62 / 3600)
    assert charged_hours("runpod", 10) == pytest.approx(10 / 3600)        # per second, no minimum
    assert charged_hours("local", 10.5) == pytest.approx(11 / 3600)


def test_the_store_records_the_clock_and_the_charged_hours(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    store.create_run("r")
    span = billed_span(_Stub(fail=True), _inst(), 1000.0, 1010.0)
    store.add_cost("r", None, *span, 3.0, **span.cost_fields())
    (row,) = store.costs("r")
    assert row.clock == "launcher" and row.hours == pytest.approx(60 / 3600) and row.usd == pytest.approx(0.05)


def test_a_store_from_before_migration_4_keeps_its_costs(tmp_path):
    path = tmp_path / "old.sqlite3"
    old = Store(path, migrate_to=3)
    old.create_run("r")
    old.db.execute("INSERT INTO costs (run_id, started_at, ended_at, price_hour, hours, usd) "
                   "VALUES ('r', 0, 3600, 2.0, 1.0, 2.0)")
    old.close()
    new = Store(path)
    (row,) = new.costs("r")
    assert row.usd == 2.0 and row.clock is None


def test_the_report_says_whose_clock_billed_the_run(tmp_path):
    from ftplan.planner.runs.reports import render_report_text, run_report

    store = Store(tmp_path / "s.sqlite3")
    store.create_run("r", status="succeeded")
    store.add_cost("r", None, 0.0, 3600.0, 2.0, clock="provider")
    rep = run_report(store, "r")
    assert rep["billed_from"] == "the provider's clock"
    assert "billed from the provider's clock" in render_report_text(rep)
