"""`bootstrap.sh --plan` on each provider's default image, simulated: a fake `nvidia-smi` on PATH (each
driver, each GPU) and the image's interpreters as stand-ins that answer torch_select.py's probe with what
that image ships (Python version, torch build, pip/venv) and run everything else with the real Python.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from job_helpers import JOB_DIR

REAL_PY = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable
TOOLS = ("bash", "date", "dirname", "id", "mv", "rm", "grep", "touch", "cat", "awk", "sed", "head", "tail", "tr",
         "timeout", "sleep", "setsid", "mkdir", "env", "mktemp")

GPU_ROWS = {"A10G": ("NVIDIA A10G", "8.6", 23028), "H100": ("NVIDIA H100 80GB HBM3", "9.0", 81559),
            "L4": ("NVIDIA L4", "8.9", 23034), "T4": ("Tesla T4", "7.5", 15360),
            "V100": ("Tesla V100-SXM2-16GB", "7.0", 16384), "A100": ("NVIDIA A100-SXM4-80GB", "8.0", 81920),
            "RTX4090": ("NVIDIA GeForce RTX 4090", "8.9", 24564), "B200": ("NVIDIA B200", "10.0", 183359)}


def torch_probe(version, cuda, sees_gpu, archs=("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")):
    return {"version": version, "cuda": cuda, "cuda_available": sees_gpu, "archs": list(archs) if sees_gpu else [],
            "capability": None}


# image -> (interpreters as (path under the fake root, probe), login PATH dirs, GPU, driver, count)
IMAGES = {
    "aws-dlami-base-oss-ubuntu22.04": {
        "pythons": [("usr/bin/python3", {"version": "3.10.12", "has_pip": True, "has_ensurepip": False})],
        "gpu": "A10G", "driver": "550.163.01"},
    "aws-pytorch-dlami": {
        "pythons": [("usr/bin/python3", {"version": "3.10.12", "has_pip": False, "has_ensurepip": False}),
                    ("opt/pytorch/bin/python3", {"version": "3.12.10", "has_pip": True, "has_ensurepip": True,
                     "torch": torch_probe("2.7.0", "12.8", True, ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100",
                                                                  "sm_120"))})],
        "gpu": "H100", "driver": "570.172.08", "count": 8},
    "gcp-dlvm-common-cu12x-conda": {
        "pythons": [("opt/conda/bin/python", {"version": "3.10.16", "has_pip": True, "has_ensurepip": True}),
                    ("usr/bin/python3", {"version": "3.10.12", "has_pip": False, "has_ensurepip": False})],
        "login_path": ["opt/conda/bin"], "gpu": "L4", "driver": "550.90.07"},
    "lambda-stack-22.04": {
        "pythons": [("usr/bin/python3", {"version": "3.10.12", "has_pip": True, "has_ensurepip": True,
                                         "torch": torch_probe("2.5.1", "12.4", True)})],
        "gpu": "H100", "driver": "535.230.02"},
    "runpod-pytorch-2.4": {
        "pythons": [("usr/bin/python3", {"version": "3.11.10", "has_pip": True, "has_ensurepip": True,
                                         "torch": torch_probe("2.4.0", "12.4", True)})],
        "gpu": "RTX4090", "driver": "570.153.02", "env": {"RUNPOD_POD_ID": "abc123xyz"}},
    "ubuntu-22.04-no-venv": {
        "pythons": [("usr/bin/python3", {"version": "3.10.12", "has_pip": False, "has_ensurepip": False})],
        "gpu": "T4", "driver": "535.230.02"},
    "ubuntu-24.04-no-venv": {
        "pythons": [("usr/bin/python3", {"version": "3.12.3", "has_pip": False, "has_ensurepip": False})],
        "gpu": "V100", "driver": "580.82.07"},
    "old-driver-470-no-compute-cap-field": {
        "pythons": [("usr/bin/python3", {"version": "3.10.12", "has_pip": True, "has_ensurepip": True})],
        "gpu": "V100", "driver": "470.256.02"},
    "cpu-only-machine": {
        "pythons": [("usr/bin/python3", {"version": "3.12.3", "has_pip": True, "has_ensurepip": True})],
        "gpu": None, "driver": None},
}

# image -> (reuse the image's torch?, wheel variant or None, venv Python version, uv source, deadline)
EXPECTED = {
    "aws-dlami-base-oss-ubuntu22.04": (False, "cu126", "3.10.12", "uv via pip install --target", "shutdown"),
    "aws-pytorch-dlami": (True, None, "3.12.10", "uv via pip install --target", "shutdown"),
    "gcp-dlvm-common-cu12x-conda": (False, "cu126", "3.10.16", "uv via pip install --target", "shutdown"),
    "lambda-stack-22.04": (False, "cu126", "3.10.12", "uv via pip install --target", "shutdown"),
    "runpod-pytorch-2.4": (False, "cu128", "3.11.10", "uv via pip install --target", "runpodctl"),
    "ubuntu-22.04-no-venv": (False, "cu126", "3.10.12", "uv wheel from PyPI (urllib)", "shutdown"),
    "ubuntu-24.04-no-venv": (False, "cu126", "3.12.3", "uv wheel from PyPI (urllib)", "shutdown"),
    "old-driver-470-no-compute-cap-field": (False, "cu118", "3.10.12", "uv via pip install --target", "shutdown"),
    "cpu-only-machine": (False, "cpu", "3.12.3", "uv via pip install --target", "shutdown"),
}


def fake_nvidia_smi(bin_dir: Path, gpu: str, driver: str, count: int) -> None:
    name, cap, mem = GPU_ROWS[gpu]
    no_cap = driver.startswith("470")
    row_cap = f"{name}, {driver}, {cap}, {mem}"
    row = f"{name}, {driver}, {mem}"
    script = bin_dir / "nvidia-smi"
    reject = 'echo "Field compute_cap is not a valid field to query." >&2; exit 2'
    cap_branch = reject if no_cap else f'for i in $(seq {count}); do echo "{row_cap}"; done'
    script.write_text(f"""#!/bin/bash
case "$*" in
  *compute_cap*) {cap_branch} ;;
  *--query-gpu*) for i in $(seq {count}); do echo "{row}"; done ;;
  -L) for i in $(seq 0 {count - 1}); do echo "GPU $i: {name} (UUID: GPU-$i)"; done ;;
  *) echo "NVIDIA-SMI {driver}" ;;
esac
""")
    script.chmod(0o755)
    if not (bin_dir / "seq").exists():
        (bin_dir / "seq").symlink_to(shutil.which("seq"))


def fake_python(path: Path, probe: dict) -> None:
    """An image's interpreter: answers the probe with what the image ships, runs the rest for real."""
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {"python": str(path), "torch": None, "site_paths": [str(path.parent.parent / "lib")], **probe}
    path.write_text(f"""#!/bin/bash
if [ "$2" = probe ]; then cat <<'JSON'
{json.dumps(full)}
JSON
exit 0; fi
exec {REAL_PY} "$@"
""")
    path.chmod(0o755)


def run_dir_for(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "job").mkdir(parents=True)
    shutil.copy(JOB_DIR / "bootstrap.sh", run / "bootstrap.sh")
    shutil.copy(JOB_DIR / "torch_select.py", run / "job" / "torch_select.py")
    shutil.copy(JOB_DIR / "requirements.txt", run / "requirements.txt")
    return run


def simulate(tmp_path: Path, image: str, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    spec = IMAGES[image]
    root, bin_dir = tmp_path / "root", tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool, path="/usr/local/bin:/usr/bin:/bin")
        if found:
            (bin_dir / tool).symlink_to(found)
    paths = []
    for rel, probe in spec["pythons"]:
        fake_python(root / rel, probe)
        paths.append(str(root / rel))
    # the image's /usr/bin/python3 is what `python3` on PATH is
    (bin_dir / "python3").symlink_to(root / spec["pythons"][0][0]) if spec["pythons"][0][0] == "usr/bin/python3" \
        else None
    if spec["gpu"]:
        fake_nvidia_smi(bin_dir, spec["gpu"], spec["driver"], spec.get("count", 1))
    login = [str(root / d) for d in spec.get("login_path", [])] + [str(bin_dir)]
    home = tmp_path / "home"
    home.mkdir()
    (home / ".profile").write_text(f'PATH="{":".join(login)}"\n')
    run = run_dir_for(tmp_path)
    env = {"PATH": str(bin_dir), "HOME": str(home), "FTPLAN_PYTHON_PATHS": ":".join(paths), **spec.get("env", {})}
    proc = subprocess.run(["bash", str(run / "bootstrap.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=120)
    return proc, run


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_bootstrap_plan_for_each_default_image(image, tmp_path):
    proc, run = simulate(tmp_path, image, "--plan", "--deadline-s", "3600")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    reuse, variant, py_version, uv, deadline = EXPECTED[image]
    assert plan["error"] is None
    assert plan["reuse_image_torch"] is reuse, plan["reason"]
    assert (plan["torch"] or {}).get("variant") == variant or (variant is None and plan["torch"] is None), plan
    if image == "cpu-only-machine":  # no GPU, no torch in the image: the CPU wheel, never a CUDA one
        assert plan["torch"]["variant"] == "cpu" and plan["gpu_count"] == 0
    else:
        assert plan["gpu_count"] == IMAGES[image].get("count", 1)
    assert plan["venv"]["python_version"] == py_version
    assert plan["installer"]["uv"] == uv and plan["installer"]["needs_python3_venv"] is False
    assert plan["deadline"] == deadline
    # nothing was installed or started
    assert not (run / ".venv").exists() and not (run / "pid").exists() and not (run / ".tools").exists()


def test_plan_reasons_name_what_disqualifies_the_image_torch(tmp_path):
    proc, _ = simulate(tmp_path, "runpod-pytorch-2.4", "--plan")
    plan = json.loads(proc.stdout)
    assert "2.4.0 is older than 2.6" in plan["reason"]
    assert plan["torch"]["spec"] == "torch==2.9.1+cu128"
    assert "driver supports CUDA 12.8" in plan["torch"]["reason"]


def test_conda_python_is_found_through_the_login_shell(tmp_path):
    """GCP's DLVM puts /opt/conda/bin on PATH in the login profile: found and preferred, not /usr/bin."""
    IMAGES["gcp-conda-only-login"] = {**IMAGES["gcp-dlvm-common-cu12x-conda"]}
    try:
        proc, _ = simulate(tmp_path, "gcp-conda-only-login", "--plan")
    finally:
        del IMAGES["gcp-conda-only-login"]
    plan = json.loads(proc.stdout)
    assert plan["venv"]["python"].endswith("opt/conda/bin/python")


def test_driver_too_old_for_the_gpu_is_refused_in_the_plan(tmp_path):
    IMAGES["h100-on-470"] = {**IMAGES["old-driver-470-no-compute-cap-field"], "gpu": "H100"}
    try:
        proc, _ = simulate(tmp_path, "h100-on-470", "--plan")
    finally:
        del IMAGES["h100-on-470"]
    plan = json.loads(proc.stdout)
    assert "470.256.02 is too old" in plan["error"] and "R520+" in plan["error"]
