"""Paperspace adapter against a fake Paperspace v1 API served on 127.0.0.1 (tests/fakes/paperspace_api.py)."""

from __future__ import annotations

import json
import logging

import pytest
from fakes import paperspace_api

from ftplan.providers.base import InstanceRequest, InstanceState, get_provider
from ftplan.providers.errors import (
    AuthError,
    BillingError,
    CapacityError,
    InstanceGone,
    OfferUnavailable,
    ProviderError,
    QuotaError,
)
from ftplan.providers.paperspace import PaperspaceProvider

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPaperPaperPaperPaperPaperPaperPaperPaper ftplan"

fake_paperspace = paperspace_api.fake_paperspace  # the pytest fixture (a running fake with fresh state)


def _provider(fake, **kw):
    kw.setdefault("client_options", {"backoff_s": 0.0, "sleep": lambda s: None})
    return PaperspaceProvider(api_key=kw.pop("api_key", fake.api_key), base_url=fake.url, poll_s=0.0, **kw)


def _request(run_id="run1", instance_type="A100-80G", region="East Coast (NY2)", **kw):
    return InstanceRequest(run_id=run_id, instance_type=instance_type, gpu="A100-80GB", gpu_count=1,
                           region=region, ssh_public_key=PUB, **kw)


def test_create_wait_list_terminate(fake_paperspace):
    fake_paperspace.ssh_host = "127.0.0.7"
    p = get_provider("paperspace", api_key=fake_paperspace.api_key, base_url=fake_paperspace.url, poll_s=0.0)
    inst = p.create(_request(disk_gib=120, max_lifetime_s=5 * 3600))

    (body,) = fake_paperspace.calls("POST", "/machines")
    assert body["machineType"] == "A100-80G" and body["region"] == "ny2"  # the catalog's display name, as a code
    assert body["name"] == "ftplan-run1" and body["diskSize"] == 250  # 120 rounded up to an allowed size
    assert body["templateId"] == "tmlinabox" and body["startOnCreate"] is True
    assert body["autoShutdownEnabled"] is True and body["autoShutdownTimeout"] == 5
    (script,) = fake_paperspace.scripts.values()
    assert body["startupScriptId"] == script["id"] and script["name"] == "ftplan-run1"
    assert PUB in script["script"] and "/home/paperspace/.ssh/authorized_keys" in script["script"]

    ep = p.wait_ready(inst, timeout_s=5)
    assert (ep.host, ep.port, ep.user) == ("127.0.0.7", 22, "paperspace")
    assert inst.state == InstanceState.RUNNING

    (listed,) = p.list_instances("run1")
    assert listed.id == inst.id and listed.run_id == "run1" and listed.instance_type == "A100-80G"
    assert fake_paperspace.requests[-1][3] == {"name": "ftplan-run1"}, "list by run uses the name filter"

    p.terminate(inst)
    assert fake_paperspace.live_instances() == []
    assert fake_paperspace.scripts == {}, "the per-run startup script must be deleted"
    assert p.describe(inst).state == InstanceState.TERMINATED
    assert p.list_instances() == []


def test_list_pages_and_ignores_foreign_machines(fake_paperspace):
    fake_paperspace.page_size = 1
    p = _provider(fake_paperspace)
    ids = {p.create(_request(run_id=f"r{i}")).id for i in range(3)}
    foreign = fake_paperspace._create({"machineType": "A4000", "templateId": "tubuntu22", "name": "my-desktop",
                                       "diskSize": 100, "region": "ny2"}, {})
    assert foreign.status_code == 200 and len(fake_paperspace.machines) == 4
    assert {i.id for i in p.list_instances()} == ids


def test_unavailable_type_is_capacity_before_anything_is_made(fake_paperspace):
    fake_paperspace.unavailable = {"A100-80G"}
    with pytest.raises(CapacityError):
        _provider(fake_paperspace).create(_request())
    assert fake_paperspace.scripts == {} and fake_paperspace.machines == {}


@pytest.mark.parametrize(("kind", "exc"), [("capacity", CapacityError), ("quota", QuotaError)])
def test_create_errors_map_and_clean_up_the_script(fake_paperspace, kind, exc):
    fake_paperspace.fail_next("create", kind=kind)
    with pytest.raises(exc):
        _provider(fake_paperspace).create(_request())
    assert fake_paperspace.scripts == {} and fake_paperspace.machines == {}


def test_machine_stuck_off_is_capacity(fake_paperspace):
    fake_paperspace.stuck_off = {"H100"}
    p = _provider(fake_paperspace, off_timeout_s=0.05)
    inst = p.create(_request(instance_type="H100"))
    with pytest.raises(CapacityError, match="stayed off"):
        p.wait_ready(inst, timeout_s=30)
    p.terminate(inst)
    assert fake_paperspace.machines == {} and fake_paperspace.scripts == {}


def test_delete_refused_then_stop_then_delete(fake_paperspace):
    fake_paperspace.refuse_delete_running = True
    p = _provider(fake_paperspace)
    inst = p.create(_request())
    p.wait_ready(inst, timeout_s=5)
    p.terminate(inst)
    assert fake_paperspace.machines == {}
    writes = [(m, path) for m, path, _, _ in fake_paperspace.requests if inst.id in path and m != "GET"]
    assert writes == [("DELETE", f"/machines/{inst.id}"), ("PATCH", f"/machines/{inst.id}/stop"),
                      ("DELETE", f"/machines/{inst.id}")]


def test_bad_and_missing_credentials(fake_paperspace, monkeypatch):
    with pytest.raises(AuthError, match="PAPERSPACE_API_KEY"):
        _provider(fake_paperspace, api_key="nope-nope-nope").list_instances()
    monkeypatch.delenv("PAPERSPACE_API_KEY", raising=False)
    with pytest.raises(AuthError, match=r"set PAPERSPACE_API_KEY \(https://"):
        PaperspaceProvider(base_url=fake_paperspace.url).create(_request())


def test_vanished_machine_and_terminate_twice(fake_paperspace):
    p = _provider(fake_paperspace)
    inst = p.create(_request())
    fake_paperspace.preempt(inst.id)
    with pytest.raises(InstanceGone):
        p.wait_ready(inst, timeout_s=5)
    assert p.describe(inst).state == InstanceState.TERMINATED
    p.terminate(inst)
    p.terminate(inst)
    assert fake_paperspace.scripts == {}


def test_sweeper_terminate_finds_the_script_by_name(fake_paperspace):
    p = _provider(fake_paperspace)
    p.create(_request(run_id="orphan"))
    (found,) = p.list_instances()
    assert "startup_script_id" not in found.extra
    p.terminate(found)
    assert fake_paperspace.machines == {} and fake_paperspace.scripts == {}


def test_api_key_never_leaks(fake_paperspace, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("PAPERSPACE_API_KEY", fake_paperspace.api_key)
    p = PaperspaceProvider(base_url=fake_paperspace.url, poll_s=0.0,
                           client_options={"backoff_s": 0.0, "sleep": lambda s: None})
    inst = p.create(_request())
    p.wait_ready(inst, timeout_s=5)
    fake_paperspace.fail_next("create", kind="quota")
    with pytest.raises(QuotaError) as quota:
        p.create(_request(run_id="again"))
    p.terminate(inst)
    texts = [caplog.text, str(quota.value), json.dumps(inst.to_dict())]
    assert all(fake_paperspace.api_key not in t for t in texts)
    assert "paperspace" in caplog.text


ROW_KEYS = {"provider", "instance_type", "gpu", "gpu_count", "gpu_memory_gib", "vcpus", "ram_gib", "price_hour",
            "spot_price_hour", "region", "zone", "billing_granularity_s", "source", "retrieved_at", "price_date"}


def test_price_fetcher_joins_live_availability_with_shipped_prices(fake_paperspace, tmp_path):
    from ftplan.providers.paperspace_prices import fetch_offers

    table = tmp_path / "paperspace.csv"  # SkyPilot's vms.csv layout, as shipped
    table.write_text(
        "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Region,SpotPrice,Price\n"
        "H100,H100,1.0,15.0,80.0,H100,East Coast (NY2),,5.95\n"
        "A100-80G,A100-80GB,1.0,12,80.0,A100-80GB,East Coast (NY2),,3.18\n"
        "A4000,A4000,1.0,8,32.0,A4000,East Coast (NY2),,0.76\n"
        "C5,,,4,8.59,,East Coast (NY2),,0.08\n"
    )
    fake_paperspace.unavailable = {"A4000"}
    rows = fetch_offers(base_url=fake_paperspace.url, api_key=fake_paperspace.api_key, price_table=table)
    assert all(set(r) == ROW_KEYS for r in rows)
    assert sorted(r["instance_type"] for r in rows) == ["A100-80G", "H100"]  # A4000 unavailable, C5 no GPU
    a100 = next(r for r in rows if r["instance_type"] == "A100-80G")
    assert (a100["gpu"], a100["gpu_count"], a100["gpu_memory_gib"], a100["price_hour"]) == ("A100-80GB", 1, 80.0, 3.18)
    assert a100["region"] == "East Coast (NY2)" and "shipped prices" in a100["source"]
    with pytest.raises(ProviderError, match="no price table"):
        fetch_offers(base_url=fake_paperspace.url, api_key=fake_paperspace.api_key, price_table=tmp_path / "x.csv")


# ---- the v1 API as documented (issue 20 item 3): Paperspace/cli api/openapi.ts @c7bdd42 -------------------


def test_template_must_list_the_machine_type_and_is_matched_by_its_os_label(fake_paperspace):
    p = _provider(fake_paperspace)
    p.create(_request(run_id="h1", instance_type="H100"))
    (body,) = fake_paperspace.calls("POST", "/machines")
    # "tmlinabox" matches by name but does not list H100; "mliab-u22-241108-h100" matches by its OS label.
    assert body["templateId"] == "t7vp562h"


def test_no_template_for_the_type_is_next_offer_and_nothing_is_made(fake_paperspace):
    with pytest.raises(OfferUnavailable, match="supports machine type V100"):
        _provider(fake_paperspace).create(_request(instance_type="V100"))
    assert fake_paperspace.scripts == {} and fake_paperspace.machines == {}


@pytest.mark.parametrize(("asked", "sent"), [(1, 100), (100, 100), (101, 250), (999, 1000), (2000, 2000)])
def test_disk_size_is_rounded_up_to_an_allowed_size(fake_paperspace, asked, sent):
    _provider(fake_paperspace).create(_request(disk_gib=asked))
    assert fake_paperspace.calls("POST", "/machines")[0]["diskSize"] == sent


def test_disk_larger_than_any_allowed_size_is_refused_before_anything_is_made(fake_paperspace):
    with pytest.raises(ProviderError, match="up to 2000"):
        _provider(fake_paperspace).create(_request(disk_gib=2500))
    assert fake_paperspace.requests == []


def test_region_form_is_configurable_and_unknown_regions_are_refused(fake_paperspace):
    fake_paperspace.region_form = "label"
    _provider(fake_paperspace, region_form="label").create(_request(region="ny2"))
    assert fake_paperspace.calls("POST", "/machines")[0]["region"] == "East Coast (NY2)"
    with pytest.raises(OfferUnavailable, match="unknown region"):
        _provider(fake_paperspace).create(_request(run_id="r2", region="Mars (MRS1)"))
    # The fake refuses a form it does not take: a wrong guess fails loudly, and leaves nothing behind.
    fake_paperspace.region_form = "code"
    with pytest.raises(ProviderError, match="Invalid region"):
        _provider(fake_paperspace, region_form="label").create(_request(run_id="r3"))
    assert len(fake_paperspace.machines) == 1 and len(fake_paperspace.scripts) == 1


def test_only_documented_fields_are_sent(fake_paperspace):
    from fakes.paperspace_api import MACHINE_FIELDS, SCRIPT_FIELDS

    _provider(fake_paperspace).create(_request())
    (script,) = fake_paperspace.calls("POST", "/startup-scripts")
    (machine,) = fake_paperspace.calls("POST", "/machines")
    assert set(script) <= SCRIPT_FIELDS and set(machine) <= MACHINE_FIELDS
    assert machine["emailPassword"] is False and "enableNvlink" not in machine
    _provider(fake_paperspace).create(_request(run_id="x8", instance_type="H100x8"))
    assert fake_paperspace.calls("POST", "/machines")[-1]["enableNvlink"] is True


def test_billing_refusal_points_at_the_billing_page(fake_paperspace):
    fake_paperspace.fail_next("create", kind="billing")
    with pytest.raises(BillingError, match="console.paperspace.com/settings/billing"):
        _provider(fake_paperspace).create(_request())
    assert fake_paperspace.scripts == {}


def test_amd_offer_is_refused(fake_paperspace):
    with pytest.raises(OfferUnavailable, match="CUDA-only"):
        _provider(fake_paperspace).create(InstanceRequest(run_id="x", instance_type="MI300X", gpu="MI300X",
                                                          gpu_count=1, region="ny2", ssh_public_key=PUB))
