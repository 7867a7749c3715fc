"""benchmarks/gpu_calibration.py on the CPU: the prepared GPU calibration runs the real job end to end and
writes rows that benchmarks/estimate_accuracy.py reads with the exact configuration that ran."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_calibration.py"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=str(ROOT), capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def _keys(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line and " " not in line.split(":")[0])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration")
    proc = _script("--quick", "--out", str(out), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with (out / "calibration-measured.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return out, proc, rows


def test_quick_run_measures_the_real_job(quick):
    out, proc, rows = quick
    keys = _keys(proc.stdout)
    assert keys["runs"] == "1" and keys["skipped"] == "0"
    (row,) = rows
    run_dir = out / "runs" / "tiny-llama-qlora-b1-s128"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["method"] == "qlora"
    assert summary["model"]["linear4bit_modules"] > 0  # the base really was NF4-quantized
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "tokens_seen" in m]
    assert [m["step"] for m in steps] == [1, 2]
    # The synthetic data fills every row: each step trains batch x seq_len real tokens.
    assert [steps[0]["tokens_seen"], steps[1]["tokens_seen"] - steps[0]["tokens_seen"]] == [128, 128]
    # tokens/s is the step after the warm-up step, from the job's own clock.
    after_warmup = 128 / (steps[1]["elapsed_s"] - steps[0]["elapsed_s"])
    assert float(row["throughput"]) > 0
    assert float(row["throughput"]) == pytest.approx(after_warmup, rel=0.01)
    assert float(row["peak_mem"]) == pytest.approx(summary["peak_mem_allocated_gib"], abs=1e-3)
    assert row["kind"] == "measured" and row["source_id"].startswith("FTPLAN-")
    assert "torch " in row["notes"] and "bitsandbytes " in row["notes"]
    assert row["gpu"] == "cpu" and row["peak_mem_metric"].startswith("process peak RSS")  # not passed off as GPU
    assert keys["memory_median_abs_err"] == "n/a"  # no estimator error from a CPU run
    # The plain Trainer + peft baseline ran on the same base and rows; both ratios are job / baseline.
    record = json.loads((out / "calibration-runs.json").read_text())
    base = record["runs"][0]["baseline"]
    assert base["steps"] == 2 and base["rows_full"] and base["tokens_per_s"] > 0
    assert base["mem_source"] == summary["mem_source"] == "process_peak_rss"  # the same meter on both sides
    assert record["runs"][0]["loss"] == summary["loss"] == "chunked"
    tps_ratio = float(keys["job_vs_baseline_tokens_per_s"].split()[0])
    assert tps_ratio == pytest.approx(float(row["throughput"]) / base["tokens_per_s"], rel=1e-3)
    mem_ratio = float(keys["job_vs_baseline_peak_mem"].split()[0])
    assert mem_ratio == pytest.approx(summary["peak_mem_allocated_gib"] / base["peak_mem_allocated_gib"], rel=1e-2)
    assert (out / "runs" / "tiny-llama-qlora-b1-s128" / "baseline.log").exists()


def test_rows_read_by_the_accuracy_benchmark_with_the_configuration_that_ran(quick):
    out, _proc, rows = quick
    acc = _load("estimate_accuracy_for_calibration_test", ROOT / "benchmarks" / "estimate_accuracy.py")
    mem_rows, tps_rows, fit_rows, skipped = acc.collect(out / "calibration-measured.csv")
    assert not (mem_rows or tps_rows or fit_rows)
    # The smoke model is never taken for a real architecture (it would be scored against one).
    assert len(skipped) == 1 and "not described" in skipped[0][2]
    assert acc.map_row({**rows[0], "model": "Llama-3.1-8B"}) == "GPU 'cpu' not in the GPU table"

    cal = _load("gpu_calibration_for_test", SCRIPT)
    from ftplan.planner.estimate.models import resolve_model

    job = json.loads((out / "runs" / "tiny-llama-qlora-b1-s128" / "job.json").read_text())
    summary = json.loads((out / "runs" / "tiny-llama-qlora-b1-s128" / "summary.json").read_text())
    for key in ("llama3.1-8b", "mistral-7b"):  # the GPU rows' model names map to the same architecture
        spec = resolve_model(key)
        name = cal.csv_model_name(spec.hf_id, spec.name)
        assert acc.model_for(name).params_total() == spec.params_total()
        # The same row as a GPU run of that model: every configuration column is read as it ran.
        m = acc.map_row({**rows[0], "gpu": "A100", "model": name})
        assert m.req.method == job["method"] and m.req.seq_len == job["seq_len"]
        assert m.req.batch_size == job["batch_size"] and m.req.grad_accum == job["grad_accum"]
        assert m.req.lora_r == job["lora"]["r"] and m.req.lora_targets == "all-linear"
        assert m.req.precision == {"fp32": "fp32", "bf16": "bf16-mixed"}[summary["precision"]]
        assert m.req.optimizer == "adamw8bit" and m.req.double_quant
        assert m.req.grad_checkpointing is job["gradient_checkpointing"] is True
        assert m.req.attention == "sdpa" and m.req.framework == "hf" and m.gpu_count == 1
        assert m.mem_quantity == "allocated"
        assert m.measured_mem_gib == float(rows[0]["peak_mem"]) and m.measured_tps == float(rows[0]["throughput"])


def test_plan_schedules_the_baseline_for_llama_8b_qlora_at_1x2048_and_4x1024(tmp_path):
    proc = _script("--plan-only", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with_baseline = sorted(line.split(":")[0] for line in proc.stdout.splitlines() if "with the baseline" in line)
    assert with_baseline == ["llama3.1-8b-qlora-b1-s2048", "llama3.1-8b-qlora-b4-s1024"]
    proc = _script("--plan-only", "--no-baseline", "--out", str(tmp_path))
    assert proc.returncode == 0 and "with the baseline" not in proc.stdout


def test_budget_too_small_skips_and_says_so(tmp_path):
    proc = _script("--quick", "--budget-s", "3", "--out", str(tmp_path))
    assert proc.returncode == 1
    assert "skip tiny-llama-qlora-b1-s128: needs ~" in proc.stdout
    assert _keys(proc.stdout)["runs"] == "0"
    with (tmp_path / "calibration-measured.csv").open(newline="") as fh:
        assert list(csv.DictReader(fh)) == []


@pytest.mark.parametrize("args, needle", [
    (["--models", "no-such-model"], "unknown model 'no-such-model'"),
    (["--settings", "4by1024"], "bad setting '4by1024'"),
    (["--methods", "qlora,full"], "unknown methods 'full'"),
    (["--steps", "1"], "--steps must be >= 2"),
    (["--gpu", "H2000"], "unknown GPU 'H2000'"),
])
def test_bad_arguments_one_line_exit_2(tmp_path, args, needle):
    proc = _script(*args, "--out", str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
