"""Lambda Cloud adapter against a fake Lambda REST API served on 127.0.0.1 (tests/fakes/lambda_api.py)."""

from __future__ import annotations

import json
import logging

import pytest
from fakes import lambda_api

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
from ftplan.providers.http import APIError
from ftplan.providers.lambda_cloud import LambdaProvider

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFake ftplan"

fake_lambda = lambda_api.fake_lambda  # the pytest fixture (a running fake with fresh state)


def _provider(fake, **kw):
    kw.setdefault("client_options", {"backoff_s": 0.0, "sleep": lambda s: None})
    return LambdaProvider(api_key=kw.pop("api_key", fake.api_key), base_url=fake.url, poll_s=0.0, **kw)


def _request(run_id="run1", instance_type="gpu_1x_a100", region="us-east-1", gpu="A100", **kw):
    return InstanceRequest(run_id=run_id, instance_type=instance_type, gpu=gpu, gpu_count=1,
                           region=region, ssh_public_key=PUB, **kw)


def test_create_wait_list_terminate(fake_lambda):
    fake_lambda.ssh_host = "127.0.0.9"
    p = get_provider("lambda", api_key=fake_lambda.api_key, base_url=fake_lambda.url, poll_s=0.0)
    inst = p.create(_request())

    (launch,) = fake_lambda.calls("POST", "/instance-operations/launch")
    assert launch["instance_type_name"] == "gpu_1x_a100"
    assert launch["region_name"] == "us-east-1"
    assert launch["name"] == "ftplan-run1"
    assert launch["ssh_key_names"] == ["ftplan-run1"]
    assert {"key": "ftplan-run-id", "value": "run1"} in launch["tags"]
    (key_body,) = fake_lambda.calls("POST", "/ssh-keys")
    assert key_body == {"name": "ftplan-run1", "public_key": PUB}

    ep = p.wait_ready(inst, timeout_s=5)
    assert (ep.host, ep.port, ep.user) == ("127.0.0.9", 22, "ubuntu")
    assert inst.state == InstanceState.RUNNING and inst.public_ip == "127.0.0.9"

    listed = p.list_instances("run1")
    assert [i.id for i in listed] == [inst.id] and listed[0].run_id == "run1"
    assert p.list_instances("other-run") == []

    p.terminate(inst)
    assert fake_lambda.live_instances() == []
    assert fake_lambda.ssh_keys == {}, "the per-run key must be deleted at teardown"
    assert inst.state.is_gone
    assert p.describe(inst).state == InstanceState.TERMINATED
    assert p.list_instances() == []


def test_list_ignores_instances_not_made_by_ftplan(fake_lambda):
    p = _provider(fake_lambda)
    mine = p.create(_request(run_id="r2"))
    # Someone's hand-made instance, and one named like ours but untagged: never swept.
    fake_lambda.ssh_keys["k"] = {"id": "k", "name": "hand", "public_key": PUB}
    fake_lambda._launch({"instance_type_name": "gpu_1x_a10", "region_name": "us-east-1",
                         "ssh_key_names": ["hand"], "name": "notebook"})
    fake_lambda._launch({"instance_type_name": "gpu_1x_a10", "region_name": "us-east-1",
                         "ssh_key_names": ["hand"], "name": "ftplan-lookalike"})
    assert [i.id for i in p.list_instances()] == [mine.id]


def test_capacity_checked_before_launch(fake_lambda):
    fake_lambda.set_capacity("gpu_1x_a100", ["us-west-1"])
    with pytest.raises(CapacityError, match="us-east-1"):
        _provider(fake_lambda).create(_request())
    assert fake_lambda.calls("POST", "/instance-operations/launch") == []
    assert fake_lambda.ssh_keys == {}


@pytest.mark.parametrize(("kind", "exc", "advice"), [
    ("capacity", CapacityError, "capacity"),
    ("quota", QuotaError, "Quota"),
    ("billing", BillingError, "cloud.lambda.ai/settings/billing"),  # not "check LAMBDA_API_KEY"
])
def test_launch_errors_map_and_clean_up_the_key(fake_lambda, kind, exc, advice):
    fake_lambda.fail_next("create", kind=kind)
    with pytest.raises(exc, match=advice) as caught:
        _provider(fake_lambda).create(_request())
    assert type(caught.value) is exc and "LAMBDA_API_KEY" not in str(caught.value)
    assert fake_lambda.ssh_keys == {}, "create must remove the side resources it made"
    assert fake_lambda.live_instances() == []


def test_launch_is_not_retried_on_5xx(fake_lambda):
    """A retried launch after a 5xx could start a second billed machine: surface the error instead."""
    fake_lambda.fail_next("create", kind="500", times=5)
    with pytest.raises(APIError) as err:
        _provider(fake_lambda).create(_request())
    assert err.value.status == 500
    assert len(fake_lambda.calls("POST", "/instance-operations/launch")) == 1
    assert fake_lambda.ssh_keys == {}


def test_reads_are_retried_on_429_honouring_retry_after(fake_lambda):
    delays = []
    p = _provider(fake_lambda, client_options={"sleep": delays.append, "backoff_s": 0.0})
    fake_lambda.retry_after = "3"
    fake_lambda.fail_next("list", kind="429", times=2)
    assert p.list_instances() == []
    assert delays == [3.0, 3.0]
    assert len(fake_lambda.calls("GET", "/instances")) == 3


def test_bad_and_missing_credentials(fake_lambda, monkeypatch):
    with pytest.raises(AuthError, match="LAMBDA_API_KEY"):
        _provider(fake_lambda, api_key="wrong-key-123456").list_instances()
    monkeypatch.delenv("LAMBDA_API_KEY", raising=False)
    with pytest.raises(AuthError, match=r"set LAMBDA_API_KEY \(https://"):
        LambdaProvider(base_url=fake_lambda.url).list_instances()


def test_instance_vanished_and_preempted(fake_lambda):
    p = _provider(fake_lambda)
    a = p.create(_request(run_id="gone"))
    del fake_lambda.instances[a.id]
    with pytest.raises(InstanceGone):
        p.wait_ready(a, timeout_s=5)
    assert p.describe(a).state == InstanceState.TERMINATED
    p.terminate(a)  # already gone: success, and the run's key is still cleaned up
    assert all(k["name"] != "ftplan-gone" for k in fake_lambda.ssh_keys.values())

    b = p.create(_request(run_id="pre"))
    fake_lambda.preempt(b.id)
    with pytest.raises(InstanceGone):
        p.wait_ready(b, timeout_s=5)
    assert p.describe(b).state == InstanceState.PREEMPTED


def test_terminate_twice_and_by_sweeper(fake_lambda):
    p = _provider(fake_lambda)
    inst = p.create(_request(run_id="twice"))
    p.terminate(inst)
    p.terminate(inst)
    assert fake_lambda.live_instances() == []
    # The sweeper only has what list_instances returns (no key id): it still removes the key.
    other = p.create(_request(run_id="swept"))
    (found,) = p.list_instances("swept")
    assert found.id == other.id and "ssh_key_id" not in found.extra
    p.terminate(found)
    assert fake_lambda.ssh_keys == {} and fake_lambda.live_instances() == []


def test_wait_ready_times_out_with_provider_error(fake_lambda):
    fake_lambda.boot_polls = 10**6
    p = _provider(fake_lambda)
    inst = p.create(_request())
    with pytest.raises(ProviderError, match="not active"):
        p.wait_ready(inst, timeout_s=0.05)
    p.terminate(inst)


def test_spot_and_bad_run_id_are_refused(fake_lambda):
    p = _provider(fake_lambda)
    with pytest.raises(ProviderError, match="spot"):
        p.create(_request(spot=True))
    with pytest.raises(ProviderError, match="run id"):
        p.create(_request(run_id="bad id/with slash"))
    assert fake_lambda.requests == []


def test_api_key_never_leaks(fake_lambda, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("LAMBDA_API_KEY", fake_lambda.api_key)
    p = LambdaProvider(base_url=fake_lambda.url, poll_s=0.0,
                       client_options={"backoff_s": 0.0, "sleep": lambda s: None})
    inst = p.create(_request(run_id="sec"))
    p.wait_ready(inst, timeout_s=5)
    fake_lambda.fail_next("create", kind="capacity")
    with pytest.raises(CapacityError) as cap:
        p.create(_request(run_id="sec2"))
    p.terminate(inst)

    # A rejected key that the server echoes back in its error message.
    wrong = "lambda-wrong-secret-987654321"
    monkeypatch.setenv("LAMBDA_API_KEY", wrong)
    fake_lambda.echo_auth_in_errors = True
    with pytest.raises(AuthError) as auth:
        LambdaProvider(base_url=fake_lambda.url).list_instances()
    assert "got Bearer" in str(auth.value), "the fake did echo the header; the key must be scrubbed from it"

    texts = [caplog.text, str(cap.value), str(auth.value), json.dumps(inst.to_dict())]
    for secret in (fake_lambda.api_key, wrong):
        assert all(secret not in t for t in texts)
    assert "lambda" in caplog.text  # the adapter did log (at DEBUG), just not the key


ROW_KEYS = {"provider", "instance_type", "gpu", "gpu_count", "gpu_memory_gib", "vcpus", "ram_gib", "price_hour",
            "spot_price_hour", "region", "zone", "billing_granularity_s", "source", "retrieved_at"}


def test_price_fetcher(fake_lambda):
    from ftplan.providers.lambda_prices import fetch_offers

    rows = fetch_offers(base_url=fake_lambda.url, api_key=fake_lambda.api_key)
    assert all(set(r) == ROW_KEYS for r in rows)
    got = {(r["instance_type"], r["region"]) for r in rows}
    # One row per region with capacity; none for the sold-out 8x type or the CPU type.
    assert got == {("gpu_1x_a10", "us-east-1"), ("gpu_1x_a10", "us-west-1"), ("gpu_1x_a100", "us-east-1"),
                   ("gpu_1x_h100_pcie", "us-west-3")}
    a100 = next(r for r in rows if r["instance_type"] == "gpu_1x_a100")
    assert (a100["gpu"], a100["gpu_count"], a100["gpu_memory_gib"]) == ("A100", 1, 40.0)
    assert a100["price_hour"] == pytest.approx(1.29) and a100["spot_price_hour"] is None
    assert (a100["vcpus"], a100["ram_gib"], a100["zone"]) == (30.0, 200.0, None)
    fake_lambda.set_capacity("gpu_8x_a100_80gb_sxm4", ["us-east-1"])
    big = [r for r in fetch_offers(base_url=fake_lambda.url, api_key=fake_lambda.api_key)
           if r["instance_type"] == "gpu_8x_a100_80gb_sxm4"]
    assert [(r["gpu"], r["gpu_count"], r["gpu_memory_gib"], r["price_hour"]) for r in big] == \
        [("A100-80GB", 8, 80.0, 14.32)]


def test_launch_404_for_an_unknown_image_is_a_bad_request_not_a_vanished_instance(fake_lambda):
    with pytest.raises(ProviderError, match="image family 'ubuntu-99-04'") as caught:
        _provider(fake_lambda, image_family="ubuntu-99-04").create(_request())
    assert not isinstance(caught.value, InstanceGone)
    assert fake_lambda.ssh_keys == {} and fake_lambda.live_instances() == []


def test_unknown_instance_type_and_amd_gpus_are_next_offer(fake_lambda):
    with pytest.raises(OfferUnavailable, match="no instance type"):
        _provider(fake_lambda).create(_request(instance_type="gpu_1x_imaginary"))
    with pytest.raises(OfferUnavailable, match="CUDA-only"):
        _provider(fake_lambda).create(_request(gpu="MI300X"))
    assert fake_lambda.ssh_keys == {} and fake_lambda.calls("POST", "/instance-operations/launch") == []
