"""Pulls from a hostile or broken machine through a real sshd (issue 11 items 2, 7, 9, 12, 16): the machine's
sender is replaced by a script that sends a crafted tar stream and manifest. A verified local copy is
never replaced by less; a looping or oversized stream ends with a clean error; secrets.env is removed
from machines ftplan does not own; kill() refuses a pid file that would signal everything."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from pathlib import Path

import pytest
from test_safe_extract_hostile import base256, header, pax, with_size_field

from ftplan.planner.remote.ssh_runner import IntegrityError, SSHRunner

MARKER = "--- ftplan sha256 manifest ---"


def _remote_run(remote_root: Path, run_id: str) -> Path:
    out = remote_root / run_id / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "weights.bin").write_bytes(b"w" * 5000)
    (out / "summary.json").write_text('{"status": "succeeded"}')
    return out


def _tar(*members: tuple[str, bytes | None, str]) -> bytes:
    """(name, data, symlink target) members; data None = directory, link set = symlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _hostile_machine(tmp_path: Path, stream: bytes, manifest: dict[str, str]) -> type[SSHRunner]:
    """An SSHRunner whose remote 'python' sends `stream` and `manifest` whatever was asked."""
    (tmp_path / "stream.tar").write_bytes(stream)
    script = tmp_path / "hostile-python3"
    script.write_text(
        f"#!/bin/sh\ncat {tmp_path / 'stream.tar'}\n"
        f"printf '\\n%s\\n%s\\n' '{MARKER}' '{json.dumps(manifest)}' >&2\nexit 0\n"
    )
    script.chmod(0o755)

    class Hostile(SSHRunner):
        _PULL_PYTHONS = (str(script),)

    return Hostile


@pytest.fixture(params=["openssh", "paramiko"])
def pulled(request, make_runner, sshd, remote_root, known_hosts, tmp_path, monkeypatch):
    """A verified local copy of out/ made by an honest pull, and a factory of hostile machines; each test
    runs with the stream carried by the system ssh client and by paramiko (the fallback)."""
    monkeypatch.setenv("FTPLAN_PULL_TRANSPORT", request.param)
    _remote_run(remote_root, "run-safe")
    local = tmp_path / "runs"
    honest = make_runner()
    honest.pull("run-safe", "out", local)
    assert honest.last_pull_transport == request.param
    assert (local / "out" / "adapter" / "weights.bin").read_bytes() == b"w" * 5000
    runners: list[SSHRunner] = []

    def hostile(stream: bytes, manifest: dict[str, str]) -> SSHRunner:
        cls = _hostile_machine(tmp_path, stream, manifest)
        runner = cls(sshd.host, sshd.port, sshd.user, sshd.client_key, known_hosts, remote_root=str(remote_root),
                     connect_timeout_s=20)
        runners.append(runner)
        runner.connect()
        return runner

    yield local, hostile
    for runner in runners:
        runner.close()


def pax_global(records: dict[str, str]) -> bytes:
    return pax(records, "pax_global_header", tarfile.XGLTYPE)


def _intact(local: Path) -> None:
    out = local / "out"
    assert out.is_dir() and not out.is_symlink()
    assert (out / "adapter" / "weights.bin").read_bytes() == b"w" * 5000
    assert (out / "summary.json").read_text() == '{"status": "succeeded"}'


def test_a_stream_without_the_folder_keeps_the_verified_copy(pulled):
    local, hostile = pulled
    with pytest.raises(IntegrityError, match="did not carry out itself"):
        hostile(bytes(1024), {}).pull("run-safe", "out", local)
    _intact(local)


def test_out_sent_as_a_link_to_dot_keeps_the_verified_copy(pulled):
    local, hostile = pulled
    with pytest.raises(IntegrityError, match="did not carry out itself"):
        hostile(_tar(("out", None, ".")), {}).pull("run-safe", "out", local)
    _intact(local)


def test_an_empty_out_never_replaces_a_verified_pull_with_less(pulled):
    local, hostile = pulled
    new = b'{"status": "failed"}'
    stream = _tar(("out", None, ""), ("out/summary.json", new, ""))
    got = hostile(stream, {"out/summary.json": hashlib.sha256(new).hexdigest()}).pull("run-safe", "out", local)
    assert got == [local / "out" / "summary.json"]
    assert (local / "out" / "summary.json").read_bytes() == new  # what came is newer
    assert (local / "out" / "adapter" / "weights.bin").read_bytes() == b"w" * 5000  # what did not is kept


def test_a_negative_size_stream_through_sshd_ends_with_a_clean_error(pulled):
    local, hostile = pulled
    stream = bytes(header("out", kind=tarfile.DIRTYPE)) + with_size_field(header("out/x.bin"), base256(-1536)) + bytes(1024)
    got: list = []

    def work():
        try:
            hostile(stream, {}).pull("run-safe", "out", local)
        except BaseException as exc:  # noqa: BLE001
            got.append(exc)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "the pull loops on a negative tar size"
    assert isinstance(got[0], IntegrityError) and "negative size" in str(got[0])
    _intact(local)


def test_a_member_larger_than_the_free_disk_is_refused_before_writing(pulled):
    local, hostile = pulled
    stream = bytes(header("out", kind=tarfile.DIRTYPE)) + bytes(header("out/huge.bin", size=2**40)) + b"x" * 8192
    with pytest.raises(IntegrityError, match="'out/huge.bin' declares 1024.00 GiB but only .* free on the local disk"):
        hostile(stream, {}).pull("run-safe", "out", local)
    _intact(local)


def test_an_announced_size_beyond_the_free_disk_is_refused_at_once(pulled):
    local, hostile = pulled
    stream = pax_global({"ftplan.size": str(2**40)}) + bytes(header("out", kind=tarfile.DIRTYPE)) + bytes(1024)
    with pytest.raises(IntegrityError, match="announces 1024.00 GiB but only"):
        hostile(stream, {}).pull("run-safe", "out", local)
    _intact(local)


def test_a_stream_sending_more_than_it_announced_is_stopped(pulled):
    local, hostile = pulled
    stream = (pax_global({"ftplan.size": "10"}) + bytes(header("out", kind=tarfile.DIRTYPE))
              + bytes(header("out/big.bin", size=64 << 20)) + b"b" * 4096)
    with pytest.raises(IntegrityError, match="more than the .* left of what the stream announced"):
        hostile(stream, {}).pull("run-safe", "out", local, attempts=1)
    _intact(local)


def test_secrets_env_is_removed_and_a_pid_file_of_1_is_not_trusted(make_runner, remote_root):
    run = remote_root / "run-sec"
    run.mkdir()
    (run / "secrets.env").write_text("HF_TOKEN='hf_x'\n")
    messages: list[str] = []
    runner = make_runner(log=messages.append)
    runner.remove_secrets("run-sec")
    assert not (run / "secrets.env").exists()
    for text in ("1", "0", "-1", "1\n2", "$(reboot)"):
        (run / "pid").write_text(text)
        runner.kill("run-sec", grace_s=0.2)  # would be `kill -TERM -- -1`: every process of the user
        assert not (run / "exit_code").exists()
    assert [m for m in messages if "is not a job's pid" in m]


def test_names_with_a_trailing_newline_are_refused(make_runner):
    runner = make_runner()
    with pytest.raises(Exception, match="invalid run id"):
        runner.run_dir("run-1\n")
    with pytest.raises(Exception, match="environment variable name"):
        runner._write_env_file(runner.run_dir("run-1"), {}, {"NAME\n": "x"})
