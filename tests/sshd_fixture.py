"""A real OpenSSH server on 127.0.0.1 (or another loopback address) for tests (and benchmarks/transfer.py).

Debian's openssh-server, started by absolute path in the foreground (`sshd -D -e -f cfg`) so the
test owns its PID, on a free high port, with its own host key, a client ed25519 key in its own
authorized_keys, and `SetEnv FTPLAN_NO_SHUTDOWN=1` so no test can ever arm a real shutdown (and `FTPLAN_NO_GPU_CHECK=1`: the
stand-in "GPU machines" of the tests have no nvidia-smi).
Readiness = the `SSH-2.0-` banner, not a bare TCP connect.

Fixtures: `sshd` (one server per test session/xdist worker), `sshd_factory` (extra private servers,
e.g. to change the host key, or on 127.0.0.2 / 127.0.0.3 as the "machines" of a multi-node run: all of
127.0.0.0/8 is loopback on Linux), `remote_root` + `known_hosts` + `make_runner` (per test).
"""

from __future__ import annotations

import getpass
import os
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

SSHD_BIN = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
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

    def __init__(self, workdir: Path, port: int | None = None, host: str = "127.0.0.1"):
        if not os.access(SSHD_BIN, os.X_OK):
            pytest.fail(f"{SSHD_BIN} not found: install Debian's openssh-server (apt-get install -y openssh-server)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.user = getpass.getuser()
        self.host_key = keygen(self.dir / "host_ed25519")
        self.client_key = keygen(self.dir / "client_ed25519")
        (self.dir / "authorized_keys").write_text((self.dir / "client_ed25519.pub").read_text())
        self.env = "FTPLAN_NO_SHUTDOWN=1 FTPLAN_NO_GPU_CHECK=1"  # SetEnv of every session
        self.config = self.dir / "sshd_config"
        self.log_path = self.dir / "sshd.log"
        self.proc: subprocess.Popen | None = None

    def _write_config(self) -> None:
        self.config.write_text(
            f"Port {self.port}\nListenAddress {self.host}\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPidFile {self.dir / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "StrictModes no\nUsePAM no\nMaxStartups 100:30:200\nSubsystem sftp internal-sftp\n"
            f"SetEnv {self.env}\n"
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


class TcpProxy:
    """A TCP relay in front of a server, to break the network on purpose (a real sshd stays behind it).

    `blackhole()`: the connections open now go silent both ways (packets "lost": the kernel still ACKs,
    like a NAT or firewall that dropped the flow) while new connections are relayed normally;
    `blackhole(new_too=True)`: new connections are accepted but never relayed either (a dead machine).
    `reset_on_next_send()`: the next bytes the client sends on any open connection are answered with a
    TCP reset (RST) of that connection, once. `connections` counts accepted connections."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.host, self.port = self.listener.getsockname()
        self.connections = 0
        self._pairs: list[tuple[socket.socket, socket.socket, dict]] = []
        self._new_black = False
        self._reset_armed = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            state = {"black": self._new_black}
            if state["black"]:
                self._pairs.append((client, client, state))
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self._pairs.append((client, upstream, state))
            threading.Thread(target=self._relay, args=(client, upstream, state), daemon=True).start()

    def _relay(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        try:
            while not self._closed:
                if state["black"]:
                    time.sleep(0.05)
                    continue
                ready, _, _ = select.select([client, upstream], [], [], 0.05)
                for sock in ready:
                    if state["black"]:
                        break
                    data = sock.recv(1 << 16)
                    if not data:
                        return self._close(client, upstream)
                    if sock is client and self._reset_armed:
                        self._reset_armed = False
                        return self._close(client, upstream, rst=True)
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            self._close(client, upstream)

    @staticmethod
    def _close(*socks: socket.socket, rst: bool = False) -> None:
        for sock in socks:
            try:
                if rst:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass

    def blackhole(self, *, new_too: bool = False) -> None:
        for _, _, state in self._pairs:
            state["black"] = True
        self._new_black = new_too

    def reset_on_next_send(self) -> None:
        self._reset_armed = True

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        for client, upstream, _ in self._pairs:
            self._close(client, upstream)


@pytest.fixture
def tcp_proxy():
    """Make TcpProxy relays (closed at the end of the test)."""
    made: list[TcpProxy] = []

    def make(server) -> TcpProxy:
        made.append(TcpProxy(server.host, server.port))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    server = SSHD(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture
def sshd_factory(tmp_path):
    """Make private servers (not started); all are stopped at the end of the test."""
    servers: list[SSHD] = []

    def make(port: int | None = None, host: str = "127.0.0.1") -> SSHD:
        server = SSHD(tmp_path / f"sshd{len(servers)}", port=port, host=host)
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
