"""AWS adapter against moto's real server on 127.0.0.1 (one per session, reset per test).

What the fake *received* is read back two ways: moto's own state through a plain boto3 client
(tags, security-group rules, key pairs) and the request log of the fault middleware (RunInstances form).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import subprocess
import sys

import boto3
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fakes.aws_moto import (  # sets MOTO_AMIS_PATH before moto loads
    DLAMI_ARM,
    DLAMI_NEW,
    MotoEC2,
    isolate_aws_env,
)

from ftplan.providers.aws import AWSProvider
from ftplan.providers.base import RUN_TAG, Instance, InstanceRequest, InstanceState, SSHEndpoint
from ftplan.providers.errors import (
    AuthError,
    BillingError,
    CapacityError,
    InstanceGone,
    MissingExtraError,
    OfferUnavailable,
    ProviderError,
    QuotaError,
)
from ftplan.providers.net import public_ip

SECRET_KEY = "planted/AWS+secret+9f8e7d6c5b4a39281706"
ACCESS_KEY = "AKIAPLANTED0KEY12345"
CALLER_IP = "203.0.113.7"
PUBKEY = Ed25519PrivateKey.generate().public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " ftplan-test"


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    # Session-wide, like the server: planted credentials and no config files or instance metadata to stumble on.
    home = tmp_path_factory.mktemp("aws-home")
    with pytest.MonkeyPatch.context() as mp:
        isolate_aws_env(mp, home, ACCESS_KEY, SECRET_KEY)
        server = MotoEC2().start()
        yield server
        server.stop()


@pytest.fixture
def moto(moto_server):
    moto_server.reset()
    return moto_server


@pytest.fixture(scope="session")
def _session_ec2(moto_server):
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_server.url)


@pytest.fixture
def ec2(moto, _session_ec2):
    return _session_ec2


@pytest.fixture(scope="session")
def _session_provider(moto_server):
    # One adapter for the session: building a boto3 session + EC2 client costs ~0.7 s of CPU each time.
    return AWSProvider(region="us-east-1", endpoint_url=moto_server.url, public_ip_lookup=lambda: CALLER_IP,
                       poll_interval_s=0.01, teardown_wait_s=2)


@pytest.fixture
def provider(moto, _session_provider):
    return _session_provider


def request(**overrides) -> InstanceRequest:
    fields = dict(run_id="r-7f3a9c", instance_type="g5.xlarge", gpu="A10G", gpu_count=1, region="us-east-1",
                  zone="use1-az4", ssh_public_key=PUBKEY, disk_gib=150, max_lifetime_s=5 * 3600 + 30)
    fields.update(overrides)
    return InstanceRequest(**fields)


def ftplan_leftovers(ec2) -> tuple[list[str], list[str]]:
    keys = [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"] if k["KeyName"].startswith("ftplan-")]
    groups = [g["GroupName"] for g in ec2.describe_security_groups()["SecurityGroups"]
              if g["GroupName"].startswith("ftplan-")]
    return keys, groups


def test_create_wait_list_terminate_against_moto(provider, moto, ec2):
    inst = provider.create(request())

    sent = moto.calls("RunInstances")
    assert len(sent) == 1
    run = sent[0]
    assert run["InstanceType"] == "g5.xlarge"
    assert run["ImageId"] == DLAMI_NEW["ami_id"]  # newest x86 Deep Learning AMI, not the newer plain Ubuntu
    assert run["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert run["BlockDeviceMapping.1.Ebs.VolumeSize"] == "150"
    assert run["BlockDeviceMapping.1.Ebs.DeleteOnTermination"] == "true"
    assert "InstanceMarketOptions.MarketType" not in run
    user_data = base64.b64decode(run["UserData"]).decode()
    assert f"shutdown -h +{math.ceil((5 * 3600 + 30) / 60)}" in user_data
    zone_name = ec2.describe_availability_zones(ZoneIds=["use1-az4"])["AvailabilityZones"][0]["ZoneName"]
    assert run["Placement.AvailabilityZone"] == zone_name and inst.zone == zone_name

    raw = ec2.describe_instances(InstanceIds=[inst.id])["Reservations"][0]["Instances"][0]
    assert {"Key": RUN_TAG, "Value": "r-7f3a9c"} in raw["Tags"]
    assert raw["KeyName"] == inst.extra["key_name"]
    assert [g["GroupId"] for g in raw["SecurityGroups"]] == [inst.extra["security_group_id"]]
    shutdown = ec2.describe_instance_attribute(InstanceId=inst.id, Attribute="instanceInitiatedShutdownBehavior")
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"

    group = ec2.describe_security_groups(GroupIds=[inst.extra["security_group_id"]])["SecurityGroups"][0]
    assert [(p["IpProtocol"], p["FromPort"], p["ToPort"], [r["CidrIp"] for r in p["IpRanges"]])
            for p in group["IpPermissions"]] == [("tcp", 22, 22, [f"{CALLER_IP}/32"])]
    key = ec2.describe_key_pairs(KeyNames=[inst.extra["key_name"]])["KeyPairs"][0]
    assert {"Key": RUN_TAG, "Value": "r-7f3a9c"} in key.get("Tags", [])

    endpoint = provider.wait_ready(inst, timeout_s=5)
    assert endpoint == SSHEndpoint(host=raw["PublicIpAddress"], port=22, user="ubuntu")
    assert inst.state is InstanceState.RUNNING

    assert [i.id for i in provider.list_instances()] == [inst.id]
    assert [i.id for i in provider.list_instances("r-7f3a9c")] == [inst.id]
    assert provider.list_instances("r-other") == []

    provider.terminate(inst)
    assert inst.state.is_gone
    state = ec2.describe_instances(InstanceIds=[inst.id])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state in ("shutting-down", "terminated")
    assert ftplan_leftovers(ec2) == ([], [])
    assert provider.list_instances() == []


def test_spot_and_request_level_cidr(provider, moto, ec2):
    inst = provider.create(request(spot=True, ssh_cidr="198.51.100.0/28", zone=None))
    run = moto.calls("RunInstances")[0]
    assert run["InstanceMarketOptions.MarketType"] == "spot"
    assert run["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == "terminate"
    raw = ec2.describe_instances(InstanceIds=[inst.id])["Reservations"][0]["Instances"][0]
    assert raw.get("InstanceLifecycle") == "spot"
    group = ec2.describe_security_groups(GroupIds=[inst.extra["security_group_id"]])["SecurityGroups"][0]
    assert group["IpPermissions"][0]["IpRanges"][0]["CidrIp"] == "198.51.100.0/28"
    assert provider.list_instances()[0].spot is True
    provider.terminate(inst)


def test_arm_instance_type_gets_the_arm_dlami(provider, moto):
    inst = provider.create(request(instance_type="g5g.xlarge", gpu="T4g", zone=None))
    assert moto.calls("RunInstances")[0]["ImageId"] == DLAMI_ARM["ami_id"]
    provider.terminate(inst)


def test_capacity_error_leaves_no_key_pair_or_security_group(provider, moto, ec2):
    moto.arm("RunInstances", "InsufficientInstanceCapacity", status=500,
             message="We currently do not have sufficient g5.xlarge capacity in the Availability Zone you requested")
    with pytest.raises(CapacityError, match="InsufficientInstanceCapacity"):
        provider.create(request())
    assert len(moto.calls("RunInstances")) == 2  # botocore's retry budget is capped; failover is ftplan's job
    assert len(moto.calls("ImportKeyPair")) == 1 and len(moto.calls("CreateSecurityGroup")) == 1
    assert ftplan_leftovers(ec2) == ([], [])
    assert ec2.describe_instances()["Reservations"] == []


@pytest.mark.parametrize(("code", "status", "error"), [
    ("Unsupported", 400, OfferUnavailable),
    ("InvalidInstanceType", 400, OfferUnavailable),
    ("InsufficientHostCapacity", 500, CapacityError),
    ("SpotMaxPriceTooLow", 400, CapacityError),
    ("VcpuLimitExceeded", 400, QuotaError),
    ("MaxSpotInstanceCountExceeded", 400, QuotaError),
    ("AuthFailure", 401, AuthError),
    ("UnauthorizedOperation", 403, AuthError),
    ("OptInRequired", 401, BillingError),
    ("PendingVerification", 400, BillingError),
    ("InternalError", 500, ProviderError),
])
def test_run_instances_errors_map_onto_the_tree(provider, moto, ec2, code, status, error):
    moto.arm("RunInstances", code, status=status)
    with pytest.raises(error) as caught:
        provider.create(request())
    assert type(caught.value) is error
    assert code in str(caught.value)
    assert ftplan_leftovers(ec2) == ([], [])


def test_rejected_credentials_name_the_variables(provider, moto):
    moto.arm("DescribeAvailabilityZones", "AuthFailure", status=401,
             message="AWS was not able to validate the provided access credentials")
    with pytest.raises(AuthError, match="AWS_ACCESS_KEY_ID"):
        provider.create(request())


def test_missing_credentials_say_how_to_set_them(moto, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    provider = AWSProvider(region="us-east-1", endpoint_url=moto.url, ssh_cidr="203.0.113.7/32")
    with pytest.raises(AuthError) as caught:
        provider.list_instances()
    assert "aws configure" in str(caught.value) and "AWS_SECRET_ACCESS_KEY" in str(caught.value)
    assert moto.requests == []  # nothing was sent unsigned


def test_vanished_instance_reads_as_terminated_and_terminate_succeeds(provider, moto, ec2):
    inst = provider.create(request())
    ec2.terminate_instances(InstanceIds=[inst.id])  # behind ftplan's back (spot reclaim, a human)
    assert provider.describe(inst).state.is_gone
    with pytest.raises(InstanceGone):
        provider.wait_ready(inst, timeout_s=1)
    provider.terminate(inst)  # already gone is success, and the side resources still go
    assert ftplan_leftovers(ec2) == ([], [])

    ghost = Instance(provider="aws", id="i-0123456789abcdef0", run_id="r-7f3a9c", region="us-east-1")
    assert provider.describe(ghost).state is InstanceState.TERMINATED
    provider.terminate(ghost)


def test_terminate_twice(provider, ec2):
    inst = provider.create(request())
    provider.terminate(inst)
    provider.terminate(inst)
    assert inst.state.is_gone
    assert ftplan_leftovers(ec2) == ([], [])


def test_terminate_that_aws_refuses_is_an_error_not_a_silent_success(provider, moto, ec2):
    inst = provider.create(request())
    moto.arm("TerminateInstances", "InternalError", status=500, message="We encountered an internal error")
    with pytest.raises(ProviderError):
        provider.terminate(inst)
    state = ec2.describe_instances(InstanceIds=[inst.id])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state in ("pending", "running")  # still billing: the caller must know
    assert provider.list_instances("r-7f3a9c")[0].id == inst.id  # and gc can still find it


def test_garbage_public_key_is_rejected_before_anything_is_created(provider, moto, ec2):
    with pytest.raises(ProviderError, match="OpenSSH"):
        provider.create(request(ssh_public_key="not a key"))
    assert moto.calls("ImportKeyPair") == [] and ftplan_leftovers(ec2) == ([], [])


def test_secrets_never_reach_logs_errors_or_records(provider, moto, caplog):
    caplog.set_level(logging.DEBUG)  # botocore's own DEBUG output included
    inst = provider.create(request())
    provider.wait_ready(inst, timeout_s=5)
    record = json.dumps(inst.to_dict())
    provider.terminate(inst)
    assert moto.requests[0].authorization.startswith("AWS4-HMAC-SHA256")  # the planted keys really signed requests
    assert SECRET_KEY not in record and ACCESS_KEY not in record
    assert all(SECRET_KEY not in r.getMessage() for r in caplog.records)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("ftplan")]
    assert ours and all(ACCESS_KEY not in m for m in ours)

    # Even an error text that echoes the credentials comes out scrubbed.
    caplog.clear()
    moto.arm("RunInstances", "AuthFailure", status=401,
             message=f"The security token included in the request is invalid: {SECRET_KEY} / {ACCESS_KEY}")
    with pytest.raises(AuthError) as caught:
        provider.create(request())
    assert SECRET_KEY not in str(caught.value) and ACCESS_KEY not in str(caught.value)
    assert all(SECRET_KEY not in r.getMessage() and ACCESS_KEY not in r.getMessage()
               for r in caplog.records if r.name.startswith("ftplan"))


def test_missing_boto3_gives_the_pip_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # what `import boto3` sees when the extra is not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'ftplan\[aws\]'"):
        AWSProvider(region="us-east-1", ssh_cidr="203.0.113.7/32").list_instances()


def test_provider_modules_import_no_sdk_at_module_level():
    code = ("import sys, ftplan.providers.aws, ftplan.providers.gcp, ftplan.providers.aws_prices, ftplan.providers.gcp_prices, ftplan.providers.net;"
            "print([m for m in ('boto3', 'botocore', 'google.cloud.compute_v1', 'google.auth') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_ip_lookup(httpserver, monkeypatch):
    monkeypatch.delenv("FTPLAN_PUBLIC_IP", raising=False)
    httpserver.expect_request("/").respond_with_data("198.51.100.23\n")
    assert public_ip(httpserver.url_for("/")) == "198.51.100.23"
    httpserver.clear()
    httpserver.expect_request("/").respond_with_data("<html>captive portal</html>")
    with pytest.raises(ProviderError, match="FTPLAN_PUBLIC_IP"):
        public_ip(httpserver.url_for("/"))
    monkeypatch.setenv("FTPLAN_PUBLIC_IP", "192.0.2.9")
    assert public_ip(httpserver.url_for("/")) == "192.0.2.9"
