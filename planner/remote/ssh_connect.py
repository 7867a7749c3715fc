"""Open one authenticated SSH connection to a machine that may still be booting, within a stated budget.

What a fresh cloud VM does to a client (research notes, Part 3 of the project's real-world checks):
- sshd comes up late, and the login key is installed after sshd is up (GCE guest agent, Paperspace's
  startup script), so "key refused" is normal for a while. That window is counted from sshd's FIRST
  ANSWER (its banner), not from when we started dialling.
- the host key can change during first boot (GCE regenerates host keys), so a key is pinned only after
  authentication succeeded; before that a different key means "still booting". After the first login a
  change is a hard stop. Pins are keyed by instance (an alias), not by ip:port, so a replacement
  instance on a recycled address gets its own pin. Where the provider publishes the instance's host
  keys (AWS console output, GCE guest attributes) only those are accepted.
- a silently dead path (black hole) is detected in seconds: keepalives that expect a reply, and a
  watchdog that closes the connection when nothing at all arrived for `dead_after_s`
  (OpenSSH's ServerAliveInterval x ServerAliveCountMax; peers use 15-30 s).
Errors name the stage that never came: no TCP, no banner, or key refused after N s of sshd answering.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from paramiko.common import cMSG_GLOBAL_REQUEST

from ftplan.providers.errors import scrub

# paramiko logs a traceback for every failed handshake (normal while a machine boots) on its transport
# thread; the runner reports what matters itself, so keep those out of the user's terminal.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

AUTH_RETRY_S = 180.0  # after sshd first answered: the key may not be installed yet
ALIVE_INTERVAL_S = 5.0  # a reply-expecting keepalive this often
DEAD_AFTER_S = 20.0  # nothing received for this long (4 keepalives unanswered): the peer is gone
REFUSED_GRACE_S = 3.0  # machines we do not boot: "connection refused" for this long means no sshd
TCP_USER_TIMEOUT_MS = 30_000  # the kernel drops a connection whose sent data stays unacknowledged


class SSHRunnerError(Exception):
    """Something failed on or on the way to the remote machine. The message is scrubbed of secrets."""

    def __init__(self, message: str):
        super().__init__(scrub(message))


class SSHUnreachable(SSHRunnerError):
    """The machine could not be reached (or re-reached) within the budget given."""


class HostKeyChangedError(SSHRunnerError):
    """The machine presented a different host key than the one pinned after the first login."""


class IntegrityError(SSHRunnerError):
    """A transferred file does not match its sha256, or the archive was unsafe."""


def fingerprint(key: paramiko.PKey) -> str:
    return base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def load_private_key(path: Path) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(str(path))
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise SSHRunnerError(f"cannot read SSH private key {path}: {exc}") from None


class PinStore:
    """known_hosts of a run, one entry per instance alias. Written 0600 via a temp file + rename."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _load(self) -> paramiko.HostKeys:
        keys = paramiko.HostKeys()
        if self.path.exists():
            try:
                keys.load(str(self.path))
            except (UnicodeDecodeError, ValueError, paramiko.SSHException, OSError) as exc:
                raise SSHRunnerError(
                    f"known_hosts file {self.path} is unreadable ({type(exc).__name__}); it holds the pinned host "
                    "keys of this run: restore it, or delete it to pin the machine's key again on the next login"
                ) from None
        return keys

    def pinned(self, alias: str) -> list[paramiko.PKey]:
        entry = self._load().lookup(alias)
        return list(entry.values()) if entry else []

    def pin(self, alias: str, key: paramiko.PKey) -> None:
        keys = self._load()
        keys.add(alias, key.get_name(), key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        keys.save(str(tmp))
        tmp.chmod(0o600)
        tmp.replace(self.path)


def parse_published_keys(lines: list[str] | None) -> list[paramiko.PKey]:
    """OpenSSH "type base64 [comment]" lines (provider-published host keys) as keys; unknown types skipped."""
    keys = []
    for line in lines or []:
        parts = line.split()
        if len(parts) < 2:
            continue
        try:
            keys.append(paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1])))
        except (ValueError, paramiko.SSHException, TypeError, binascii.Error):
            continue
    return keys


class _NotPublished(paramiko.SSHException):
    """The presented host key is not among the provider-published ones (maybe still booting)."""


class _HostKeyCheck(paramiko.MissingHostKeyPolicy):
    """Called by paramiko after key exchange, before authentication: record the key, refuse a mismatch
    with a pin (a change after the first login) or with the provider-published keys."""

    def __init__(self, pinned: list[paramiko.PKey], published: list[paramiko.PKey]):
        self.pinned, self.published = pinned, published
        self.presented: paramiko.PKey | None = None

    def missing_host_key(self, client, hostname, key):
        self.presented = key
        if self.pinned and not any(k == key for k in self.pinned):
            raise paramiko.BadHostKeyException(hostname, key, self.pinned[0])
        if not self.pinned and self.published and not any(k == key for k in self.published):
            raise _NotPublished(f"host key SHA256:{fingerprint(key)} is not one the provider published")


class LiveTransport(paramiko.Transport):
    """A Transport that prefers AES-GCM (one AEAD call per packet: cheaper bulk pulls), remembers when
    sshd first answered, and notices every packet received (the dead-peer watchdog's clock)."""

    def __init__(self, sock, **kwargs):
        super().__init__(sock, **kwargs)
        options = self.get_security_options()
        gcm = tuple(c for c in options.ciphers if c.endswith("-gcm@openssh.com"))
        options.ciphers = gcm + tuple(c for c in options.ciphers if c not in gcm)
        self.last_heard = time.monotonic()
        self._pending_alive = 0
        read = self.packetizer.read_message

        def counted():
            msg = read()
            self.last_heard = time.monotonic()
            return msg

        self.packetizer.read_message = counted

    def send_alive(self) -> None:
        """keepalive@openssh.com with want-reply set: sshd answers (with a failure), so silence means trouble.
        paramiko's own keepalive sets no want-reply and so never notices a dead peer."""
        m = paramiko.Message()
        m.add_byte(cMSG_GLOBAL_REQUEST)
        m.add_string("keepalive@openssh.com")
        m.add_boolean(True)
        self._pending_alive += 1
        self._send_user_message(m)

    def _parse_request_success(self, m):
        if self._pending_alive:
            self._pending_alive -= 1  # our keepalive's answer: nobody waits on it
        else:
            super()._parse_request_success(m)

    def _parse_request_failure(self, m):
        if self._pending_alive:
            self._pending_alive -= 1
        else:
            super()._parse_request_failure(m)


class Watchdog(threading.Thread):
    """Sends a reply-expecting keepalive every `interval_s`; when nothing at all arrived for `dead_after_s`,
    closes the transport, which wakes every blocked channel and SFTP call with an error at once."""

    def __init__(self, transport: LiveTransport, interval_s: float, dead_after_s: float,
                 on_dead: Callable[[float], None]):
        super().__init__(name="ftplan-ssh-watchdog", daemon=True)
        self.transport, self.interval_s, self.dead_after_s, self.on_dead = transport, interval_s, dead_after_s, on_dead
        self.stopped = threading.Event()

    def run(self) -> None:
        t = self.transport
        tick = min(1.0, self.interval_s)
        next_alive = time.monotonic() + self.interval_s
        while not self.stopped.wait(tick) and t.is_active():
            silent = time.monotonic() - t.last_heard
            if silent > self.dead_after_s:
                self.on_dead(silent)
                t.close()
                return
            if time.monotonic() >= next_alive:
                next_alive += self.interval_s
                try:
                    t.send_alive()
                except Exception:  # noqa: BLE001 - a failing send means the transport is going away
                    return


def _tune_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS)


@dataclass
class Target:
    host: str
    port: int
    user: str
    key_path: Path
    pins: PinStore
    alias: str  # whose host key this is: the instance id, or [host]:port
    published: list[paramiko.PKey] = field(default_factory=list)
    auth_retry_s: float = AUTH_RETRY_S
    refused_is_fatal: bool = False  # a machine we did not boot: refused = nothing listens

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def open_client(target: Target, budget_s: float, log: Callable[[str], None], *,
                single_attempt: bool = False) -> paramiko.SSHClient:
    """An authenticated client within `budget_s`, retrying while the machine boots (capped backoff).

    Raises SSHUnreachable naming the stage that never came, HostKeyChangedError at once on a key that
    differs from the pin, SSHRunnerError for a key that sshd refused for `auth_retry_s` after it first
    answered. `single_attempt`: one try only (teardown and salvage reconnects).
    """
    pkey = load_private_key(target.key_path)
    pinned = target.pins.pinned(target.alias)
    start = time.monotonic()
    deadline = start + budget_s
    delay, attempt = 0.5, 0
    first_answer: float | None = None  # when sshd first sent its banner
    tcp_ok = False
    last = "no attempt"
    while True:
        attempt += 1
        remaining = max(1.0, deadline - time.monotonic())
        check = _HostKeyCheck(pinned, target.published)
        made: list[LiveTransport] = []

        def factory(sock, made=made, **kw):
            made.append(LiveTransport(sock, **kw))
            return made[-1]

        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(check)
        try:
            sock = socket.create_connection((target.host, target.port), timeout=min(10.0, remaining))
            tcp_ok = True
            _tune_socket(sock)
            client.connect(
                target.host, target.port, username=target.user, pkey=pkey, sock=sock,
                timeout=min(15.0, remaining), banner_timeout=min(15.0, remaining), auth_timeout=min(15.0, remaining),
                allow_agent=False, look_for_keys=False, transport_factory=factory,
            )
            break
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyChangedError(
                f"host key of {target.alias} ({target.host}:{target.port}) changed since the first login (pinned "
                f"{exc.expected_key.get_name()} SHA256:{fingerprint(exc.expected_key)}, got SHA256:"
                f"{fingerprint(exc.key)}); refusing to connect. If the machine was legitimately re-created, delete "
                f"its line in {target.pins.path}"
            ) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            first_answer = first_answer or time.monotonic()
            last = f"key not accepted yet ({exc})"
            answered = time.monotonic() - first_answer
            if answered > target.auth_retry_s:
                raise SSHRunnerError(
                    f"SSH key {target.key_path} refused by {target.where} for {answered:.0f}s after sshd first "
                    f"answered ({exc}): the key was never installed for {target.user!r} (on GCP, an organization "
                    "policy enforcing OS Login overrides the instance's keys)"
                ) from None
        except ConnectionRefusedError:
            client.close()
            last = "connection refused"
            if target.refused_is_fatal and time.monotonic() - start >= min(REFUSED_GRACE_S, budget_s):
                raise SSHUnreachable(
                    f"nothing listens on {target.host}:{target.port}: is sshd running there (and on that port)?"
                ) from None
        except _NotPublished as exc:
            client.close()
            first_answer = first_answer or time.monotonic()
            last = f"{exc} (still booting?)"
        except (OSError, EOFError, paramiko.SSHException) as exc:  # timeout, reset, no banner, unreachable
            client.close()
            if made and made[-1].remote_version:
                first_answer = first_answer or time.monotonic()
            last = _describe(exc)
        now = time.monotonic()
        if single_attempt or now + delay > deadline:
            raise SSHUnreachable(_stage_message(target, budget_s, now - start, attempt, last, tcp_ok, first_answer))
        log(f"waiting for sshd at {target.host}:{target.port} (attempt {attempt}: {last}); retry in {delay:.1f}s")
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
    presented = check.presented
    if presented is not None and not pinned:
        target.pins.pin(target.alias, presented)  # only now: the login succeeded
        how = "verified against the provider's published keys" if target.published else "first login"
        log(f"pinned host key of {target.alias}: {presented.get_name()} SHA256:{fingerprint(presented)} ({how})")
    return client


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if "Error reading SSH protocol banner" in str(exc):
        return "no SSH banner"
    return f"{type(exc).__name__}: {exc}"


def _stage_message(target: Target, budget_s: float, spent: float, attempts: int, last: str, tcp_ok: bool,
                   first_answer: float | None) -> str:
    """Which stage never came: TCP, sshd's banner, or a login."""
    where = f"{target.host}:{target.port}"
    if target.refused_is_fatal and last == "connection refused":
        return f"nothing listens on {where}: is sshd running there (and on that port)?"
    head = f"could not connect to {target.where} within {budget_s:.0f}s"
    tail = f"({attempts} attempt{'s' * (attempts > 1)} in {spent:.0f}s; last: {last})"
    if not tcp_ok:
        return (f"{head}: no TCP connection {tail}; the machine is not up, or port {target.port} is closed to "
                "this computer's address (firewall / security group source range)")
    if first_answer is None:
        return f"{head}: {where} accepted TCP but sshd never sent its SSH banner {tail}; still booting, or not sshd"
    answered = time.monotonic() - first_answer
    if last.startswith("key not accepted"):
        return (f"{head}: sshd answered for {answered:.0f}s but refused the key {target.key_path} {tail}; it may "
                "not be installed yet (raise the connect budget) or not at all")
    return f"{head}: sshd answered for {answered:.0f}s but no login succeeded {tail}"
