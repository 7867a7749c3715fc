"""The estimate a launch prints is computed for what the launched job runs, and the job config it ships
carries the same values: loss, precision, optimizer (fused or not), packing, LoRA dropout, checkpointing.

Both sides are built from one ftplan.toml as `ftplan launch` builds them; the job side is read through the
job's own code (remote_job/job_config.validate, job_optim.choose), the estimate side through the estimator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftplan.planner.errors import UserError
from ftplan.planner.estimate.estimator import estimate
from ftplan.planner.estimate.gpus import resolve_gpu
from ftplan.planner.launch.estimate_bridge import launch_offers, request_from_config
from ftplan.planner.launch.launch_plan import build_job_config
from ftplan.planner.launch.project_config import load_project
from ftplan.remote_job import job_config, job_optim

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "remote_job" / "examples" / "alpaca_small.json"
# job optimizer (remote_job/job_optim.py) -> estimator optimizer
OPTIMIZER = {"paged_adamw_8bit": "paged_adamw8bit", "adamw_8bit": "adamw8bit", "paged_adamw": "adamw",
             "adamw": "adamw"}


def _project(tmp_path: Path, job: str = "", launch: str = "") -> Path:
    path = tmp_path / "ftplan.toml"
    path.write_text(f'[job]\nmodel = "tiny-llama"\ndataset = "{EXAMPLE}"\n{job}\n[launch]\nbudget_usd = 50\n{launch}\n')
    return path


def _both(cfg, gpu: str):
    job = job_config.validate(build_job_config(cfg, "ft-test", 1, gpu))
    return job, request_from_config(cfg, EXAMPLE, gpu=gpu)


@pytest.mark.parametrize("gpu", ["L4", "T4", "A100-80GB"])
@pytest.mark.parametrize("method, optimizer", [("qlora", "paged_adamw_8bit"), ("lora", "auto"), ("full", "auto")])
def test_job_config_and_estimate_agree_field_by_field(tmp_path, gpu, method, optimizer):
    cfg = load_project(_project(tmp_path, f'method = "{method}"\noptimizer = "{optimizer}"'))
    job, req = _both(cfg, gpu)
    card = resolve_gpu(gpu)

    # precision: what the job picks on this GPU (bf16 from compute capability 8.0, fp16 on a T4)
    assert job["precision"] == ("bf16" if card.supports_bf16 else "fp16")
    assert req.precision == {"bf16": "bf16-mixed", "fp16": "fp16-mixed"}[job["precision"]]
    est = estimate(req, card)
    assert est.precision == req.precision and not any("no bf16" in n for n in est.notes)
    # optimizer: the one the job chooses; torch's AdamW is fused on CUDA, bitsandbytes' 8-bit is not torch's
    chosen = job_optim.choose(job["optimizer"], job["method"])
    assert req.resolved_optimizer == OPTIMIZER[chosen]
    assert req.fused_optimizer == (chosen == "adamw")
    assert (method, chosen) != ("qlora", "adamw") and (method == "qlora") == (chosen == "paged_adamw_8bit")
    # loss: the job's fused/chunked loss never builds the full-vocabulary logits; neither does the estimate
    assert job["loss"] == "fused" and req.loss == "fused"
    # the rest, as written in the project file
    assert req.packing is job["packing"] is False
    assert req.lora_dropout == job["lora"]["dropout"] == 0.05
    assert req.grad_checkpointing is job["gradient_checkpointing"] is True
    assert (req.method, req.seq_len, req.batch_size, req.grad_accum) == \
        (job["method"], job["seq_len"], job["batch_size"], job["grad_accum"])
    assert (req.lora_r, req.lora_alpha, req.lora_targets.split(",")) == \
        (job["lora"]["r"], job["lora"]["alpha"], job["lora"]["targets"])


def test_project_file_loss_packing_and_dropout_reach_both(tmp_path):
    cfg = load_project(_project(tmp_path, 'method = "lora"\nloss = "standard"\npacking = true\nlora_dropout = 0.0\n'
                                          'gradient_checkpointing = false'))
    job, req = _both(cfg, "L4")
    assert (job["loss"], req.loss) == ("standard", "standard")
    assert job["packing"] is True and req.packing is True and req.step_seq_len == job["seq_len"]
    assert job["lora"]["dropout"] == 0.0 == req.lora_dropout
    assert job["gradient_checkpointing"] is False and req.grad_checkpointing is False
    standard = estimate(req, resolve_gpu("L4")).memory
    fused = estimate(request_from_config(load_project(_project(tmp_path, 'method = "lora"\npacking = true\n'
                                                                         'lora_dropout = 0.0\n'
                                                                         'gradient_checkpointing = false')),
                                         EXAMPLE, gpu="L4"), resolve_gpu("L4")).memory
    assert fused.logits < standard.logits  # the loss the file names is the one estimated


def test_unpacked_job_is_estimated_at_the_datasets_longest_record(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": "x " * n, "output": "y"}) for n in (10, 40, 20)) + "\n")
    cfg = load_project(_project(tmp_path, 'seq_len = 512'))
    req = request_from_config(cfg, data, gpu="L4")
    assert not req.packing and 0 < req.step_seq_len < 512  # padded to the longest of three short records
    packed = load_project(_project(tmp_path, 'seq_len = 512\npacking = true'))
    assert request_from_config(packed, data, gpu="L4").step_seq_len == 512


def test_soft_capped_model_is_estimated_with_the_standard_loss_the_job_falls_back_to(tmp_path):
    cfg = load_project(_project(tmp_path))
    cfg.job.model = "gemma2-2b"
    req = request_from_config(cfg, None, gpu="L4")
    assert build_job_config(cfg, "r", 1, "L4")["loss"] == "fused" and req.loss == "standard"


def test_catalog_launch_plans_gpus_without_bf16_in_fp16(tmp_path):
    cfg = load_project(_project(tmp_path, launch='providers = ["aws", "gcp"]'))
    offers = launch_offers(cfg, EXAMPLE)
    t4 = [o for o in offers if o.gpu == "T4"]
    assert t4, "the job runs fp16 on a T4: its offers must be planned, not rejected for lack of bf16"
    assert [o.total_usd for o in offers] == sorted(o.total_usd for o in offers)
    fp16 = estimate(request_from_config(cfg, EXAMPLE, gpu="T4"), resolve_gpu("T4"))
    assert t4[0].peak_gib == pytest.approx(fp16.memory.total, rel=1e-6)


def test_dry_run_prints_the_estimate_of_what_the_job_runs(tmp_path):
    project = _project(tmp_path, 'method = "lora"\noptimizer = "auto"',
                       '[[launch.offers]]\nprovider = "lambda"\ninstance_type = "gpu_1x_a10"\ngpu = "A10"\n'
                       'region = "us-east-1"\nprice_hour = 0.75')
    env = {**os.environ, "FTPLAN_STORE": str(tmp_path / "none.sqlite3")}
    proc = subprocess.run([sys.executable, "-m", "ftplan.planner.cli", "launch", "--dry-run", "--json"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)["estimated"]
    est = estimate(request_from_config(load_project(project), EXAMPLE, gpu="A10"), resolve_gpu("A10"))
    assert shown["peak_mem_gib"] == round(est.memory.total, 2)
    assert shown["tokens_per_s"] == round(est.tokens_per_s, 1)


@pytest.mark.parametrize("line, key", [('loss = "liger"', "job.loss"), ('packing = "yes"', "job.packing"),
                                       ('lora_dropout = 1.5', "job.lora_dropout"),
                                       ('optimizer = "adam"', "job.optimizer")])
def test_bad_job_keys_are_one_line_errors_with_exit_2(tmp_path, line, key):
    _project(tmp_path, line)
    with pytest.raises(UserError, match=key):
        load_project(tmp_path / "ftplan.toml")
    proc = subprocess.run([sys.executable, "-m", "ftplan.planner.cli", "launch", "--dry-run"], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and key in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("method, distributed, zero, loss", [("full", "fsdp", 3, "standard"),
                                                             ("lora", None, 0, "fused")])
def test_several_gpus_shard_in_the_job_as_in_the_estimate(tmp_path, method, distributed, zero, loss):
    cfg = load_project(_project(tmp_path, f'method = "{method}"\noptimizer = "auto"'))
    job = job_config.validate(build_job_config(cfg, "ft-test", 4, "A10G"))
    req = request_from_config(cfg, EXAMPLE, gpu_count=4, gpu="A10G")
    assert job["num_gpus"] == 4 and job["distributed"] == distributed
    assert req.resolved_zero(4) == zero  # FSDP full shard = the estimator's ZeRO-3; DDP = ZeRO-0
    assert req.loss == loss  # the job's chunked head cannot run on a sharded lm_head: it uses the standard loss
