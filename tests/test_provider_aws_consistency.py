"""AWS adapter against EC2's documented eventual consistency, "not offered" answers, GPU/image refusals,
host keys from the console and the ssh rule update (issues 20 and 22), on moto behind the fault middleware.

EC2 documents that a resource just created may answer NotFound for a while and that a NotFound from
TerminateInstances "does not mean that the instance is or will be terminated"
(https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html); `MotoEC2.lag` reproduces that.
"""

from __future__ import annotations

import time

import pytest
import test_provider_aws as _aws
from test_provider_aws import CALLER_IP, ftplan_leftovers, request

from ftplan.providers.aws import AWSProvider
from ftplan.providers.base import InstanceState
from ftplan.providers.errors import BillingError, InstanceGone, OfferUnavailable, ProviderError, QuotaError

HOST_ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG7hQ2u5cH0m1mS0m3b8i0Jx1Kd2V3QeXH0fVtq3h9Qz"
HOST_ECDSA = ("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBKq2VQw1m7yq0u0b1c"
              "Vb0m2w9M5o7dQ3l3aX0sS4mJb2tqkZrC5l1JrJ8m6p8GfQeQ2vNfXo0c1k2Jm3tZqKp0s=")
# What an Ubuntu DLAMI's serial console looks like around cloud-init's keys_to_console stage.
CONSOLE = f"""[   10.123456] cloud-init[1021]: Cloud-init v. 24.1.3 running 'modules:config' at Mon, 07 Dec 2026 12:00:05 +0000.
<14>Dec  7 12:00:06 cloud-init: #############################################################
<14>Dec  7 12:00:06 cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----
<14>Dec  7 12:00:06 cloud-init: 256 SHA256:3mXq1b3Q8m2Yq2nJxk1aY0v4o5kqjv6r8dWQyM3lJ9Y root@ip-172-31-7-9 (ECDSA)
<14>Dec  7 12:00:06 cloud-init: 256 SHA256:Lx2Zr3v6f5p8w9e0u1t2y3i4o5p6a7s8d9f0g1h2j3k root@ip-172-31-7-9 (ED25519)
<14>Dec  7 12:00:06 cloud-init: -----END SSH HOST KEY FINGERPRINTS-----
<14>Dec  7 12:00:06 cloud-init: #############################################################
-----BEGIN SSH HOST KEY KEYS-----\r
{HOST_ECDSA} root@ip-172-31-7-9\r
{HOST_ED25519} root@ip-172-31-7-9\r
-----END SSH HOST KEY KEYS-----\r
[   11.000000] cloud-init[1021]: Cloud-init v. 24.1.3 finished at Mon, 07 Dec 2026 12:00:07 +0000.
"""


# The moto server and adapter fixtures of test_provider_aws, shared rather than copied.
moto_server, moto, ec2, provider = _aws.moto_server, _aws.moto, _aws.ec2, _aws.provider
_session_ec2, _session_provider = _aws._session_ec2, _aws._session_provider


def _state(ec2, instance_id: str) -> str:
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]


def test_new_instance_hidden_for_two_describes_and_new_group_for_one_authorize_still_comes_up(provider, moto, ec2):
    moto.lag("RunInstances", DescribeInstances=2)
    moto.lag("CreateSecurityGroup", AuthorizeSecurityGroupIngress=1)
    inst = provider.create(request())
    assert len(moto.calls("AuthorizeSecurityGroupIngress")) == 2  # refused once as "no such group", then done

    endpoint = provider.wait_ready(inst, timeout_s=30)

    assert all(n == 0 for left in moto.hidden_left().values() for n in left.values())  # the lag really happened
    raw = ec2.describe_instances(InstanceIds=[inst.id])["Reservations"][0]["Instances"][0]
    assert (endpoint.host, endpoint.port, endpoint.user) == (raw["PublicIpAddress"], 22, "ubuntu")
    group = ec2.describe_security_groups(GroupIds=[inst.extra["security_group_id"]])["SecurityGroups"][0]
    assert group["IpPermissions"][0]["IpRanges"][0]["CidrIp"] == f"{CALLER_IP}/32"
    provider.terminate(inst)


def test_create_then_immediate_terminate_leaves_the_instance_really_terminated(provider, moto, ec2):
    moto.lag("RunInstances", DescribeInstances=2, TerminateInstances=1)
    inst = provider.create(request())

    provider.terminate(inst)

    assert len(moto.calls("TerminateInstances")) == 2  # the NotFound was not taken for "already gone"
    assert _state(ec2, inst.id) in ("shutting-down", "terminated")
    assert inst.state.is_gone
    assert ftplan_leftovers(ec2) == ([], [])


def test_key_pair_not_yet_visible_to_run_instances_is_retried_without_a_second_instance(provider, moto, ec2):
    moto.lag("ImportKeyPair", RunInstances=1)
    inst = provider.create(request())
    runs = moto.calls("RunInstances")
    assert len(runs) == 2 and runs[0]["ClientToken"] == runs[1]["ClientToken"]
    assert [i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]] == [inst.id]
    provider.terminate(inst)


def test_not_found_for_a_fresh_instance_is_not_gone_but_long_after_creation_it_is(provider, moto, ec2):
    inst = provider.create(request())
    moto.arm("DescribeInstances", "InvalidInstanceID.NotFound")
    assert provider.describe(inst).state is InstanceState.PENDING  # fresh: "not visible yet"
    with pytest.raises(ProviderError, match="not visible") as caught:
        provider.wait_ready(inst, timeout_s=0.3)
    assert not isinstance(caught.value, InstanceGone)

    inst.extra["created_at"] = time.time() - 3600  # the same answer an hour after creation: gone
    assert provider.describe(inst).state is InstanceState.TERMINATED
    with pytest.raises(InstanceGone):
        provider.wait_ready(inst, timeout_s=5)
    moto.middleware.faults.clear()
    ec2.terminate_instances(InstanceIds=[inst.id])


def test_terminate_never_records_a_running_instance_as_terminated(moto, ec2):
    # EC2 answers NotFound to TerminateInstances for ever (window 0.5 s): the read-back still shows it running.
    quick = AWSProvider(region="us-east-1", endpoint_url=moto.url, public_ip_lookup=lambda: CALLER_IP,
                        poll_interval_s=0.01, teardown_wait_s=1, consistency_window_s=0.5)
    inst = quick.create(request())
    moto.arm("TerminateInstances", "InvalidInstanceID.NotFound")
    with pytest.raises(ProviderError, match="still (pending|running) after terminate"):
        quick.terminate(inst)
    assert len(moto.calls("TerminateInstances")) > 1
    assert _state(ec2, inst.id) in ("pending", "running")
    assert [i.id for i in quick.list_instances("r-7f3a9c")] == [inst.id]  # gc can still find it
    moto.middleware.faults.clear()
    quick.terminate(inst)


def test_v100_offer_is_refused_before_anything_is_made_unless_an_image_is_given(provider, moto, ec2):
    with pytest.raises(OfferUnavailable, match="no P3/V100") as caught:
        provider.create(request(instance_type="p3.2xlarge", gpu="V100", zone=None))
    assert "image" in str(caught.value)
    assert moto.calls("ImportKeyPair") == [] and moto.calls("RunInstances") == []
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    inst = provider.create(request(instance_type="p3dn.24xlarge", gpu="V100-32GB", zone=None, image=ami))
    assert moto.calls("RunInstances")[0]["ImageId"] == ami
    provider.terminate(inst)
    configured = AWSProvider(region="us-east-1", endpoint_url=moto.url, public_ip_lookup=lambda: CALLER_IP,
                             poll_interval_s=0.01, teardown_wait_s=1, image=ami)  # [providers.aws] image = ...
    inst = configured.create(request(run_id="r-cfg", instance_type="p3dn.24xlarge", gpu="V100-32GB", zone=None))
    assert moto.calls("RunInstances")[-1]["ImageId"] == ami
    configured.terminate(inst)


def test_amd_gpu_offer_is_refused_as_next_offer(provider, moto):
    with pytest.raises(OfferUnavailable, match="CUDA-only"):
        provider.create(request(instance_type="g4ad.xlarge", gpu="Radeon Pro V520", zone=None))
    assert moto.requests == []


def test_instance_type_not_offered_in_the_region_moves_to_the_next_offer(provider, moto, ec2):
    with pytest.raises(OfferUnavailable, match="InvalidInstanceType"):
        provider.create(request(instance_type="p9.imaginary", zone=None))
    assert ftplan_leftovers(ec2) == ([], [])


@pytest.mark.parametrize(("code", "error", "advice"), [
    ("VcpuLimitExceeded", QuotaError, "Running On-Demand P instances"),
    ("MaxSpotInstanceCountExceeded", QuotaError, "Spot Instance Requests"),
    ("OptInRequired", BillingError, "console.aws.amazon.com/billing"),
])
def test_refusals_carry_the_advice_that_fixes_them(provider, moto, code, error, advice):
    moto.arm("RunInstances", code)
    with pytest.raises(error, match=advice):
        provider.create(request())


def test_host_keys_come_from_cloud_inits_console_block(provider, moto):
    inst = provider.create(request())
    assert provider.published_host_keys(inst) is None  # moto's console has no cloud-init block yet
    moto.set_console_output(inst.id, CONSOLE)
    assert provider.published_host_keys(inst) == [HOST_ECDSA, HOST_ED25519]
    provider.terminate(inst)


def test_allow_ssh_from_replaces_the_source_range_ipv4_and_ipv6(provider, moto, ec2):
    inst = provider.create(request(ssh_cidr="2001:db8:1::/64"))
    group_id = inst.extra["security_group_id"]

    def sources():
        perms = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]["IpPermissions"]
        return sorted([r["CidrIp"] for p in perms for r in p.get("IpRanges", [])] +
                      [r["CidrIpv6"] for p in perms for r in p.get("Ipv6Ranges", [])])

    assert sources() == ["2001:db8:1::/64"]  # IPv6 goes in Ipv6Ranges, as the EC2 model wants
    provider.allow_ssh_from(inst, "198.51.100.0/24")
    assert sources() == ["198.51.100.0/24"]
    provider.allow_ssh_from(inst, "198.51.100.0/24")  # idempotent
    assert sources() == ["198.51.100.0/24"] and inst.extra["ssh_cidr"] == "198.51.100.0/24"
    provider.terminate(inst)
