"""Several GPUs: the job relaunches itself under torchrun; on CPU the same path runs two gloo processes."""

from __future__ import annotations

import pytest
from job_helpers import job_config, make_job, read_json, run_job, use_job_modules

use_job_modules()
import job_config as jc  # noqa: E402
import job_distributed  # noqa: E402


@pytest.mark.slow
def test_two_process_qlora_stops_together_and_resumes(tmp_path):
    cfg_path = make_job(tmp_path, method="qlora", num_gpus=2, max_steps=3, batch_size=2)
    (tmp_path / "STOP").write_text("budget\n")
    first = run_job(cfg_path, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out"
    summary = read_json(out / "summary.json")
    # both ranks saw the stop at the same step (the flag is all-reduced), so one checkpoint, no hang
    assert summary["status"] == "stopped" and summary["steps"] == 1 and summary["num_processes"] == 2
    ckpt = out / "checkpoints" / "checkpoint-1"
    assert sorted(p.name for p in ckpt.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]

    second = run_job(cfg_path, timeout=240)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = read_json(out / "summary.json")
    assert summary["status"] == "succeeded" and summary["resumed_from_step"] == 1
    assert summary["steps"] == 3 and [s for s, _ in summary["losses"]] == [1, 2, 3]
    assert summary["model"]["linear4bit_modules"] == 14
    # each step covers 2 rows on each of the 2 ranks
    assert summary["data"]["train_rows"] == 36 and summary["train_tokens"] > 3 * 4 * 20
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert read_json(out / "heartbeat.json")["status"] == "done"


@pytest.mark.slow
def test_eval_with_fewer_rows_than_ranks_does_not_hang(tmp_path):
    """One eval row, two ranks: rank 1 has none, yet runs the same forwards (DDP broadcasts in each)."""
    cfg_path = make_job(tmp_path, method="qlora", num_gpus=2, max_steps=2, batch_size=2, n=12,
                        eval_fraction=0.05, checkpoint_every_steps=1)
    result = run_job(cfg_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_json(tmp_path / "out" / "summary.json")
    assert summary["data"]["eval_rows"] == 1 and summary["num_processes"] == 2
    assert summary["status"] == "succeeded" and summary["eval_loss"] > 0


def _cfg(**overrides):
    raw = job_config(**overrides)
    return jc.validate(raw)


def test_launch_command_uses_torchrun_of_the_same_python(tmp_path):
    import sys

    cmd = job_distributed.launch_command(_cfg(num_gpus=4), "/run/job.json", "/run/job/train.py")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=4" in cmd and cmd[-3:] == ["/run/job/train.py", "--config", "/run/job.json"]
    assert job_distributed.needs_launcher(_cfg(num_gpus=2)) and not job_distributed.needs_launcher(_cfg())


@pytest.mark.parametrize("mode, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_config_follows_the_plan(mode, stage):
    cfg = _cfg(method="lora", num_gpus=8, distributed=mode, batch_size=2, grad_accum=4)
    ds = job_distributed.deepspeed_config(cfg, stage, "bf16")
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ("stage3_gather_16bit_weights_on_model_save" in ds["zero_optimization"]) == (stage == 3)


def test_engine_plugins_for_each_distributed_mode(tmp_path):
    from accelerate import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    assert "fsdp_plugin" not in job_distributed.accelerator_kwargs(_cfg(num_gpus=2), "bf16", str(tmp_path), False)
    fsdp = job_distributed.accelerator_kwargs(_cfg(num_gpus=2, distributed="fsdp"), "bf16", str(tmp_path), False)
    assert isinstance(fsdp["fsdp_plugin"], FullyShardedDataParallelPlugin)
    try:
        kwargs = job_distributed.accelerator_kwargs(_cfg(num_gpus=2, distributed="zero2"), "bf16",
                                                    str(tmp_path), False)
    except ImportError:  # deepspeed is not installed here: the config file is still written for the GPU box
        kwargs = None
    assert read_json(tmp_path / "deepspeed.json")["zero_optimization"]["stage"] == 2
    if kwargs is not None:
        assert isinstance(kwargs["deepspeed_plugin"], DeepSpeedPlugin)
