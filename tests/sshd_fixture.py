"""A real OpenSSH server on 127.0.0.1 for tests (and benchmarks/transfer.py).

Debian's openssh-server, started by absolute path in the foreground (`sshd -D -e -f cfg`) so the
test owns its PID, on a free high port, with its own host key, a client ed25519 key in its own
authorized_keys, and `SetEnv FTPLAN_NO_SHUTDOWN=1` so no test can ever arm a real shutdown.
Readiness = the `SSH-2.0-` banner, not a bare TCP connect.

Fixtures: `sshd` (one server per test session/xdist worker), `sshd_factory` (extra private servers,
e.g. to change the host key), `remote_root` + `known_hosts` + `make_runner` (per test).
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

SSHD_BIN = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    """An ed25519 key pair at `path` / `path.pub` (replaced if present)."""
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "ftplan-test", "-f", str(path)], check=True)
    return path


def wait_for_banner(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"sshd on {host}:{port} did not send its banner within {timeout_s}s")


class SSHD:
    """One sshd process. `restart(new_host_key=True)` simulates a re-created (or spoofed) machine."""

    def __init__(self, workdir: Path, port: int | None = None):
        if not os.access(SSHD_BIN, os.X_OK):
            pytest.fail(f"{SSHD_BIN} not found: install Debian's openssh-server (apt-get install -y openssh-server)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.user = getpass.getuser()
        self.host_key = keygen(self.dir / "host_ed25519")
        self.client_key = keygen(self.dir / "client_ed25519")
        (self.dir / "authorized_keys").write_text((self.dir / "client_ed25519.pub").read_text())
        self.config = self.dir / "sshd_config"
        self.log_path = self.dir / "sshd.log"
        self.proc: subprocess.Popen | None = None

    def _write_config(self) -> None:
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPidFile {self.dir / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "StrictModes no\nUsePAM no\nMaxStartups 100:30:200\nSubsystem sftp internal-sftp\n"
            "SetEnv FTPLAN_NO_SHUTDOWN=1\n"
        )

    def start(self) -> SSHD:
        self._write_config()
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)  # privilege-separation dir; sshd refuses to start without it
        subprocess.run([SSHD_BIN, "-t", "-f", str(self.config)], check=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [SSHD_BIN, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        wait_for_banner(self.host, self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, *, new_host_key: bool = False) -> None:
        self.stop()
        if new_host_key:
            keygen(self.host_key)
        self.start()

    def ssh_args(self) -> list[str]:
        """Arguments for OpenSSH's ssh/scp client to reach this server without touching ~/.ssh."""
        return [
            "-i", str(self.client_key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
        ]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    server = SSHD(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture
def sshd_factory(tmp_path):
    """Make private servers (not started); all are stopped at the end of the test."""
    servers: list[SSHD] = []

    def make(port: int | None = None) -> SSHD:
        server = SSHD(tmp_path / f"sshd{len(servers)}", port=port)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def remote_root(tmp_path) -> Path:
    """Where runs live on the 'remote' side (the same machine): a fresh folder per test."""
    path = tmp_path / "remote-runs"
    path.mkdir()
    return path


@pytest.fixture
def known_hosts(tmp_path) -> Path:
    return tmp_path / "known_hosts"


@pytest.fixture
def make_runner(sshd, remote_root, known_hosts):
    """Build connected SSHRunner objects against the session sshd; closed at the end of the test."""
    from ftplan.planner.remote.ssh_runner import SSHRunner

    runners: list[SSHRunner] = []

    def make(server: SSHD | None = None, *, connect: bool = True, **kwargs) -> SSHRunner:
        server = server or sshd
        kwargs.setdefault("remote_root", str(remote_root))
        kwargs.setdefault("connect_timeout_s", 20)
        runner = SSHRunner(server.host, server.port, server.user, server.client_key, known_hosts, **kwargs)
        runners.append(runner)
        if connect:
            runner.connect()
        return runner

    yield make
    for runner in runners:
        runner.close()
