"""The job's requirements resolve on every Python a rented image may have (3.10, 3.11, 3.12), as pip does.

pip's `--python-version` picks wheels for the target but evaluates environment markers for the running
interpreter, so each version gets the file as pip on that Python would read it (markers evaluated for it),
then a real `pip install --dry-run` against the index pip uses here decides.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from job_helpers import JOB_DIR
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

REQUIREMENTS = JOB_DIR / "requirements.txt"
OFFLINE_MARKS = ("Could not fetch URL", "NewConnectionError", "Temporary failure in name resolution",
                 "Network is unreachable", "Max retries exceeded", "ProxyError")


def requirements_for(python: str) -> list[str]:
    env = {"python_version": python, "python_full_version": f"{python}.0"}
    out = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            out.append(str(req))
    return out


def test_transformers_pin_follows_the_python_version():
    assert "transformers==5.20.2" in requirements_for("3.10")
    assert "transformers==5.24.0" in requirements_for("3.11") and "transformers==5.24.0" in requirements_for("3.12")
    for py in ("3.10", "3.11", "3.12"):
        names = [Requirement(r).name for r in requirements_for(py)]
        assert len(names) == len(set(names)) and "torch" in names  # one line per package on every Python
        torch = next(Requirement(r) for r in requirements_for(py) if Requirement(r).name == "torch")
        assert not torch.specifier.contains("2.5.1")  # transformers 5.x disables torch < 2.6


@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12"])
def test_requirements_resolve_with_pip_for(python, tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("\n".join(requirements_for(python)) + "\n")
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
         "--python-version", python, "--only-binary=:all:", "--ignore-installed", "--target", str(tmp_path / "t"),
         "-r", str(reqs)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and any(mark in proc.stderr for mark in OFFLINE_MARKS):
        pytest.skip(f"package index unreachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    expected_tf = "5.20.2" if python == "3.10" else "5.24.0"
    assert chosen["transformers"] == expected_tf
    assert chosen["peft"] == "0.21.2" and chosen["bitsandbytes"] == "0.50.2" and chosen["accelerate"] == "1.15.0"
    major, minor = (int(x) for x in chosen["torch"].split(".")[:2])
    assert (major, minor) >= (2, 6)


CUDA_REQUIREMENTS = JOB_DIR / "requirements-cuda.txt"


def test_the_hub_client_pins_sit_within_transformers_range_and_liger_is_cuda_only():
    """bootstrap.sh installs the Hub client alone first (the weights download starts then): its pin must be one
    transformers accepts, or the full install would replace it under the running download."""
    import importlib.metadata

    lines = {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in requirements_for("3.11")}
    hub = lines["huggingface-hub"]
    wanted = next(Requirement(r) for r in importlib.metadata.requires("transformers")
                  if Requirement(r).name.replace("_", "-") == "huggingface-hub" and Requirement(r).marker is None)
    assert next(iter(hub.specifier)).operator == "==" and wanted.specifier.contains(next(iter(hub.specifier)).version)
    assert "hf-xet" in lines and "liger-kernel" not in lines and "hf-transfer" not in lines
    cuda = [Requirement(line) for line in CUDA_REQUIREMENTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert [r.name for r in cuda] == ["liger-kernel"] and next(iter(cuda[0].specifier)).operator == "=="


@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12"])
def test_cuda_requirements_resolve_beside_the_job_with_its_torch_held(python, tmp_path):
    """What a GPU machine installs after the job's requirements: liger-kernel's wheel exists and needs no
    other torch (bootstrap.sh holds the installed one with -c)."""
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("\n".join(requirements_for(python)) + "\n" + CUDA_REQUIREMENTS.read_text())
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
         "--python-version", python, "--only-binary=:all:", "--ignore-installed", "--target", str(tmp_path / "t"),
         "-r", str(reqs)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and any(mark in proc.stderr for mark in OFFLINE_MARKS):
        pytest.skip(f"package index unreachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    chosen = {name.replace("_", "-"): v for name, v in chosen.items()}
    assert chosen["liger-kernel"] == "0.8.5" and "triton" in chosen
    assert chosen["huggingface-hub"] == "2.4.0" and chosen["hf-xet"] == "1.8.0"


def test_on_a_cuda_machine_with_liger_the_job_runs_what_the_plan_estimates(monkeypatch):
    """`ftplan plan`/launch estimate loss `fused` (no full-vocabulary logits); the job on CUDA with the
    requirements-cuda.txt install runs Liger's fused linear cross-entropy, and its chunked loss elsewhere."""
    from job_helpers import use_job_modules

    from ftplan.planner.launch.estimate_bridge import LAUNCH_LOSS

    use_job_modules()
    import job_loss

    monkeypatch.setattr(job_loss, "liger_available", lambda: True)
    assert LAUNCH_LOSS == "fused" and job_loss.resolve(LAUNCH_LOSS, "cuda") == "liger"
    assert job_loss.resolve(LAUNCH_LOSS, "cpu") == "chunked"
    monkeypatch.setattr(job_loss, "liger_available", lambda: False)  # the install failed: a warning, then
    assert job_loss.resolve(LAUNCH_LOSS, "cuda") == "chunked"
