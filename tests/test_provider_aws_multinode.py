"""AWS multi-node (issue 13) against moto's server: a cluster placement group, N nodes in one zone that share
one security group admitting each other, EFA where the type has it, gc of a leftover group, and the
lifetimes EC2 reports (issue 14).

What the fake received is read from its request log (RunInstances form fields) and from moto's state through a
plain boto3 client; placement groups are served by tests/fakes/aws_placement.py (moto 5 has none).
"""

from __future__ import annotations

import json
import threading
import time

import boto3
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fakes.aws_moto import MotoEC2, isolate_aws_env  # sets MOTO_AMIS_PATH before moto loads

from ftplan.planner.cli import cli
from ftplan.planner.runs.store import Store
from ftplan.providers.aws import AWSProvider
from ftplan.providers.aws_cluster import ended_at
from ftplan.providers.base import RUN_TAG, STORE_TAG, InstanceRequest, InstanceState
from ftplan.providers.errors import ProviderError

PUBKEY = Ed25519PrivateKey.generate().public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " ftplan-test"
CIDR = "203.0.113.7/32"


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        isolate_aws_env(mp, tmp_path_factory.mktemp("aws-home"), "AKIAMULTINODE0000001", "planted/multi+node+secret")
        server = MotoEC2().start()
        yield server
        server.stop()


@pytest.fixture
def moto(moto_server):
    moto_server.reset()
    return moto_server


@pytest.fixture
def ec2(moto):
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=moto.url)


@pytest.fixture
def provider(moto):
    return AWSProvider(region="us-east-1", endpoint_url=moto.url, ssh_cidr=CIDR, poll_interval_s=0.01,
                       teardown_wait_s=2)


def _node(placement, rank, instance_type="p4d.24xlarge", nodes=3):
    return InstanceRequest(run_id=placement["run_id"], instance_type=instance_type, gpu="A100", gpu_count=8,
                           region="us-east-1", ssh_public_key=PUBKEY, zone=placement["zone"], placement=placement,
                           node_rank=rank, nodes=nodes, store_id="store-mn-1")


def _groups(ec2, name):
    return ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]}])["SecurityGroups"]


def test_three_nodes_in_one_cluster_placement_group_reach_each_other(provider, moto, ec2):
    assert provider.multinode == "cluster placement group"
    placement = provider.create_placement("ft-mn-0001", "us-east-1", "use1-az2", 3, store_id="store-mn-1")
    [sent] = moto.calls("CreatePlacementGroup")
    assert sent["Strategy"] == "cluster" and sent["GroupName"] == placement["name"]
    assert sent["TagSpecification.1.ResourceType"] == "placement-group"
    pg = ec2.describe_placement_groups(GroupNames=[placement["name"]])["PlacementGroups"][0]
    assert {t["Key"]: t["Value"] for t in pg["Tags"]}[RUN_TAG] == "ft-mn-0001"
    assert {t["Key"]: t["Value"] for t in pg["Tags"]}[STORE_TAG] == "store-mn-1"
    zone = placement["zone"]
    assert zone.startswith("us-east-1")   # the zone id from the catalog, as this account names it

    nodes = [provider.create(_node(placement, rank)) for rank in range(3)]

    # Every node went into the group, in the one zone, with an EFA interface carrying the shared group.
    [group] = _groups(ec2, placement["name"])
    runs = moto.calls("RunInstances")
    assert len(runs) == 3
    for params in runs:
        assert params["Placement.GroupName"] == placement["name"]
        assert params["Placement.AvailabilityZone"] == zone
        assert params["NetworkInterface.1.InterfaceType"] == "efa"
        assert params["NetworkInterface.1.SecurityGroupId.1"] == group["GroupId"]
        assert params["NetworkInterface.1.AssociatePublicIpAddress"] == "true"
        assert "SecurityGroupId.1" not in params   # EC2 wants the groups on the interface
    assert {n.zone for n in nodes} == {zone}
    assert len({r["ClientToken"] for r in runs}) == 3   # one token each: no node returns another's instance

    # One group and one key pair for the run; the group admits its own members on every protocol and port.
    assert len(ec2.describe_key_pairs(Filters=[{"Name": "tag-key", "Values": [RUN_TAG]}])["KeyPairs"]) == 1
    perms = group["IpPermissions"]
    assert {"IpProtocol": "-1", "UserIdGroupPairs": [group["GroupId"]]} in [
        {"IpProtocol": p["IpProtocol"], "UserIdGroupPairs": [g["GroupId"] for g in p["UserIdGroupPairs"]]}
        for p in perms if p.get("UserIdGroupPairs")]
    assert any(p.get("FromPort") == 22 and [r["CidrIp"] for r in p["IpRanges"]] == [CIDR] for p in perms)
    assert any(g["GroupId"] == group["GroupId"] for p in group["IpPermissionsEgress"]
               for g in p.get("UserIdGroupPairs", []))

    # Private addresses: the rendezvous endpoint of node 0 and the others' NCCL peers.
    for node in nodes:
        provider.wait_ready(node, timeout_s=10)
    ips = [n.private_ip for n in nodes]
    assert all(ips) and len(set(ips)) == 3

    # The placement is a side resource gc can see, and EC2 refuses to delete it while nodes run.
    listed = [r for r in provider.list_side_resources() if r["kind"] == "placement_group"]
    assert [(r["name"], r["run_id"]) for r in listed] == [(placement["name"], "ft-mn-0001")]
    with pytest.raises(ProviderError, match="still holds instances"):
        provider.delete_side_resource(listed[0])
    with pytest.raises(ProviderError, match="still holds instances"):
        provider.delete_placement(placement)   # a running node is not waited for (only shutting-down ones)
    assert len(moto.calls("DeletePlacementGroup")) == 2

    # Terminating one node keeps the shared group for the others; the last one takes it with it.
    provider.terminate(nodes[0])
    provider.terminate(nodes[1])
    assert len(_groups(ec2, placement["name"])) == 1
    provider.terminate(nodes[2])
    assert _groups(ec2, placement["name"]) == []
    assert ec2.describe_key_pairs(Filters=[{"Name": "tag-key", "Values": [RUN_TAG]}])["KeyPairs"] == []
    provider.delete_placement(placement)
    assert ec2.describe_placement_groups()["PlacementGroups"] == []
    assert [r for r in provider.list_side_resources() if r["kind"] == "placement_group"] == []
    provider.delete_placement(placement)   # idempotent


def test_a_type_without_efa_gets_the_group_on_the_instance(provider, moto, ec2):
    placement = provider.create_placement("ft-mn-0002", "us-east-1", "us-east-1b", 2)
    nodes = [provider.create(_node(placement, rank, instance_type="g5.xlarge", nodes=2)) for rank in range(2)]
    [group] = _groups(ec2, placement["name"])
    for params in moto.calls("RunInstances"):
        assert params["SecurityGroupId.1"] == group["GroupId"] and "NetworkInterface.1.InterfaceType" not in params
        assert params["Placement.GroupName"] == placement["name"]
    assert "efa" not in nodes[0].extra
    # gc's view of a running node knows its placement, so its terminate also spares the others' group.
    listed = {i.id: i for i in provider.list_instances("ft-mn-0002")}
    assert {i.extra.get("placement_group") for i in listed.values()} == {placement["name"]}
    provider.terminate(listed[nodes[0].id])
    assert len(_groups(ec2, placement["name"])) == 1
    provider.terminate(listed[nodes[1].id])
    assert _groups(ec2, placement["name"]) == []


def test_a_placement_without_zone_keeps_later_nodes_in_the_first_nodes_zone(provider, moto):
    placement = provider.create_placement("ft-mn-0003", "us-east-1", None, 2)
    assert placement["zone"] is None
    first = provider.create(_node(placement, 0, instance_type="g5.xlarge", nodes=2))
    second = provider.create(_node(placement, 1, instance_type="g5.xlarge", nodes=2))
    assert first.zone and second.zone == first.zone
    assert moto.calls("RunInstances")[1]["Placement.AvailabilityZone"] == first.zone


def test_nodes_created_at_once_share_one_group_without_errors(provider, moto, ec2):
    """The launcher may create the N nodes concurrently: the shared key pair and group are made once."""
    placement = provider.create_placement("ft-mn-0004", "us-east-1", "us-east-1a", 3)
    made, errors = [], []

    def create(rank):
        try:
            made.append(provider.create(_node(placement, rank, instance_type="g5.xlarge")))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(rank,)) for rank in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(made) == 3
    [group] = _groups(ec2, placement["name"])
    assert {n.extra["security_group_id"] for n in made} == {group["GroupId"]}


def test_a_node_for_a_placement_that_does_not_exist_is_refused(moto, ec2):
    provider = AWSProvider(region="us-east-1", endpoint_url=moto.url, ssh_cidr=CIDR, poll_interval_s=0.01,
                           teardown_wait_s=2, consistency_window_s=0.5)
    placement = provider.create_placement("ft-mn-0005", "us-east-1", "us-east-1a", 2)
    provider.delete_placement(placement)
    with pytest.raises(ProviderError, match="InvalidPlacementGroup.Unknown"):
        provider.create(_node(placement, 0, instance_type="g5.xlarge", nodes=2))
    assert ec2.describe_instances()["Reservations"] == []


def test_a_placement_group_ec2_has_not_propagated_yet_is_waited_for(provider, moto, ec2):
    """EC2's eventual consistency: RunInstances right after CreatePlacementGroup may not find the group yet."""
    moto.lag("CreatePlacementGroup", RunInstances=2)
    placement = provider.create_placement("ft-mn-0007", "us-east-1", "us-east-1a", 1)
    node = provider.create(_node(placement, 0, instance_type="g5.xlarge", nodes=1))
    assert node.id.startswith("i-") and moto.hidden_left()[placement["name"]] == {"RunInstances": 0}
    assert len(moto.calls("RunInstances")) == 3


def test_placement_without_nodes_is_collected_by_gc(provider, moto, ec2, tmp_path, monkeypatch):
    """A launcher killed between create_placement and its first node leaves a tagged, empty group."""
    monkeypatch.chdir(tmp_path)
    store = Store(tmp_path / "runs.sqlite3")
    store.create_run("ft-mn-gc-0001", status="failed")
    provider.create_placement("ft-mn-gc-0001", "us-east-1", "us-east-1a", 2, store_id=store.store_id)
    cfg = tmp_path / "ftplan.toml"
    cfg.write_text(f'[providers.aws]\nendpoint_url = "{moto.url}"\nssh_cidr = "{CIDR}"\npoll_interval_s = 0.01\n'
                   "teardown_wait_s = 1\n[launch]\nproviders = [\"aws\"]\n")

    def gc(*args):
        res = CliRunner().invoke(cli, ["gc", "--store", str(tmp_path / "runs.sqlite3"), "--config", str(cfg),
                                       "--json", *args], catch_exceptions=False)
        return res.exit_code, json.loads(res.stdout)

    rc, report = gc()
    assert rc == 0 and [(r["kind"], r["action"]) for r in report["side_resources"]] == [("placement_group", "orphan")]
    assert len(ec2.describe_placement_groups()["PlacementGroups"]) == 1
    rc, report = gc("--yes")
    assert rc == 0 and report["side_deleted"] == 1, report["errors"]
    assert ec2.describe_placement_groups()["PlacementGroups"] == []


def test_describe_reports_launch_and_end_times(provider, moto):
    before = time.time()
    placement = provider.create_placement("ft-mn-0006", "us-east-1", "us-east-1a", 1)
    node = provider.create(_node(placement, 0, instance_type="g5.xlarge", nodes=1))
    provider.describe(node)
    assert node.launched_at is not None and abs(node.launched_at - before) < 120 and node.ended_at is None
    provider.terminate(node)
    provider.describe(node)
    assert node.state is InstanceState.TERMINATED
    assert node.ended_at is not None and node.launched_at - 1 <= node.ended_at < time.time() + 1


@pytest.mark.parametrize("reason, expected", [
    ("User initiated (2016-05-23 17:27:52 GMT)", 1464024472.0),
    ("User initiated (2026-12-07 17:29:29 UTC)", 1796664569.0),
    ("Service initiated (2026-12-07 17:29:29 GMT)", 1796664569.0),   # e.g. a reclaimed spot instance
    ("Server.SpotInstanceTermination: Spot instance termination", None),
    ("", None),
    ("User initiated (2026-13-45 99:00:00 GMT)", None),
])
def test_end_time_is_read_from_the_state_transition_reason(reason, expected):
    assert ended_at({"StateTransitionReason": reason}) == expected


def test_providers_without_a_placement_primitive_say_so():
    from ftplan.providers.lambda_cloud import LambdaProvider
    from ftplan.providers.paperspace import PaperspaceProvider
    from ftplan.providers.runpod import RunPodProvider

    for cls in (RunPodProvider, LambdaProvider, PaperspaceProvider):
        assert cls.multinode == ""
        with pytest.raises(ProviderError, match="cannot place several nodes together"):
            cls.create_placement(cls.__new__(cls), "ft-x", "us-east-1", None, 2)


def test_gc_listing_goes_on_without_permission_to_list_placement_groups(provider, moto, ec2):
    """An IAM policy from before multi-node runs: the key pairs and groups (what a sweep must find) still list."""
    ec2.create_key_pair(KeyName="ftplan-ft-old-0001-abc123",
                        TagSpecifications=[{"ResourceType": "key-pair", "Tags": [{"Key": RUN_TAG, "Value": "ft-old"}]}])
    moto.arm("DescribePlacementGroups", "UnauthorizedOperation", status=403,
             message="You are not authorized to perform this operation.")
    assert [(r["kind"], r["run_id"]) for r in provider.list_side_resources()] == [("key_pair", "ft-old")]
