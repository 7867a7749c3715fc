"""Issue 13 through the real launcher on the clouds' fakes: a 2-node offer on AWS (moto's EC2 server, placement
groups from tests/fakes/aws_placement.py) and GCP (the fake Compute server). The provider receives one
placement group/policy and 2 instances in one zone and ends with none; when one of the 2 fails to create, the
one that came up is torn down with its placement and the next offer is taken; a Ctrl-C while the second node
is being created leaves nothing either.

As in test_first_contact_adapters.py, every "instance" is the local sshd (the runner factory points the
instance's address there) and the job is the fault matrix's stand-in, which needs no rendezvous.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from test_fault_matrix import EXAMPLE, stop_leftover_jobs, stub_files
from test_gc_side_resources import PROJECT, gcp  # noqa: F401  (fixture)
from test_provider_aws import _session_ec2, ec2, moto, moto_server  # noqa: F401  (fixtures)

from ftplan.providers.base import RUN_TAG

pytestmark = pytest.mark.slow

AWS_OFFERS = """
[[launch.offers]]
provider = "aws"
instance_type = "p4d.24xlarge"
gpu = "A100"
region = "us-east-1"
zone = "us-east-1b"
price_hour = 21.96
nodes = 2
[[launch.offers]]
provider = "aws"
instance_type = "g5.48xlarge"
gpu = "A10G"
region = "us-east-1"
zone = "us-east-1c"
price_hour = 16.29
nodes = 2
"""
GCP_OFFERS = """
[[launch.offers]]
provider = "gcp"
instance_type = "a2-highgpu-8g"
gpu = "A100"
region = "us-central1"
zone = "us-central1-b"
price_hour = 29.39
nodes = 2
[[launch.offers]]
provider = "gcp"
instance_type = "a2-highgpu-8g"
gpu = "A100"
region = "us-central1"
zone = "us-central1-c"
price_hour = 29.39
nodes = 2
"""


def ctrl_c_in_second_create(name: str, **options):
    """The real adapter, with a Ctrl-C arriving while node 1's create is in flight: the provider has made the
    instance, the launcher never sees its id (only the run tag can find it)."""
    from ftplan.planner.launch.launcher import _default_provider_factory

    provider = _default_provider_factory(name, **options)
    real = provider.create

    def create(request):
        inst = real(request)
        if request.node_rank == 1:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)   # the handler raises in this (main) thread before this ends
        return inst

    provider.create = create
    return provider


def when_training(tmp: Path, action) -> threading.Thread:
    """Run `action` once the launcher records the training phase (both nodes' jobs started)."""
    from ftplan.planner.runs.store import Store

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (tmp / "runs.sqlite3").exists():
                runs = Store(tmp / "runs.sqlite3").list_runs()
                if runs and runs[0].phase == "training":
                    time.sleep(0.5)
                    action()
                    return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def launch(tmp: Path, provider: str, section: str, offers: str, sshd, factory=None,
           fault: dict | None = None) -> dict:
    """One launch of the stand-in job with a 2-node offer; what a user would check afterwards."""
    from ftplan.planner.launch.launch_plan import build_plan
    from ftplan.planner.launch.launcher import Launcher, _default_provider_factory
    from ftplan.planner.launch.project_config import load_project
    from ftplan.planner.remote.ssh_runner import SSHRunner
    from ftplan.planner.runs.store import Store

    (tmp / "remote").mkdir(exist_ok=True)
    job, fault = stub_files(tmp, fault or {"steps": 4, "step_s": 0.05})
    cfg = tmp / "ftplan.toml"
    cfg.write_text(f"""
[job]
model = "tiny-llama"
dataset = "{EXAMPLE}"
checkpoint_every_steps = 2
[launch]
providers = ["{provider}"]
budget_usd = 500
poll_interval_s = 0.1
pull_margin_min = 0
ssh_connect_timeout_s = 3
ssh_reconnect_s = 5
wait_ready_timeout_s = 20
remote_python = "{sys.executable}"
runs_dir = "{tmp / 'runs'}"
[launch.bundle_extra_files]
"job/train.py" = "{job}"
"fault.json" = "{fault}"
{offers}
[providers.{provider}]
remote_root = "{tmp / 'remote'}"
{section}
""")
    plan = build_plan(load_project(cfg), EXAMPLE, identity=sshd.client_key)

    def runner(**kw):  # the instance's public address is the fake's; its sshd is ours
        kw.update(host="127.0.0.1", port=sshd.port, user=sshd.user)
        return SSHRunner(**kw)

    store = Store(tmp / "runs.sqlite3")
    t0 = time.monotonic()
    try:
        result = Launcher(store, plan, runner_factory=runner,
                          provider_factory=factory or (lambda n, **o: _default_provider_factory(n, **o))).run()
    finally:
        stop_leftover_jobs(tmp / "remote")
    rows = store.instances(result.run_id)
    return {"status": result.status, "error": result.error or "", "seconds": time.monotonic() - t0,
            "run_id": result.run_id, "created": [(r.instance_type, r.zone) for r in rows if r.provider_instance_id],
            "open_rows": len(store.instances(result.run_id, open_only=True)),
            "events": [e.kind for e in store.events(result.run_id)],
            "log": [f"{e.kind}: {e.message}" for e in store.events(result.run_id)]}


def _aws_section(url: str) -> str:
    return f'endpoint_url = "{url}"\nssh_cidr = "203.0.113.7/32"\npoll_interval_s = 0.01\nteardown_wait_s = 2\n'


def _gcp_section(fake) -> str:
    return (f'project = "{PROJECT}"\napi_endpoint = "{fake.endpoint}"\nssh_cidr = "203.0.113.7/32"\n'
            "poll_interval_s = 0.01\n")


def _aws_left(ec2_client) -> dict:
    tagged = [{"Name": "tag-key", "Values": [RUN_TAG]}]
    live = ec2_client.describe_instances(Filters=[{"Name": "instance-state-name",
                                                   "Values": ["pending", "running", "stopping", "stopped"]}])
    return {"instances": sum(len(r["Instances"]) for r in live["Reservations"]),
            "placement_groups": len(ec2_client.describe_placement_groups()["PlacementGroups"]),
            "security_groups": len(ec2_client.describe_security_groups(Filters=tagged)["SecurityGroups"]),
            "key_pairs": len(ec2_client.describe_key_pairs(Filters=tagged)["KeyPairs"])}


NOTHING_LEFT_AWS = {"instances": 0, "placement_groups": 0, "security_groups": 0, "key_pairs": 0}


def test_aws_two_nodes_in_one_placement_group_and_nothing_left(tmp_path, moto, ec2, sshd):  # noqa: F811
    got = launch(tmp_path, "aws", _aws_section(moto.url), AWS_OFFERS, sshd)
    assert got["status"] == "succeeded", got["error"]
    [group] = moto.calls("CreatePlacementGroup")
    assert group["Strategy"] == "cluster"
    runs = moto.calls("RunInstances")
    assert len(runs) == 2
    assert {r["Placement.GroupName"] for r in runs} == {group["GroupName"]}
    assert {r["Placement.AvailabilityZone"] for r in runs} == {"us-east-1b"}
    assert {r["NetworkInterface.1.InterfaceType"] for r in runs} == {"efa"}
    assert got["created"] == [("p4d.24xlarge", "us-east-1b")] * 2
    assert [c["GroupName"] for c in moto.calls("DeletePlacementGroup")][-1] == group["GroupName"]
    assert _aws_left(ec2) == NOTHING_LEFT_AWS and got["open_rows"] == 0


def test_aws_second_node_out_of_capacity_tears_down_the_first_and_takes_the_next_offer(tmp_path, moto, ec2, sshd):  # noqa: F811
    # The 2nd RunInstances (node 1 of the p4d offer) and botocore's one retry of it: no capacity.
    moto.arm("RunInstances", "InsufficientInstanceCapacity", status=500, count=2, after=1,
             message="We currently do not have sufficient p4d.24xlarge capacity in the Availability Zone you requested")
    got = launch(tmp_path, "aws", _aws_section(moto.url), AWS_OFFERS, sshd)
    assert got["status"] == "succeeded", got["error"]
    groups = [c["GroupName"] for c in moto.calls("CreatePlacementGroup")]
    assert len(groups) == 2 and len(set(groups)) == 2          # a fresh placement for the next offer
    launched = [(r["InstanceType"], r["Placement.GroupName"]) for r in moto.calls("RunInstances")]
    assert launched[0] == ("p4d.24xlarge", groups[0])
    assert launched[-2:] == [("g5.48xlarge", groups[1])] * 2
    assert got["created"] == [("p4d.24xlarge", "us-east-1b"), ("g5.48xlarge", "us-east-1c"),
                              ("g5.48xlarge", "us-east-1c")]
    assert {c["GroupName"] for c in moto.calls("DeletePlacementGroup")} == set(groups)
    assert _aws_left(ec2) == NOTHING_LEFT_AWS and got["open_rows"] == 0


def _gcp_left(fake) -> dict:
    return {"instances": len(fake.instances), "policies": len(fake.policies), "firewalls": len(fake.firewalls)}


def test_gcp_two_nodes_in_one_compact_policy_and_nothing_left(tmp_path, gcp, sshd):  # noqa: F811
    got = launch(tmp_path, "gcp", _gcp_section(gcp), GCP_OFFERS, sshd)
    assert got["status"] == "succeeded", got["error"]
    [policy] = gcp.calls("POST", "/regions/us-central1/resourcePolicies")
    assert policy.body["groupPlacementPolicy"] == {"collocation": "COLLOCATED", "vmCount": 2}
    inserts = gcp.calls("POST", "/instances")
    assert [i.path.split("/zones/")[1] for i in inserts] == ["us-central1-b/instances"] * 2
    assert {link.rsplit("/", 1)[-1] for i in inserts for link in i.body["resourcePolicies"]} == {policy.body["name"]}
    assert got["created"] == [("a2-highgpu-8g", "us-central1-b")] * 2
    assert _gcp_left(gcp) == {"instances": 0, "policies": 0, "firewalls": 0} and got["open_rows"] == 0


def test_gcp_second_node_out_of_capacity_tears_down_the_first_and_takes_the_next_offer(tmp_path, gcp, sshd):  # noqa: F811
    gcp.insert_op_errors_at[2] = ("ZONE_RESOURCE_POOL_EXHAUSTED", "The zone 'projects/p/zones/us-central1-b' does "
                                  "not have enough resources available to fulfill the request.", 503)
    got = launch(tmp_path, "gcp", _gcp_section(gcp), GCP_OFFERS, sshd)
    assert got["status"] == "succeeded", got["error"]
    policies = [c.body["name"] for c in gcp.calls("POST", "/regions/us-central1/resourcePolicies")]
    assert len(set(policies)) == 2
    zones = [i.path.split("/zones/")[1].split("/")[0] for i in gcp.calls("POST", "/instances")]
    assert zones == ["us-central1-b", "us-central1-b", "us-central1-c", "us-central1-c"]
    assert [c.path.rsplit("/", 1)[-1] for c in gcp.calls("DELETE", "") if "/resourcePolicies/" in c.path] == policies
    assert _gcp_left(gcp) == {"instances": 0, "policies": 0, "firewalls": 0} and got["open_rows"] == 0


def test_aws_ctrl_c_while_the_second_node_is_created_leaves_nothing(tmp_path, moto, ec2, sshd):  # noqa: F811
    got = launch(tmp_path, "aws", _aws_section(moto.url), AWS_OFFERS, sshd, factory=ctrl_c_in_second_create)
    assert got["status"] == "cancelled" and "interrupted by SIGINT" in got["error"], got
    assert len(moto.calls("RunInstances")) == 2 and len(moto.calls("CreatePlacementGroup")) == 1
    assert _aws_left(ec2) == NOTHING_LEFT_AWS and got["open_rows"] == 0


def test_gcp_ctrl_c_while_the_second_node_is_created_leaves_nothing(tmp_path, gcp, sshd):  # noqa: F811
    got = launch(tmp_path, "gcp", _gcp_section(gcp), GCP_OFFERS, sshd, factory=ctrl_c_in_second_create)
    assert got["status"] == "cancelled" and "interrupted by SIGINT" in got["error"], got
    assert len(gcp.calls("POST", "/instances")) == 2
    assert _gcp_left(gcp) == {"instances": 0, "policies": 0, "firewalls": 0} and got["open_rows"] == 0


LONG_JOB = {"steps": 300, "step_s": 0.1}   # 30 s at most: the loss is seen long before


def test_aws_node_lost_mid_training_stops_all_and_says_which(tmp_path, moto, ec2, sshd):  # noqa: F811
    """EC2 ends node 1 behind the launcher's back (a reclaimed or hand-terminated instance)."""
    def lose_node_1():
        from ftplan.planner.runs.store import Store

        store = Store(tmp_path / "runs.sqlite3")
        [run] = store.list_runs()
        node_1 = [r.provider_instance_id for r in store.instances(run.id)][1]
        ec2.terminate_instances(InstanceIds=[node_1])

    watcher = when_training(tmp_path, lose_node_1)
    got = launch(tmp_path, "aws", _aws_section(moto.url), AWS_OFFERS, sshd, fault=LONG_JOB)
    watcher.join(5)
    assert got["status"] == "failed" and "node 1" in got["error"] and "lost" in got["error"], "\n".join(got["log"])
    assert "instance_lost" in got["events"] or "node_lost" in got["events"]
    assert _aws_left(ec2) == NOTHING_LEFT_AWS and got["open_rows"] == 0, "\n".join(got["log"])


def test_gcp_node_lost_mid_training_stops_all_and_says_which(tmp_path, gcp, sshd):  # noqa: F811
    """Compute deletes node 1 (a preempted VM with termination action DELETE, or a human)."""
    def lose_node_1():
        node_1 = gcp.calls("POST", "/instances")[1].body["name"]
        gcp.vanish(PROJECT, "us-central1-b", node_1)

    watcher = when_training(tmp_path, lose_node_1)
    got = launch(tmp_path, "gcp", _gcp_section(gcp), GCP_OFFERS, sshd, fault=LONG_JOB)
    watcher.join(5)
    assert got["status"] == "failed" and "node 1" in got["error"] and "lost" in got["error"], got
    assert _gcp_left(gcp) == {"instances": 0, "policies": 0, "firewalls": 0} and got["open_rows"] == 0
