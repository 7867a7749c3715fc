"""`ftplan gc` sweeps the side resources of a create that never returned.

The crash is real: `ftplan launch` runs as its own process against the fake cloud, and the fake kills it
with SIGKILL the moment the instance request arrives, i.e. after the adapter made the run's key pair and
security group (AWS, moto's server) or firewall rule (GCP, the fake Compute server) and before any instance
exists. No `finally` runs, so nothing deletes them; `list_instances` never sees them. Then `ftplan gc` (in
process, through click) must list them, keep what a live run still needs, and delete the rest with --yes.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import urllib.parse
from pathlib import Path

import boto3
import pytest
from cli_helpers import FTPLAN_PROCESS
from click.testing import CliRunner
from fakes.aws_moto import MotoEC2, isolate_aws_env  # sets MOTO_AMIS_PATH before moto loads
from fakes.gcp_compute import FakeCompute, _error, _json

from ftplan.planner.cli import cli
from ftplan.planner.runs.store import FINAL_STATUSES, Store
from ftplan.providers.base import RUN_TAG

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "remote_job" / "examples" / "alpaca_small.json"
PROJECT = "ftplan-gc-project"
TOKEN = "ya29.planted-gc-token-0a1b2c3d"


class Killer:
    """The pid of the launcher process the fake kills -9 when the instance request arrives."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.fired = False

    def fire(self) -> bool:
        if self.pid is None or self.fired:
            return False
        self.fired = True
        os.kill(self.pid, signal.SIGKILL)
        return True


# ---- AWS: moto's server with a kill switch on RunInstances ------------------------------------------
@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    home = tmp_path_factory.mktemp("aws-home")
    with pytest.MonkeyPatch.context() as mp:
        isolate_aws_env(mp, home, "AKIAGCTEST0000000001", "planted/gc+secret+0000000000000000")
        server = MotoEC2()
        killer = Killer()
        moto_app = server.middleware.app

        def app(environ, start_response):  # behind the fault middleware, in front of moto
            body = environ["wsgi.input"].read()
            environ["wsgi.input"] = io.BytesIO(body)
            action = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("Action", [""])[-1]
            if action == "RunInstances" and killer.fire():
                start_response("500 Internal Server Error", [("Content-Length", "0")])
                return [b""]
            return moto_app(environ, start_response)

        server.middleware.app = app
        server.start()
        server.killer = killer
        yield server
        server.stop()


def _ec2(aws):
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=aws.url)


def _aws_project(tmp: Path, aws) -> Path:
    cfg = tmp / "ftplan.toml"
    cfg.write_text(f"""
[job]
model = "tiny-llama"
dataset = "{EXAMPLE}"
[launch]
providers = ["aws"]
budget_usd = 5
[[launch.offers]]
provider = "aws"
instance_type = "g5.xlarge"
gpu = "A10G"
region = "us-east-1"
price_hour = 1.006
[providers.aws]
endpoint_url = "{aws.url}"
ssh_cidr = "203.0.113.7/32"
poll_interval_s = 0.01
teardown_wait_s = 1
""")
    return cfg


def _launch_killed_in_create(tmp: Path, cfg: Path, killer: Killer, env: dict[str, str]) -> str:
    """`ftplan launch` in its own process, killed -9 by the fake cloud; returns the run id it recorded."""
    store = tmp / "runs.sqlite3"
    proc = subprocess.Popen([*FTPLAN_PROCESS, "launch", "--config", str(cfg), "--yes", "--json", "--store", str(store),
                             "--runs-dir", str(tmp / "runs")], cwd=tmp, env={**env, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killer.fired, killer.pid = False, proc.pid
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        killer.pid = None
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    [run] = Store(store).list_runs()
    assert run.status not in FINAL_STATUSES   # it died mid-create: nobody closed the run
    return run.id


def gc(tmp: Path, *args: str) -> tuple[int, dict]:
    res = CliRunner().invoke(cli, ["gc", "--store", str(tmp / "runs.sqlite3"), "--json", *args],
                             catch_exceptions=False)
    return res.exit_code, json.loads(res.stdout)


def _aws_side(aws) -> set[tuple[str, str]]:
    ec2 = _ec2(aws)
    tagged = [{"Name": "tag-key", "Values": [RUN_TAG]}]
    pairs = {("key_pair", kp["KeyName"]) for kp in ec2.describe_key_pairs(Filters=tagged)["KeyPairs"]}
    groups = {("security_group", g["GroupName"]) for g in ec2.describe_security_groups(Filters=tagged)["SecurityGroups"]}
    return pairs | groups


def test_aws_key_pair_and_security_group_of_a_killed_create_are_swept(aws, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    aws.reset()
    ec2 = _ec2(aws)
    # The user's own key pair, without ftplan's tag, must survive every sweep.
    own_key = ec2.create_key_pair(KeyName="my-own-key")["KeyName"]
    cfg = _aws_project(tmp_path, aws)
    run_id = _launch_killed_in_create(tmp_path, cfg, aws.killer, dict(os.environ))

    left = _aws_side(aws)
    assert {kind for kind, _ in left} == {"key_pair", "security_group"}
    assert not [r for res in ec2.describe_instances()["Reservations"] for r in res["Instances"]]

    rc, report = gc(tmp_path, "--config", str(cfg))
    assert rc == 0
    listed = {(r["kind"], r["name"]) for r in report["side_resources"] if r["action"] == "orphan"}
    assert listed == left and all(r["run_id"] == run_id for r in report["side_resources"])
    assert _aws_side(aws) == left                      # listing changes nothing

    rc, report = gc(tmp_path, "--config", str(cfg), "--yes")
    assert rc == 0, report["errors"]
    assert report["side_deleted"] == 2 and {r["action"] for r in report["side_resources"]} == {"deleted"}
    assert _aws_side(aws) == set()
    assert [kp["KeyName"] for kp in ec2.describe_key_pairs()["KeyPairs"]] == [own_key]
    run = Store(tmp_path / "runs.sqlite3").get_run(run_id)
    assert run.status == "failed" and "closed by ftplan gc" in run.error


def test_aws_side_resources_of_a_run_whose_launcher_lives_are_kept(aws, tmp_path, monkeypatch):
    """A live launcher may be inside `create` right now: its key pair and group are not orphans."""
    monkeypatch.chdir(tmp_path)
    aws.reset()
    from ftplan.providers.aws import AWSProvider

    store = Store(tmp_path / "runs.sqlite3")
    store.create_run("ft-live-side-0001", status="provisioning")   # launcher pid = this process: alive
    provider = AWSProvider(region="us-east-1", endpoint_url=aws.url, poll_interval_s=0.01)
    ec2 = _ec2(aws)
    tags = [{"Key": RUN_TAG, "Value": "ft-live-side-0001"}]
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    ec2.create_key_pair(KeyName="ftplan-ft-live-side-0001-abc123",
                        TagSpecifications=[{"ResourceType": "key-pair", "Tags": tags}])
    ec2.create_security_group(GroupName="ftplan-ft-live-side-0001-abc123", Description="ftplan run", VpcId=vpc,
                              TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}])
    assert len(provider.list_side_resources()) == 2
    cfg = _aws_project(tmp_path, aws)
    rc, report = gc(tmp_path, "--config", str(cfg), "--yes")
    assert rc == 0 and report["side_deleted"] == 0
    assert {r["action"] for r in report["side_resources"]} == {"keep"}
    assert len(_aws_side(aws)) == 2
    assert store.get_run("ft-live-side-0001").status == "provisioning"


# ---- GCP: the fake Compute server plus firewall listing and a kill switch on instance insert -----------
class CrashingCompute(FakeCompute):
    """FakeCompute plus `GET global/firewalls` (list, with the `name eq "regex"` filter Compute accepts) and
    a SIGKILL to the launcher when its instance insert arrives."""

    killer: Killer | None = None

    def _route(self, request, body):
        m = re.fullmatch(r"/compute/v1/projects/([^/]+)/global/firewalls", request.path)
        if request.method == "GET" and m:
            flt = re.fullmatch(r'\s*name\s+eq\s+"?([^"]*)"?\s*', request.args.get("filter", ""))
            items = [fw for (project, name), fw in sorted(self.firewalls.items())
                     if project == m.group(1) and (not flt or re.fullmatch(flt.group(1), name))]
            return _json({"kind": "compute#firewallList", "items": items})
        if (request.method == "POST" and re.fullmatch(r"/compute/v1/projects/[^/]+/zones/[^/]+/instances", request.path)
                and self.killer and self.killer.fire()):
            return _error(503, "SERVICE_UNAVAILABLE", "the caller is gone", "backendError")
        return super()._route(request, body)


@pytest.fixture
def gcp(tmp_path, monkeypatch):
    fake = CrashingCompute()
    fake.killer = Killer()
    fake.start()
    # Application Default Credentials as `gcloud auth application-default login` writes them, with a
    # still-valid access token so google-auth never needs Google's token endpoint.
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps({"type": "authorized_user", "client_id": "ftplan-test.apps.googleusercontent.com",
                               "client_secret": "planted-client-secret", "refresh_token": "planted-refresh",
                               "token": TOKEN, "expiry": "2099-01-01T00:00:00Z"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    yield fake
    fake.stop()


def _gcp_project(tmp: Path, fake) -> Path:
    cfg = tmp / "ftplan.toml"
    cfg.write_text(f"""
[job]
model = "tiny-llama"
dataset = "{EXAMPLE}"
[launch]
providers = ["gcp"]
budget_usd = 5
[[launch.offers]]
provider = "gcp"
instance_type = "n1-standard-8"
gpu = "T4"
region = "us-central1"
zone = "us-central1-b"
price_hour = 0.73
[providers.gcp]
project = "{PROJECT}"
api_endpoint = "{fake.endpoint}"
ssh_cidr = "198.51.100.4/32"
poll_interval_s = 0.01
""")
    return cfg


def test_gcp_firewall_rule_of_a_killed_create_is_swept(gcp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A rule of the user's own: not named by ftplan, never touched.
    gcp.firewalls[(PROJECT, "allow-office-ssh")] = {"name": "allow-office-ssh", "description": "office"}
    cfg = _gcp_project(tmp_path, gcp)
    run_id = _launch_killed_in_create(tmp_path, cfg, gcp.killer, dict(os.environ))

    ours = [name for (_, name) in gcp.firewalls if name != "allow-office-ssh"]
    assert len(ours) == 1 and ours[0].startswith("ftplan-") and ours[0].endswith("-ssh")
    assert not gcp.instances

    text = CliRunner().invoke(cli, ["gc", "--store", str(tmp_path / "runs.sqlite3"), "--config", str(cfg)])
    assert text.exit_code == 0
    [line] = [ln for ln in text.stdout.splitlines() if ln.startswith("orphan")]
    assert f"firewall {ours[0]}" in line and run_id in line and "run 'ftplan gc --yes'" in text.stdout
    rc, report = gc(tmp_path, "--config", str(cfg))
    assert rc == 0, report["errors"]
    [item] = report["side_resources"]
    assert (item["kind"], item["name"], item["run_id"], item["action"]) == ("firewall", ours[0], run_id, "orphan")
    assert (PROJECT, ours[0]) in gcp.firewalls

    rc, report = gc(tmp_path, "--config", str(cfg), "--yes")
    assert rc == 0 and report["side_deleted"] == 1, report["errors"]
    assert list(gcp.firewalls) == [(PROJECT, "allow-office-ssh")]
    run = Store(tmp_path / "runs.sqlite3").get_run(run_id)
    assert run.status == "failed"
    # Deletion is recorded on the run, so `ftplan report` says what gc removed.
    assert any(e.kind == "gc" and ours[0] in (e.message or "") for e in Store(tmp_path / "runs.sqlite3").events(run_id))

