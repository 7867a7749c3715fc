"""The job refuses a GPU it cannot use, picks precision by hardware, and measures like with like."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
from job_helpers import make_job, read_json, run_job, use_job_modules

use_job_modules()
import device_check  # noqa: E402
import job_progress  # noqa: E402


def fake_nvidia_smi(bin_dir: Path, row: str = "NVIDIA A100-SXM4-80GB, 535.230.02, 8.0, 81920") -> str:
    bin_dir.mkdir(parents=True, exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    name = row.split(",")[0]
    smi.write_text(f"""#!/bin/bash
case "$*" in
  *--query-gpu*) echo "{row}" ;;
  -L) echo "GPU 0: {name} (UUID: GPU-0)" ;;
esac
""")
    smi.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.mark.slow
def test_a_listed_gpu_with_a_cpu_only_torch_stops_before_training(tmp_path):
    """This torch is a CPU build: with nvidia-smi listing an A100 the job must not train on the CPU."""
    cfg = make_job(tmp_path, method="qlora", optimizer="paged_adamw_8bit")
    result = run_job(cfg, env={"PATH": fake_nvidia_smi(tmp_path / "bin")})
    assert result.returncode == 1
    assert "GPU NVIDIA A100-SXM4-80GB, driver 535.230.02" in result.stderr and "CPU-only build" in result.stderr
    summary = read_json(tmp_path / "out" / "summary.json")
    assert summary["status"] == "failed" and summary["phase"] == "setup" and summary["steps"] == 0
    assert summary["gpu_name"] == "NVIDIA A100-SXM4-80GB" and summary["driver_version"] == "535.230.02"
    assert "torch_cuda" in summary and summary["torch_cuda"] is None  # the CPU build has no CUDA version
    assert "DeviceMismatch" in summary["error"]
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "heartbeat.json").exists()


@pytest.mark.slow
def test_a_gpu_offer_without_nvidia_smi_is_refused_too(tmp_path):
    cfg = make_job(tmp_path, expect_gpu=True)
    result = run_job(cfg, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    summary = read_json(tmp_path / "out" / "summary.json")
    assert summary["gpus_listed"] == 0 and "not listed by nvidia-smi" in summary["error"]


def test_no_gpu_listed_and_none_expected_means_cpu(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    import torch

    info = device_check.facts(torch)
    assert info["gpus_listed"] == 0 and device_check.pick_device(None, torch, info) == "cpu"
    assert device_check.pick_device(False, torch, info) == "cpu"


def fake_cuda(monkeypatch, cap: tuple[int, int]):
    """What torch.cuda answers on a GPU of this compute capability (emulated bf16 counts as 'supported')."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: True if including_emulation else cap[0] >= 8)
    return torch


@pytest.mark.parametrize("cap, want", [((7, 0), "float16"), ((7, 5), "float16"), ((8, 0), "bfloat16"),
                                       ((9, 0), "bfloat16")])
def test_precision_auto_is_native_bf16_or_fp16(monkeypatch, cap, want):
    torch = fake_cuda(monkeypatch, cap)
    assert torch.cuda.is_bf16_supported()  # the trap: a T4/V100 says True (emulation)
    assert device_check.pick_dtype("auto", "cuda", torch) == getattr(torch, want)
    assert device_check.pick_dtype("auto", "cpu", torch) == torch.float32
    assert device_check.pick_dtype("bf16", "cuda", torch) == torch.bfloat16  # an explicit choice is kept


def test_wrong_architecture_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90", "sm_100", "sm_120"])
    info = {"gpus_listed": 1, "gpu_name": "Tesla V100-SXM2-16GB", "driver_version": "580.82.07",
            "torch_version": "2.9.1+cu130", "torch_cuda": "13.0"}
    with pytest.raises(device_check.DeviceMismatch, match="no kernels for this GPU's compute capability 7.0"):
        device_check.pick_device(None, torch, info)


def test_step_clock_excludes_warmup_eval_and_checkpoints():
    clock = job_progress.StepClock()
    clock.warmup_s, clock.warmup_tokens = 5.0, 100   # the first step: CUDA/cuBLAS warm-up
    clock.steps_s, clock.tokens = 2.0, 400
    clock.add("eval", 3.0)
    clock.add("checkpoint", 1.0)
    assert clock.tokens_per_s() == 200.0
    assert clock.durations() == {"train_steps": 2.0, "warmup_step": 5.0, "eval": 3.0, "checkpoint": 1.0}


def test_measured_memory_maps_onto_the_estimates_figures():
    import dataclasses

    from ftplan.planner.estimate.memory import MemoryEstimate

    zeros = {f.name: ([] if f.name == "notes" else 0) for f in dataclasses.fields(MemoryEstimate)}
    figures = MemoryEstimate(**zeros).figures()
    for measured, figure in job_progress.MEMORY_COMPARISON.items():
        assert measured.startswith("peak_mem_") and figure in figures
    assert set(job_progress.MEMORY_COMPARISON.values()) == {"allocated", "reserved", "device"}


def test_paged_optimizer_state_is_counted_apart():
    import torch

    paged = torch.zeros(1000, dtype=torch.uint8)
    paged.is_paged = True
    opt = types.SimpleNamespace(state={"p": {"state1": paged, "state2": torch.zeros(10), "step": 3}})
    assert job_progress.paged_optimizer_bytes(opt) == 1000


def test_job_config_runs_one_process_per_offered_gpu_and_refuses_the_cpu_on_gpu_offers():
    from ftplan.planner.launch.launch_plan import build_job_config
    from ftplan.planner.launch.project_config import ProjectConfig, with_overrides

    cfg = with_overrides(ProjectConfig(), **{"job.model": "tiny-llama"})
    four = build_job_config(cfg, "r1", 4, "A10G")
    assert four["num_gpus"] == 4 and four["expect_gpu"] is True
    local = build_job_config(cfg, "r2", 1, "cpu")
    assert local["num_gpus"] == 1 and local["expect_gpu"] is False
    use_job_modules()
    import job_config

    assert job_config.validate({**four, "dataset": "d.jsonl"})["num_gpus"] == 4  # the job accepts both keys
