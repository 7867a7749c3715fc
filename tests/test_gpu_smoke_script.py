"""benchmarks/gpu_smoke.sh's CPU-safe part runs in CI, so the GPU smoke script cannot rot before a GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_gpu_smoke_cpu_only(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"), "--cpu-only", "--out", str(tmp_path)],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert lines["mode"] == "cpu-only" and lines["precision"] == "float32"
    assert lines["tiny_job"].startswith("succeeded on cpu, resumed from ")
    result = json.loads((tmp_path / "gpu_smoke.json").read_text())
    checks = result["checks"]
    assert set(checks) == {"machine", "bootstrap_plan", "cuda", "precision", "tiny_job_stop_resume"}
    assert all(c["ok"] for c in checks.values()), checks
    plan = checks["bootstrap_plan"]["plan"]
    assert plan["gpu_count"] == 0 and plan["error"] is None  # no GPU here: the CPU wheel or the image's torch
    job = checks["tiny_job_stop_resume"]
    assert job["stopped_at"] >= 2 and job["resumed_from_step"] == job["stopped_at"] and job["eval_loss"] > 0
