"""The real job shipped over real SSH: bundle -> upload -> bootstrap -> QLoRA on CPU -> pull -> peft.

A tiny random-weight Llama (hidden 64, 2 layers) whose tokenizer the job trains on the test data;
the 'remote' machine is this one, reached through the test's own sshd on 127.0.0.1.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from job_helpers import job_config, write_dataset

from ftplan.planner.remote.bundle import build_bundle
from ftplan.planner.remote.ssh_runner import SSHRunner

pytestmark = pytest.mark.slow

# The job's environment on the 'remote' side: offline, and one thread so two xdist workers fit on 2 cores.
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def ship(runner: SSHRunner, tmp_path: Path, run_id: str, **overrides) -> None:
    config = job_config("qlora", run_id=run_id, **{"seq_len": 64, **overrides})
    dataset = write_dataset(tmp_path / "train.jsonl", "alpaca", 40)
    bundle = build_bundle(config, dataset, tmp_path / f"{run_id}.tar.gz")
    runner.upload_bundle(bundle, run_id)


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def finish(runner: SSHRunner, run_id: str, timeout_s: float = 240) -> int:
    code = wait_until(lambda: (runner.exit_code(run_id),) if runner.exit_code(run_id) is not None else None,
                      timeout_s, "the job's exit code")[0]
    if code != 0:
        print(runner.tail_log(run_id)[0][-3000:])
    return code


def step_of(runner: SSHRunner, run_id: str) -> int:
    hb = runner.read_json(run_id, "out/heartbeat.json") or {}
    return hb.get("step", 0) if hb.get("status") in ("training", "saving") else 0


def test_qlora_adapter_comes_back_and_changes_the_model(make_runner, tmp_path):
    runner = make_runner()
    ship(runner, tmp_path, "e2e-qlora", max_steps=3, checkpoint_every_steps=10, packing=True, seq_len=192)
    runner.start("e2e-qlora", remote_python=sys.executable, env=JOB_ENV, deadline_s=3600, shutdown="dry-run")
    assert finish(runner, "e2e-qlora") == 0
    summary = runner.read_json("e2e-qlora", "out/summary.json")
    assert summary["status"] == "succeeded" and summary["steps"] == 3
    assert summary["model"]["quant_type"] == "nf4" and summary["model"]["linear4bit_modules"] > 0
    assert summary["data"]["train_rows"] < summary["data"]["records"] - 4 and summary["loss"] == "chunked"  # packed

    local = tmp_path / "artifacts"
    adapter = runner.pull("e2e-qlora", "out/adapter", local)
    runner.pull("e2e-qlora", "out/base_model", local)
    runner.pull("e2e-qlora", "out/tokenizer", local)
    assert local / "adapter" / "adapter_model.safetensors" in adapter

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local / "tokenizer")
    ids = tokenizer("Give three tips for staying healthy.", return_tensors="pt").input_ids
    assert ids.shape[1] > 3
    base = AutoModelForCausalLM.from_pretrained(local / "base_model", dtype=torch.float32)
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, local / "adapter")
        after = tuned(ids).logits
    assert before.shape == after.shape
    assert (after - before).abs().max().item() > 1e-3
    with torch.no_grad():
        with tuned.disable_adapter():
            assert torch.allclose(tuned(ids).logits, before, atol=1e-5)  # the difference is the adapter's


def test_training_survives_a_dropped_connection(make_runner, tmp_path):
    first = make_runner()
    ship(first, tmp_path, "e2e-detach", max_steps=8, throttle_s_per_step=0.4, checkpoint_every_steps=100,
         eval_fraction=0.0)
    first.start("e2e-detach", remote_python=sys.executable, env=JOB_ENV)
    wait_until(lambda: step_of(first, "e2e-detach") >= 1, 180, "the first training step")
    _, offset = first.tail_log("e2e-detach")
    first.close()  # connection gone mid-run

    second = make_runner()  # fresh runner, same pinned host key
    assert second.is_running("e2e-detach")
    seen = step_of(second, "e2e-detach")
    wait_until(lambda: step_of(second, "e2e-detach") > seen, 60, "progress after re-attaching")
    assert finish(second, "e2e-detach") == 0
    summary = second.read_json("e2e-detach", "out/summary.json")
    assert summary["status"] == "succeeded" and summary["steps"] == 8
    rest, _ = second.tail_log("e2e-detach", offset)
    assert "training exited with status 0" in rest


def test_stop_checkpoint_and_resume_to_the_total_step_count(make_runner, tmp_path):
    runner = make_runner()
    ship(runner, tmp_path, "e2e-resume", max_steps=6, throttle_s_per_step=0.3, checkpoint_every_steps=100,
         eval_fraction=0.0)
    runner.start("e2e-resume", remote_python=sys.executable, env=JOB_ENV)
    wait_until(lambda: step_of(runner, "e2e-resume") >= 2, 180, "two training steps")
    runner.request_stop("e2e-resume")
    assert finish(runner, "e2e-resume") == 0
    stopped = runner.read_json("e2e-resume", "out/summary.json")
    assert stopped["status"] == "stopped" and 2 <= stopped["steps"] < 6
    checkpoints = runner.pull("e2e-resume", "out/checkpoints", tmp_path / "ckpt")
    assert tmp_path / "ckpt" / "checkpoints" / f"checkpoint-{stopped['steps']}" / "COMPLETE" in checkpoints

    runner.start("e2e-resume", remote_python=sys.executable)  # same run dir, secrets.env kept
    assert finish(runner, "e2e-resume") == 0
    resumed = runner.read_json("e2e-resume", "out/summary.json")
    assert resumed["status"] == "succeeded"
    assert resumed["resumed_from_step"] == stopped["steps"] and resumed["steps"] == 6
    assert [step for step, _ in resumed["losses"]] == list(range(1, 7))
