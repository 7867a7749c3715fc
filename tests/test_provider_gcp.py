"""GCP adapter: the real google-cloud-compute client against the fake Compute REST server on 127.0.0.1.

Credentials are real google-auth objects: `Credentials(token=...)` sends `Authorization: Bearer ...`, which the
fake checks, and a rejected token goes through google-auth's own refresh failure (RefreshError).
"""

from __future__ import annotations

import json
import logging

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fakes.gcp_compute import FakeCompute
from google.oauth2.credentials import Credentials

from ftplan.providers.base import Instance, InstanceRequest, InstanceState, SSHEndpoint
from ftplan.providers.errors import AuthError, CapacityError, InstanceGone, ProviderError, QuotaError
from ftplan.providers.gcp import GCPProvider

PROJECT = "ftplan-test-project"
TOKEN = "ya29.planted-gcp-token-5e4d3c2b1a"
CALLER_IP = "198.51.100.4"
PUBKEY = Ed25519PrivateKey.generate().public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " ftplan-test"


@pytest.fixture
def fake():
    server = FakeCompute(valid_tokens={TOKEN}).start()
    yield server
    server.stop()


def make_provider(fake, token: str = TOKEN, **kw) -> GCPProvider:
    return GCPProvider(project=PROJECT, zone="us-central1-a", api_endpoint=fake.endpoint,
                       credentials=Credentials(token=token), public_ip_lookup=lambda: CALLER_IP,
                       poll_interval_s=0.01, **kw)


@pytest.fixture
def provider(fake):
    return make_provider(fake)


def request(**overrides) -> InstanceRequest:
    fields = dict(run_id="r-7f3a9c", instance_type="n1-standard-8", gpu="T4", gpu_count=1, region="us-central1",
                  zone="us-central1-b", ssh_public_key=PUBKEY, disk_gib=150, max_lifetime_s=6 * 3600)
    fields.update(overrides)
    return InstanceRequest(**fields)


def metadata(body: dict) -> dict[str, str]:
    return {item["key"]: item["value"] for item in body["metadata"]["items"]}


def test_create_wait_list_terminate_against_fake(provider, fake):
    inst = provider.create(request())

    [insert] = fake.calls("POST", "/zones/us-central1-b/instances")
    body = insert.body
    assert insert.authorization == f"Bearer {TOKEN}"
    assert body["machineType"] == "zones/us-central1-b/machineTypes/n1-standard-8"
    assert body["guestAccelerators"] == [
        {"acceleratorType": "zones/us-central1-b/acceleratorTypes/nvidia-tesla-t4", "acceleratorCount": 1}]
    assert body["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert body["scheduling"]["instanceTerminationAction"] == "DELETE"
    assert int(body["scheduling"]["maxRunDuration"]["seconds"]) == 6 * 3600
    assert "provisioningModel" not in body["scheduling"]
    assert body["labels"] == {"ftplan-run-id": "r-7f3a9c"}
    meta = metadata(body)
    assert meta["ssh-keys"] == f"ftplan:{PUBKEY}"
    assert meta["enable-oslogin"] == "FALSE" and meta["install-nvidia-driver"] == "True"
    disk = body["disks"][0]["initializeParams"]
    assert disk["sourceImage"].endswith("/global/images/common-cu128-ubuntu-2204-nvidia-570-v20250812")
    assert int(disk["diskSizeGb"]) == 150

    [rule] = fake.firewalls.values()
    assert rule["sourceRanges"] == [f"{CALLER_IP}/32"]
    assert rule["allowed"] == [{"IPProtocol": "tcp", "ports": ["22"]}]
    assert rule["targetTags"] == body["tags"]["items"]

    endpoint = provider.wait_ready(inst, timeout_s=5)
    assert endpoint == SSHEndpoint(host="127.0.0.1", port=22, user="ftplan")
    assert len(fake.calls("GET", f"/instances/{inst.id}")) >= fake.boot_polls  # it waited for RUNNING

    assert [i.id for i in provider.list_instances()] == [inst.id]
    [listed] = provider.list_instances("r-7f3a9c")
    assert (listed.run_id, listed.zone, listed.instance_type) == ("r-7f3a9c", "us-central1-b", "n1-standard-8")
    assert listed.extra["firewall"] == inst.extra["firewall"]
    assert provider.list_instances("r-other") == []

    provider.terminate(inst)
    assert inst.state.is_gone
    assert fake.instances == {} and fake.firewalls == {}
    assert provider.describe(inst).state is InstanceState.TERMINATED
    assert provider.list_instances() == []


def test_a2_spot_carries_its_gpus_and_uses_the_spot_model(provider, fake):
    inst = provider.create(request(instance_type="a2-highgpu-1g", gpu="A100", spot=True, zone=None))
    [insert] = fake.calls("POST", "/zones/us-central1-a/instances")
    assert "guestAccelerators" not in insert.body
    assert insert.body["scheduling"]["provisioningModel"] == "SPOT"
    assert inst.zone == "us-central1-a"
    assert provider.list_instances()[0].spot is True
    provider.terminate(inst)


@pytest.mark.parametrize(("instance_type", "gpu"), [("n1-standard-8", "H100"), ("a2-highgpu-1g", "L4")])
def test_impossible_gpu_and_machine_pairs_are_refused_before_any_call(provider, fake, instance_type, gpu):
    with pytest.raises(ProviderError, match=instance_type):
        provider.create(request(instance_type=instance_type, gpu=gpu))
    assert fake.requests == []


@pytest.mark.parametrize("code", ["ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"])
def test_capacity_error_in_the_operation_leaves_nothing_behind(provider, fake, code):
    fake.insert_op_error = (code, "The zone 'projects/p/zones/us-central1-b' does not have enough resources "
                                  "available to fulfill the request.", 503)
    with pytest.raises(CapacityError, match=code):
        provider.create(request())
    assert fake.calls("POST", "/global/firewalls")  # the firewall rule had been made...
    assert fake.instances == {} and fake.firewalls == {}  # ...and was removed


def test_quota_errors_async_and_sync(provider, fake):
    fake.insert_op_error = ("QUOTA_EXCEEDED", "Quota 'NVIDIA_T4_GPUS' exceeded. Limit: 0.0 in region us-central1.",
                            403)
    with pytest.raises(QuotaError, match="NVIDIA_T4_GPUS"):
        provider.create(request())
    fake.insert_op_error = None
    fake.sync_errors[("POST", "insert")] = (403, "quotaExceeded", "Quota 'GPUS_ALL_REGIONS' exceeded. Limit: 0.0 "
                                            "globally.")
    with pytest.raises(QuotaError, match="GPUS_ALL_REGIONS"):
        provider.create(request())
    assert fake.instances == {} and fake.firewalls == {}


def test_rejected_token_is_an_auth_error_naming_the_fix(fake):
    provider = make_provider(fake, token="ya29.expired-token")
    with pytest.raises(AuthError, match="gcloud auth application-default login"):
        provider.create(request())
    assert fake.instances == {} and fake.firewalls == {}


def test_missing_permission_is_an_auth_error(provider, fake):
    fake.sync_errors[("POST", "firewall-insert")] = (
        403, "forbidden", "Required 'compute.firewalls.create' permission for 'projects/ftplan-test-project'")
    with pytest.raises(AuthError, match="compute.firewalls.create"):
        provider.create(request())


def test_missing_adc_says_how_to_log_in(monkeypatch, tmp_path):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    with pytest.raises(AuthError) as caught:
        GCPProvider(project=PROJECT, zone="us-central1-a", api_endpoint="http://127.0.0.1:9").list_instances()
    assert "gcloud auth application-default login" in str(caught.value)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(caught.value)


def test_instance_that_vanishes_before_running_is_capacity_after_running_is_gone(provider, fake):
    early = provider.create(request())
    fake.vanish(PROJECT, "us-central1-b", early.id)  # GCP accepted the insert, then dropped the VM
    with pytest.raises(CapacityError):
        provider.wait_ready(early, timeout_s=2)
    provider.terminate(early)  # already gone is success; its firewall still goes
    assert fake.firewalls == {}

    late = provider.create(request())
    provider.wait_ready(late, timeout_s=5)
    fake.vanish(PROJECT, "us-central1-b", late.id)  # preempted spot VM deleted by GCP
    with pytest.raises(InstanceGone):
        provider.wait_ready(late, timeout_s=2)
    assert provider.describe(late).state is InstanceState.TERMINATED
    provider.terminate(late)

    never = Instance(provider="gcp", id="ftplan-never-existed", run_id="x", region="us-central1",
                     zone="us-central1-b", extra={"project": PROJECT})
    provider.terminate(never)
    assert never.state is InstanceState.TERMINATED


def test_terminate_twice(provider, fake):
    inst = provider.create(request())
    provider.terminate(inst)
    provider.terminate(inst)
    assert inst.state is InstanceState.TERMINATED
    assert len(fake.calls("DELETE", f"/instances/{inst.id}")) == 2


def test_terminate_that_gcp_refuses_is_an_error(provider, fake):
    inst = provider.create(request())
    fake.sync_errors[("DELETE", "delete")] = (503, "backendError", "Internal error. Please try again.")
    with pytest.raises(ProviderError):
        provider.terminate(inst)
    assert provider.list_instances("r-7f3a9c")[0].id == inst.id  # still there, still findable by gc


def test_list_ignores_instances_ftplan_did_not_make(provider, fake):
    fake.instances[(PROJECT, "us-central1-c", "someone-elses-vm")] = {
        "name": "someone-elses-vm", "status": "RUNNING", "labels": {"team": "web"}, "_polls": 0,
        "zone": f"{fake.endpoint}/compute/v1/projects/{PROJECT}/zones/us-central1-c"}
    inst = provider.create(request())
    assert [i.id for i in provider.list_instances()] == [inst.id]
    assert fake.calls("GET", "/aggregated/instances")[-1].query["filter"] == "labels.ftplan-run-id:*"


def test_secrets_never_reach_logs_errors_or_records(provider, fake, caplog):
    caplog.set_level(logging.DEBUG)  # google-auth, urllib3 and api-core DEBUG output included
    inst = provider.create(request())
    provider.wait_ready(inst, timeout_s=5)
    record = json.dumps(inst.to_dict())
    provider.terminate(inst)
    assert fake.requests[0].authorization == f"Bearer {TOKEN}"  # the planted token really was used
    assert TOKEN not in record
    assert all(TOKEN not in r.getMessage() for r in caplog.records)

    # Even an error text that echoes the token comes out scrubbed.
    caplog.clear()
    fake.sync_errors[("POST", "firewall-insert")] = (403, "forbidden", f"token {TOKEN} lacks compute.firewalls.create")
    with pytest.raises(AuthError) as caught:
        provider.create(request())
    assert TOKEN not in str(caught.value) and "compute.firewalls.create" in str(caught.value)
    assert all(TOKEN not in r.getMessage() for r in caplog.records if r.name.startswith("ftplan"))
