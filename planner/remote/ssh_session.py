"""One SSH connection to a machine, kept alive for as long as the machine is: every remote call reconnects and
retries on a dropped or dead connection within `reconnect_grace_s`; `bounded()` caps all of it in teardown.

Connecting itself (booting machines, host keys, stage-naming errors, the keepalive watchdog) is in
ssh_connect.py; what is run on the machine is in ssh_runner.py and artifact_pull.py.
"""

from __future__ import annotations

import posixpath
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import paramiko

from ftplan.planner.remote.ssh_connect import (
    ALIVE_INTERVAL_S,
    AUTH_RETRY_S,
    DEAD_AFTER_S,
    LiveTransport,
    PinStore,
    SSHRunnerError,
    SSHUnreachable,
    Target,
    Watchdog,
    open_client,
    parse_published_keys,
)

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_OP_TIMEOUT_S = 60.0  # any single SFTP request or short command
_RECONNECT_GRACE_S = 300.0  # a dropped connection is retried this long before the run gives up on SSH
_TEARDOWN_RECONNECT_S = 15.0  # inside bounded(): one reconnect attempt of at most this long
_T = TypeVar("_T")


class SSHSession:
    """A connection to one machine that survives drops. `ever_connected` says whether it was ever reached."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        key_path: Path,
        known_hosts: Path,
        *,
        remote_root: str = "~/ftplan-runs",
        connect_timeout_s: float | None = 600,
        log: Callable[[str], None] | None = None,
        host_key_alias: str | None = None,
        expected_host_keys: list[str] | None = None,
        refused_is_fatal: bool = False,
        auth_retry_s: float = AUTH_RETRY_S,
        reconnect_grace_s: float = _RECONNECT_GRACE_S,
        alive_interval_s: float = ALIVE_INTERVAL_S,
        dead_after_s: float = DEAD_AFTER_S,
        first_boot_s: float | None = None,
        pull_transport: str | None = None,
    ):
        self.host, self.port, self.user = host, int(port), user
        self.key_path = Path(key_path)
        self.known_hosts = Path(known_hosts)
        self.remote_root = remote_root
        # A fresh instance's first connect may take the provider's first-boot budget (unless the user set
        # one), and sshd may refuse our key for that long after it first answered (installed late).
        self.connect_timeout_s = connect_timeout_s or first_boot_s or 600.0
        if first_boot_s:
            auth_retry_s = max(auth_retry_s, first_boot_s)
        self.reconnect_grace_s = reconnect_grace_s
        self.alive_interval_s, self.dead_after_s = alive_interval_s, dead_after_s
        self.log = log or (lambda _msg: None)
        self._default_alias = f"[{host}]:{port}" if int(port) != 22 else host
        alias = host_key_alias or self._default_alias
        # Artifact pulls: "openssh" / "paramiko" / "auto" (the system ssh when usable); None: the
        # FTPLAN_PULL_TRANSPORT variable, else auto. See artifact_pull.py and openssh_pull.py.
        self.pull_transport = pull_transport
        self._openssh_off: str | None = None
        self._openssh_said: str | None = None
        self._target = Target(
            host, int(port), user, self.key_path, PinStore(self.known_hosts), alias,
            parse_published_keys(expected_host_keys), auth_retry_s, refused_is_fatal,
        )
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._watchdog: Watchdog | None = None
        self._root: str | None = None  # remote_root with ~ expanded
        self.ever_connected = False
        self.last_pull_skipped: list[tuple[str, str]] = []
        self._bounded_until: float | None = None
        self._gave_up = False

    # ------------------------------------------------------------------ connection
    def connect(self, budget_s: float | None = None, *, single_attempt: bool = False) -> None:
        """Connect within `budget_s` (default connect_timeout_s), retrying while the machine boots.

        Raises SSHUnreachable naming the stage that never came (no TCP / no banner / key refused),
        HostKeyChangedError at once when the key differs from the one pinned after the first login.
        """
        self.close()
        client = open_client(self._target, self.connect_timeout_s if budget_s is None else budget_s, self.log,
                             single_attempt=single_attempt)
        transport = client.get_transport()
        assert isinstance(transport, LiveTransport)
        # paramiko starts a re-key after 512 MiB in either direction. If the server closes a channel
        # just then (the end of a pulled stream), paramiko's transport thread waits for that very
        # re-key to finish before answering the close: a self-deadlock that kills the connection
        # after 30 s (reproduced on 512 MiB pulls). Leave re-keying to the server: OpenSSH re-keys
        # by itself every 1-4 GB and sends nothing else during the exchange, so no such race.
        transport.packetizer.REKEY_BYTES = transport.packetizer.REKEY_PACKETS = 2**62
        self._client = client
        try:
            self._sftp = client.open_sftp()
            self._sftp.get_channel().settimeout(_OP_TIMEOUT_S)
            self._root = self._resolve_root()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self.close()
            raise SSHUnreachable(f"logged in to {self.host} but SFTP did not start: {type(exc).__name__}: {exc}") from None
        self._watchdog = Watchdog(transport, self.alive_interval_s, self.dead_after_s, self._on_dead)
        self._watchdog.start()
        self.ever_connected = True

    def _on_dead(self, silent_s: float) -> None:
        self.log(f"no answer from {self.host} for {silent_s:.0f}s: the connection is dead; dropping it")

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stopped.set()
            self._watchdog = None
        for obj in (self._sftp, self._client):
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # noqa: BLE001 - closing a dead connection must never mask the real error
                    pass
        self._sftp = self._client = None

    def __enter__(self) -> SSHSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _active(self) -> bool:
        transport = self._client.get_transport() if self._client else None
        return transport is not None and transport.is_active()

    def _time_left(self) -> float:
        if self._bounded_until is None:
            return float("inf")
        return self._bounded_until - time.monotonic()

    @contextmanager
    def bounded(self, total_s: float, reconnect_s: float = _TEARDOWN_RECONNECT_S) -> Iterator[None]:
        """Teardown and salvage: everything inside ends within about `total_s`; a lost connection gets
        ONE reconnect attempt of at most `reconnect_s`, after which every call fails at once."""
        saved = (self._bounded_until, self._gave_up, self.reconnect_grace_s)
        self._bounded_until = time.monotonic() + total_s
        self.reconnect_grace_s = reconnect_s
        try:
            yield
        finally:
            self._bounded_until, self._gave_up, self.reconnect_grace_s = saved

    def _reconnect(self, why: str) -> None:
        left = self._time_left()
        if self._bounded_until is not None:
            if self._gave_up or left <= 1:
                raise SSHUnreachable(f"{self.host} is unreachable ({why}); not trying again during teardown")
            self.log(f"connection to {self.host} lost ({why}); one reconnect attempt")
            try:
                self.connect(min(self.reconnect_grace_s, left), single_attempt=True)
            except SSHRunnerError:
                self._gave_up = True
                raise
            return
        self.log(f"connection to {self.host} lost ({why}); reconnecting (up to {self.reconnect_grace_s:.0f}s)")
        self.connect(self.reconnect_grace_s)

    def _ensure(self) -> None:
        if self._time_left() <= 0:
            raise SSHUnreachable(f"the time allowed for talking to {self.host} is spent")
        if not self._active():
            if not self.ever_connected:
                self.connect()
            else:
                self._reconnect("connection closed")

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run an idempotent remote operation, reconnecting and retrying when the connection drops or
        goes silent; gives up after `reconnect_grace_s` of trying (at once inside `bounded()`)."""
        lost_since: float | None = None
        while True:
            self._ensure()
            try:
                return fn()
            except (OSError, EOFError, paramiko.SSHException) as exc:
                if not self._is_lost(exc):
                    raise
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > self.reconnect_grace_s:
                    raise SSHUnreachable(f"{what} on {self.host}: connection kept failing ({exc})") from None
                self.close()
                self._reconnect(f"{what}: {type(exc).__name__}: {exc}")

    def _is_lost(self, exc: BaseException) -> bool:
        if isinstance(exc, (EOFError, paramiko.SSHException, TimeoutError, socket.timeout, ConnectionError)):
            return True
        return self._going_down()  # an SFTP OSError on a live connection is a real answer (no such file...)

    def _going_down(self) -> bool:
        """Whether the transport died: paramiko closes channels a moment before it marks itself inactive."""
        for _ in range(20):
            if not self._active():
                return True
            time.sleep(0.025)
        return False

    @property
    def sftp(self) -> paramiko.SFTPClient:
        self._ensure()
        assert self._sftp is not None
        return self._sftp

    def _resolve_root(self) -> str:
        root = self.remote_root
        assert self._sftp is not None
        if root == "~" or root.startswith("~/"):
            home = self._sftp.normalize(".")
            root = home + root[1:]
        return posixpath.normpath(root)

    def run_dir(self, run_id: str) -> str:
        if not _RUN_ID.match(run_id or ""):
            raise SSHRunnerError(f"invalid run id {run_id!r}: use letters, digits, '.', '_' and '-'")
        if self._root is None:
            self._ensure()
        assert self._root is not None
        return f"{self._root}/{run_id}"

    # ------------------------------------------------------------------ remote commands
    def _exec(self, command: str, *, timeout: float = 120, check: bool = True) -> tuple[int, str, str]:
        """One command; raises the raw connection error (callers wrap it in `_call`)."""
        self._ensure()
        assert self._client is not None
        timeout = max(1.0, min(timeout, self._time_left()))
        chan = self._client.get_transport().open_session(timeout=timeout)
        try:
            chan.settimeout(timeout)
            chan.exec_command(command)
            out = chan.makefile("rb").read()
            err = chan.makefile_stderr("rb").read()
            rc = chan.recv_exit_status()
        finally:
            chan.close()
        if rc == -1 and self._going_down():
            raise EOFError("connection closed before the command's exit status arrived")
        out_s, err_s = out.decode(errors="replace"), err.decode(errors="replace")
        if check and rc != 0:
            raise SSHRunnerError(f"remote command exited {rc} on {self.host}: {err_s.strip()[-500:] or out_s[-500:]}")
        return rc, out_s, err_s

    def run_command(self, command: str, *, timeout: float = 120, check: bool = True) -> tuple[int, str, str]:
        """An idempotent command, retried over a reconnect if the connection drops."""
        return self._call("remote command", lambda: self._exec(command, timeout=timeout, check=check))

    def _read_text(self, path: str) -> str | None:
        def read() -> str | None:
            try:
                with self.sftp.open(path, "rb") as fh:
                    return fh.read().decode(errors="replace")
            except FileNotFoundError:
                return None

        try:
            return self._call(f"reading {posixpath.basename(path)}", read)
        except SSHUnreachable:
            raise
        except OSError as exc:
            raise SSHRunnerError(f"cannot read {path} on {self.host}: {exc}") from None
