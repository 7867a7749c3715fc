"""Drive a training run on a remote machine over SSH (paramiko): upload, start detached, watch, pull.

Remote layout, under `<remote_root>/<run_id>/` (see bundle.py): the unpacked bundle plus `secrets.env`
(0600), `train.log`, `pid`, `exit_code`, `STOP` and the job's `out/`.

Design choices (measured in the project's SSH research):
- connecting (ssh_connect.py) waits for a booting machine within a budget, pins the host key per
  instance only after a successful login, and watches the connection with reply-expecting keepalives;
- every remote operation survives a dropped or dead connection: it reconnects and retries within
  `reconnect_grace_s` (the job runs detached under `setsid nohup`, so nothing is lost meanwhile);
- `bounded()` caps everything during teardown: one short reconnect attempt, then the machine counts as
  unreachable and every further call fails at once, so terminate is reached in seconds;
- the job starts in a login shell (`bash -lc`) so conda/pyenv/`/opt` pythons set up by the image's
  profile are found; `preflight()` waits for cloud-init and for the GPU driver first;
- artifacts come back through artifact_pull.py (one verified stream per pull, through the system ssh
  client when there is one: openssh_pull.py);
- secrets travel only inside a 0600 file written over SFTP, never on a command line, and
  `remove_secrets()` deletes it from machines ftplan does not own.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import paramiko

from ftplan.planner.remote.artifact_pull import PullSteps
from ftplan.planner.remote.safe_extract import UnsafeArchiveError, check_member_name
from ftplan.planner.remote.ssh_connect import (
    HostKeyChangedError,
    IntegrityError,
    SSHRunnerError,
    SSHUnreachable,
)
from ftplan.planner.remote.ssh_session import SSHSession
from ftplan.providers.errors import register_secret, scrub

__all__ = ["HostKeyChangedError", "IntegrityError", "SSHRunner", "SSHRunnerError", "SSHUnreachable"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_PID = re.compile(r"^[0-9]{1,10}\Z")
_CHUNK = 1 << 20
_SFTP_REQUEST = 255 * 1024  # OpenSSH's sftp-server takes up to 256 KiB per request; paramiko defaults to 32 KiB
_TAIL_MAX = 1 << 20


class SSHRunner(SSHSession, PullSteps):
    """One remote machine, any number of runs on it (see SSHSession for the connection's guarantees)."""

    # ------------------------------------------------------------------ readiness
    def preflight(self, *, gpus: int = 0, cloud_init_s: float = 600, gpu_wait_s: float = 300) -> None:
        """Before the bootstrap: wait for cloud-init to finish where it exists (bounded), and when the offer
        has GPUs, for `nvidia-smi` to list them (drivers installed at first boot come late)."""
        ci = int(cloud_init_s)
        if ci <= 0 and gpus <= 0:
            return
        script = "true; "
        if ci > 0:
            script += (
                "if command -v cloud-init >/dev/null 2>&1; then "
                f"timeout {ci} cloud-init status --wait >/dev/null 2>&1; echo \"cloud-init: $?\"; fi; "
            )
        if gpus > 0:  # FTPLAN_NO_GPU_CHECK=1 on the machine skips it (a GPU without nvidia-smi; tests)
            script += (
                'if [ -n "$FTPLAN_NO_GPU_CHECK" ]; then echo "gpus: skipped"; exit 0; fi; '
                f"end=$(( $(date +%s) + {int(gpu_wait_s)} )); "
                "until n=$(nvidia-smi -L 2>&1) && [ -n \"$n\" ]; do "
                "[ $(date +%s) -ge $end ] && { echo \"nvidia-smi: $n\" | tail -n 3; exit 93; }; sleep 5; done; "
                "echo \"$n\" | grep -c '^GPU' | sed 's/^/gpus: /'"
            )
        rc, out, _ = self.run_command(f"bash -lc {shlex.quote(script)}", timeout=ci + gpu_wait_s + 60, check=False)
        if "cloud-init: 124" in out:
            self.log(f"cloud-init on {self.host} had not finished after {ci}s; going on")
        if rc == 93:
            detail = out.strip().splitlines()[-1][:200] if out.strip() else "no output"
            raise SSHRunnerError(
                f"the offer has {gpus} GPU(s) but nvidia-smi on {self.host} did not list them within "
                f"{gpu_wait_s:.0f}s ({detail}): the GPU driver is not ready on this image; pick another image or offer"
            )
        found = re.search(r"^gpus: (\d+)$", out, re.M)
        if gpus > 0 and found and int(found.group(1)) < gpus:
            self.log(f"{self.host} shows {found.group(1)} GPU(s), the offer promised {gpus}")

    # ------------------------------------------------------------------ upload
    def upload_bundle(self, bundle: Path, run_id: str) -> str:
        """Upload the bundle over SFTP, check its sha256 remotely, unpack it into the run dir; return that dir.
        A dropped connection restarts the upload (every step can be repeated)."""
        return self._call("upload", lambda: self._upload_once(Path(bundle), run_id))

    def _upload_once(self, bundle: Path, run_id: str) -> str:
        run = self.run_dir(run_id)
        self._exec(f"mkdir -p {shlex.quote(run)} && chmod 700 {shlex.quote(run)}")
        remote_tar = f"{run}/.bundle.tar.gz"
        digest = hashlib.sha256()
        try:
            with open(bundle, "rb") as src, self.sftp.open(remote_tar, "wb") as dst:
                dst.MAX_REQUEST_SIZE = _SFTP_REQUEST  # instance attribute: pipelined 255 KiB writes
                dst.set_pipelined(True)
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
        except OSError as exc:
            if self._is_lost(exc):
                raise
            raise SSHRunnerError(f"upload of {bundle.name} to {self.host} failed: {exc}") from None
        # One round trip: check the sha256 on the machine, then unpack (GNU tar; the bundle is ours).
        q = shlex.quote(run)
        rc, out, err = self._exec(
            f"m=$({self._manifest_command(run, '.bundle.tar.gz')}) || exit 87; "
            f"case \"$m\" in *{digest.hexdigest()}*) ;; *) exit 86 ;; esac; "
            f"cd {q} && tar -xzf .bundle.tar.gz --no-same-owner && rm -f .bundle.tar.gz",
            timeout=600, check=False,
        )
        if rc == 86:
            raise IntegrityError(f"bundle {bundle.name} arrived corrupted on {self.host} (sha256 mismatch); upload again")
        if rc != 0:
            raise SSHRunnerError(f"unpacking {bundle.name} on {self.host} failed (exit {rc}): {err.strip()[-300:]}")
        self.log(f"uploaded {bundle.name} ({bundle.stat().st_size / 2**20:.1f} MiB) to {run}")
        return run

    # ------------------------------------------------------------------ start / watch / stop
    def _write_env_file(self, run: str, secrets: dict[str, str], env: dict[str, str]) -> None:
        """secrets.env: KEY='value' lines, sourced by bootstrap.sh. Secret values are also registered
        with providers.errors.scrub so they are masked anywhere they might surface."""
        lines = []
        for name, value in [*env.items(), *secrets.items()]:
            if not _ENV_NAME.match(name):
                raise SSHRunnerError(f"environment variable name {name!r} is not valid; use letters, digits and _")
            if name in secrets:
                register_secret(str(value))
            lines.append(f"{name}='" + str(value).replace("'", "'\"'\"'") + "'\n")
        path = f"{run}/secrets.env"

        def write() -> None:
            with self.sftp.open(path, "w") as fh:
                self.sftp.chmod(path, 0o600)  # before any byte of a secret is written
                fh.write("".join(lines))

        try:
            self._call("writing secrets.env", write)
        except SSHUnreachable:
            raise
        except OSError as exc:
            raise SSHRunnerError(f"cannot write secrets.env on {self.host}: {exc}") from None

    def remove_secrets(self, run_id: str) -> None:
        """Delete secrets.env (HF_TOKEN...) from the machine: for machines ftplan does not own, on every path."""
        q = shlex.quote(f"{self.run_dir(run_id)}/secrets.env")
        self.run_command(f"rm -f {q}", timeout=30)
        self.log(f"removed secrets.env of run {run_id} on {self.host}")

    def start(
        self,
        run_id: str,
        *,
        remote_python: str | None = None,
        secrets: dict[str, str] | None = None,
        deadline_s: int | None = None,
        shutdown: str = "arm",
        env: dict[str, str] | None = None,
    ) -> int:
        """Start bootstrap.sh detached in its own session, in a login shell; return its PID (= process group).

        `secrets` and `env` reach the job as environment variables through the 0600 secrets.env file,
        never a command line. `deadline_s` arms `shutdown -h` on the machine (`shutdown`: "arm";
        "dry-run" only logs the command; "off" never - use it for machines ftplan does not own;
        FTPLAN_NO_SHUTDOWN=1 on the machine also disables it).
        """
        if shutdown not in ("arm", "dry-run", "off"):
            raise SSHRunnerError(f"shutdown must be 'arm', 'dry-run' or 'off', not {shutdown!r}")
        run = self.run_dir(run_id)
        try:
            self._call("checking the bundle", lambda: self.sftp.stat(f"{run}/bootstrap.sh"))
        except FileNotFoundError:
            raise SSHRunnerError(f"run {run_id} is not on {self.host} yet; upload its bundle first") from None
        if self.is_running(run_id):
            raise SSHRunnerError(f"run {run_id} is already running on {self.host}; attach to it or stop it first")
        if secrets or env:
            self._write_env_file(run, secrets or {}, env or {})
        args = ["bash", "./bootstrap.sh", "--shutdown", shutdown]
        if remote_python:
            args += ["--remote-python", remote_python]
        if deadline_s is not None:
            args += ["--deadline-s", str(int(deadline_s))]
        # `cd X; ... &` not `cd X && ... &`: the latter backgrounds a subshell that holds the channel open.
        # A login shell: the image's profile puts conda/pyenv/`/opt` pythons on PATH (a plain exec does not).
        inner = (
            f"cd {shlex.quote(run)} || exit 97; rm -f exit_code exit_code.tmp STOP pid; "
            f"setsid nohup {shlex.join(args)} >> train.log 2>&1 < /dev/null & echo $! > pid; echo $!"
        )
        # Not retried blindly: a start that may have happened is checked through the pid file instead.
        try:
            _, out, _ = self._exec(f"bash -lc {shlex.quote(inner)}", timeout=60)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self._reconnect(f"start: {type(exc).__name__}: {exc}")
            pid = self._pid(run)
            if pid is None or not self.is_running(run_id):
                raise SSHRunnerError(f"could not start run {run_id} on {self.host}: {exc}") from None
            out = str(pid)
        try:
            pid = int(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SSHRunnerError(f"could not start run {run_id} on {self.host}: {out.strip()[-300:]}") from None
        self.log(f"started run {run_id} on {self.host} (pid {pid})")
        return pid

    def _pid(self, run: str) -> int | None:
        """The job's process group from its pid file; None when absent, not a number, or <= 1 (a pid of
        1 or 0 would make `kill -- -PID` signal every process of the user)."""
        text = (self._read_text(f"{run}/pid") or "").strip()
        if not _PID.match(text) or int(text) <= 1:
            if text:
                self.log(f"ignoring the pid file of {run} on {self.host}: {text[:40]!r} is not a job's pid")
            return None
        return int(text)

    def is_running(self, run_id: str) -> bool:
        """True while bootstrap (and so the job) is alive: its PID exists and runs our bootstrap.sh."""
        run = self.run_dir(run_id)
        q = shlex.quote(run)
        cmd = (
            f"cd {q} 2>/dev/null || exit 1; [ -f exit_code ] && exit 1; "
            "[ -s pid ] || exit 1; "
            'p=$(cat pid); kill -0 "$p" 2>/dev/null || exit 1; '
            '[ -r /proc/$p/cmdline ] && { tr "\\0" " " < /proc/$p/cmdline | grep -q bootstrap.sh || exit 1; }; exit 0'
        )
        rc, _, _ = self.run_command(cmd, timeout=30, check=False)
        return rc == 0

    def exit_code(self, run_id: str) -> int | None:
        """The job's exit status once it ended (0 ok, 143 killed by TERM, ...), else None."""
        text = self._read_text(f"{self.run_dir(run_id)}/exit_code")
        try:
            return int(text.strip()) if text and text.strip() else None
        except ValueError:
            return None

    def read_json(self, run_id: str, rel_path: str) -> dict | None:
        """A JSON file of the run (e.g. out/heartbeat.json); None if absent or half-written."""
        rel = self._rel(rel_path)
        text = self._read_text(f"{self.run_dir(run_id)}/{rel}")
        if text is None:
            return None
        try:
            value: Any = json.loads(text)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def tail_log(self, run_id: str, offset: int = 0) -> tuple[str, int]:
        """New text of train.log from byte `offset` (at most 1 MiB) and the offset to continue from.

        A log shorter than `offset` (recreated) is read from the start. Text is cut at a complete
        UTF-8 character and scrubbed of known secrets.
        """
        path = f"{self.run_dir(run_id)}/train.log"

        def read() -> tuple[bytes, int]:
            start = offset
            try:
                with self.sftp.open(path, "rb") as fh:
                    size = fh.stat().st_size or 0
                    if start > size:
                        start = 0
                    fh.seek(start)
                    return fh.read(min(_TAIL_MAX, size - start)), start
            except FileNotFoundError:
                return b"", offset

        try:
            data, start = self._call("reading train.log", read)
        except SSHUnreachable:
            raise
        except OSError as exc:
            raise SSHRunnerError(f"cannot read train.log on {self.host}: {exc}") from None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = decoder.decode(data, final=False)
        used = len(data) - len(decoder.getstate()[0])
        return scrub(text), start + used

    def request_stop(self, run_id: str) -> None:
        """Create STOP in the run dir: the job checkpoints and exits with status `stopped`."""
        path = f"{self.run_dir(run_id)}/STOP"

        def write() -> None:
            with self.sftp.open(path, "w") as fh:
                fh.write("stop requested by ftplan\n")

        try:
            self._call("creating STOP", write)
        except SSHUnreachable:
            raise
        except OSError as exc:
            raise SSHRunnerError(f"cannot create STOP on {self.host}: {exc}") from None

    def kill(self, run_id: str, *, grace_s: float = 10) -> None:
        """TERM the job's process group, KILL it after `grace_s`; exit_code is set if bootstrap could not."""
        run = self.run_dir(run_id)
        pid = self._pid(run)
        if pid is None:
            return
        q = shlex.quote(run)
        steps = max(1, int(grace_s / 0.2))
        self.run_command(
            f"kill -TERM -- -{pid} 2>/dev/null; i=0; "
            f"while kill -0 -- -{pid} 2>/dev/null && [ $i -lt {steps} ]; do sleep 0.2; i=$((i+1)); done; "
            f"kill -KILL -- -{pid} 2>/dev/null; "
            f"[ -f {q}/exit_code ] || echo 137 > {q}/exit_code",
            timeout=grace_s + 30, check=False,
        )
        self.log(f"killed run {run_id} (process group {pid})")

    @staticmethod
    def _rel(rel_path: str) -> str:
        try:
            return check_member_name(rel_path)
        except UnsafeArchiveError:
            raise SSHRunnerError(f"path {rel_path!r} must be relative to the run dir, without '..'") from None

    # ------------------------------------------------------------------ cleanup
    def cleanup(self, run_id: str) -> None:
        """Kill the job if alive, cancel an armed shutdown, and remove the remote run dir."""
        run = self.run_dir(run_id)
        if self.is_running(run_id):
            self.kill(run_id)
        q = shlex.quote(run)
        self.run_command(
            f"if [ -f {q}/deadline.armed ]; then "
            f'if [ "$(id -u)" -eq 0 ]; then shutdown -c; else sudo -n shutdown -c; fi; fi; rm -rf {q}',
            timeout=120, check=False,
        )
        self.log(f"removed {run} on {self.host}")
