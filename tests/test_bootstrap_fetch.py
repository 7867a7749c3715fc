"""bootstrap.sh, run for real without --remote-python: the weights download starts in the background once
huggingface_hub is in the venv, before the rest of the environment installs, and is waited for before the
job starts; requirements-cuda.txt (Liger) is installed only where `nvidia-smi -L` lists a GPU, and its failure
only warns. The bootstrap's timings reach the job (FTPLAN_BOOTSTRAP_TIMINGS) and its summary.json.

As in test_bundle.py: offline pip (PIP_NO_INDEX), the image's Python is this venv's (its torch and Hub client
seen through the .pth the bootstrap writes), no uv on PATH; the Hub is a closed local port, so the download
fails fast and the job (a stand-in that reports what it was given) still runs.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from job_helpers import job_config, make_job, read_json, run_job, write_dataset
from test_fetch_weights import closed_port

from ftplan.planner.remote.bundle import build_bundle
from ftplan.planner.remote.safe_extract import safe_extract

pytestmark = pytest.mark.slow
TOKEN = "hf_" + "Z" * 34
STAND_IN = """import json, os, time
started = time.time()
boot = json.load(open(os.environ["FTPLAN_BOOTSTRAP_TIMINGS"]))
json.dump({"started": started, "boot": boot, "token_seen": bool(os.environ.get("HF_TOKEN"))}, open("job-saw.json", "w"))
print("job ran")
"""
TOOLS = ("bash", "date", "dirname", "id", "mv", "rm", "grep", "touch", "cat", "awk", "sed", "head", "tail", "tr",
         "timeout", "sleep", "setsid", "mkdir", "mktemp", "env", "seq")


def sandbox(tmp_path: Path, gpu: bool) -> tuple[Path, Path]:
    """PATH without uv, shutdown or sudo; an image python that says its torch is CUDA when a GPU is faked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool, path="/usr/local/bin:/usr/bin:/bin")
        if found:
            (bin_dir / tool).symlink_to(found)
    image_py = tmp_path / "image" / "python3"
    image_py.parent.mkdir()
    if gpu:
        (bin_dir / "nvidia-smi").write_text("""#!/bin/bash
case "$*" in
  *compute_cap*) echo "NVIDIA L4, 550.90.07, 8.9, 23034" ;;
  *--query-gpu*) echo "NVIDIA L4, 550.90.07, 23034" ;;
  -L) echo "GPU 0: NVIDIA L4 (UUID: GPU-0)" ;;
  *) echo "NVIDIA-SMI 550.90.07" ;;
esac
""")
        (bin_dir / "nvidia-smi").chmod(0o755)
        import torch

        probe = {"python": str(image_py), "version": sysconfig.get_python_version() + ".0", "has_pip": True,
                 "has_ensurepip": True, "site_paths": [sysconfig.get_paths()["purelib"]],
                 "torch": {"version": torch.__version__.split("+")[0], "cuda": "12.8", "cuda_available": True,
                           "archs": ["sm_80", "sm_86", "sm_89", "sm_90"], "capability": None}}
        image_py.write_text(f"#!/bin/bash\nif [ \"$2\" = probe ]; then echo '{json.dumps(probe)}'; exit 0; fi\n"
                            f"exec {sys.executable} \"$@\"\n")
    else:
        image_py.write_text(f"#!/bin/bash\nexec {sys.executable} \"$@\"\n")
    image_py.chmod(0o755)
    return bin_dir, image_py


def run_bootstrap(tmp_path: Path, gpu: bool) -> tuple[int, str, Path]:
    if subprocess.run([sys.executable, "-c", "import ensurepip"], capture_output=True).returncode != 0:
        pytest.skip("this python has no ensurepip: python -m venv cannot seed pip")
    job = tmp_path / "train.py"
    job.write_text(STAND_IN)
    dataset = write_dataset(tmp_path / "train.jsonl")
    cfg = job_config(model={"hf_id": "meta-llama/Llama-3.1-8B", "random_init": False, "config": None})
    bundle = build_bundle(cfg, dataset, tmp_path / "b.tar.gz", extra_files={"job/train.py": job})
    run = tmp_path / "run"
    with gzip.open(bundle) as fh:
        safe_extract(fh.read, run)
    # offline: only what this venv already has. The shipped file's Hub client lines, pinned to the versions
    # installed here (a fresh CI venv may resolve a newer huggingface_hub than the job's pin).
    from importlib.metadata import version

    hub = [line.split("==")[0] for line in (run / "requirements.txt").read_text().splitlines()
           if line.startswith(("huggingface", "hf-"))]
    assert hub == ["huggingface_hub", "hf-xet"], hub
    (run / "requirements.txt").write_text("".join(f"{name}=={version(name)}\n" for name in hub))
    (run / "secrets.env").write_text(f"HF_TOKEN={TOKEN}\n")
    (run / "secrets.env").chmod(0o600)
    bin_dir, image_py = sandbox(tmp_path, gpu)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "FTPLAN_PYTHON_PATHS": str(image_py), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    proc = subprocess.run(["bash", str(run / "bootstrap.sh")], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    return proc.returncode, proc.stdout, run


def test_weights_download_runs_beside_the_install_and_before_the_job(tmp_path):
    rc, log, run = run_bootstrap(tmp_path, gpu=False)
    assert rc == 0, log
    lines = log.splitlines()

    def at(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    # the Hub client alone, the download started, then the rest installs; the job starts after the wait
    assert at("weights: download started in the background") < at("installing the rest of the environment") \
        < at("environment ready") <= at("weights: download finished") < at("starting:") < at("job ran")
    saw = json.loads((run / "job-saw.json").read_text())
    download = saw["boot"]["download"]
    assert download["status"] == "failed" and download["repo"] == "meta-llama/Llama-3.1-8B"
    assert download["finished_at"] <= saw["started"]  # waited for before the job
    assert saw["token_seen"] and TOKEN not in log and TOKEN not in (run / ".ftplan-download.json").read_text()
    boot = saw["boot"]
    assert boot["env_s"] >= 0 and boot["ready_s"] >= boot["env_s"] and boot["reused_venv"] is False
    assert boot["liger"] == "skipped" and "no GPU listed by nvidia-smi: requirements-cuda.txt not installed" in log


def test_liger_is_tried_on_a_gpu_machine_and_its_failure_only_warns(tmp_path):
    rc, log, run = run_bootstrap(tmp_path, gpu=True)  # offline: liger-kernel cannot install
    assert rc == 0, log
    assert "warning: requirements-cuda.txt did not install; the job uses its chunked loss" in log
    assert json.loads((run / "job-saw.json").read_text())["boot"]["liger"] == "failed"
    assert "job ran" in log


def test_the_job_folds_the_bootstrap_timings_into_its_summary(tmp_path):
    config = make_job(tmp_path / "w", max_steps=2)
    timings = tmp_path / "boot.json"
    timings.write_text(json.dumps({"started_at": 1.0, "env_s": 7, "wait_s": 3, "ready_s": 11, "liger": "skipped",
                                   "download": {"status": "ok", "download_s": 9.5, "download_bytes": 123}}))
    proc = run_job(config, env={"FTPLAN_BOOTSTRAP_TIMINGS": str(timings)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    boot = read_json(config.parent / "out" / "summary.json")["bootstrap"]
    assert boot["env_s"] == 7 and boot["download"]["download_bytes"] == 123 and "started_at" not in boot
    assert boot["first_step_s"] > 11  # from the bootstrap's start (epoch 1.0) to the first finished step
    os.environ.pop("FTPLAN_BOOTSTRAP_TIMINGS", None)
