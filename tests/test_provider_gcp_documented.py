"""GCP adapter against what Compute Engine documents (issue 20 item 2, issue 22 items 1 and 5): machine types
sold only by reservation/Spot/Flex-start, Hyperdisk-only families, the newer instance states, the synchronous
capacity wording, quota/billing advice, 429s while polling, host keys as guest attributes, and the firewall
update. Real google-cloud-compute client against tests/fakes/gcp_compute.py (which parses every insert body
as a compute_v1 `Instance`, so an unknown field fails as on GCP)."""

from __future__ import annotations

import pytest
from test_provider_gcp import PROJECT, make_provider, metadata, request

from ftplan.providers.base import InstanceState
from ftplan.providers.errors import (
    BillingError,
    CapacityError,
    InstanceGone,
    OfferUnavailable,
    ProviderError,
    QuotaError,
)
from ftplan.providers.gcp import boot_disk_type

HOST_ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG7hQ2u5cH0m1mS0m3b8i0Jx1Kd2V3QeXH0fVtq3h9Qz"


@pytest.fixture
def fake():
    from fakes.gcp_compute import FakeCompute
    from test_provider_gcp import TOKEN

    server = FakeCompute(valid_tokens={TOKEN}).start()
    yield server
    server.stop()


@pytest.fixture
def provider(fake):
    return make_provider(fake)


def inserted(fake) -> dict:
    return fake.calls("POST", "/instances")[-1].body


@pytest.mark.parametrize("machine", ["a4-highgpu-8g", "a3-ultragpu-8g", "a3-ultragpu-8g-nolssd", "a3-highgpu-1g",
                                     "a3-highgpu-2g", "a3-highgpu-4g"])
def test_on_demand_reservation_only_types_are_next_offer_before_any_call(provider, fake, machine):
    gpu = {"a4": "B200", "a3-ultragpu": "H200"}.get(machine[:2] if machine.startswith("a4") else machine[:11], "H100")
    with pytest.raises(OfferUnavailable, match="reservations, Spot or Flex-start"):
        provider.create(request(instance_type=machine, gpu=gpu, gpu_count=8))
    assert fake.requests == []


def test_spot_a4_boots_from_hyperdisk_with_a_cuda_12_8_image(provider, fake):
    inst = provider.create(request(instance_type="a4-highgpu-8g", gpu="B200", gpu_count=8, spot=True))
    body = inserted(fake)
    params = body["disks"][0]["initializeParams"]
    assert params["diskType"].endswith("/diskTypes/hyperdisk-balanced")
    assert "common-cu128" in params["sourceImage"]  # the only family here with sm_100 kernels
    assert body["scheduling"]["provisioningModel"] == "SPOT"
    provider.terminate(inst)


def test_blackwell_without_a_cuda_12_8_image_is_refused_as_next_offer(provider, fake):
    fake.images = [i for i in fake.images if "cu128" not in i["family"]]
    with pytest.raises(OfferUnavailable, match="CUDA >= 12.8"):
        provider.create(request(instance_type="a4-highgpu-8g", gpu="B200", gpu_count=8, spot=True))
    assert fake.calls("POST", "/instances") == []


def test_boot_disk_type_by_family():
    assert boot_disk_type("a3-ultragpu-8g") == "hyperdisk-balanced"
    assert boot_disk_type("a4-highgpu-8g") == "hyperdisk-balanced"
    assert boot_disk_type("a3-highgpu-8g") == "pd-balanced"
    assert boot_disk_type("n1-standard-8") == "pd-balanced"


def test_a_refusal_in_the_docs_words_moves_to_the_next_offer(provider, fake):
    fake.sync_errors[("POST", "insert")] = (
        400, "invalid", "Machine type a3-highgpu-8g can only be provisioned with a reservation, Spot VMs or "
                        "Flex-start VMs.")
    with pytest.raises(OfferUnavailable):
        provider.create(request(instance_type="a3-highgpu-8g", gpu="H100", gpu_count=8))
    assert fake.firewalls == {}


def test_newer_synchronous_capacity_wording_is_capacity(provider, fake):
    fake.sync_errors[("POST", "insert")] = (
        503, "resourceExhausted", "A n1-standard-8 VM instance with 1 nvidia-tesla-t4 accelerator(s) is currently "
                                  "unavailable in the us-central1-b zone. Alternatively, you can try your request "
                                  "again with a different VM hardware configuration or at a later time.")
    with pytest.raises(CapacityError) as caught:
        provider.create(request())
    assert type(caught.value) is CapacityError
    assert fake.firewalls == {}


def test_quota_refusal_names_the_quota_to_raise(provider, fake):
    fake.insert_op_error = ("QUOTA_EXCEEDED", "Quota 'NVIDIA_T4_GPUS' exceeded.  Limit: 0.0 in region us-central1.", 403)
    with pytest.raises(QuotaError, match=r"raise quota NVIDIA_T4_GPUS in region us-central1 at https://console"):
        provider.create(request())


def test_billing_refusal_points_at_the_billing_page(provider, fake):
    fake.sync_errors[("POST", "firewall-insert")] = (
        403, "accessNotConfigured", "This API method requires billing to be enabled. Please enable billing on "
                                    "project #123 by visiting https://console.developers.google.com/billing/enable")
    with pytest.raises(BillingError, match=r"console.cloud.google.com/billing"):
        provider.create(request())


def test_amd_offer_is_refused(provider, fake):
    with pytest.raises(OfferUnavailable, match="CUDA-only"):
        provider.create(request(gpu="MI300X"))
    assert fake.requests == []


@pytest.mark.parametrize(("status", "state"), [
    ("PENDING", InstanceState.PENDING), ("PENDING_STOP", InstanceState.STOPPING),
    ("DEPROVISIONING", InstanceState.TERMINATING), ("STOPPED", InstanceState.STOPPED),
])
def test_newer_instance_states_are_mapped(provider, fake, status, state):
    inst = provider.create(request())
    fake.set_status(PROJECT, inst.zone, inst.id, status)
    assert provider.describe(inst).state is state
    if status != "PENDING":  # on the way out: wait_ready reports it instead of polling to its timeout
        with pytest.raises(InstanceGone):
            provider.wait_ready(inst, timeout_s=5)


def test_polling_rides_out_429s(provider, fake):
    inst = provider.create(request())
    fake.throttle_gets = 2
    assert provider.wait_ready(inst, timeout_s=5).host == fake.nat_ip
    fake.throttle_gets = 50
    with pytest.raises(ProviderError, match="429"):
        provider.describe(inst)  # bounded: a provider that keeps refusing is an error, not a hang


def test_host_keys_from_guest_attributes(provider, fake):
    inst = provider.create(request())
    assert metadata(inserted(fake))["enable-guest-attributes"] == "TRUE"
    assert provider.published_host_keys(inst) is None  # the guest agent has not written them yet
    fake.publish_guest_attribute(PROJECT, inst.zone, inst.id, "hostkeys", "ssh-ed25519", HOST_ED25519)
    fake.publish_guest_attribute(PROJECT, inst.zone, inst.id, "other", "x", "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAB")
    assert provider.published_host_keys(inst) == [HOST_ED25519]


def test_allow_ssh_from_replaces_the_firewall_source(provider, fake):
    inst = provider.create(request())
    rule = fake.firewalls[(PROJECT, inst.extra["firewall"])]
    assert rule["sourceRanges"] == ["198.51.100.4/32"]
    provider.allow_ssh_from(inst, "203.0.113.0/24")
    assert rule["sourceRanges"] == ["203.0.113.0/24"] and inst.extra["ssh_cidr"] == "203.0.113.0/24"
    assert rule["allowed"] == [{"IPProtocol": "tcp", "ports": ["22"]}]  # the rest of the rule is untouched
