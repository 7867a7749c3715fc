"""The training job run as on the GPU box (`python train.py --config job.json`), on a tiny Llama on CPU."""

from __future__ import annotations

import json
import signal
import time

import pytest
from job_helpers import make_job, read_json, read_metrics, run_job, start_job, use_job_modules

pytestmark = pytest.mark.slow

HEARTBEAT_KEYS = {"status", "step", "total_steps", "epoch", "loss", "eval_loss", "tokens_per_s", "tokens_seen",
                  "elapsed_s", "peak_mem_allocated_gib", "peak_mem_reserved_gib", "device", "updated_at"}
SUMMARY_KEYS = {"status", "error", "steps", "total_steps", "train_tokens", "tokens_per_s", "peak_mem_allocated_gib",
                "peak_mem_reserved_gib", "losses", "eval_loss", "durations_s", "device", "gpu_name", "config"}


def _ok(result):
    assert result.returncode == 0, result.stderr[-3000:]


QLORA = {"method": "qlora", "optimizer": "paged_adamw_8bit", "max_steps": 6, "checkpoint_every_steps": 3}


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """One uninterrupted QLoRA run (with merge), shared by the output and resume tests."""
    workdir = tmp_path_factory.mktemp("qlora")
    _ok(run_job(make_job(workdir, merge_adapter=True, **QLORA)))
    return workdir


def test_qlora_job_trains_nf4_model_and_writes_all_outputs(qlora_run):
    tmp_path = qlora_run
    out = tmp_path / "out"
    summary = read_json(out / "summary.json")
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "succeeded" and summary["error"] is None
    assert summary["steps"] == summary["total_steps"] == 6
    # real QLoRA: bitsandbytes NF4 layers (7 linear layers x 2 blocks), only LoRA weights trained
    assert summary["model"]["linear4bit_modules"] == 14
    assert summary["model"]["quant_type"] == "nf4"
    assert 0 < summary["model"]["trainable_params"] < summary["model"]["total_params"] / 5
    assert [s for s, _ in summary["losses"]] == [1, 2, 3, 4, 5, 6]
    assert summary["train_tokens"] > 0 and summary["tokens_per_s"] > 0
    assert summary["eval_loss"] > 0 and summary["device"] == "cpu" and summary["gpu_name"] is None
    assert 0.05 < summary["peak_mem_allocated_gib"] < 16 and summary["mem_source"] == "process_peak_rss"
    d = summary["durations_s"]
    assert d["total"] >= d["load"] + d["train"] + d["save"] - 0.01 and d["train"] > 0
    assert summary["config"]["method"] == "qlora" and summary["data"]["format"] == "alpaca"

    hb = read_json(out / "heartbeat.json")
    assert HEARTBEAT_KEYS <= set(hb)
    assert hb["status"] == "done" and hb["step"] == hb["total_steps"] == 6 and hb["device"] == "cpu"
    assert hb["tokens_seen"] == summary["train_tokens"] and hb["eval_loss"] == summary["eval_loss"]

    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in steps] == [loss for _, loss in summary["losses"]]
    assert any("eval_loss" in m for m in metrics)

    adapter_cfg = read_json(out / "adapter" / "adapter_config.json")
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16
    assert (out / "tokenizer" / "tokenizer.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    # merged into a 16-bit copy of the base, never into the 4-bit one
    merged_cfg = read_json(out / "merged" / "config.json")
    assert "quantization_config" not in merged_cfg and merged_cfg["dtype"] == "bfloat16"
    assert list((out / "merged").glob("*.safetensors"))


def test_full_finetune_on_chat_data_with_packing(tmp_path):
    cfg_path = make_job(tmp_path, method="full", fmt="chat", packing=True, max_steps=3, checkpoint_every_steps=10,
                        optimizer="adamw_8bit", seq_len=128)
    _ok(run_job(cfg_path))
    summary = read_json(tmp_path / "out" / "summary.json")
    assert summary["status"] == "succeeded" and summary["data"]["format"] == "chat"
    assert summary["model"]["trainable_params"] == summary["model"]["total_params"]
    # packing: whole records per 128-token row (never split), so rows are fuller than one ~70-token record;
    # 3 steps x 4 unpacked rows would count ~840 tokens
    assert 3 * 4 * 90 < summary["train_tokens"] <= 3 * 4 * 128
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "out" / "adapter").exists()


def test_stop_then_resume_matches_an_uninterrupted_run(qlora_run, tmp_path):
    reference = read_json(qlora_run / "out" / "summary.json")

    resumed = make_job(tmp_path / "b", **QLORA)
    (tmp_path / "b" / "STOP").write_text("budget\n")  # the launcher's budget stop
    _ok(run_job(resumed))
    first = read_json(tmp_path / "b" / "out" / "summary.json")
    assert first["status"] == "stopped" and first["steps"] == 1
    assert (tmp_path / "b" / "out" / "checkpoints" / "checkpoint-1" / "COMPLETE").exists()
    assert read_json(tmp_path / "b" / "out" / "heartbeat.json")["status"] == "stopped"
    assert not (tmp_path / "b" / "STOP").exists()  # consumed, so the resume does not stop at once

    _ok(run_job(resumed))
    second = read_json(tmp_path / "b" / "out" / "summary.json")
    assert second["status"] == "succeeded" and second["resumed_from_step"] == 1
    assert second["steps"] == reference["steps"] == 6
    # same data order, 8-bit optimizer state, scheduler and RNG: the same losses as without the stop
    assert [s for s, _ in second["losses"]] == list(range(1, 7))
    for (_, a), (_, b) in zip(second["losses"], reference["losses"], strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-4)
    assert second["train_tokens"] == reference["train_tokens"]
    assert second["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-4)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    cfg_path = make_job(tmp_path, max_steps=200, throttle_s_per_step=0.2, checkpoint_every_steps=100)
    proc = start_job(cfg_path)
    hb_path = tmp_path / "out" / "heartbeat.json"
    deadline = time.time() + 90
    hb = {}
    while time.time() < deadline and proc.poll() is None:
        if hb_path.exists():
            hb = json.loads(hb_path.read_text())
            if hb["status"] == "training" and hb["step"] >= 2:
                break
        time.sleep(0.2)
    assert hb.get("status") == "training", proc.stdout.read() if proc.poll() is not None else hb
    proc.send_signal(signal.SIGTERM)  # a spot preemption notice
    assert proc.wait(timeout=60) == 0
    summary = read_json(tmp_path / "out" / "summary.json")
    assert summary["status"] == "stopped" and summary["stop_reason"] == "SIGTERM"
    assert 2 <= summary["steps"] < 200
    use_job_modules()
    import job_checkpoints

    assert job_checkpoints.newest(str(tmp_path / "out")).endswith(f"checkpoint-{summary['steps']}")


def test_half_written_checkpoints_are_never_resumed_from(tmp_path):
    use_job_modules()
    import job_checkpoints

    root = tmp_path / "checkpoints"
    for name, complete in [("checkpoint-2", True), ("checkpoint-10", False), (".tmp-checkpoint-12", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "COMPLETE").write_text("ok\n")
    assert job_checkpoints.newest(str(tmp_path)) == str(root / "checkpoint-2")


def test_failure_writes_failed_summary_without_leaking_the_token(tmp_path):
    secret = "hf_" + "Zx9" * 10
    cfg_path = make_job(tmp_path, model={"hf_id": f"no-such-org/model-{secret}", "random_init": False,
                                         "config": None})
    result = run_job(cfg_path, env={"HF_TOKEN": secret})
    assert result.returncode == 1
    summary = read_json(tmp_path / "out" / "summary.json")
    assert summary["status"] == "failed" and summary["error"]
    assert read_json(tmp_path / "out" / "heartbeat.json")["status"] == "failed"
    for text in (json.dumps(summary), result.stderr, result.stdout, (tmp_path / "out" / "train.log").read_text()):
        assert secret not in text


def test_bad_dataset_line_fails_fast_with_one_error_line(tmp_path):
    cfg_path = make_job(tmp_path)
    data = tmp_path / "data" / "train.jsonl"
    lines = data.read_text().splitlines()
    lines[6] = '{"instruction": "x"}'
    data.write_text("\n".join(lines) + "\n")
    result = run_job(cfg_path, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {data} line 7: needs 'instruction' and 'output' (the file was read as Alpaca format)"]
    assert read_json(tmp_path / "out" / "summary.json")["status"] == "failed"


def test_unknown_config_key_is_rejected(tmp_path):
    cfg_path = make_job(tmp_path, lora_rank=8)
    result = run_job(cfg_path, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown key(s) in 'config': lora_rank; allowed: " + ", ".join(_default_keys())]


def _default_keys():
    use_job_modules()
    import job_config

    return list(job_config.DEFAULTS)
