"""`ftplan attach` of a multi-node run whose launcher died (issue 13): the take-over owns every node and the
placement, not only the machine it watches. Real AWS adapter against moto's EC2 server (placement groups
from tests/fakes/aws_placement.py)."""

from __future__ import annotations

import pytest
from test_multinode_cloud_launch import NOTHING_LEFT_AWS, _aws_left
from test_provider_aws import _session_ec2, ec2, moto, moto_server  # noqa: F401  (fixtures)
from test_provider_aws_multinode import PUBKEY

from ftplan.planner.errors import UserError
from ftplan.planner.launch.attach import attach_run
from ftplan.planner.runs.store import Store
from ftplan.providers.aws import AWSProvider
from ftplan.providers.base import InstanceRequest


def _two_node_run(tmp_path, provider, store: Store, run_id: str, name: str = "aws") -> list:
    store.create_run(run_id, model="tiny-llama", method="qlora", provider=name, instance_type="p4d.24xlarge",
                     gpu="A100", gpu_count=8, region="us-east-1", price_hour=21.96, budget_usd=100.0,
                     artifacts_dir=str(tmp_path / "runs" / run_id), config_json={"nnodes": 2})
    placement = provider.create_placement(run_id, "us-east-1", "us-east-1b", 2, store_id=store.store_id)
    store.add_event(run_id, "placement_created", str(placement["name"]), data={"provider": name,
                                                                              "placement": placement})
    made = []
    for k in range(2):
        row = store.add_instance_intent(run_id, name, instance_type="p4d.24xlarge", gpu="A100",
                                        region="us-east-1", zone="us-east-1b", spot=False, price_hour=21.96)
        inst = provider.create(InstanceRequest(
            run_id=run_id, instance_type="p4d.24xlarge", gpu="A100", gpu_count=8, region="us-east-1",
            zone="us-east-1b", ssh_public_key=PUBKEY,
            store_id=store.store_id, ssh_cidr="203.0.113.7/32", placement=placement, node_rank=k, nodes=2))
        store.set_instance_created(row, inst.id, inst.to_dict())
        made.append(inst)
    store.add_event(run_id, "node_group", "2 nodes ready", data={"nodes": 2, "instances": [i.id for i in made]})
    return made


def test_attach_when_node_0_is_gone_terminates_every_node_and_the_placement(tmp_path, moto, ec2):  # noqa: F811
    provider = AWSProvider(region="us-east-1", endpoint_url=moto.url, public_ip_lookup=lambda: "203.0.113.7",
                           poll_interval_s=0.01, teardown_wait_s=2)
    store = Store(tmp_path / "runs.sqlite3")
    node0, node1 = _two_node_run(tmp_path, provider, store, "run-mn-attach")
    assert _aws_left(ec2)["instances"] == 2 and _aws_left(ec2)["placement_groups"] == 1
    ec2.terminate_instances(InstanceIds=[node0.id])       # node 0 reclaimed while nobody watched

    result = attach_run(store, "run-mn-attach", provider_factory=lambda name, **opts: provider)

    assert result.status == "failed" and "node 0" in (result.error or ""), result
    assert _aws_left(ec2) == NOTHING_LEFT_AWS
    assert store.instances("run-mn-attach", open_only=True) == []
    assert [c.instance_row for c in store.costs("run-mn-attach")] and len(store.costs("run-mn-attach")) == 2
    assert store.events("run-mn-attach", "placement_deleted")


def test_attach_refuses_several_machines_of_your_own_in_one_line(tmp_path):
    store = Store(tmp_path / "runs.sqlite3")
    store.create_run("run-mn-ssh", model="tiny-llama", method="qlora", provider="ssh", instance_type="own",
                     gpu="A100", gpu_count=1, price_hour=0.0, budget_usd=1.0,
                     artifacts_dir=str(tmp_path / "runs" / "run-mn-ssh"), config_json={"nnodes": 2})
    for host in ("127.0.0.2", "127.0.0.3"):
        row = store.add_instance_intent("run-mn-ssh", "ssh", instance_type="own", gpu="A100", region="on-prem")
        store.set_instance_created(row, f"ssh:u@{host}:22:run-mn-ssh", {
            "provider": "ssh", "id": f"ssh:u@{host}:22:run-mn-ssh", "run_id": "run-mn-ssh", "region": "on-prem",
            "state": "running", "ssh": {"host": host, "port": 22, "user": "u"}})
    store.add_event("run-mn-ssh", "node_group", "2 nodes ready", data={
        "nodes": 2, "instances": [f"ssh:u@{h}:22:run-mn-ssh" for h in ("127.0.0.2", "127.0.0.3")]})
    with pytest.raises(UserError) as err:
        attach_run(store, "run-mn-ssh")
    assert "2 machines of your own" in str(err.value) and "\n" not in str(err.value)
    assert len(store.instances("run-mn-ssh", open_only=True)) == 2    # nothing closed behind the user's back


def test_two_open_rows_of_a_single_node_run_are_not_taken_for_nodes(tmp_path):
    """A spot-lost instance whose termination is unconfirmed beside its replacement: two open rows, one job.
    Only the run's node_group event makes rows nodes, so attach keeps watching the newest machine."""
    from ftplan.planner.launch.node_group import recorded_nodes

    store = Store(tmp_path / "runs.sqlite3")
    store.create_run("run-1n", model="tiny-llama", method="qlora", provider="aws", budget_usd=1.0,
                     artifacts_dir=str(tmp_path / "runs" / "run-1n"))
    for k in range(2):
        row = store.add_instance_intent("run-1n", "aws", instance_type="g5.xlarge", gpu="A10G", region="us-east-1")
        store.set_instance_created(row, f"i-{k}", {"provider": "aws", "id": f"i-{k}", "run_id": "run-1n",
                                                   "region": "us-east-1", "state": "running"})
    rows = store.instances("run-1n", open_only=True)
    assert len(rows) == 2 and recorded_nodes(store, "run-1n", rows) is None
    store.add_event("run-1n", "node_group", "2 nodes ready", data={"nodes": 2, "instances": ["i-0", "i-1"]})
    assert [r.provider_instance_id for r in recorded_nodes(store, "run-1n", rows)] == ["i-0", "i-1"]
