"""A firewall that lets you back in (issue 22 item 5), on AWS through moto and GCP through the fake Compute.

Real parts: the launcher in its own process (AWS adapter -> moto's EC2 server and its security group, or the
GCP adapter -> the fake Compute server and its firewall rule; real
sshd on 127.0.0.1, real bundle and runner, the fault-matrix stand-in job), killed -9 mid-training like a
laptop that died; then `attach_run` in this process after a "network change". Between SSH and sshd sits a
gate that plays the cloud firewall: it relays a connection only when the provider's port-22 rule of the run
(read back from moto / the fake) covers the address this "laptop" now has, and drops it otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_fault_matrix import EXAMPLE, _wait_for, stop_leftover_jobs, stub_files
from test_gc_side_resources import PROJECT, gcp  # noqa: F401  (fixture)
from test_provider_aws import _session_ec2, ec2, moto, moto_server  # noqa: F401  (fixtures)

from ftplan.planner.errors import UserError
from ftplan.planner.launch.attach import attach_run
from ftplan.planner.runs.store import Store
from ftplan.providers.net import ENV_OVERRIDE

ROOT = Path(__file__).resolve().parent.parent
AT_LAUNCH = "198.51.100.7"      # inside the configured 198.51.100.0/24
AFTER_MOVE = "203.0.113.9"      # another network: outside it


class SecurityGroupGate:
    """127.0.0.1 relay to sshd that admits a connection only if `rule_covers(source)` (moto's rule)."""

    def __init__(self, sshd_port: int, rule_covers):
        self.source = AT_LAUNCH
        self.rule_covers = rule_covers
        self.refused = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = ("127.0.0.1", sshd_port)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.rule_covers(self.source):
                self.refused += 1
                client.close()       # EC2 drops the SYN; closing at once keeps the test quick
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


CHILD = """
import sys
from pathlib import Path
from ftplan.planner.launch.launch_plan import build_plan
from ftplan.planner.launch.launcher import Launcher, _default_provider_factory
from ftplan.planner.launch.project_config import load_project
from ftplan.planner.remote.ssh_runner import SSHRunner
from ftplan.planner.runs.store import Store

cfg_path, store_path, identity, port, user = sys.argv[1:6]
cfg = load_project(cfg_path)
plan = build_plan(cfg, Path(cfg.job.dataset), identity=Path(identity), store_path=store_path)

def runner(**kw):  # the instance's public IP is moto's; the packets go through the gate to sshd
    kw.update(host="127.0.0.1", port=int(port), user=user)
    return SSHRunner(**kw)

Launcher(Store(Path(store_path)), plan, provider_factory=lambda n, **o: _default_provider_factory(n, **o),
         runner_factory=runner).run()
"""


def _project(tmp: Path, cloud: str, url: str, job: Path, fault: Path) -> Path:
    (tmp / "remote").mkdir()
    cfg = tmp / "ftplan.toml"
    cfg.write_text(f"""
[job]
model = "tiny-llama"
dataset = "{EXAMPLE}"
checkpoint_every_steps = 2
[launch]
providers = ["{cloud}"]
budget_usd = 5
poll_interval_s = 0.1
sync_every_min = 0.005
pull_margin_min = 0
ssh_connect_timeout_s = 5
ssh_reconnect_s = 5
wait_ready_timeout_s = 20
remote_python = "{sys.executable}"
ssh_cidr = "198.51.100.0/24"
runs_dir = "{tmp / 'runs'}"
[launch.bundle_extra_files]
"job/train.py" = "{job}"
"fault.json" = "{fault}"
""" + (f"""
[[launch.offers]]
provider = "aws"
instance_type = "g5.xlarge"
gpu = "A10G"
region = "us-east-1"
price_hour = 1.006
[providers.aws]
endpoint_url = "{url}"
poll_interval_s = 0.01
teardown_wait_s = 2
remote_root = "{tmp / 'remote'}"
""" if cloud == "aws" else f"""
[[launch.offers]]
provider = "gcp"
instance_type = "n1-standard-8"
gpu = "T4"
region = "us-central1"
zone = "us-central1-b"
price_hour = 0.73
[providers.gcp]
project = "{PROJECT}"
api_endpoint = "{url}"
poll_interval_s = 0.01
remote_root = "{tmp / 'remote'}"
"""))
    return cfg


class Cloud:
    """The rule as the provider holds it, read back through its own API (moto) or state (the fake)."""

    def __init__(self, name: str, request):
        self.name = name
        if name == "aws":
            self.ec2 = request.getfixturevalue("ec2")
            self.url = request.getfixturevalue("moto").url
        else:
            self.fake = request.getfixturevalue("gcp")
            self.url = self.fake.endpoint

    def sources(self, inst: dict) -> list[str]:
        if self.name == "aws":
            group = inst["extra"]["security_group_id"]
            perms = self.ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]["IpPermissions"]
            return sorted(r["CidrIp"] for p in perms if p.get("FromPort") == 22 for r in p.get("IpRanges", []))
        return sorted(self.fake.firewalls[(PROJECT, inst["extra"]["firewall"])]["sourceRanges"])

    def rule_gone(self, inst: dict) -> bool:
        if self.name == "aws":
            group = inst["extra"]["security_group_id"]
            return not self.ec2.describe_security_groups(
                Filters=[{"Name": "group-id", "Values": [group]}])["SecurityGroups"]
        return (PROJECT, inst["extra"]["firewall"]) not in self.fake.firewalls

    def instance_running(self, inst: dict) -> bool:
        if self.name == "aws":
            got = self.ec2.describe_instances(InstanceIds=[inst["id"]])["Reservations"][0]["Instances"][0]
            return got["State"]["Name"] == "running"
        return any(i.get("status") == "RUNNING" for (_, _, name), i in self.fake.instances.items() if name == inst["id"])


@pytest.mark.slow
@pytest.mark.parametrize("cloud_name", ["aws", "gcp"])
def test_attach_after_a_network_change_moves_the_rule_with_consent_and_reconnects(cloud_name, request, tmp_path, sshd,
                                                                                   monkeypatch):
    cloud = Cloud(cloud_name, request)
    seen: dict[str, dict] = {}

    def rule_covers(address: str) -> bool:
        if "inst" not in seen:
            return True  # the launch's own connections: the rule was made for AT_LAUNCH (checked below)
        return any(ipaddress.ip_address(address) in ipaddress.ip_network(c) for c in cloud.sources(seen["inst"]))

    gate = SecurityGroupGate(sshd.port, rule_covers)
    job, fault = stub_files(tmp_path, {"steps": 40, "step_s": 0.1})
    cfg = _project(tmp_path, cloud_name, cloud.url, job, fault)
    store_path = tmp_path / "runs.sqlite3"
    env = {**os.environ, ENV_OVERRIDE: AT_LAUNCH, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(cfg), str(store_path), str(sshd.client_key),
                              str(gate.port), sshd.user], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        try:
            _wait_for(store_path, "progress")
        finally:
            child.kill()          # the laptop dies mid-training: no teardown ran
            _, err = child.communicate()
        store = Store(store_path)
        run = store.list_runs()[0]
        row = store.instances(run.id, open_only=True)[-1]
        inst = seen["inst"] = row.json("instance_json")
        # The configured range reached the firewall instead of a looked-up /32.
        assert cloud.sources(inst) == ["198.51.100.0/24"], err[-2000:]

        # The laptop wakes up on another network: the rule keeps it out now.
        gate.source = AFTER_MOVE
        monkeypatch.setenv(ENV_OVERRIDE, AFTER_MOVE)

        rule_at_reconnect: list[list[str]] = []

        def via_gate(**kw):
            from ftplan.planner.remote.ssh_runner import SSHRunner

            rule_at_reconnect.append(cloud.sources(inst))

            kw.update(host="127.0.0.1", port=gate.port, user=sshd.user)
            return SSHRunner(**kw)

        def probe(host: str, port: int) -> bool:
            from ftplan.planner.launch.ssh_firewall import sshd_answers

            return sshd_answers("127.0.0.1", gate.port, timeout_s=2)

        # Asked and declined: a one-line error that says how to agree; nothing changed, nothing torn down.
        questions: list[str] = []
        with pytest.raises(UserError) as declined:
            attach_run(store, run.id, runner_factory=via_gate, probe=probe,
                       confirm=lambda q: questions.append(q) or False)
        assert "--update-firewall" in str(declined.value) and AFTER_MOVE in str(declined.value)
        assert len(questions) == 1 and "198.51.100.0/24" in questions[0] and f"{AFTER_MOVE}/32" in questions[0]
        assert cloud.sources(inst) == ["198.51.100.0/24"]
        assert cloud.instance_running(inst)
        assert store.get_run(run.id).status not in ("succeeded", "failed", "cancelled")

        # With --update-firewall: the rule now names the new address only, and the run is taken over to its end.
        result = attach_run(store, run.id, runner_factory=via_gate, probe=probe, update_firewall=True)
    finally:
        gate.close()
        stop_leftover_jobs(tmp_path / "remote")
    assert result.status == "succeeded", result.error
    assert rule_at_reconnect == [[f"{AFTER_MOVE}/32"]]   # replaced (new range in, old one out) before SSH
    moved = store.events(run.id, "firewall_updated")
    assert [e.json("data_json") for e in moved] == [{"old": "198.51.100.0/24", "new": f"{AFTER_MOVE}/32"}]
    summary = json.loads((Path(result.artifacts_dir) / "out" / "summary.json").read_text())
    assert summary["steps"] == 40
    assert not cloud.instance_running(inst)
    assert cloud.rule_gone(inst)      # teardown removed the rule with the instance
    assert gate.refused >= 1   # the old rule really kept the moved laptop out


def test_a_configured_ssh_cidr_that_is_not_a_cidr_is_a_one_line_error(tmp_path, capsys):
    from cli_helpers import error_line

    cfg = tmp_path / "ftplan.toml"
    cfg.write_text(f'[job]\ndataset = "{EXAMPLE}"\n[launch]\nproviders = ["aws"]\nbudget_usd = 5\n'
                   'ssh_cidr = "my office"\n')
    line = error_line(capsys, "launch", "--config", str(cfg), "--dry-run")
    assert "ssh_cidr" in line and "'my office' is not a CIDR block such as 203.0.113.0/24" in line


def test_ssh_cidr_flag_that_is_not_a_cidr_is_a_one_line_error(tmp_path, capsys):
    from cli_helpers import error_line

    cfg = tmp_path / "ftplan.toml"
    cfg.write_text(f'[job]\ndataset = "{EXAMPLE}"\n[launch]\nproviders = ["aws"]\nbudget_usd = 5\n')
    line = error_line(capsys, "launch", "--config", str(cfg), "--ssh-cidr", "10.0.0.300/8", "--dry-run")
    assert line == "error: invalid value for ssh-cidr: Value error, '10.0.0.300/8' is not a CIDR block such as 203.0.113.0/24"
