"""The `ssh` (bring your own machine) and `local` adapters: host parsing, the endpoint they hand the
launcher (checked against the real test sshd), and that teardown never touches the machine."""

from __future__ import annotations

import getpass
import socket
import threading

import paramiko
import pytest

from ftplan.providers.base import InstanceRequest, InstanceState, get_provider
from ftplan.providers.ssh import HostSpecError, LocalProvider, SSHHostProvider, parse_host_spec


def _request(run_id="r1"):
    return InstanceRequest(run_id=run_id, instance_type="on-prem", gpu="RTX4090", gpu_count=1, region="",
                           ssh_public_key="ssh-ed25519 AAAA ftplan")


@pytest.mark.parametrize(("spec", "expected"), [
    ("ubuntu@10.0.0.5", ("ubuntu", "10.0.0.5", 22)),
    ("ubuntu@gpu-box.lan:2222", ("ubuntu", "gpu-box.lan", 2222)),
    ("root@[::1]:2200", ("root", "::1", 2200)),
    ("gpu-box", (getpass.getuser(), "gpu-box", 22)),
])
def test_host_spec_parsing(spec, expected):
    h = parse_host_spec(spec)
    assert (h.user, h.host, h.port) == expected


@pytest.mark.parametrize(("spec", "says"), [
    ("user@@host:abc", "expected user@host[:port]"),
    ("user@host:abc", "port 'abc' must be a number"),
    ("user@host:70000", "must be a number from 1 to 65535"),
    ("@host", "expected user@host[:port]"),
    ("us er@host", "expected user@host[:port]"),
    ("user@ho_st!", "is not a host name or IP address"),
    ("user@[zz::1]:22", "is not an IPv6 address"),
    ("", "expected user@host[:port]"),
])
def test_bad_host_specs_are_one_clear_line(spec, says):
    with pytest.raises(HostSpecError) as err:
        SSHHostProvider(host=spec)
    msg = str(err.value)
    assert says in msg and "\n" not in msg and repr(spec) in msg
    assert isinstance(err.value, ValueError)


def test_missing_identity_file(tmp_path):
    with pytest.raises(HostSpecError, match="no such key file"):
        SSHHostProvider(host="ubuntu@10.0.0.5", identity=tmp_path / "nope")


def test_ssh_lifecycle_never_connects_to_the_machine():
    """create/wait/describe/terminate/list must not open a single connection to the user's machine."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        p = get_provider("ssh", host=f"alice@127.0.0.1:{port}")
        inst = p.create(_request("run7"))
        assert inst.id == f"ssh:alice@127.0.0.1:{port}:run7"
        assert inst.state == InstanceState.RUNNING
        ep = p.wait_ready(inst, timeout_s=1)
        assert (ep.host, ep.port, ep.user) == ("127.0.0.1", port, "alice")
        assert p.describe(inst).state == InstanceState.RUNNING
        p.terminate(inst)
        p.terminate(inst)
        assert inst.state == InstanceState.TERMINATED
        assert p.describe(inst).state == InstanceState.TERMINATED
        assert p.list_instances() == [] and p.list_instances("run7") == []
    finally:
        stop.set()
        t.join()
        listener.close()
    assert accepted == []


def test_local_endpoint_logs_in_to_a_real_sshd_and_survives_terminate(sshd):
    p = LocalProvider(port=sshd.port, identity=sshd.client_key)
    inst = p.create(_request("loc"))
    ep = p.wait_ready(inst, timeout_s=1)
    assert inst.extra["identity"] == str(sshd.client_key)

    def run(cmd: str) -> str:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        client.connect(ep.host, ep.port, ep.user, key_filename=inst.extra["identity"], allow_agent=False,
                       look_for_keys=False, timeout=10)
        try:
            _, out, _ = client.exec_command(cmd)
            return out.read().decode().strip()
        finally:
            client.close()

    assert run("echo ready") == "ready"
    p.terminate(inst)
    assert run("echo still-here") == "still-here", "terminate must not shut the machine down"
    assert inst.to_dict()["id"] == f"ssh:{getpass.getuser()}@127.0.0.1:{sshd.port}:loc"
