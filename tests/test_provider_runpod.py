"""RunPod adapter: the real `runpod` SDK pointed at a fake GraphQL server on 127.0.0.1
(tests/fakes/runpod_graphql.py), which executes the SDK's queries against a schema."""

from __future__ import annotations

import json
import logging
import os

import pytest
from fakes import runpod_graphql

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
from ftplan.providers.runpod import RunPodProvider

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIRunPodRunPodRunPodRunPodRunPodRunPodRunPo ftplan"

fake_runpod = runpod_graphql.fake_runpod  # the pytest fixture (a running fake with fresh state)


def _provider(fake, **kw):
    return RunPodProvider(api_key=kw.pop("api_key", fake.api_key), api_base_url=fake.url, poll_s=0.0, **kw)


def _request(run_id="run1", gpu="RTX4090", count=1, **kw):
    return InstanceRequest(run_id=run_id, instance_type=f"{count}x_{gpu}_SECURE", gpu=gpu, gpu_count=count,
                           region="US", zone="US-TX-1", ssh_public_key=PUB, **kw)


def test_create_wait_list_terminate(fake_runpod):
    fake_runpod.ssh_host, fake_runpod.ssh_port = "127.0.0.5", 40022
    p = get_provider("runpod", api_key=fake_runpod.api_key, api_base_url=fake_runpod.url, poll_s=0.0)
    inst = p.create(_request(count=2, disk_gib=80))

    (sent,) = fake_runpod.created()
    assert sent["gpuTypeId"] == "NVIDIA GeForce RTX 4090" and sent["gpuCount"] == 2
    assert sent["cloudType"] == "SECURE" and sent["dataCenterId"] == "US-TX-1"
    assert sent["name"] == "ftplan-run1" and sent["containerDiskInGb"] == 80
    assert sent["ports"] == "22/tcp" and sent["supportPublicIp"] is True and sent["startSsh"] is True
    assert {"key": "PUBLIC_KEY", "value": PUB} in sent["env"]
    assert {"key": "FTPLAN_RUN_ID", "value": "run1"} in sent["env"]
    assert "RUNPOD_API_BASE_URL" not in os.environ, "the SDK's env switch is restored after each call"

    ep = p.wait_ready(inst, timeout_s=5)
    assert (ep.host, ep.port, ep.user) == ("127.0.0.5", 40022, "root"), "the public mapping of 22/tcp"
    assert inst.state == InstanceState.RUNNING

    (listed,) = p.list_instances("run1")
    assert listed.id == inst.id and listed.run_id == "run1"
    assert p.list_instances("another") == []

    p.terminate(inst)
    assert fake_runpod.live_instances() == []
    assert p.describe(inst).state == InstanceState.TERMINATED
    assert p.list_instances() == []


def test_list_ignores_pods_not_made_by_ftplan(fake_runpod):
    p = _provider(fake_runpod)
    mine = p.create(_request(run_id="mine"))
    fake_runpod._deploy("podFindAndDeployOnDemand", {"name": "jupyter", "gpuTypeId": "NVIDIA GeForce RTX 4090"})
    fake_runpod._deploy("podFindAndDeployOnDemand", {"name": "ftplan-lookalike",
                                                     "gpuTypeId": "NVIDIA GeForce RTX 4090"})
    assert [i.id for i in p.list_instances()] == [mine.id]


def test_spot_goes_through_rent_interruptable_with_a_bid(fake_runpod):
    p = _provider(fake_runpod)
    inst = p.create(_request(gpu="A100-80GB", spot=True))
    ((name, sent),) = [m for m in fake_runpod.mutations if m[0].startswith("pod")]
    assert name == "podRentInterruptable"
    # 10% over the floor (1.19) for the cloud/DC asked for, never above on-demand (1.64)
    assert sent["bidPerGpu"] == pytest.approx(1.309) and sent["gpuTypeId"] == "NVIDIA A100 80GB PCIe"
    assert {"key": "PUBLIC_KEY", "value": PUB} in sent["env"] and sent["ports"] == "22/tcp"
    p.wait_ready(inst, timeout_s=5)
    fake_runpod.preempt(inst.id)
    assert p.describe(inst).state == InstanceState.PREEMPTED
    with pytest.raises(InstanceGone):
        p.wait_ready(inst, timeout_s=5)
    p.terminate(inst)
    assert fake_runpod.pods == {}


@pytest.mark.parametrize(("kind", "exc", "advice"), [
    ("capacity", CapacityError, "no longer any instances"),
    ("quota", BillingError, "runpod.io/console/user/billing"),  # "balance is too low ... add funds"
    ("auth", AuthError, "RUNPOD_API_KEY"),
    ("500", ProviderError, "runpod"),
])
def test_create_errors_map(fake_runpod, kind, exc, advice):
    fake_runpod.fail_next("create", kind=kind)
    with pytest.raises(exc, match=advice):
        _provider(fake_runpod).create(_request())
    assert fake_runpod.pods == {}


def test_no_stock_is_capacity(fake_runpod):
    with pytest.raises(CapacityError, match="no longer any instances"):
        _provider(fake_runpod).create(_request(gpu="RTXA6000"))


def test_bad_and_missing_credentials(fake_runpod, monkeypatch):
    with pytest.raises(AuthError, match="RUNPOD_API_KEY"):
        _provider(fake_runpod, api_key="wrong-wrong-wrong").list_instances()
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    with pytest.raises(AuthError, match=r"set RUNPOD_API_KEY \(https://www.runpod.io/console/user/settings\)"):
        RunPodProvider(api_base_url=fake_runpod.url).create(_request())
    assert fake_runpod.queries == [], "no request without a key"


def test_vanished_pod_and_terminate_twice(fake_runpod):
    p = _provider(fake_runpod)
    inst = p.create(_request())
    del fake_runpod.pods[inst.id]
    with pytest.raises(InstanceGone):
        p.wait_ready(inst, timeout_s=5)
    assert p.describe(inst).state == InstanceState.TERMINATED
    p.terminate(inst)
    p.terminate(inst)
    assert ("podTerminate", {"podId": inst.id}) in fake_runpod.mutations


def test_wait_ready_without_public_ssh_times_out(fake_runpod):
    fake_runpod.boot_polls = 10**6
    p = _provider(fake_runpod)
    inst = p.create(_request())
    with pytest.raises(ProviderError, match="22/tcp"):
        p.wait_ready(inst, timeout_s=0.05)
    p.terminate(inst)


def test_values_that_would_break_the_graphql_text_are_refused(fake_runpod):
    p = _provider(fake_runpod)
    with pytest.raises(ProviderError, match="quotes"):
        p.create(_request(image='evil" } ) { id } mutation { x'))
    with pytest.raises(ProviderError, match="no GPU type"):
        p.create(_request(gpu="GTX-9999"))
    assert fake_runpod.queries == []


def test_api_key_never_leaks(fake_runpod, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("RUNPOD_API_KEY", fake_runpod.api_key)
    p = RunPodProvider(api_base_url=fake_runpod.url, poll_s=0.0)
    inst = p.create(_request())
    p.wait_ready(inst, timeout_s=5)
    fake_runpod.fail_next("create", kind="capacity")
    with pytest.raises(CapacityError) as cap:
        p.create(_request(run_id="two"))
    fake_runpod.fail_next("get", kind="500", times=5)  # every read retry (1 + 4)
    with pytest.raises(ProviderError) as broken:
        p.describe(inst)
    p.terminate(inst)
    texts = [caplog.text, str(cap.value), str(broken.value), json.dumps(inst.to_dict())]
    assert all(fake_runpod.api_key not in t for t in texts)
    assert "runpod" in caplog.text


ROW_KEYS = {"provider", "instance_type", "gpu", "gpu_count", "gpu_memory_gib", "vcpus", "ram_gib", "price_hour",
            "spot_price_hour", "region", "zone", "billing_granularity_s", "source", "retrieved_at", "cloud", "purchase"}


def test_price_fetcher(fake_runpod):
    from ftplan.providers.runpod_prices import fetch_offers

    fake_runpod.gpu_types["NVIDIA GeForce RTX 4090"] = ("RTX 4090", 24, 0.69, 0.34, 2, True)
    rows = fetch_offers(api_key=fake_runpod.api_key, api_base_url=fake_runpod.url)
    assert all(set(r) == ROW_KEYS for r in rows)
    by_type = {r["instance_type"]: r for r in rows}
    # maxGpuCount 2 for the 4090: no 4x/8x rows; prices are per GPU-hour times the count.
    assert {t for t in by_type if "RTX4090" in t and t.endswith("_SECURE")} == {"1x_RTX4090_SECURE",
                                                                                  "2x_RTX4090_SECURE"}
    two = by_type["2x_RTX4090_SECURE"]
    assert (two["gpu"], two["gpu_count"], two["gpu_memory_gib"]) == ("RTX4090", 2, 24.0)
    assert two["price_hour"] == pytest.approx(1.38) and two["spot_price_hour"] == pytest.approx(0.68)
    assert two["vcpus"] == 16 and two["ram_gib"] == 124, "host size of the 2-GPU offer, not the 1-GPU one"
    assert by_type["1x_RTXA6000_SECURE"]["spot_price_hour"] is None
    assert not any("Made Up" in r["instance_type"] or r["gpu"] == "" for r in rows), "unknown GPU ids skipped"
    in_stock = fetch_offers(api_key=fake_runpod.api_key, api_base_url=fake_runpod.url, only_in_stock=True)
    assert not any(r["gpu"] == "RTXA6000" for r in in_stock) and any(r["gpu"] == "RTX4090" for r in in_stock)
    with pytest.raises(AuthError):
        fetch_offers(api_key="bad-bad-bad", api_base_url=fake_runpod.url)


# ---- issue 20 items 4, 5 and issue 22 item 10: cloud type, bids, read retries, terminate read-back, GPUs ----


def test_request_cloud_type_is_sent_as_cloud_type(fake_runpod):
    p = _provider(fake_runpod)
    p.create(_request(run_id="c1", cloud_type="COMMUNITY"))
    p.create(_request(run_id="c2", gpu="A100-80GB", spot=True, cloud_type="COMMUNITY"))
    p.create(_request(run_id="c3"))  # none on the request: the adapter's default
    assert [c["cloudType"] for c in fake_runpod.created()] == ["COMMUNITY", "COMMUNITY", "SECURE"]
    with pytest.raises(ProviderError, match="cloud type"):
        p.create(_request(run_id="c4", cloud_type="ORBITAL"))


def test_spot_bid_is_over_the_floor_of_the_cloud_and_data_centre_asked_for(fake_runpod):
    # Community cloud elsewhere is cheaper; a bid at *that* floor would be refused in US-TX-1 secure.
    fake_runpod.spot_floor = {(False, "EU-RO-1"): 0.60, (True, "US-TX-1"): 1.30, (True, "EU-RO-1"): 1.10}
    p = _provider(fake_runpod)
    p.create(_request(gpu="A100-80GB", spot=True))
    (sent,) = fake_runpod.created()
    assert sent["bidPerGpu"] == pytest.approx(1.43) and sent["dataCenterId"] == "US-TX-1"
    assert any("secureCloud: true" in q and 'dataCenterId: "US-TX-1"' in q for q in fake_runpod.queries)


def test_bid_refused_as_too_low_is_next_offer(fake_runpod):
    fake_runpod.market_moves = 0.50  # the floor rises between the price query and the bid
    p = _provider(fake_runpod)
    with pytest.raises(CapacityError, match="minimum bid"):
        p.create(_request(gpu="A100-80GB", spot=True))
    assert fake_runpod.live_instances() == []


def test_polling_rides_out_429_and_5xx_but_not_for_ever(fake_runpod):
    p = _provider(fake_runpod)
    inst = p.create(_request())
    fake_runpod.fail_next("get", kind="429", times=2)
    fake_runpod.fail_next("get", kind="500", times=1)
    assert p.wait_ready(inst, timeout_s=5).user == "root"
    fake_runpod.fail_next("get", kind="500", times=50)
    with pytest.raises(ProviderError, match="still failing after 5 tries"):
        p.describe(inst)


def test_terminate_read_back_not_found_error_after_delete_is_success(fake_runpod):
    fake_runpod.missing_pod_error = True
    p = _provider(fake_runpod)
    inst = p.create(_request())
    p.terminate(inst)  # the read-back answers "pod not found": gone, not an exception
    assert inst.state == InstanceState.TERMINATED and fake_runpod.live_instances() == []
    assert p.describe(inst).state == InstanceState.TERMINATED


def test_blackwell_gets_a_cuda_12_8_image_and_amd_is_refused(fake_runpod):
    fake_runpod.gpu_types["NVIDIA B200"] = ("B200", 180, 5.99, 3.59, 8, True)
    p = _provider(fake_runpod)
    p.create(_request(gpu="B200"))
    assert "cuda12.8" in fake_runpod.created()[0]["imageName"]
    with pytest.raises(OfferUnavailable, match="CUDA-only"):
        p.create(_request(run_id="amd", gpu="MI300X"))
    assert len(fake_runpod.created()) == 1


def test_spend_limit_is_quota_naming_the_page():
    err = RunPodProvider(api_key="x")._map_query_error("Spend limit reached for this account.", "create pod")
    assert type(err) is QuotaError and "runpod.io/console/user/billing" in str(err)
