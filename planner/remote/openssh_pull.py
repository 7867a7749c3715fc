"""The artifact pull's byte stream through the system OpenSSH client instead of paramiko.

paramiko decrypts every packet in Python: on a 2-core loopback it reached ~0.4-0.6x of `scp`
(benchmarks/transfer.py). `ssh` runs the same remote sender command; its stdout is the tar stream
and its stderr the sender's manifest, read by artifact_pull exactly as a paramiko channel's.

Host keys stay exactly as strict: ssh gets a throw-away known_hosts holding ONLY the key pinned for
this instance (under its alias), StrictHostKeyChecking=yes, no user or system known_hosts, no
config file, no agent, no forwarding. A key that differs from the pin makes ssh refuse to connect,
reported as HostKeyChangedError (never a silent fallback). ssh's own messages go to a log file
(`-E`), so stderr carries only what the machine wrote. Nothing secret is on the command line: the
identity is a file path, the remote command only paths.

`stream_unavailable()` says why this path cannot be used (no ssh binary, nothing pinned yet, a name
ssh could misread); the caller then uses paramiko. `OpenSSHFailed` (ssh exited before any byte)
also sends the caller to paramiko.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paramiko

from ftplan.planner.remote.ssh_connect import (
    ALIVE_INTERVAL_S,
    DEAD_AFTER_S,
    HostKeyChangedError,
    Target,
    fingerprint,
)

TRANSPORTS = ("auto", "openssh", "paramiko")
ENV_VAR = "FTPLAN_PULL_TRANSPORT"
_CONNECT_TIMEOUT_S = 15
_PIPE_SIZE = 1 << 20  # Linux F_SETPIPE_SZ: 1 MiB reads instead of 64 KiB ones
# Names ssh reads verbatim: no known_hosts pattern characters (*?!,), no leading '-' or '@'/'|' markers.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.:\[\]/][A-Za-z0-9_.:\[\]/-]*\Z")
_SAFE_USER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*\Z")
_HOSTKEY_FAILED = ("Host key verification failed", "HOST IDENTIFICATION HAS CHANGED", "host key for")


class OpenSSHFailed(Exception):
    """ssh exited before the machine sent a byte (not a host-key refusal): use paramiko instead."""


def choose_transport(option: str | None) -> str:
    """The runner option, else FTPLAN_PULL_TRANSPORT, else "auto" (OpenSSH when usable)."""
    value = (option or os.environ.get(ENV_VAR) or "auto").strip().lower()
    return value if value in TRANSPORTS else "auto"


def stream_unavailable(target: Target, default_alias: str) -> str | None:
    """Why the OpenSSH stream cannot be used for `target` (None when it can)."""
    if shutil.which("ssh") is None:
        return "no ssh client on PATH"
    if not target.pins.pinned(target.alias):
        return "no host key pinned yet"
    if not _SAFE_NAME.match(target.alias):
        return f"host key name {target.alias!r} is not one ssh reads verbatim"
    if not _SAFE_NAME.match(target.host) or not _SAFE_USER.match(target.user):
        return "host or user name is not one ssh reads verbatim"
    if any(c in tempfile.gettempdir() for c in '%"'):  # ssh expands % tokens in UserKnownHostsFile
        return f"the temporary folder {tempfile.gettempdir()!r} has a character ssh would misread"
    return None


def known_hosts_text(alias: str, keys: list[paramiko.PKey]) -> str:
    """OpenSSH known_hosts lines naming `alias` ([host]:port off port 22, else the instance alias)."""
    return "".join(f"{alias} {key.get_name()} {key.get_base64()}\n" for key in keys)


def ssh_argv(target: Target, default_alias: str, known_hosts: Path, log_file: Path, command: str, *,
             alive_interval_s: float = ALIVE_INTERVAL_S, dead_after_s: float = DEAD_AFTER_S) -> list[str]:
    """The ssh command line: batch mode, only the pinned key accepted, keepalives that detect a dead peer
    (the session's own interval and dead-after, as its paramiko watchdog uses)."""
    interval = max(1, round(alive_interval_s))
    dead_count = max(1, round(dead_after_s / interval))
    argv = [
        "ssh", "-F", "none", "-T", "-n", "-x", "-a", "-E", str(log_file),
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f'UserKnownHostsFile="{known_hosts}"',
        "-o", "GlobalKnownHostsFile=none",
        "-o", "UpdateHostKeys=no",
        "-o", "CheckHostIP=no",
        "-o", "VerifyHostKeyDNS=no",
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no",
        "-o", "ClearAllForwardings=yes",
        "-o", "PermitLocalCommand=no",
        "-o", "ControlPath=none",
        "-o", "ConnectionAttempts=1",
        "-o", f"ConnectTimeout={_CONNECT_TIMEOUT_S}",
        "-o", f"ServerAliveInterval={interval}",
        "-o", f"ServerAliveCountMax={dead_count}",
        "-o", "Compression=no",
        # AES-GCM first (hardware AES; OpenSSH's default chacha20 is slower here), the defaults after.
        "-o", "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com",
        "-o", "LogLevel=ERROR",
        "-i", str(target.key_path).replace("%", "%%"),
        "-p", str(target.port),
        "-l", target.user,
    ]
    if target.alias != default_alias:
        argv += ["-o", f"HostKeyAlias={target.alias}"]
    return [*argv, "--", target.host, command]


class OpenSSHStream:
    """One `ssh ... <command>` process read like a pull channel: `read(n)` gives stdout (the tar), with the
    pull's deadline and stall limit; stderr (the manifest) is collected by a thread, capped at `stderr_max`."""

    def __init__(self, target: Target, default_alias: str, command: str, deadline: float, *,
                 stall_s: float, stderr_max: int, alive_interval_s: float = ALIVE_INTERVAL_S,
                 dead_after_s: float = DEAD_AFTER_S):
        self.target, self.deadline, self.stall_s, self.stderr_max = target, deadline, stall_s, stderr_max
        self.received = 0
        self.parts: list[bytes] = []
        self.size = 0
        self.overflow = False
        self._dir = Path(tempfile.mkdtemp(prefix="ftplan-ssh-"))  # 0700
        try:
            known = self._dir / "known_hosts"
            fd = os.open(known, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(known_hosts_text(target.alias, target.pins.pinned(target.alias)))
            self.log_file = self._dir / "ssh.log"
            self.proc = subprocess.Popen(
                ssh_argv(target, default_alias, known, self.log_file, command,
                         alive_interval_s=alive_interval_s, dead_after_s=dead_after_s),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
            )
        except OSError as exc:  # ssh vanished since it was looked up, or cannot be run
            shutil.rmtree(self._dir, ignore_errors=True)
            raise OpenSSHFailed(f"cannot run ssh: {exc}") from None
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._out = self.proc.stdout.fileno()
        if hasattr(fcntl, "F_SETPIPE_SZ"):  # Linux
            try:
                fcntl.fcntl(self._out, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:  # above the system's pipe-max-size: 64 KiB reads then
                pass
        self._poll = select.poll()
        self._poll.register(self._out, select.POLLIN)
        self._stderr = threading.Thread(target=self._collect, name="ftplan-pull-ssh-stderr", daemon=True)
        self._stderr.start()

    def _collect(self) -> None:
        err = self.proc.stderr
        while data := err.read(1 << 16):
            self.size += len(data)
            if self.size > self.stderr_max:
                self.overflow = True
            else:
                self.parts.append(data)

    def read(self, size: int) -> bytes:
        now = time.monotonic()
        if now > self.deadline:
            raise TimeoutError("the pull's time limit was reached")
        wait = max(0.0, min(self.stall_s, self.deadline - now))
        if not self._poll.poll(wait * 1000):  # poll, not select: no FD_SETSIZE limit in a busy process
            raise TimeoutError(f"no data from ssh for {wait:.0f}s")
        data = os.read(self._out, size)
        if not data and self.received == 0:
            self._failed_before_data()
        self.received += len(data)
        return data

    def _failed_before_data(self) -> None:
        """stdout closed with nothing on it: a host-key refusal is fatal, another ssh failure means
        "use paramiko"; a remote command that failed (exit != 255) is the caller's to report."""
        rc = self.exit_status(timeout=10)
        if rc != 255:
            return
        log = self.client_log()
        if any(m in log for m in _HOSTKEY_FAILED):
            pinned = self.target.pins.pinned(self.target.alias)
            pins = ", ".join(f"{k.get_name()} SHA256:{fingerprint(k)}" for k in pinned)
            raise HostKeyChangedError(
                f"host key of {self.target.alias} ({self.target.host}:{self.target.port}) is not the one pinned "
                f"after the first login ({pins}); ssh refused to connect. If the machine was legitimately "
                f"re-created, delete its line in {self.target.pins.path}"
            )
        raise OpenSSHFailed(log.strip().splitlines()[-1][:300] if log.strip() else "ssh exited with status 255")

    def exit_status(self, timeout: float | None = None) -> int:
        """ssh's exit status (the remote command's, or 255 for ssh's own failure); kills it past the deadline."""
        limit = max(1.0, self.deadline - time.monotonic())
        try:
            return self.proc.wait(timeout=min(limit, timeout) if timeout else limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise TimeoutError("ssh did not exit after the stream ended") from None

    def lost(self) -> bool:
        """Whether ssh ended with its own failure (255: connection lost, dead peer, refused)."""
        if self.proc.returncode is not None:
            return self.proc.returncode == 255
        try:
            return self.exit_status(timeout=10) == 255
        except TimeoutError:
            return True

    def stderr_text(self, timeout: float = 60) -> str:
        self._stderr.join(timeout)
        return b"".join(self.parts).decode(errors="replace")

    def client_log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._stderr.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()
        shutil.rmtree(self._dir, ignore_errors=True)
