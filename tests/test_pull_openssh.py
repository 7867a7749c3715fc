"""Artifact pulls through the system OpenSSH client (issue 16 item 5), against a real sshd on 127.0.0.1:
the stream is verified as strictly as paramiko's, only the pinned host key is accepted (a changed key
fails the pull instead of falling back), a tampered stream fails its manifest, and paramiko is used
where there is no `ssh`, when it is switched off, or when ssh fails before any byte."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import paramiko
import pytest

from ftplan.planner.remote.ssh_runner import HostKeyChangedError, IntegrityError, SSHRunner

pytestmark = pytest.mark.slow

REAL_SSH = shutil.which("ssh")


def _remote_file(remote_root: Path, run_id: str, data: bytes) -> Path:
    out = remote_root / run_id / "out"
    out.mkdir(parents=True)
    (out / "weights.bin").write_bytes(data)
    (out / "sub").mkdir()
    (out / "sub" / "summary.json").write_text('{"status": "succeeded"}')
    return out


@pytest.fixture
def ssh_spy(tmp_path, monkeypatch):
    """`ssh` on PATH is a wrapper that records its arguments and runs the real client."""
    if REAL_SSH is None:
        pytest.skip("no OpenSSH client here")
    bin_dir = tmp_path / "spy-bin"
    bin_dir.mkdir()
    calls = tmp_path / "ssh-calls.jsonl"
    wrapper = bin_dir / "ssh"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "known = [a.split('=', 1)[1].strip('\"') for a in sys.argv if a.startswith('UserKnownHostsFile=')]\n"
        "text = open(known[0]).read() if known else None\n"
        f"with open({str(calls)!r}, 'a') as f: f.write(json.dumps({{'argv': sys.argv[1:], 'known_hosts': text}}) + '\\n')\n"
        f"os.execv({REAL_SSH!r}, [{REAL_SSH!r}, *sys.argv[1:]])\n"
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("FTPLAN_PULL_TRANSPORT", raising=False)

    def argvs() -> list[dict]:
        if not calls.exists():
            return []
        return [json.loads(line) for line in calls.read_text().splitlines()]

    return argvs


def test_pull_through_openssh_is_verified_and_pins_the_host_key(make_runner, remote_root, tmp_path, ssh_spy, sshd):
    data = os.urandom(3 * 2**20 + 7)
    _remote_file(remote_root, "run-ossh", data)
    messages: list[str] = []
    runner = make_runner(log=messages.append)
    got = runner.pull("run-ossh", "out", tmp_path / "local")
    assert runner.last_pull_transport == "openssh"
    assert sorted(p.relative_to(tmp_path / "local").as_posix() for p in got) == ["out/sub/summary.json", "out/weights.bin"]
    assert hashlib.sha256((tmp_path / "local" / "out" / "weights.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert any("through openssh" in m and "2 files verified" in m for m in messages)
    (call,) = ssh_spy()
    argv = call["argv"]
    assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv and "GlobalKnownHostsFile=none" in argv
    assert argv[argv.index("-p") + 1] == str(sshd.port) and argv[argv.index("-i") + 1] == str(sshd.client_key)
    assert any(a.startswith("ServerAliveInterval=") for a in argv) and any(a.startswith("ServerAliveCountMax=") for a in argv)
    assert not any(a.startswith("HostKeyAlias=") for a in argv)  # no alias: the key is filed under [host]:port
    # ssh was given exactly the pinned key, nothing else, and the throw-away file is gone afterwards
    pinned = (sshd.host_key.with_name(sshd.host_key.name + ".pub")).read_text().split()[:2]
    assert call["known_hosts"] == f"[{sshd.host}]:{sshd.port} {pinned[0]} {pinned[1]}\n"
    used = next(a.split("=", 1)[1].strip('"') for a in argv if a.startswith("UserKnownHostsFile="))
    assert not Path(used).exists()


def test_openssh_pull_with_an_instance_alias_uses_that_pin(make_runner, remote_root, tmp_path, ssh_spy):
    _remote_file(remote_root, "run-alias", b"adapter")
    runner = make_runner(host_key_alias="aws/i-0abc123")
    runner.pull("run-alias", "out/weights.bin", tmp_path)
    assert runner.last_pull_transport == "openssh"
    assert (tmp_path / "weights.bin").read_bytes() == b"adapter"
    (call,) = ssh_spy()
    assert "HostKeyAlias=aws/i-0abc123" in call["argv"]
    assert call["known_hosts"].startswith("aws/i-0abc123 ssh-ed25519 ")


def test_a_host_key_that_differs_from_the_pin_fails_the_openssh_pull(make_runner, remote_root, tmp_path, ssh_spy,
                                                                      known_hosts, sshd):
    """The pin is replaced by another key while the (verified) paramiko connection stays up: ssh must refuse
    the real server's key and the pull must fail - not quietly fall back to paramiko."""
    _remote_file(remote_root, "run-mitm", b"secret adapter")
    runner = make_runner()
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    name, blob = other.with_suffix(".pub").read_text().split()[:2]
    known_hosts.write_text(f"[{sshd.host}]:{sshd.port} {name} {blob}\n")
    with pytest.raises(HostKeyChangedError, match="ssh refused to connect"):
        runner.pull("run-mitm", "out/weights.bin", tmp_path / "local")
    assert len(ssh_spy()) == 1
    assert not (tmp_path / "local" / "weights.bin").exists()


# The machine's python3 runs the real sender but flips one byte inside the first file's data.
TAMPERING_PYTHON = r"""#!/bin/sh
PYTHON "$@" | PYTHON -c '
import sys
data = bytearray(sys.stdin.buffer.read())
data[600000] ^= 0xFF
sys.stdout.buffer.write(data)
'
"""


@pytest.mark.parametrize("transport", ["openssh", "paramiko"])
def test_a_tampered_stream_fails_verification(transport, sshd, remote_root, known_hosts, tmp_path, ssh_spy):
    _remote_file(remote_root, "run-flip", os.urandom(2**20))
    script = tmp_path / "tampering-python3"
    script.write_text(TAMPERING_PYTHON.replace("PYTHON", sys.executable))
    script.chmod(0o755)

    class Tampered(SSHRunner):
        _PULL_PYTHONS = (str(script),)

    with Tampered(sshd.host, sshd.port, sshd.user, sshd.client_key, known_hosts, remote_root=str(remote_root),
                  connect_timeout_s=20, pull_transport=transport) as runner:
        runner.connect()
        with pytest.raises(IntegrityError, match=r"different \['weights.bin'\]\); gave up after 2 attempts"):
            runner.pull("run-flip", "out/weights.bin", tmp_path / "local", attempts=2)
        assert runner.last_pull_transport == transport
    assert len(ssh_spy()) == (2 if transport == "openssh" else 0)
    assert list((tmp_path / "local").iterdir()) == []


def test_without_ssh_on_path_the_pull_uses_paramiko(make_runner, remote_root, tmp_path, monkeypatch):
    _remote_file(remote_root, "run-nossh", b"weights")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("FTPLAN_PULL_TRANSPORT", raising=False)
    runner = make_runner()
    runner.pull("run-nossh", "out/weights.bin", tmp_path)
    assert runner.last_pull_transport == "paramiko"
    assert (tmp_path / "weights.bin").read_bytes() == b"weights"


def test_paramiko_when_switched_off_by_variable_or_option(make_runner, remote_root, tmp_path, ssh_spy, monkeypatch):
    _remote_file(remote_root, "run-off", b"weights")
    monkeypatch.setenv("FTPLAN_PULL_TRANSPORT", "paramiko")
    runner = make_runner()
    runner.pull("run-off", "out/weights.bin", tmp_path / "a")
    assert runner.last_pull_transport == "paramiko"
    monkeypatch.delenv("FTPLAN_PULL_TRANSPORT")
    optioned = make_runner(pull_transport="paramiko")
    optioned.pull("run-off", "out/weights.bin", tmp_path / "b")
    assert optioned.last_pull_transport == "paramiko"
    assert ssh_spy() == []
    assert (tmp_path / "b" / "weights.bin").read_bytes() == b"weights"


def test_an_ssh_that_fails_before_any_byte_falls_back_to_paramiko(make_runner, remote_root, tmp_path, monkeypatch):
    """e.g. a client too old for an option, or a key format it cannot read: paramiko carries the pull."""
    _remote_file(remote_root, "run-broken-ssh", b"weights")
    bin_dir = tmp_path / "broken-bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/sh\necho 'command-line line 0: Bad configuration option' >&2\nexit 255\n")
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("FTPLAN_PULL_TRANSPORT", raising=False)
    messages: list[str] = []
    runner = make_runner(log=messages.append)
    runner.pull("run-broken-ssh", "out/weights.bin", tmp_path / "local")
    assert runner.last_pull_transport == "paramiko"
    assert (tmp_path / "local" / "weights.bin").read_bytes() == b"weights"
    assert any("ssh could not stream" in m for m in messages)


# The machine's python3: the first time, a part of the real stream and then silence (the sender hangs
# with the channel open); afterwards the real sender.
STALLING_PYTHON = r"""#!/bin/sh
if [ ! -e MARK ]; then
  PYTHON "$@" | head -c 200000
  touch MARK
  sleep 15
  exit 0
fi
exec PYTHON "$@"
"""


def test_a_dead_peer_mid_stream_is_detected_by_ssh_keepalives(sshd, tcp_proxy, remote_root, known_hosts, tmp_path,
                                                               ssh_spy):
    """The connection goes silent after the first bytes: ssh's ServerAlive probes (the session's 1 s / 3 s
    here) end it, and the pull reconnects and completes - instead of waiting out the 60 s stall limit."""
    data = os.urandom(2**20)
    _remote_file(remote_root, "run-bh", data)
    mark = tmp_path / "stalled"
    script = tmp_path / "stalling-python3"
    script.write_text(STALLING_PYTHON.replace("PYTHON", sys.executable).replace("MARK", str(mark)))
    script.chmod(0o755)

    class Stalling(SSHRunner):
        _PULL_PYTHONS = (str(script),)

    proxy = tcp_proxy(sshd)
    messages: list[str] = []
    runner = Stalling(proxy.host, proxy.port, sshd.user, sshd.client_key, known_hosts, remote_root=str(remote_root),
                      connect_timeout_s=20, alive_interval_s=1, dead_after_s=3, log=messages.append)

    def cut_when_stalled() -> None:
        for _ in range(300):
            if mark.exists():
                proxy.blackhole()  # the open connections (paramiko's and ssh's) go silent; new ones work
                return
            threading.Event().wait(0.05)

    with runner:
        runner.connect()
        cutter = threading.Thread(target=cut_when_stalled, daemon=True)
        cutter.start()
        got = runner.pull("run-bh", "out/weights.bin", tmp_path / "local")
        cutter.join(1)
    assert got == [tmp_path / "local" / "weights.bin"]
    assert (tmp_path / "local" / "weights.bin").read_bytes() == data
    assert runner.last_pull_transport == "openssh"
    lost = [m for m in messages if "connection lost while pulling" in m]
    assert lost and "closed mid-stream" in lost[0], messages
    call = ssh_spy()[0]["argv"]
    assert "ServerAliveInterval=1" in call and "ServerAliveCountMax=3" in call


def test_no_ssh_before_a_host_key_is_pinned_or_for_a_name_ssh_would_misread(tmp_path, ssh_spy):
    """ssh is only ever given a key ftplan pinned after a login; an alias with known_hosts pattern
    characters (which ssh would read as a wildcard) keeps the pull on paramiko."""
    from ftplan.planner.remote.openssh_pull import stream_unavailable
    from ftplan.planner.remote.ssh_connect import PinStore, Target

    pins = PinStore(tmp_path / "known_hosts")
    target = Target("127.0.0.1", 2222, "ubuntu", tmp_path / "id", pins, "[127.0.0.1]:2222")
    assert stream_unavailable(target, "[127.0.0.1]:2222") == "no host key pinned yet"
    key = paramiko.Ed25519Key.from_private_key_file(str(_keygen(tmp_path / "hk")))
    pins.pin("[127.0.0.1]:2222", key)
    assert stream_unavailable(target, "[127.0.0.1]:2222") is None
    pins.pin("aws/i-*", key)
    wild = Target("127.0.0.1", 2222, "ubuntu", tmp_path / "id", pins, "aws/i-*")
    assert "not one ssh reads verbatim" in stream_unavailable(wild, "[127.0.0.1]:2222")
    dash = Target("-oProxyCommand=x", 22, "ubuntu", tmp_path / "id", pins, "[127.0.0.1]:2222")
    assert "host or user" in stream_unavailable(dash, "-oProxyCommand=x")


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path
