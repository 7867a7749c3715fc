"""SSHRunner against a real sshd on 127.0.0.1, with a small stand-in job (the real QLoRA job is in
tests/test_e2e_ssh_job.py). The 'remote' run dir is on this machine, so a test can also look at
what the job really left there (file modes, processes)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ftplan.planner.remote.bundle import build_bundle
from ftplan.planner.remote.ssh_runner import HostKeyChangedError, IntegrityError, SSHRunner, SSHRunnerError

pytestmark = pytest.mark.slow

# A stand-in for remote_job/train.py with the same contract: --config job.json, paths relative to
# the run dir, heartbeat.json per step, summary.json at the end, STOP -> status "stopped".
STAND_IN_JOB = r'''
import argparse, hashlib, json, os, sys, time
ap = argparse.ArgumentParser(); ap.add_argument("--config"); args = ap.parse_args()
cfg = json.load(open(args.config))
t = cfg.get("stand_in", {})
os.makedirs(cfg["output_dir"], exist_ok=True)
out = lambda name: os.path.join(cfg["output_dir"], name)
def write_json(name, obj):
    with open(out(name) + ".tmp", "w") as f: json.dump(obj, f)
    os.replace(out(name) + ".tmp", out(name))
write_json("job.json", {"pid": os.getpid(), "argv": sys.argv})
if "HF_TOKEN" in os.environ:
    write_json("secret_check.json", {"sha256": hashlib.sha256(os.environ["HF_TOKEN"].encode()).hexdigest()})
step = 0
while step < t.get("steps", 3) or t.get("until_stop"):
    if os.path.exists(cfg["stop_file"]):
        print("STOP seen at step", step); write_json("summary.json", {"status": "stopped", "step": step}); sys.exit(0)
    step += 1
    print("step", step, "loss", 1.0 / step)
    write_json("heartbeat.json", {"step": step})
    time.sleep(t.get("sleep", 0.05))
write_json("summary.json", {"status": "completed", "step": step})
sys.exit(t.get("exit", 0))
'''


@pytest.fixture
def stand_in_bundle(tmp_path):
    """Build a bundle whose job is the stand-in; `make(**stand_in options)` -> bundle path."""
    job = tmp_path / "stand_in_train.py"
    job.write_text(STAND_IN_JOB)
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')

    def make(**options) -> Path:
        return build_bundle({"stand_in": options}, data, tmp_path / "bundle.tar.gz", extra_files={"job/train.py": job})

    return make


def wait_for(predicate, timeout_s: float = 30, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


def run_to_end(runner: SSHRunner, run_id: str, timeout_s: float = 30) -> int:
    return wait_for(lambda: runner.exit_code(run_id) is not None and (runner.exit_code(run_id),), timeout_s)[0]


# ----------------------------------------------------------------------------- connecting


def test_first_contact_pins_host_key_and_later_connects_use_it(make_runner, sshd, known_hosts):
    runner = make_runner()
    host_pub = (sshd.dir / "host_ed25519.pub").read_text().split()
    entry = known_hosts.read_text().split()
    assert entry[0] == f"[127.0.0.1]:{sshd.port}"
    assert entry[1:3] == host_pub[:2]
    assert oct(known_hosts.stat().st_mode & 0o777) == "0o600"
    runner.close()
    before = known_hosts.read_text()
    again = make_runner()
    assert again._exec("echo ok")[1].strip() == "ok"
    assert known_hosts.read_text() == before


def test_changed_host_key_is_refused_without_retrying(sshd_factory, make_runner):
    server = sshd_factory().start()
    make_runner(server).close()
    server.restart(new_host_key=True)
    messages: list[str] = []
    with pytest.raises(HostKeyChangedError, match="host key .* changed"):
        make_runner(server, connect_timeout_s=120, log=messages.append)
    assert not [m for m in messages if "waiting for sshd" in m]


def test_connect_waits_for_sshd_that_comes_up_later(sshd_factory, make_runner):
    server = sshd_factory()  # not started yet: connection refused, like a booting instance
    messages: list[str] = []
    runner = make_runner(server, connect=False, log=messages.append)
    starter = threading.Timer(1.5, server.start)
    starter.start()
    try:
        runner.connect()
    finally:
        starter.join()
    assert runner._exec("echo up")[1].strip() == "up"
    retries = [m for m in messages if "waiting for sshd" in m]
    assert retries and "refused" in retries[0].lower()


def test_connect_gives_up_after_its_deadline(make_runner, sshd_factory):
    server = sshd_factory()  # never started
    with pytest.raises(SSHRunnerError, match=r"could not connect .* within 1s"):
        make_runner(server, connect_timeout_s=1)


def test_wrong_key_is_reported(make_runner, sshd, tmp_path):
    from sshd_fixture import keygen

    other = keygen(tmp_path / "other_key")
    runner = SSHRunner(sshd.host, sshd.port, sshd.user, other, tmp_path / "kh", connect_timeout_s=1)
    with pytest.raises(SSHRunnerError, match="refused the key .*other_key"):
        runner.connect()
    runner = SSHRunner(sshd.host, sshd.port, sshd.user, other, tmp_path / "kh", connect_timeout_s=30, auth_retry_s=0)
    with pytest.raises(SSHRunnerError, match=r"other_key refused by .* after sshd first answered"):
        runner.connect()
    assert not (tmp_path / "kh").exists()  # nothing is pinned before a login succeeded


# ----------------------------------------------------------------------------- running


def test_upload_start_tail_and_exit_status(make_runner, stand_in_bundle, remote_root):
    runner = make_runner()
    run_dir = runner.upload_bundle(stand_in_bundle(steps=4), "run-ok")
    assert run_dir == f"{remote_root}/run-ok"
    assert json.loads(Path(run_dir, "job.json").read_text())["dataset"] == "data/train.jsonl"
    pid = runner.start("run-ok", remote_python=sys.executable)
    assert pid > 1
    assert run_to_end(runner, "run-ok") == 0
    assert not runner.is_running("run-ok")
    log, offset = runner.tail_log("run-ok")
    assert "step 4 loss 0.25" in log and "training exited with status 0" in log
    assert offset == Path(run_dir, "train.log").stat().st_size
    assert runner.tail_log("run-ok", offset) == ("", offset)
    assert runner.read_json("run-ok", "out/summary.json") == {"status": "completed", "step": 4}
    assert runner.read_json("run-ok", "out/missing.json") is None


def test_failing_job_reports_its_exit_status(make_runner, stand_in_bundle):
    runner = make_runner()
    runner.upload_bundle(stand_in_bundle(steps=1, exit=3), "run-fail")
    runner.start("run-fail", remote_python=sys.executable)
    assert run_to_end(runner, "run-fail") == 3


def test_secret_reaches_the_job_but_no_command_line_log_or_record(make_runner, stand_in_bundle, remote_root):
    token = "hf_" + hashlib.sha256(os.urandom(16)).hexdigest()[:30]
    messages: list[str] = []
    runner = make_runner(log=messages.append)
    runner.upload_bundle(stand_in_bundle(until_stop=True, sleep=0.05), "run-secret")
    runner.start("run-secret", remote_python=sys.executable, secrets={"HF_TOKEN": token})
    wait_for(lambda: runner.read_json("run-secret", "out/heartbeat.json"))
    # While it runs: no process on this machine has the token in its command line.
    for proc in Path("/proc").iterdir():
        try:
            assert token.encode() not in (proc / "cmdline").read_bytes()
        except (FileNotFoundError, PermissionError, ProcessLookupError, NotADirectoryError):
            continue
    runner.request_stop("run-secret")
    assert run_to_end(runner, "run-secret") == 0
    assert runner.read_json("run-secret", "out/secret_check.json") == {"sha256": hashlib.sha256(token.encode()).hexdigest()}
    secrets_file = remote_root / "run-secret" / "secrets.env"
    assert oct(secrets_file.stat().st_mode & 0o777) == "0o600"
    for path in (remote_root / "run-secret").rglob("*"):
        if path.is_file() and path != secrets_file:
            assert token not in path.read_text(errors="replace"), path
    assert token not in "".join(messages)
    assert token not in runner.tail_log("run-secret")[0]


def test_job_survives_a_dropped_connection_and_is_reattached(make_runner, stand_in_bundle, known_hosts):
    first = make_runner()
    first.upload_bundle(stand_in_bundle(until_stop=True, sleep=0.1), "run-detach")
    first.start("run-detach", remote_python=sys.executable)
    wait_for(lambda: (first.read_json("run-detach", "out/heartbeat.json") or {}).get("step", 0) >= 2)
    _, offset = first.tail_log("run-detach")
    first.close()  # the launcher's laptop goes to sleep

    second = make_runner()  # a fresh runner, same known_hosts: re-attach
    assert second.is_running("run-detach")
    step = second.read_json("run-detach", "out/heartbeat.json")["step"]
    wait_for(lambda: second.read_json("run-detach", "out/heartbeat.json")["step"] > step + 2)
    more, _ = second.tail_log("run-detach", offset)
    assert more.startswith("step ") and "run dir" not in more  # continues where the first runner left off
    second.request_stop("run-detach")
    assert run_to_end(second, "run-detach") == 0
    assert second.read_json("run-detach", "out/summary.json")["status"] == "stopped"


def test_kill_ends_the_whole_process_group(make_runner, stand_in_bundle):
    runner = make_runner()
    runner.upload_bundle(stand_in_bundle(until_stop=True), "run-kill")
    runner.start("run-kill", remote_python=sys.executable)
    job_pid = wait_for(lambda: (runner.read_json("run-kill", "out/job.json") or {}).get("pid"))
    assert runner.is_running("run-kill")
    with pytest.raises(SSHRunnerError, match="already running"):
        runner.start("run-kill", remote_python=sys.executable)
    runner.kill("run-kill")
    assert not runner.is_running("run-kill")
    assert runner.exit_code("run-kill") == 143  # bootstrap's TERM trap recorded it
    with pytest.raises(ProcessLookupError):
        os.kill(job_pid, 0)


def test_deadline_dry_run_logs_the_shutdown_command(make_runner, stand_in_bundle):
    runner = make_runner()
    runner.upload_bundle(stand_in_bundle(steps=1), "run-deadline")
    runner.start("run-deadline", remote_python=sys.executable, deadline_s=5 * 3600 + 1, shutdown="dry-run")
    assert run_to_end(runner, "run-deadline") == 0
    expected = "shutdown -h +301" if os.geteuid() == 0 else "sudo -n shutdown -h +301"
    assert f"deadline dry-run: would run: {expected}\n" in runner.tail_log("run-deadline")[0]


def test_test_sshd_sessions_can_never_shut_down_this_machine(make_runner):
    assert make_runner()._exec("echo $FTPLAN_NO_SHUTDOWN")[1].strip() == "1"


def test_cleanup_removes_the_run_dir(make_runner, stand_in_bundle, remote_root):
    runner = make_runner()
    runner.upload_bundle(stand_in_bundle(until_stop=True), "run-clean")
    runner.start("run-clean", remote_python=sys.executable)
    wait_for(lambda: runner.read_json("run-clean", "out/heartbeat.json"))
    runner.cleanup("run-clean")
    assert not (remote_root / "run-clean").exists()
    assert not runner.is_running("run-clean")


def test_bad_run_id_and_paths_are_refused(make_runner):
    runner = make_runner()
    with pytest.raises(SSHRunnerError, match="invalid run id"):
        runner.start("../etc")
    with pytest.raises(SSHRunnerError, match="not on 127.0.0.1 yet; upload its bundle first"):
        runner.start("never-uploaded")
    with pytest.raises(SSHRunnerError, match="without '..'"):
        runner.read_json("r1", "../../etc/passwd")
    with pytest.raises(SSHRunnerError, match="relative"):
        runner.pull("r1", "/etc", Path("/tmp"))


# ----------------------------------------------------------------------------- pulling


def _remote_run(remote_root: Path, run_id: str) -> Path:
    out = remote_root / run_id / "out"
    out.mkdir(parents=True)
    return out


def test_pull_folder_is_verified_and_complete(make_runner, remote_root, tmp_path):
    out = _remote_run(remote_root, "run-pull")
    adapter = out / "adapter"
    (adapter / "nested").mkdir(parents=True)
    files = {
        "adapter_model.safetensors": os.urandom(3 * 2**20 + 17),
        "adapter_config.json": b'{"r": 8}',
        "nested/notes.txt": "ünïcode\n".encode(),
        "empty": b"",
    }
    for name, data in files.items():
        (adapter / name).write_bytes(data)
    (adapter / "latest").symlink_to("adapter_config.json")
    runner = make_runner()
    local = tmp_path / "artifacts"
    got = runner.pull("run-pull", "out/adapter", local)
    assert sorted(p.relative_to(local / "adapter").as_posix() for p in got) == sorted(files)
    for name, data in files.items():
        assert (local / "adapter" / name).read_bytes() == data
    assert os.readlink(local / "adapter" / "latest") == "adapter_config.json"
    assert [p.name for p in local.iterdir()] == ["adapter"]  # no staging left behind
    # Pulling again replaces the earlier copy; a single file works too.
    (adapter / "adapter_config.json").write_bytes(b'{"r": 16}')
    runner.pull("run-pull", "out/adapter", local)
    assert (local / "adapter" / "adapter_config.json").read_bytes() == b'{"r": 16}'
    assert runner.pull("run-pull", "out/adapter/empty", tmp_path / "one") == [tmp_path / "one" / "empty"]


def test_pull_skips_a_link_out_of_the_run_and_keeps_the_good_files(make_runner, remote_root, tmp_path):
    out = _remote_run(remote_root, "run-evil")
    (out / "adapter").mkdir()
    (out / "adapter" / "weights.bin").write_bytes(b"x" * 100)
    (out / "adapter" / "passwd").symlink_to("/etc/passwd")
    messages: list[str] = []
    runner = make_runner(log=messages.append)
    got = runner.pull("run-evil", "out/adapter", tmp_path / "artifacts")
    assert got == [tmp_path / "artifacts" / "adapter" / "weights.bin"]
    assert sorted(p.name for p in (tmp_path / "artifacts" / "adapter").iterdir()) == ["weights.bin"]
    assert [n for n, why in runner.last_pull_skipped] == ["adapter/passwd"]
    assert [m for m in messages if "skipped 1 unsafe entries of out/adapter" in m and "absolute" in m]
    assert [p.name for p in (tmp_path / "artifacts").iterdir()] == ["adapter"]  # no staging left behind


def test_pull_skips_a_fifo(make_runner, remote_root, tmp_path):
    out = _remote_run(remote_root, "run-fifo")
    os.mkfifo(out / "pipe")
    runner = make_runner()
    runner.pull("run-fifo", "out", tmp_path / "artifacts")
    assert not (tmp_path / "artifacts" / "out" / "pipe").exists()
    assert "fifo" in runner.last_pull_skipped[0][1]


def test_pull_of_a_missing_path_says_so(make_runner, remote_root, tmp_path):
    _remote_run(remote_root, "run-empty")
    with pytest.raises(SSHRunnerError, match="out/adapter does not exist"):
        make_runner().pull("run-empty", "out/adapter", tmp_path)


def test_pull_matches_openssh_scp(make_runner, sshd, remote_root, tmp_path):
    """Same bytes as OpenSSH's own client fetches (the benchmark compares their speed)."""
    out = _remote_run(remote_root, "run-scp")
    (out / "blob.bin").write_bytes(os.urandom(2**20))
    make_runner().pull("run-scp", "out/blob.bin", tmp_path / "ours")
    subprocess.run(
        ["scp", *sshd.ssh_args(), "-P", str(sshd.port), f"{sshd.user}@{sshd.host}:{out / 'blob.bin'}", str(tmp_path / "scp.bin")],
        check=True,
    )
    assert (tmp_path / "ours" / "blob.bin").read_bytes() == (tmp_path / "scp.bin").read_bytes()


def test_a_dropped_connection_is_reestablished_on_the_next_call(make_runner, remote_root, tmp_path):
    out = _remote_run(remote_root, "run-redial")
    (out / "a.txt").write_text("still here\n")
    runner = make_runner()
    runner._client.get_transport().close()  # e.g. the laptop's Wi-Fi dropped
    assert runner.pull("run-redial", "out/a.txt", tmp_path) == [tmp_path / "a.txt"]
    assert (tmp_path / "a.txt").read_text() == "still here\n"
    assert runner.read_json("run-redial", "out/none.json") is None



@pytest.fixture
def machine_runner(sshd, remote_root, known_hosts):
    """Connected runners of an SSHRunner subclass describing another machine (e.g. no python3)."""
    runners: list[SSHRunner] = []

    def make(cls: type[SSHRunner], **kwargs) -> SSHRunner:
        runner = cls(sshd.host, sshd.port, sshd.user, sshd.client_key, known_hosts,
                     remote_root=str(remote_root), connect_timeout_s=20, **kwargs)
        runners.append(runner)
        runner.connect()
        return runner

    yield make
    for runner in runners:
        runner.close()


def _adapter_with_everything(out: Path) -> dict[str, bytes]:
    """A folder with a large file, a long non-ASCII name, an empty dir, a hard link and a symlink."""
    adapter = out / "adapter"
    (adapter / "empty_dir").mkdir(parents=True)
    files = {
        "adapter_model.safetensors": os.urandom(2 * 2**20 + 3),
        "sub/" + "ü" * 60 + ".json": b'{"r": 8}',
        "zero": b"",
    }
    for name, data in files.items():
        (adapter / name).parent.mkdir(parents=True, exist_ok=True)
        (adapter / name).write_bytes(data)
    os.link(adapter / "adapter_model.safetensors", adapter / "same_weights.safetensors")
    files["same_weights.safetensors"] = files["adapter_model.safetensors"]
    (adapter / "latest").symlink_to("zero")
    return files


def _check_pulled(got: list[Path], local: Path, files: dict[str, bytes]) -> None:
    assert sorted(p.relative_to(local / "adapter").as_posix() for p in got) == sorted(files)
    for name, data in files.items():
        assert (local / "adapter" / name).read_bytes() == data, name
    assert (local / "adapter" / "empty_dir").is_dir()
    assert os.readlink(local / "adapter" / "latest") == "zero"
    assert [p.name for p in local.iterdir()] == ["adapter"]


def test_pull_keeps_links_names_and_empty_dirs(make_runner, remote_root, tmp_path):
    files = _adapter_with_everything(_remote_run(remote_root, "run-all"))
    local = tmp_path / "artifacts"
    _check_pulled(make_runner().pull("run-all", "out/adapter", local), local, files)
    pulled = local / "adapter"
    assert os.stat(pulled / "adapter_model.safetensors").st_ino == os.stat(pulled / "same_weights.safetensors").st_ino


class NoPythonMachine(SSHRunner):
    """A machine without python3: the pull falls back to GNU tar and a sha256sum manifest."""

    _PULL_PYTHONS = ("ftplan-no-such-python3",)


def test_pull_without_python_on_the_machine_uses_tar_and_sha256sum(machine_runner, remote_root, tmp_path):
    out = _remote_run(remote_root, "run-nopy")
    files = _adapter_with_everything(out)
    runner = machine_runner(NoPythonMachine)
    local = tmp_path / "artifacts"
    _check_pulled(runner.pull("run-nopy", "out/adapter", local), local, files)
    assert runner.pull("run-nopy", "out/adapter/zero", tmp_path / "one") == [tmp_path / "one" / "zero"]
    (out / "adapter" / "passwd").symlink_to("/etc/passwd")
    runner.pull("run-nopy", "out/adapter", tmp_path / "evil")
    assert not (tmp_path / "evil" / "adapter" / "passwd").is_symlink()
    assert "absolute" in runner.last_pull_skipped[0][1]


def test_pull_with_a_large_manifest(make_runner, remote_root, tmp_path):
    """The manifest arrives on stderr after the stream; ~2.3 MB of it must not stall the pull."""
    many = _remote_run(remote_root, "run-many") / "many"
    many.mkdir()
    names = [f"{i:05d}" + "x" * 230 for i in range(7000)]
    for name in names:
        (many / name).write_bytes(name[:5].encode())
    got = make_runner().pull("run-many", "out/many", tmp_path / "artifacts")
    assert len(got) == len(names)
    assert (tmp_path / "artifacts" / "many" / names[-1]).read_bytes() == b"06999"


# A stand-in for the machine's python3 that runs the real sender but flips one byte of its stream
# (inside the first file's data) during the first FLIPS calls: a transfer corrupted on the way.
TAMPERING_PYTHON = r"""#!/bin/sh
count="$(cat "$0.calls" 2>/dev/null || echo 0)"; echo $((count + 1)) > "$0.calls"
if [ "$count" -ge FLIPS ]; then exec PYTHON "$@"; fi
PYTHON "$@" | PYTHON -c '
import sys
data = bytearray(sys.stdin.buffer.read())
data[600000] ^= 0xFF
sys.stdout.buffer.write(data)
'
"""


def _tampered_machine(tmp_path: Path, flips: int) -> type[SSHRunner]:
    script = tmp_path / "tampering-python3"
    script.write_text(TAMPERING_PYTHON.replace("FLIPS", str(flips)).replace("PYTHON", sys.executable))
    script.chmod(0o755)

    class TamperedMachine(SSHRunner):
        _PULL_PYTHONS = (str(script),)

    return TamperedMachine


def test_a_corrupted_stream_fails_the_manifest_and_is_pulled_again(machine_runner, remote_root, tmp_path):
    out = _remote_run(remote_root, "run-flip")
    data = os.urandom(2**20)
    (out / "weights.bin").write_bytes(data)
    messages: list[str] = []
    runner = machine_runner(_tampered_machine(tmp_path, flips=1), log=messages.append)
    assert runner.pull("run-flip", "out/weights.bin", tmp_path / "a") == [tmp_path / "a" / "weights.bin"]
    assert (tmp_path / "a" / "weights.bin").read_bytes() == data
    assert [m for m in messages if "does not match its remote sha256 manifest" in m and "pulling again (1/3)" in m]


def test_a_stream_corrupted_every_time_is_refused(machine_runner, remote_root, tmp_path):
    out = _remote_run(remote_root, "run-flip-always")
    (out / "weights.bin").write_bytes(os.urandom(2**20))
    runner = machine_runner(_tampered_machine(tmp_path, flips=99))
    with pytest.raises(IntegrityError, match=r"different \['weights.bin'\]\); gave up after 2 attempts"):
        runner.pull("run-flip-always", "out/weights.bin", tmp_path / "a", attempts=2)
    assert list((tmp_path / "a").iterdir()) == []


def test_a_manifest_larger_than_a_small_window_does_not_stall_the_pull(machine_runner, remote_root, tmp_path):
    """The pull asks for a 64 MiB window; where a server grants less (here paramiko's 2 MiB default),
    stdout and a ~2.3 MB stderr manifest share it, and the stream must still complete and verify."""

    class SmallWindow(SSHRunner):
        _PULL_WINDOW = 2 << 20
        _PULL_MAX_PACKET = 32 << 10

    many = _remote_run(remote_root, "run-small-window") / "many"
    many.mkdir()
    names = [f"{i:05d}" + "x" * 230 for i in range(7000)]
    for name in names:
        (many / name).write_bytes(name[:5].encode())
    blob = os.urandom(3 * 2**20)  # larger than the window: the stream itself needs window adjusts
    (many / "blob.bin").write_bytes(blob)
    got = machine_runner(SmallWindow).pull("run-small-window", "out/many", tmp_path / "artifacts")
    assert len(got) == len(names) + 1
    assert (tmp_path / "artifacts" / "many" / names[-1]).read_bytes() == b"06999"
    assert (tmp_path / "artifacts" / "many" / "blob.bin").read_bytes() == blob
