"""First contact with a machine that is still booting, against real sshd processes (issue 22 items 1, 2, 7;
issue 11 items 14, 16): host keys pinned only after a login and per instance, provider-published keys
verified, the key-refused window counted from sshd's first answer, errors naming the missing stage."""

from __future__ import annotations

import threading
import time

import pytest
from sshd_fixture import keygen

from ftplan.planner.remote.ssh_runner import HostKeyChangedError, SSHRunner, SSHRunnerError, SSHUnreachable


def _runner(server, known_hosts, remote_root, **kw) -> SSHRunner:
    kw.setdefault("connect_timeout_s", 60)
    return SSHRunner(server.host, server.port, server.user, server.client_key, known_hosts,
                     remote_root=str(remote_root), **kw)


def _authorize(server, yes: bool) -> None:
    pub = (server.dir / "client_ed25519.pub").read_text()
    (server.dir / "authorized_keys").write_text(pub if yes else "")


def _connect_in_thread(runner: SSHRunner) -> tuple[threading.Thread, list]:
    got: list = []

    def work():
        try:
            runner.connect()
            got.append("connected")
        except BaseException as exc:  # noqa: BLE001
            got.append(exc)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t, got


def _wait_for(messages: list[str], text: str, timeout_s: float = 60) -> None:
    end = time.monotonic() + timeout_s
    while not any(text in m for m in messages):
        assert time.monotonic() < end, f"never logged {text!r}: {messages}"
        time.sleep(0.05)


def test_host_key_replaced_before_the_first_login_is_still_booting(sshd_factory, known_hosts, remote_root):
    """GCE regenerates host keys on first boot, after sshd already answered with the image's keys."""
    server = sshd_factory()
    _authorize(server, False)  # the key is not installed yet
    server.start()
    old_key = (server.dir / "host_ed25519.pub").read_text().split()[1]
    messages: list[str] = []
    runner = _runner(server, known_hosts, remote_root, log=messages.append)
    t, got = _connect_in_thread(runner)
    _wait_for(messages, "key not accepted yet")
    assert not known_hosts.exists()  # nothing pinned on a handshake whose login failed
    _authorize(server, True)
    server.restart(new_host_key=True)
    t.join(90)
    try:
        assert got == ["connected"]
        new_key = (server.dir / "host_ed25519.pub").read_text().split()[1]
        assert new_key != old_key and new_key in known_hosts.read_text() and old_key not in known_hosts.read_text()
        assert [m for m in messages if "pinned host key" in m and "first login" in m]
    finally:
        runner.close()
    server.restart(new_host_key=True)  # after the first login a change is a hard stop
    with pytest.raises(HostKeyChangedError, match="changed since the first login"):
        _runner(server, known_hosts, remote_root).connect()


def test_key_refused_window_counts_from_sshd_first_answer(sshd_factory, known_hosts, remote_root):
    """sshd comes up late (7 s) and the key lands 2 s after its first answer: a 7 s window counted from
    connect() would already be over; counted from the banner, the login succeeds."""
    server = sshd_factory()
    _authorize(server, False)
    messages: list[str] = []
    runner = _runner(server, known_hosts, remote_root, auth_retry_s=7, log=messages.append)
    t, got = _connect_in_thread(runner)
    time.sleep(7)
    server.start()
    _wait_for(messages, "key not accepted yet")
    time.sleep(2)
    _authorize(server, True)
    t.join(90)
    runner.close()
    assert got == ["connected"], got


def test_errors_name_the_stage_that_never_came(sshd_factory, known_hosts, remote_root, tcp_proxy, sshd):
    nothing = sshd_factory()  # nothing listens
    with pytest.raises(SSHUnreachable, match="no TCP connection"):
        _runner(nothing, known_hosts, remote_root, connect_timeout_s=2).connect()
    silent = tcp_proxy(sshd)
    silent.blackhole(new_too=True)  # TCP accepted, nothing ever answers
    with pytest.raises(SSHUnreachable, match="accepted TCP but sshd never sent its SSH banner"):
        SSHRunner(silent.host, silent.port, sshd.user, sshd.client_key, known_hosts, connect_timeout_s=3).connect()
    other = keygen(remote_root / "other_key")
    with pytest.raises(SSHRunnerError, match=r"other_key refused by .* for \d+s after sshd first answered"):
        SSHRunner(sshd.host, sshd.port, sshd.user, other, known_hosts, connect_timeout_s=30, auth_retry_s=1).connect()


def test_refused_on_a_machine_we_did_not_boot_fails_in_seconds(sshd_factory, known_hosts, remote_root):
    server = sshd_factory()
    runner = _runner(server, known_hosts, remote_root, connect_timeout_s=300, refused_is_fatal=True)
    with pytest.raises(SSHUnreachable, match=rf"nothing listens on 127.0.0.1:{server.port}: is sshd running"):
        runner.connect()


def test_pins_are_per_instance_so_a_new_instance_on_a_reused_address_connects(sshd_factory, known_hosts, remote_root):
    server = sshd_factory().start()
    _runner(server, known_hosts, remote_root, host_key_alias="aws/i-old").connect()
    server.restart(new_host_key=True)  # spot recovery: a new instance, same ip:port
    runner = _runner(server, known_hosts, remote_root, host_key_alias="aws/i-new")
    runner.connect()
    runner.close()
    names = [line.split()[0] for line in known_hosts.read_text().splitlines()]
    assert names == ["aws/i-old", "aws/i-new"]
    with pytest.raises(HostKeyChangedError):
        _runner(server, known_hosts, remote_root, host_key_alias="aws/i-old").connect()


def test_provider_published_host_keys_are_verified(sshd_factory, known_hosts, remote_root, tmp_path):
    server = sshd_factory().start()
    published = (server.dir / "host_ed25519.pub").read_text().strip()
    messages: list[str] = []
    runner = _runner(server, known_hosts, remote_root, expected_host_keys=["# comment", published],
                     host_key_alias="gcp/vm-1", log=messages.append)
    runner.connect()
    runner.close()
    assert [m for m in messages if "verified against the provider's published keys" in m]
    keygen(tmp_path / "not_the_host")
    runner = _runner(server, tmp_path / "kh2", remote_root, connect_timeout_s=2,
                     expected_host_keys=[(tmp_path / "not_the_host.pub").read_text()])
    with pytest.raises(SSHUnreachable, match="not one the provider published"):
        runner.connect()
    assert not (tmp_path / "kh2").exists()


def test_a_corrupted_known_hosts_is_a_one_line_error(sshd, known_hosts, remote_root):
    known_hosts.write_bytes(b"\xff\xfe\x00garbage\x80\n")
    with pytest.raises(SSHRunnerError, match=r"known_hosts file .* is unreadable .*delete it"):
        _runner(sshd, known_hosts, remote_root).connect()


def test_gpu_not_ready_is_a_clear_error(sshd_factory, known_hosts, remote_root):
    server = sshd_factory()
    server.env = "FTPLAN_NO_SHUTDOWN=1"  # a "GPU machine" without the test opt-out: nvidia-smi must answer
    server.start()
    runner = _runner(server, known_hosts, remote_root)
    try:
        runner.connect()
        runner.preflight(gpus=0, cloud_init_s=0)  # nothing to check on a CPU offer
        with pytest.raises(SSHRunnerError, match=r"has 2 GPU\(s\) but nvidia-smi on 127.0.0.1 did not list them"):
            runner.preflight(gpus=2, cloud_init_s=5, gpu_wait_s=1)
    finally:
        runner.close()


def test_remote_commands_see_the_login_profile_of_the_image(sshd_factory, known_hosts, remote_root, tmp_path):
    """conda/pyenv/`/opt` tools are put on PATH by the login profile: the GPU check (like the job's start)
    runs in a login shell, so an nvidia-smi found only through ~/.bash_profile answers."""
    home = tmp_path / "home"
    (home / "opt-bin").mkdir(parents=True)
    (home / "opt-bin" / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-1)'\n")
    (home / "opt-bin" / "nvidia-smi").chmod(0o755)
    (home / ".bash_profile").write_text(f'export PATH="{home / "opt-bin"}:$PATH"\n')
    server = sshd_factory()
    server.env = f"FTPLAN_NO_SHUTDOWN=1 HOME={home}"
    server.start()
    runner = _runner(server, known_hosts, remote_root)
    try:
        runner.connect()
        assert "opt-bin" not in runner.run_command("echo $PATH")[1]  # a plain exec does not read the profile
        runner.preflight(gpus=1, cloud_init_s=0, gpu_wait_s=1)
    finally:
        runner.close()
