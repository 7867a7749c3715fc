"""The bundle's layout, safe extraction of hostile archives, and bootstrap.sh run locally (no SSH)."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from ftplan.planner.errors import UserError
from ftplan.planner.remote.bundle import build_bundle, job_dir
from ftplan.planner.remote.safe_extract import ArchiveFormatError, UnsafeArchiveError, safe_extract


@pytest.fixture
def dataset(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    return path


def members(bundle: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(bundle) as tf:
        return {m.name: m for m in tf.getmembers()}


def read_member(bundle: Path, name: str) -> bytes:
    with tarfile.open(bundle) as tf:
        return tf.extractfile(name).read()


# ----------------------------------------------------------------------------- bundle


def test_bundle_has_the_fixed_layout(tmp_path, dataset):
    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}')
    (model / "__pycache__").mkdir()
    (model / "__pycache__" / "junk.pyc").write_bytes(b"x")
    config = {"model": "model", "method": "qlora", "max_steps": 5, "dataset": "/home/me/train.jsonl"}
    bundle = build_bundle(config, dataset, tmp_path / "b.tar.gz", extra_files={"model": model})
    names = members(bundle)
    packaged = sorted(f"job/{p.name}" for p in job_dir().glob("*.py"))
    assert packaged and set(packaged) <= set(names)
    assert {"job.json", "data/train.jsonl", "requirements.txt", "bootstrap.sh", "model/config.json"} <= set(names)
    assert not [n for n in names if "__pycache__" in n]
    assert names["bootstrap.sh"].mode == 0o755
    assert all(m.uid == 0 and m.uname == "" for m in names.values())
    job = json.loads(read_member(bundle, "job.json"))
    assert job == {**config, "dataset": "data/train.jsonl", "output_dir": "out", "stop_file": "STOP"}
    assert read_member(bundle, "data/train.jsonl") == dataset.read_bytes()
    assert read_member(bundle, "bootstrap.sh") == (job_dir() / "bootstrap.sh").read_bytes()
    reqs = read_member(bundle, "requirements.txt").decode()
    assert "transformers" in reqs and "peft" in reqs


def test_bundle_is_reproducible_and_job_files_can_be_replaced(tmp_path, dataset):
    stand_in = tmp_path / "train.py"
    stand_in.write_text("print('stand-in')\n")
    a = build_bundle({"x": 1}, dataset, tmp_path / "a.tar.gz", extra_files={"job/train.py": stand_in})
    b = build_bundle({"x": 1}, dataset, tmp_path / "b.tar.gz", extra_files={"job/train.py": stand_in})
    assert a.read_bytes() == b.read_bytes()
    assert read_member(a, "job/train.py") == b"print('stand-in')\n"


def test_dataset_folder_is_shipped_whole(tmp_path):
    data = tmp_path / "shards"
    data.mkdir()
    for i in range(3):
        (data / f"part-{i}.jsonl").write_text(f'{{"text": "{i}"}}\n')
    bundle = build_bundle({}, data, tmp_path / "b.tar.gz")
    assert {f"data/shards/part-{i}.jsonl" for i in range(3)} <= set(members(bundle))
    assert json.loads(read_member(bundle, "job.json"))["dataset"] == "data/shards"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "missing.jsonl"}, "does not exist"),
        ({"extra_files": {"../escape": "x"}}, "relative path without '..'"),
        ({"extra_files": {"/abs": "x"}}, "relative path"),
        ({"extra_files": {"job.json": "x"}}, "reserved"),
        ({"extra_files": {"model": "nowhere"}}, "does not exist"),
        ({"job_config": ["not", "a", "dict"]}, "JSON object"),
        ({"job_config": {"lr": object()}}, "cannot be written as JSON"),
    ],
)
def test_bad_bundle_input_is_a_one_line_user_error(tmp_path, dataset, kwargs, message):
    (tmp_path / "x").write_text("x")
    job_config = kwargs.pop("job_config", {})
    data = tmp_path / kwargs.pop("dataset") if "dataset" in kwargs else dataset
    extra = {k: tmp_path / v for k, v in kwargs.pop("extra_files", {}).items()} or None
    with pytest.raises(UserError, match=message) as info:
        build_bundle(job_config, data, tmp_path / "b.tar.gz", extra_files=extra)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- safe extraction


def crafted(tmp_path: Path, *entries: tuple) -> Path:
    """A tar with (name, type, payload-or-linkname) entries, written byte by byte like an attacker would."""
    path = tmp_path / "crafted.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                    info.linkname = payload
                tf.addfile(info)
    return path


def extract(archive: Path, dest: Path) -> dict[str, str]:
    with open(archive, "rb") as fh:
        return safe_extract(fh.read, dest)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("/tmp/ftplan-evil", tarfile.REGTYPE, b"x")], "absolute path"),
        ([("ok/../../ftplan-evil", tarfile.REGTYPE, b"x")], r"'\.\.'"),
        ([("../ftplan-evil", tarfile.REGTYPE, b"x")], r"'\.\.'"),
        ([("link", tarfile.SYMTYPE, "/etc/passwd")], "absolute"),
        ([("link", tarfile.SYMTYPE, "../outside")], "points outside"),
        ([("a", tarfile.DIRTYPE, None), ("a/link", tarfile.SYMTYPE, "../../outside")], "points outside"),
        ([("hard", tarfile.LNKTYPE, "/etc/passwd")], "absolute"),
        ([("hard", tarfile.LNKTYPE, "../outside")], r"'\.\.'"),
        ([("null", tarfile.CHRTYPE, None)], "device"),
        ([("disk", tarfile.BLKTYPE, None)], "device"),
        ([("pipe", tarfile.FIFOTYPE, None)], "fifo"),
        # A link that stays inside, then a file written *through* a second link that leaves.
        ([("d", tarfile.DIRTYPE, None), ("d/up", tarfile.SYMTYPE, ".."), ("d/up/up", tarfile.SYMTYPE, "..")], "outside"),
    ],
)
def test_hostile_archives_are_refused(tmp_path, entries, message):
    dest = tmp_path / "sandbox" / "dest"
    with pytest.raises(UnsafeArchiveError, match=message):
        extract(crafted(tmp_path, *entries), dest)
    assert not (tmp_path / "ftplan-evil").exists() and not (tmp_path / "sandbox" / "ftplan-evil").exists()
    assert not Path("/tmp/ftplan-evil").exists()


def test_a_file_cannot_be_written_through_a_link_to_outside(tmp_path):
    """Even if a link to outside already sits in the destination, nothing is written through it."""
    dest = tmp_path / "dest"
    dest.mkdir()
    (tmp_path / "outside").mkdir()
    (dest / "sub").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafeArchiveError, match="leaves the destination"):
        extract(crafted(tmp_path, ("sub/file", tarfile.REGTYPE, b"x")), dest)
    assert list((tmp_path / "outside").iterdir()) == []


def test_safe_archive_extracts_with_hashes(tmp_path):
    import hashlib

    archive = crafted(
        tmp_path,
        ("adapter", tarfile.DIRTYPE, None),
        ("adapter/weights.bin", tarfile.REGTYPE, b"w" * 5000),
        ("adapter/latest", tarfile.SYMTYPE, "weights.bin"),
        ("adapter/copy.bin", tarfile.LNKTYPE, "adapter/weights.bin"),
        ("./adapter//cfg.json", tarfile.REGTYPE, b"{}"),
    )
    dest = tmp_path / "dest"
    hashes = extract(archive, dest)
    w = hashlib.sha256(b"w" * 5000).hexdigest()
    assert hashes == {"adapter/weights.bin": w, "adapter/copy.bin": w, "adapter/cfg.json": hashlib.sha256(b"{}").hexdigest()}
    assert (dest / "adapter" / "latest").read_bytes() == b"w" * 5000
    assert (dest / "adapter" / "copy.bin").read_bytes() == b"w" * 5000


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_from_every_tar_dialect(tmp_path, fmt):
    deep = "/".join(["d" * 40] * 3) + "/" + "f" * 60 + ".safetensors"  # 183 chars: beyond the 100-char field
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        info = tarfile.TarInfo(deep)
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
        if fmt != tarfile.USTAR_FORMAT:  # ustar has no long link targets (prefix field is for names only)
            link = tarfile.TarInfo("short-link")
            link.type, link.linkname = tarfile.SYMTYPE, deep
            tf.addfile(link)
    hashes = extract(path, tmp_path / "dest")
    assert list(hashes) == [deep]
    assert (tmp_path / "dest" / deep).read_bytes() == b"abc"
    if fmt != tarfile.USTAR_FORMAT:
        assert (tmp_path / "dest" / "short-link").read_bytes() == b"abc"


def test_a_pax_path_record_is_checked_too(tmp_path):
    """A harmless header name with a PAX 'path' record that climbs out: the record wins and is refused."""
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("harmless.txt")
        info.size = 1
        info.pax_headers = {"path": "../../ftplan-evil"}
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(UnsafeArchiveError, match=r"'\.\.'"):
        extract(path, tmp_path / "dest")


def test_a_truncated_stream_is_a_format_error(tmp_path):
    archive = crafted(tmp_path, ("big.bin", tarfile.REGTYPE, b"z" * 5000))
    data = archive.read_bytes()[:2048]
    with pytest.raises(ArchiveFormatError, match="truncated"):
        safe_extract(io.BytesIO(data).read, tmp_path / "dest")
    corrupt = bytearray(archive.read_bytes())
    corrupt[0:4] = b"\xff\xfe\xfd\xfc"  # breaks the header checksum
    with pytest.raises(ArchiveFormatError, match="bad tar header"):
        safe_extract(io.BytesIO(bytes(corrupt)).read, tmp_path / "dest2")


# ----------------------------------------------------------------------------- bootstrap.sh, run locally


STAND_IN = "import json, os; c = json.load(open('job.json')); os.makedirs(c['output_dir'], exist_ok=True); print('job ran')\n"


@pytest.fixture
def run_dir(tmp_path, dataset) -> Path:
    job = tmp_path / "train.py"
    job.write_text(STAND_IN)
    bundle = build_bundle({}, dataset, tmp_path / "b.tar.gz", extra_files={"job/train.py": job})
    run = tmp_path / "run"
    with gzip.open(bundle) as fh:
        safe_extract(fh.read, run)
    return run


def sandbox_path(tmp_path: Path) -> str:
    """A PATH with only the tools bootstrap needs: no `shutdown`, no `sudo`, so nothing can power off."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("bash", "date", "dirname", "id", "mv", "rm", "grep", "touch", "cat", "python3", "awk", "sed", "head",
                 "tail", "tr", "timeout", "sleep", "setsid", "mkdir", "mktemp"):
        found = shutil.which(tool, path="/usr/local/bin:/usr/bin:/bin")
        if found and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    assert not shutil.which("shutdown", path=str(bin_dir)) and not shutil.which("sudo", path=str(bin_dir))
    return str(bin_dir)


def bootstrap(run: Path, tmp_path: Path, *args: str, **env: str) -> tuple[int, str]:
    proc = subprocess.run(
        ["bash", str(run / "bootstrap.sh"), *args],
        env={"PATH": sandbox_path(tmp_path), "HOME": str(tmp_path), **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    assert (run / "exit_code").read_text().strip() == str(proc.returncode)
    return proc.returncode, proc.stdout


def test_bootstrap_cannot_arm_without_shutdown_and_still_trains(run_dir, tmp_path):
    rc, log = bootstrap(run_dir, tmp_path, "--remote-python", sys.executable, "--deadline-s", "600")
    assert rc == 0
    assert "could not arm the deadline" in log and "job ran" in log
    # the fallback: a watchdog stops the job at the deadline; it ends with the job, so nothing lingers
    assert "watchdog armed" in log and (run_dir / "deadline.watchdog").exists()
    assert not (run_dir / "deadline.armed").exists()
    assert int((run_dir / "pid").read_text()) > 1


def test_the_watchdog_stops_a_job_that_outlives_the_deadline(run_dir, tmp_path):
    (run_dir / "job" / "train.py").write_text("import time\nprint('job ran', flush=True)\ntime.sleep(120)\n")
    rc, log = bootstrap(run_dir, tmp_path, "--remote-python", sys.executable, "--deadline-s", "2")
    assert rc == 143 and "job ran" in log, log  # TERM from the watchdog, not the 120 s sleep's end


def test_runpod_pods_arm_runpodctl_instead_of_shutdown(run_dir, tmp_path):
    """A RunPod container cannot shut down: `runpodctl stop pod <id>` at the deadline, from inside the pod."""
    calls = tmp_path / "runpodctl.calls"
    fake = tmp_path / "bin" / "runpodctl"
    sandbox_path(tmp_path)
    fake.write_text(f"#!/bin/bash\necho \"$*\" >> {calls}\n")
    fake.chmod(0o755)
    rc, log = bootstrap(run_dir, tmp_path, "--remote-python", sys.executable, "--deadline-s", "600",
                        "--shutdown", "dry-run", RUNPOD_POD_ID="pod42")
    assert rc == 0 and "would run: runpodctl stop pod pod42" in log and "shutdown -h" not in log
    rc, log = bootstrap(run_dir, tmp_path, "--remote-python", sys.executable, "--deadline-s", "1",
                        RUNPOD_POD_ID="pod42")
    assert rc == 0 and "deadline armed: runpodctl stop pod pod42" in log
    assert (run_dir / "deadline.armed").read_text().startswith("runpodctl stop pod pod42")
    # the timer outlives the job (the launcher may be gone): it calls runpodctl once the deadline passes
    for _ in range(100):
        if calls.exists():
            break
        time.sleep(0.1)
    assert calls.read_text().split() == ["stop", "pod", "pod42"]


def test_runpod_id_is_read_from_the_pod_environment_file_too(run_dir, tmp_path):
    """Not testable without writing /etc/rp_environment; the env-var path is covered above."""
    text = (run_dir / "bootstrap.sh").read_text()
    assert "/etc/rp_environment" in text


def test_ftplan_no_shutdown_disables_the_deadline(run_dir, tmp_path):
    rc, log = bootstrap(run_dir, tmp_path, "--remote-python", sys.executable, "--deadline-s", "600", FTPLAN_NO_SHUTDOWN="1")
    assert rc == 0 and "deadline not armed (shutdown disabled" in log and "could not arm" not in log


def test_bootstrap_rejects_an_unknown_flag(run_dir, tmp_path):
    rc, log = bootstrap(run_dir, tmp_path, "--frobnicate")
    assert rc == 2 and "unknown argument: --frobnicate" in log


def test_bootstrap_builds_a_venv_reusing_the_images_torch(run_dir, tmp_path):
    """Without --remote-python, no GPU, offline: the image's python with torch >= 2.6 (this venv's) is found,
    a venv is built without uv (unreachable) and sees that torch through a .pth file; requirements install."""
    if subprocess.run(["python3", "-c", "import ensurepip"], capture_output=True).returncode != 0:
        pytest.skip("system python3 has no venv/ensurepip module")
    bin_dir = Path(sandbox_path(tmp_path))
    image_py = tmp_path / "image" / "python3"
    image_py.parent.mkdir()
    image_py.write_text(f"#!/bin/bash\nexec {sys.executable} \"$@\"\n")
    image_py.chmod(0o755)
    (run_dir / "requirements.txt").write_text("# nothing to install offline\n")
    (run_dir / "job" / "train.py").write_text("import torch\nprint('job ran with torch', torch.__version__)\n")
    rc, log = bootstrap(run_dir, tmp_path, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
                        FTPLAN_PYTHON_PATHS=str(image_py), PATH=f"{bin_dir}")
    assert rc == 0, log
    plan = json.loads((run_dir / "bootstrap-plan.json").read_text())
    assert plan["reuse_image_torch"] and plan["gpu_count"] == 0 and plan["venv"]["python"] == sys.executable
    assert "uv unavailable; python -m venv + pip" in log
    assert f"starting: {run_dir}/.venv/bin/python job/train.py" in log and "job ran with torch" in log
    assert (run_dir / ".venv" / ".ftplan-ready").exists()
    rc, log = bootstrap(run_dir, tmp_path)  # a second start (resume) reuses it
    assert rc == 0 and "reusing" in log


def test_bootstrap_is_in_the_installed_package():
    assert os.access(job_dir() / "bootstrap.sh", os.R_OK)
