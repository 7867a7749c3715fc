"""Pull a file or folder of a run back from the machine: one verified stream, swapped into place only
after it checked out, never replacing a verified copy with less, always within a hard time bound.

One remote command writes a tar stream, from a small Python sender that hashes each file in the same
pass and hands it to sshd with zero-copy sendfile (pull_scripts.SENDER_PY); the sha256 manifest
follows on stderr. Locally the stream is extracted safely while hashing (safe_extract), then checked
against that manifest. The command runs through the system `ssh` client where it can be used
(openssh_pull.py: only the pinned host key accepted), else through a paramiko exec channel with a
64 MiB window and 1 MiB packets; both feed the same extraction and checks. benchmarks/transfer.py on
the shared 2-core loopback (4 runs, load 2-5): ssh 0.89-1.04x OpenSSH scp (paired medians), paramiko
0.52-1.02x with a far wider spread; scp verifies nothing. FTPLAN_PULL_TRANSPORT=paramiko (or the
runner's `pull_transport`) turns ssh off.

A mixin of SSHRunner (it uses the runner's connection, run dirs, log and time budget).
"""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import shutil
import threading
import time
import uuid
from pathlib import Path

import paramiko

from ftplan.planner.remote.openssh_pull import (
    OpenSSHFailed,
    OpenSSHStream,
    choose_transport,
    stream_unavailable,
)
from ftplan.planner.remote.pull_scripts import MANIFEST_PY, SENDER_PY
from ftplan.planner.remote.safe_extract import (
    ArchiveFormatError,
    ArchiveTooLargeError,
    UnsafeArchiveError,
    safe_extract,
)
from ftplan.planner.remote.ssh_connect import IntegrityError, SSHRunnerError, SSHUnreachable

_CHUNK = 1 << 20
_MANIFEST_MARKER = "--- ftplan sha256 manifest ---"
_CHANGED_RC = 75  # the sender's (and the tar fallback's) "a file changed while it was read"
_TRAILER_MAX = 1 << 20  # after the end-of-archive marker only tar's record padding may follow
_STDERR_MAX = 64 << 20
_STALL_S = 60.0  # no byte for this long on a pull channel: the connection is treated as lost
PULL_TIME_LIMIT_S = 4 * 3600.0  # a pull never runs longer than this (teardown gives it far less)


class _ChangedWhileReading(Exception):
    """The remote files changed during a pull (a live folder): worth another attempt."""


class _ConnectionLost(Exception):
    """The SSH connection broke during a pull: reconnect and try again."""


class _StderrCollector(threading.Thread):
    """Reads a channel's stderr while its stdout is streamed. The sender writes its manifest there at
    the end; unread, a large one would fill the channel window and stall the stream for good."""

    def __init__(self, channel: paramiko.Channel):
        super().__init__(name="ftplan-pull-stderr", daemon=True)
        self.channel = channel
        self.parts: list[bytes] = []
        self.size = 0
        self.overflow = False

    def run(self) -> None:
        while True:
            try:
                data = self.channel.recv_stderr(1 << 16)
            except TimeoutError:  # a quiet stderr during a long stream: keep waiting
                if self.channel.closed:
                    return
                continue
            if not data:  # EOF, channel closed, or connection lost
                return
            self.size += len(data)
            if self.size > _STDERR_MAX:
                self.overflow = True
            else:
                self.parts.append(data)

    def text(self, timeout: float = 60) -> str:
        self.join(timeout)
        return b"".join(self.parts).decode(errors="replace")


class _ChannelStream:
    """A paramiko exec channel as the pull's stream: read(n) of stdout, counting bytes, that gives up at the
    pull's hard deadline (and after _STALL_S without a byte); stderr collected alongside."""

    def __init__(self, transport: paramiko.Transport, command: str, deadline: float, window: int, packet: int):
        self.transport, self.deadline = transport, deadline
        self.received = 0
        self.chan = transport.open_session(window_size=window, max_packet_size=packet, timeout=60)
        try:
            self.chan.settimeout(max(1.0, min(_STALL_S, deadline - time.monotonic())))
            self.chan.exec_command(command)
        except BaseException:
            self.chan.close()
            raise
        self._stderr = _StderrCollector(self.chan)
        self._stderr.start()

    def read(self, size: int = _CHUNK) -> bytes:
        if time.monotonic() > self.deadline:
            raise TimeoutError("the pull's time limit was reached")
        data = self.chan.recv(size)
        self.received += len(data)
        return data

    def exit_status(self) -> int:
        return self.chan.recv_exit_status()

    def lost(self) -> bool:
        return not self.transport.is_active()

    def stderr_text(self) -> str:
        return self._stderr.text()

    @property
    def overflow(self) -> bool:
        return self._stderr.overflow

    def close(self) -> None:
        self.chan.close()


def _files_under(path: Path) -> set[str]:
    if path.is_symlink() or not path.exists():
        return set()
    if path.is_file():
        return {""}
    return {os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files}


def swap_into_place(new: Path, final: Path, log) -> int:
    """Move the verified `new` to `final`. Files of an earlier copy that `new` lacks are carried over (a
    rotated-away checkpoint, a file the machine lost): a pull never leaves less than there was.
    Returns how many files were carried over."""
    kept = 0
    if final.is_dir() and not final.is_symlink() and new.is_dir():
        for rel in sorted(_files_under(final) - _files_under(new)):
            dst = new / rel
            if dst.is_symlink() or dst.parent.is_symlink() or not dst.parent.resolve().is_relative_to(new.resolve()):
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(final / rel, dst)
            kept += 1
    elif final.exists() and new.is_dir() and not _files_under(new):
        raise IntegrityError(f"refusing to replace {final} by an empty folder")
    aside = final.with_name(f".ftplan-old-{uuid.uuid4().hex[:8]}")
    had = final.exists() or final.is_symlink()
    if had:
        os.replace(final, aside)
    try:
        os.replace(new, final)
    except OSError:
        if had:
            os.replace(aside, final)
        raise
    if had:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)
    if kept:
        log(f"kept {kept} files of the earlier copy of {final.name} that this pull did not carry")
    return kept


class PullSteps:
    """`pull()` and its helpers; mixed into SSHRunner."""

    # Interpreters tried for the sender, in order. The system one first: `python3` on PATH is often a
    # pyenv/conda shim that costs 100-150 ms per start (measured), and the sender needs only the
    # standard library. `-I -S`: no PYTHONPATH, user site or .pth files - faster, and nothing the job
    # installed can shadow hashlib. Where none exists, GNU tar followed by a sha256sum manifest.
    _PULL_PYTHONS: tuple[str, ...] = ("/usr/bin/python3", "python3")
    # 64 MiB window and packets of up to 1 MiB instead of paramiko's (and OpenSSH's) 2 MiB / 32 KiB:
    # fewer packets and window-adjust round trips (see the module docstring). At most one window is
    # ever buffered locally.
    _PULL_WINDOW = 64 << 20
    _PULL_MAX_PACKET = 1 << 20

    last_pull_skipped: list[tuple[str, str]]
    last_pull_transport: str | None = None  # "openssh" or "paramiko": what carried the last stream
    pull_transport: str | None  # "auto", "openssh" or "paramiko" (None: FTPLAN_PULL_TRANSPORT, else auto)
    _openssh_off: str | None  # why the system ssh is no longer tried for this session
    _openssh_said: str | None

    def _manifest_command(self, base: str, name: str) -> str:
        qb, qn = shlex.quote(base), shlex.quote(name)
        return (
            f"if command -v python3 >/dev/null 2>&1; then python3 -c {shlex.quote(MANIFEST_PY)} {qb} {qn}; "
            f"else cd {qb} && find {qn} -type f -exec sha256sum {{}} +; fi"
        )

    @staticmethod
    def _parse_manifest(text: str) -> dict[str, str]:
        text = text.strip()
        if text.startswith("{"):
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("manifest is not a JSON object")
            return {str(k): str(v) for k, v in value.items()}
        manifest = {}
        for line in text.splitlines():  # sha256sum format; a leading backslash marks escaped names
            escaped = line.startswith("\\")
            digest, _, name = line.lstrip("\\").partition("  ")
            if escaped:
                name = name.replace("\\n", "\n").replace("\\\\", "\\")
            manifest[posixpath.normpath(name)] = digest
        return manifest

    def pull(self, run_id: str, rel_path: str, local_dir: Path, *, attempts: int = 3,
             time_limit_s: float | None = None) -> list[Path]:
        """Copy `rel_path` (file or folder, relative to the run dir) to `local_dir/<its name>`; return the files.

        Extraction is safe (safe_extract) and hashes in the same pass; unsafe members are skipped and
        reported (`last_pull_skipped`, and the log) while every safe file is kept. The result replaces an
        earlier copy only after it matched the remote sha256 manifest, and files of that earlier copy
        missing from the new one are kept. A folder the job is still writing can change under the
        pull: that is retried `attempts` times, as is a dropped connection. The whole call ends within
        `time_limit_s` (default PULL_TIME_LIMIT_S, less inside a bounded teardown).
        """
        rel = self._rel(rel_path)
        run = self.run_dir(run_id)
        base, name = posixpath.split(f"{run}/{rel}")
        local_dir = Path(local_dir)
        limit = min(time_limit_s or PULL_TIME_LIMIT_S, self._time_left())
        deadline = time.monotonic() + limit
        for attempt in range(1, attempts + 1):
            staging = None
            started = time.monotonic()
            try:
                try:
                    self._call(f"checking {rel}", lambda: self.sftp.stat(f"{run}/{rel}"))
                except FileNotFoundError:
                    raise SSHRunnerError(f"{rel} does not exist in run {run_id} on {self.host}") from None
                local_dir.mkdir(parents=True, exist_ok=True)
                staging = local_dir / f".ftplan-pull-{uuid.uuid4().hex[:8]}"
                local, received, skipped = self._pull_once(rel, base, name, staging, deadline)
                new = staging / name
                if new.is_symlink() or not new.exists():
                    raise IntegrityError(
                        f"refused artifact {rel} from {self.host}: the stream did not carry {name} itself "
                        "(missing, or sent as a link); the local copy is kept"
                    )
                swap_into_place(new, local_dir / name, self.log)
            except _ChangedWhileReading as exc:
                if attempt == attempts:
                    raise IntegrityError(f"{exc}; gave up after {attempts} attempts") from None
                self.log(f"{exc}; pulling again ({attempt}/{attempts})")
                continue
            except _ConnectionLost as exc:
                if attempt == attempts or time.monotonic() >= deadline:
                    raise SSHUnreachable(f"pulling {rel} from {self.host} failed: {exc}") from None
                self.log(f"connection lost while pulling {rel} ({exc}); reconnecting ({attempt}/{attempts})")
                self._reconnect(f"pull of {rel}: {exc}")
                continue
            finally:
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)
            elapsed = time.monotonic() - started
            self.last_pull_skipped = skipped
            if skipped:
                self.log(f"skipped {len(skipped)} unsafe entries of {rel}: " +
                         "; ".join(f"{n!r}: {why}" for n, why in skipped[:5]))
            self.log(f"pulled {rel} ({received / 2**20:.1f} MiB in {elapsed:.1f}s through "
                     f"{self.last_pull_transport}), {len(local)} files verified")
            return sorted(local_dir / p for p in local)
        raise AssertionError("unreachable")

    def _pull_command(self, base: str, name: str) -> str:
        qb, qn, qm = shlex.quote(base), shlex.quote(name), shlex.quote(_MANIFEST_MARKER)
        pythons = " ".join(shlex.quote(p) for p in self._PULL_PYTHONS)
        fallback = (
            f"cd {qb} || exit 2; tar -cf - -- {qn}; t=$?; printf '\\n%s\\n' {qm} >&2; "
            f"find {qn} -type f -exec sha256sum {{}} + >&2 || exit 2; [ $t -eq 1 ] && exit {_CHANGED_RC}; exit $t"
        )
        return (
            f'for p in {pythons}; do if command -v "$p" >/dev/null 2>&1; then '
            f'exec "$p" -I -S -c {shlex.quote(SENDER_PY)} {qb} {qn} {qm}; fi; done; {fallback}'
        )

    def _pull_once(self, rel: str, base: str, name: str, staging: Path,
                   deadline: float) -> tuple[dict[str, str], int, list[tuple[str, str]]]:
        """One stream extracted into `staging` and checked against its manifest: through the system
        `ssh` client where it can be used (openssh_pull), else (or when ssh fails before any byte)
        through paramiko. Both go through the same extraction and verification."""
        command = self._pull_command(base, name)
        if self._pull_via_openssh():
            try:
                self.last_pull_transport = "openssh"
                return self._verified_stream(rel, staging, lambda: OpenSSHStream(
                    self._target, self._default_alias, command, deadline, stall_s=_STALL_S, stderr_max=_STDERR_MAX,
                    alive_interval_s=self.alive_interval_s, dead_after_s=self.dead_after_s))
            except OpenSSHFailed as exc:
                self._openssh_off = f"ssh failed: {exc}"
                self.log(f"ssh could not stream {rel} from {self.host} ({exc}); using paramiko from now on")
                shutil.rmtree(staging, ignore_errors=True)
        self._ensure()
        transport = self._client.get_transport()
        self.last_pull_transport = "paramiko"
        return self._verified_stream(rel, staging, lambda: _ChannelStream(
            transport, command, deadline, self._PULL_WINDOW, self._PULL_MAX_PACKET))

    def _pull_via_openssh(self) -> bool:
        choice = choose_transport(self.pull_transport)
        if choice == "paramiko":
            return False
        why = self._openssh_off or stream_unavailable(self._target, self._default_alias)
        if why and why != self._openssh_said:
            self._openssh_said = why
            if choice == "openssh" or not why.startswith("no ssh client"):
                self.log(f"pulling through paramiko, not the system ssh: {why}")
        return why is None

    def _verified_stream(self, rel: str, staging: Path,
                         open_stream) -> tuple[dict[str, str], int, list[tuple[str, str]]]:
        skipped: list[tuple[str, str]] = []
        stream = None
        try:
            stream = open_stream()
            try:
                local = safe_extract(stream.read, staging, skipped=skipped)
            except ArchiveTooLargeError as exc:
                if "than the" in str(exc) and "announced" in str(exc):
                    raise _ChangedWhileReading(f"{rel} on {self.host} grew while it was read ({exc})") from None
                raise IntegrityError(f"refused artifact {rel} from {self.host}: {exc}") from None
            except UnsafeArchiveError as exc:  # not raised with `skipped`; kept for safety
                raise IntegrityError(f"refused artifact {rel} from {self.host}: {exc}") from None
            except ArchiveFormatError as exc:
                if stream.lost():
                    raise _ConnectionLost(f"connection closed mid-stream ({exc})") from None
                if "truncated" not in str(exc):  # a hostile or broken header: no point asking again
                    raise IntegrityError(f"refused artifact {rel} from {self.host}: {exc}") from None
                stream.exit_status()
                err = stream.stderr_text().partition(f"\n{_MANIFEST_MARKER}\n")[0].strip()
                raise SSHRunnerError(f"pulling {rel} from {self.host} failed: {err[-300:] or exc}") from None
            trailing = 0
            while data := stream.read(_CHUNK):  # tar's end-of-archive record padding
                trailing += len(data)
                if trailing > _TRAILER_MAX:
                    raise IntegrityError(f"refused artifact {rel} from {self.host}: data after the end of the archive")
            rc = stream.exit_status()
            err, found, manifest_text = stream.stderr_text().rpartition(f"\n{_MANIFEST_MARKER}\n")
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise _ConnectionLost(f"{type(exc).__name__}: {exc}") from None
        finally:
            if stream is not None:
                stream.close()
        if not found and stream.lost():
            raise _ConnectionLost("connection closed before the manifest arrived")
        if rc == _CHANGED_RC:
            raise _ChangedWhileReading(f"{rel} changed on {self.host} while it was read")
        if rc != 0 or not found or stream.overflow:
            raise SSHRunnerError(f"sending {rel} from {self.host} failed (exit {rc}): {err.strip()[-300:]}")
        try:
            remote = self._parse_manifest(manifest_text)
        except ValueError as exc:
            raise SSHRunnerError(f"unreadable sha256 manifest of {rel} from {self.host}: {exc}") from None
        left_out = {posixpath.normpath(n) for n, _ in skipped}
        missing = sorted(set(remote) - set(local) - left_out)
        extra = sorted(set(local) - set(remote))
        bad = sorted(p for p in set(remote) & set(local) if remote[p] != local[p])
        if missing or extra or bad:
            raise _ChangedWhileReading(
                f"artifact {rel} from {self.host} does not match its remote sha256 manifest "
                f"(missing {missing[:3]}, unexpected {extra[:3]}, different {bad[:3]})"
            )
        return local, stream.received, skipped
