"""GCP multi-node (issue 13) against the fake Compute server: a compact placement policy, N nodes in one zone
that carry it and a firewall rule admitting each other, refusals Compute documents (policy in use, unknown
policy), gc of a leftover policy and rule, and the lifetimes Compute reports (issue 14)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fakes.gcp_compute import FakeCompute
from google.oauth2.credentials import Credentials

from ftplan.planner.cli import cli
from ftplan.planner.runs.store import Store
from ftplan.providers.base import InstanceRequest, InstanceState
from ftplan.providers.errors import ProviderError
from ftplan.providers.gcp import GCPProvider

PROJECT = "ftplan-mn-project"
TOKEN = "ya29.planted-multinode-token-77aa"
CIDR = "198.51.100.4/32"
PUBKEY = Ed25519PrivateKey.generate().public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " ftplan-test"


@pytest.fixture
def fake():
    server = FakeCompute(valid_tokens={TOKEN}).start()
    yield server
    server.stop()


@pytest.fixture
def provider(fake):
    return GCPProvider(project=PROJECT, zone="us-central1-a", api_endpoint=fake.endpoint,
                       credentials=Credentials(token=TOKEN), ssh_cidr=CIDR, poll_interval_s=0.01, op_timeout_s=2)


def _node(placement, rank, nodes=3, zone="us-central1-c"):
    return InstanceRequest(run_id=placement["run_id"], instance_type="a2-highgpu-8g", gpu="A100", gpu_count=8,
                           region="us-central1", zone=zone, ssh_public_key=PUBKEY, placement=placement,
                           node_rank=rank, nodes=nodes, store_id="store-mn-1")


def test_three_nodes_in_one_compact_placement_policy_reach_each_other(provider, fake):
    assert provider.multinode == "compact placement policy"
    placement = provider.create_placement("ft-mn-0001", "us-central1", "us-central1-c", 3, store_id="store-mn-1")
    [sent] = fake.calls("POST", "/regions/us-central1/resourcePolicies")
    assert sent.body["name"] == placement["name"]
    assert sent.body["groupPlacementPolicy"] == {"collocation": "COLLOCATED", "vmCount": 3}
    assert "ft-mn-0001" in sent.body["description"] and "store-mn-1" in sent.body["description"]
    assert [r for r in fake.requests if r.path.startswith(f"/compute/v1/projects/{PROJECT}/regions/us-central1/"
                                                          "operations/") and r.path.endswith("/wait")]

    nodes = [provider.create(_node(placement, rank)) for rank in range(3)]
    inserts = fake.calls("POST", "/instances")
    assert len(inserts) == 3 and {n.zone for n in nodes} == {"us-central1-c"}
    for insert in inserts:
        assert insert.path.endswith("/zones/us-central1-c/instances")
        assert [link.rsplit("/", 1)[-1] for link in insert.body["resourcePolicies"]] == [placement["name"]]
        assert placement["name"] in insert.body["tags"]["items"]
    # One rule for the run: every protocol from the run's own tag to the same tag.
    rule = fake.firewalls[(PROJECT, f"{placement['name']}-nodes")]
    assert rule["sourceTags"] == [placement["name"]] and rule["targetTags"] == [placement["name"]]
    assert rule["allowed"] == [{"IPProtocol": "all"}] and "sourceRanges" not in rule
    assert len([n for (_, n) in fake.firewalls if n.endswith("-nodes")]) == 1

    for node in nodes:
        provider.wait_ready(node, timeout_s=5)
    ips = [n.private_ip for n in nodes]
    assert all(ips) and len(set(ips)) == 3

    listed = [r for r in provider.list_side_resources() if r["kind"] == "placement_policy"]
    assert [(r["name"], r["run_id"], r["region"]) for r in listed] == [(placement["name"], "ft-mn-0001", "us-central1")]
    with pytest.raises(ProviderError, match="still used by a VM"):
        provider.delete_side_resource(listed[0])
    with pytest.raises(ProviderError, match="still used by a VM"):
        provider.delete_placement(placement)   # a running node is not waited for (only one being deleted)
    assert len([r for r in fake.requests if r.method == "DELETE" and "/resourcePolicies/" in r.path]) == 2
    assert (PROJECT, "us-central1", placement["name"]) in fake.policies

    # Terminating nodes keeps the nodes' rule for the others; the last one deletes it with its ssh rule.
    provider.terminate(nodes[0])
    provider.terminate(nodes[1])
    assert (PROJECT, f"{placement['name']}-nodes") in fake.firewalls
    provider.terminate(nodes[2])
    assert fake.firewalls == {}
    provider.delete_placement(placement)
    assert fake.policies == {} and provider.list_side_resources() == []
    provider.delete_placement(placement)   # idempotent


def test_a_node_naming_a_policy_that_does_not_exist_is_refused(provider, fake):
    placement = provider.create_placement("ft-mn-0002", "us-central1", "us-central1-c", 2)
    provider.delete_placement(placement)
    with pytest.raises(ProviderError, match="was not found|no longer exists"):
        provider.create(_node(placement, 0, nodes=2))
    assert fake.instances == {}
    assert [n for (_, n) in fake.firewalls if n.endswith("-ssh")] == []   # its own rule went with the failure


def test_a_zone_outside_the_policys_region_is_refused_before_any_call(provider, fake):
    placement = provider.create_placement("ft-mn-0003", "us-central1", "us-central1-c", 2)
    before = len(fake.requests)
    with pytest.raises(ProviderError, match="not in the placement policy's region us-central1"):
        provider.create(_node(placement, 0, nodes=2, zone="europe-west4-a"))
    assert len(fake.requests) == before


def test_gc_deletes_a_leftover_policy_and_nodes_rule(fake, tmp_path, monkeypatch):
    """A launcher killed after create_placement and the first node's firewall step leaves both behind."""
    monkeypatch.chdir(tmp_path)
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps({"type": "authorized_user", "client_id": "ftplan-test.apps.googleusercontent.com",
                               "client_secret": "planted-client-secret", "refresh_token": "planted-refresh",
                               "token": TOKEN, "expiry": "2099-01-01T00:00:00Z"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    store = Store(tmp_path / "runs.sqlite3")
    store.create_run("ft-mn-gc-0001", status="failed")
    provider = GCPProvider(project=PROJECT, api_endpoint=fake.endpoint, credentials=Credentials(token=TOKEN),
                           poll_interval_s=0.01)
    placement = provider.create_placement("ft-mn-gc-0001", "us-central1", "us-central1-c", 2,
                                          store_id=store.store_id)
    provider._nodes_firewall(placement, "ft-mn-gc-0001")
    cfg = tmp_path / "ftplan.toml"
    cfg.write_text(f'[launch]\nproviders = ["gcp"]\n[providers.gcp]\nproject = "{PROJECT}"\n'
                   f'api_endpoint = "{fake.endpoint}"\nssh_cidr = "{CIDR}"\npoll_interval_s = 0.01\n')

    def gc(*args):
        res = CliRunner().invoke(cli, ["gc", "--store", str(tmp_path / "runs.sqlite3"), "--config", str(cfg),
                                       "--json", *args], catch_exceptions=False)
        return res.exit_code, json.loads(res.stdout)

    rc, report = gc()
    assert rc == 0, report["errors"]
    assert sorted((r["kind"], r["action"]) for r in report["side_resources"]) == [
        ("firewall", "orphan"), ("placement_policy", "orphan")]
    rc, report = gc("--yes")
    assert rc == 0 and report["side_deleted"] == 2, report["errors"]
    assert fake.policies == {} and fake.firewalls == {}


def test_describe_reports_the_creation_time_and_no_end(provider, fake):
    before = time.time()
    placement = provider.create_placement("ft-mn-0004", "us-central1", "us-central1-c", 1)
    node = provider.create(_node(placement, 0, nodes=1))
    provider.describe(node)
    assert node.launched_at is not None and before - 2 <= node.launched_at <= time.time() + 1
    provider.terminate(node)
    provider.describe(node)
    assert node.state is InstanceState.TERMINATED and node.ended_at is None   # GCP forgets a deleted VM


def test_delete_placement_waits_for_a_vm_compute_is_still_deleting(provider, fake):
    placement = provider.create_placement("ft-mn-0005", "us-central1", "us-central1-c", 1)
    node = provider.create(_node(placement, 0, nodes=1))
    fake.set_status(PROJECT, "us-central1-c", node.id, "STOPPING")   # its delete is under way

    def finish_delete():
        time.sleep(0.3)
        fake.vanish(PROJECT, "us-central1-c", node.id)

    threading.Thread(target=finish_delete, daemon=True).start()
    provider.delete_placement(placement)
    assert fake.policies == {}
    assert len([r for r in fake.requests if r.method == "DELETE" and "/resourcePolicies/" in r.path]) >= 2


def test_gc_listing_goes_on_without_permission_to_list_policies(provider, fake):
    provider._nodes_firewall({"name": "ftplan-ft-old-0001-abc123"}, "ft-old")
    fake.sync_errors[("GET", "policy-aggregated")] = (403, "forbidden", "Required 'compute.resourcePolicies.list' "
                                                                        "permission for 'projects/ftplan-mn-project'")
    assert [(r["kind"], r["run_id"]) for r in provider.list_side_resources()] == [("firewall", "ft-old")]
