"""Measure the real job on a GPU and set the figures beside `ftplan estimate` for the same configuration.

Usage (repo root; ftplan need not be installed; benchmarks/gpu_calibration.sh first checks the libraries):
    python3 benchmarks/gpu_calibration.py --out DIR [--quick] [--models llama3.1-8b,mistral-7b]
        [--methods qlora,lora] [--settings 1x512,1x2048,4x1024] [--steps 6] [--budget-s 480] [--gpu NAME]
        [--work-dir DIR] [--plan-only] [--baseline-settings 1x2048,4x1024 | --no-baseline]

For each model (random weights built from the catalog's config.json, no hub), method and (batch x seq_len)
it runs `remote_job/train.py` exactly as a rented box does, reads `out/summary.json` and `out/metrics.jsonl`,
and writes DIR/calibration-measured.csv in the column layout of the published measurements, so
`benchmarks/estimate_accuracy.py --csv` can score it. `--quick` runs one tiny Llama QLoRA config for 2 steps
(the CPU smoke test).

Why the base is prebuilt once per model (in a work dir, not DIR): with `random_init` the job would build
and save a 16 GB base in every run. Here a helper process (`--build-base`) builds the model on the GPU,
saves it and the job's own BPE tokenizer once, and every run loads it as a local `hf_id`; the job's
loading, quantization, training and saving paths stay the ones users get. No merge, no evaluation,
no checkpoints: only what the estimate covers is timed.

Runs go cheapest first; a run that would not finish inside `--budget-s` is skipped and listed. The script
ends with `key: value` lines (runs, memory/throughput median abs error of the estimator on these runs).

Baseline: right after the job's QLoRA run of the first model at each of --baseline-settings, the plain
transformers Trainer + peft recipe (benchmarks/gpu_baseline.py) trains the same base on the same rows;
`job_vs_baseline_tokens_per_s` (job / baseline, higher is better) and `job_vs_baseline_peak_mem` (job /
baseline, lower is better) give the median over those pairs, each pair listed after it.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB_DIR = ROOT / "remote_job"
TRAIN_SCRIPT = JOB_DIR / "train.py"
BASELINE_SCRIPT = Path(__file__).resolve().parent / "gpu_baseline.py"
DEFAULT_BASELINE_SETTINGS = "1x2048,4x1024"
BASELINE_SLOWDOWN = 1.5  # budget guess for a baseline run: the job's run time times this
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the planner from the checkout, installed or not

GIB = 1024**3
CSV_NAME = "calibration-measured.csv"
# The column layout of shared/calibration/published-measurements.csv (what estimate_accuracy.py reads).
COLUMNS = (
    "row_id,source_id,source,source_ref,model,hf_id,size_nominal,method,precision,quantization,optimizer,"
    "lora_r,lora_alpha,lora_targets,extra_trainable,framework,gpu,gpu_mem_nominal_gb,gpu_count,nodes,"
    "parallelism,cpu_offload,micro_batch,grad_accum,seq_len,packed,grad_ckpt,attention,compile,peak_mem,"
    "peak_mem_unit,peak_mem_metric,peak_mem_scope,outcome,throughput,throughput_unit,derived_tokens_per_s_total,"
    "wall_time_s,wall_time_scope,dataset,dataset_samples,epochs_or_steps,cloud,instance_type,price_per_hour_usd,"
    "cost_usd,kind,notes"
).split(",")

JOB_MODULES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers", "safetensors")
DEFAULT_MODELS = "llama3.1-8b,mistral-7b"
DEFAULT_SETTINGS = "1x512,1x2048,4x1024"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}
METHOD_RANK = {"qlora": 0, "lora": 1}
MAX_FAILURES_IN_A_ROW = 2  # the same broken environment would fail every run: stop spending device time
JOB_OPTIMIZER = "paged_adamw_8bit"  # ftplan's project default for every method
ESTIMATOR_OPTIMIZER = {"paged_adamw_8bit": "paged_adamw8bit", "adamw_8bit": "adamw8bit", "adamw": "adamw"}
# hidden 64, 2 layers: the --quick smoke run (the same shape as tests/job_helpers.TINY_LLAMA).
TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
RECORDS = 32  # >= steps x the largest batch, so no row is seen twice in a default run

# Budget model before anything is measured (replaced by measurements as runs finish): process start,
# imports, tokenizing and loading a 16 GB base from the page cache; building + saving a base; the
# share of the estimator's tokens/s reached (pessimistic, so early runs are not cut at the deadline).
FIRST_OVERHEAD_S = {"cuda": 45.0, "cpu": 20.0}
BUILD_S_PER_GB = 3.5
BUILD_FIXED_S = 15.0
FIRST_SPEED_RATIO = 0.5
DEADLINE_MARGIN_S = 10.0


class UsageError(Exception):
    """Bad arguments: one `error: ...` line, exit 2 (ftplan.planner.errors.UserError is caught the same way)."""


# ----------------------------------------------------------------------------------------- the plan
@dataclass
class ModelUnderTest:
    key: str            # catalog name, e.g. llama3.1-8b
    name: str           # the CSV's model column: the hub id's last part (what estimate_accuracy matches)
    hf_id: str
    config: dict        # config.json for AutoConfig.for_model
    spec: object        # ftplan.planner.estimate.models.ModelSpec
    params: int


@dataclass
class Run:
    model: ModelUnderTest
    method: str
    batch: int
    seq_len: int
    steps: int
    predicted: dict | None = None        # the estimator's figures for this configuration
    result: dict = field(default_factory=dict)
    wants_baseline: bool = False
    baseline: dict | None = None         # gpu_baseline.py's result for the same configuration

    @property
    def run_id(self) -> str:
        return f"{self.model.key}-{self.method}-b{self.batch}-s{self.seq_len}"

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


def csv_model_name(hf_id: str | None, key: str) -> str:
    return hf_id.rsplit("/", 1)[-1] if hf_id else key


def resolve_models(names: list[str]) -> list[ModelUnderTest]:
    from ftplan.planner.estimate.models import resolve_model

    out = []
    for name in names:
        spec = resolve_model(name)
        if spec.is_encoder:
            raise UsageError(f"model '{name}' is an encoder; the job fine-tunes causal LMs, pick a decoder")
        out.append(ModelUnderTest(key=spec.name, name=csv_model_name(spec.hf_id, spec.name), hf_id=spec.hf_id or "",
                                  config=spec.to_hf_config(), spec=spec, params=spec.params_total()))
    return out


def tiny_model() -> ModelUnderTest:
    from ftplan.planner.estimate.models import from_hf_config

    spec = from_hf_config(dict(TINY_LLAMA), name="ftplan-tiny-llama")
    # Not "tiny-llama": estimate_accuracy.py would take that for TinyLlama-1.1B and score the smoke row.
    return ModelUnderTest(key="tiny-llama", name="ftplan smoke model (llama, hidden 64, 2 layers)", hf_id="",
                          config=dict(TINY_LLAMA), spec=spec, params=spec.params_total())


def parse_list(text: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"--{what} is empty; give a comma-separated list")
    bad = [t for t in items if allowed is not None and t not in allowed]
    if bad:
        raise UsageError(f"unknown {what} '{bad[0]}'; choose from {', '.join(allowed)}")
    return items


def parse_settings(text: str) -> list[tuple[int, int]]:
    out = []
    for item in parse_list(text, None, "settings"):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise UsageError(f"bad setting '{item}'; write BATCHxSEQ_LEN, e.g. 1x512,4x1024")
        out.append((int(parts[0]), int(parts[1])))
    return out


def predict(run: Run, gpu_name: str, precision: str) -> dict:
    """The estimator's figures for exactly the configuration the job runs."""
    from ftplan.planner.estimate.estimator import EstimateRequest, estimate
    from ftplan.planner.estimate.gpus import resolve_gpu

    req = EstimateRequest(model=run.model.spec, method=run.method, seq_len=run.seq_len, batch_size=run.batch,
                          grad_accum=1, lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_targets=LORA["targets"],
                          lora_dropout=LORA["dropout"], optimizer=ESTIMATOR_OPTIMIZER[JOB_OPTIMIZER],
                          precision=precision, grad_checkpointing=True, attention="sdpa", double_quant=True,
                          framework="hf")
    est = estimate(req, resolve_gpu(gpu_name), 1)
    return {"gpu": est.gpu.name, "allocated_gib": est.memory.allocated, "reserved_gib": est.memory.reserved,
            "total_gib": est.memory.total, "tokens_per_s": est.tokens_per_s}


# ----------------------------------------------------------------------------------------- data
def synthetic_alpaca(path: Path, max_seq_len: int, n: int = RECORDS, seed: int = 0) -> None:
    """Alpaca records with a short prompt and a response longer than the longest seq_len, so every
    training row is filled to seq_len (the estimator assumes full rows). Pseudo-words from a few
    thousand-word vocabulary: the BPE trained on them gives about one token per word."""
    import random

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(3000)})
    words = int(max_seq_len * 1.5) + 64
    records = [{"instruction": f"Write a long note about topic {i}.", "input": "",
                "output": " ".join(rng.choice(vocab) for _ in range(words))} for i in range(n)]
    path.write_text(json.dumps(records), encoding="utf-8")


# ----------------------------------------------------------------------------------------- helper process
def build_base(spec_path: Path) -> int:
    """`--build-base SPEC`: the model with random weights (on the GPU when there is one) and the job's own
    tokenizer, saved once for all runs of this model; device facts go to build.json."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    dest = Path(spec["dest"])
    t0 = time.time()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(JOB_DIR))
    import job_model  # the tokenizer the job itself trains for random-init models

    records = json.loads(Path(spec["dataset"]).read_text(encoding="utf-8"))
    texts = [t for r in records for t in (r["instruction"], r["input"], r["output"]) if t]
    conf = dict(spec["config"])
    tok = job_model.train_tokenizer(texts, conf.get("vocab_size") or 32000)
    tok.save_pretrained(dest / "tokenizer")

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    hf_config = AutoConfig.for_model(conf.pop("model_type"), **conf)
    torch.manual_seed(spec["seed"])
    try:
        with torch.device(device):  # normal_ init of 8B weights takes a second on a GPU, minutes on CPU
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except RuntimeError:
        if not cuda:
            raise
        device = "cpu (cuda init failed)"
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    attn = getattr(model.config, "_attn_implementation", None)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(dest / "model")
    del model
    info = {"device": "cuda" if cuda else "cpu", "built_on": device,
            "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
            "cuda_version": torch.version.cuda, "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
            "attn_implementation": attn, "params": params, "dtype": str(dtype).replace("torch.", ""),
            "build_s": round(time.time() - t0, 2)}
    (dest / "build.json").write_text(json.dumps(info), encoding="utf-8")
    return 0


def job_env(device_hint: str) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    if device_hint == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")  # the CPU smoke run shares small CI machines
    return env


def run_process(cmd: list[str], cwd: Path, log_path: Path, timeout_s: float, env: dict) -> tuple[int | None, float]:
    """Run with output to a log file; past the timeout, SIGTERM (the job checkpoints and stops), then kill."""
    t0 = time.time()
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=str(cwd), stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = None
    return rc, time.time() - t0


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------- measuring
def steady_tokens_per_s(metrics: list[dict], warmup: int) -> tuple[float | None, int]:
    """tokens/s over the steps after the first `warmup` (kernel selection, allocator growth, paged
    optimizer setup happen there); returns (tokens/s, steps in the window)."""
    steps = sorted((m for m in metrics if "tokens_seen" in m), key=lambda m: m["step"])
    if len(steps) < 2:
        return None, 0
    w = min(warmup, len(steps) - 1)
    first, last = steps[w - 1], steps[-1]
    dt = last["elapsed_s"] - first["elapsed_s"]
    if dt <= 0:
        return None, 0
    return (last["tokens_seen"] - first["tokens_seen"]) / dt, len(steps) - w


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def job_config(run: Run, base: Path, dataset: Path) -> dict:
    return {
        "run_id": run.run_id, "method": run.method,
        "model": {"hf_id": str(base / "model"), "config": None, "random_init": False,
                  "tokenizer": str(base / "tokenizer")},
        "dataset": str(dataset), "data_format": "alpaca", "eval_fraction": 0.0, "max_eval_samples": 0,
        "seq_len": run.seq_len, "batch_size": run.batch, "grad_accum": 1, "max_steps": run.steps,
        "warmup_ratio": 0.0, "lora": dict(LORA), "optimizer": JOB_OPTIMIZER, "precision": "auto",
        "gradient_checkpointing": True, "packing": False, "seed": 42,
        "checkpoint_every_steps": 100000, "keep_checkpoints": 1, "output_dir": "out",
        # No heartbeat ticks during a run: the thread and the main thread share one temp file name in
        # job_progress.write_json_atomic, and a collision fails the job at "saving" (reported).
        "heartbeat_every_s": 86400,
        "resume": False, "merge_adapter": False, "num_gpus": 1,
    }


def versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def estimator_precision(job_precision: str | None) -> str:
    return {"bf16": "bf16-mixed", "fp16": "fp16-mixed", "fp32": "fp32"}.get(job_precision or "", "bf16-mixed")


def csv_row(n: int, run: Run, source_id: str, gpu_row: dict, vers: dict) -> dict:
    r, s = run.result, run.result["summary"]
    cuda = s.get("device") == "cuda"
    precision = {"bf16": "bf16 autocast; frozen base bf16, LoRA weights fp32 (peft)",
                 "fp32": "fp32 (CPU run)"}.get(s.get("precision"), f"{s.get('precision')} autocast")
    notes = [f"torch {vers['torch']}, transformers {vers['transformers']}, peft {vers['peft']}, "
             f"bitsandbytes {vers['bitsandbytes']}, accelerate {vers['accelerate']}",
             f"device {s.get('gpu_name') or 'cpu'}" + (f" (CUDA {r['build'].get('cuda_version')})" if cuda else ""),
             "random weights built from the config (no hub download); the job's own byte-level BPE",
             f"{s.get('steps')} steps; tokens/s over the last {r['window_steps']} (first ones are warm-up); "
             f"whole-session tokens/s {s.get('tokens_per_s')}",
             f"peak reserved {s.get('peak_mem_reserved_gib')} GiB; peaks cover the whole process incl. loading",
             f"attention {r['build'].get('attn_implementation')}; default CUDA allocator settings",
             f"loss {s.get('loss', 'standard')} (remote_job/job_loss.py)"]
    if r.get("rows_not_full"):
        notes.append(r["rows_not_full"])
    row = dict.fromkeys(COLUMNS, "")
    row.update({
        "row_id": n, "source_id": source_id,
        "source": "ftplan benchmarks/gpu_calibration.py: remote_job/train.py on a random-weight model",
        "source_ref": "benchmarks/gpu_calibration.py; remote_job/train.py",
        "model": run.model.name, "hf_id": run.model.hf_id, "size_nominal": f"{run.model.params / 1e9:.1f}B" if run.model.params >= 1e8 else f"{run.model.params / 1e6:.2f}M",
        "method": run.method, "precision": precision,
        "quantization": f"bitsandbytes nf4, double quant, compute {s.get('precision')}" if run.method == "qlora" else "",
        "optimizer": f"{JOB_OPTIMIZER} (bitsandbytes)", "lora_r": LORA["r"], "lora_alpha": LORA["alpha"],
        "lora_targets": "all-linear", "extra_trainable": "",
        "framework": "ftplan remote_job (transformers + peft + accelerate)",
        "gpu": gpu_row["gpu"], "gpu_mem_nominal_gb": gpu_row["mem"], "gpu_count": 1, "nodes": 1,
        "parallelism": "single", "cpu_offload": "no", "micro_batch": run.batch, "grad_accum": 1,
        "seq_len": run.seq_len, "packed": "no (every row is filled to seq_len)",
        "grad_ckpt": "yes (non-reentrant)", "attention": r["build"].get("attn_implementation") or "default",
        "compile": "no", "peak_mem": round(s["peak_mem_allocated_gib"], 3), "peak_mem_unit": "GiB (binary)",
        "peak_mem_metric": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS (CPU run)",
        "peak_mem_scope": "per_gpu", "outcome": "ran", "throughput": round(r["tokens_per_s"], 1),
        "throughput_unit": "tokens/s per GPU", "derived_tokens_per_s_total": round(r["tokens_per_s"], 1),
        "wall_time_s": round(r["wall_s"], 1),
        "wall_time_scope": "whole job process: start, load, steps, save adapter",
        "dataset": "synthetic alpaca (pseudo-words; responses longer than seq_len)",
        "dataset_samples": RECORDS, "epochs_or_steps": f"{s.get('steps')} steps", "kind": "measured",
        "notes": "; ".join(notes),
    })
    return row


# ----------------------------------------------------------------------------------------- the session
class Session:
    def __init__(self, args, out: Path, work: Path):
        self.args = args
        self.out = out
        self.work = work
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.bases: dict[str, Path] = {}
        self.build_info: dict[str, dict] = {}
        self.overheads: list[float] = []
        self.speed_ratios: list[float] = []
        self.build_rate: float | None = None  # seconds per GB of base, once one was built
        self.device_hint = "cuda" if shutil.which("nvidia-smi") else "cpu"
        self.dataset = work / "alpaca_synthetic.json"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def predicted_run_s(self, run: Run) -> float:
        overhead = max(self.overheads) if self.overheads else FIRST_OVERHEAD_S[self.device_hint]
        if run.predicted is None or self.device_hint == "cpu":
            return overhead + run.steps * 2.0
        ratio = statistics.median(self.speed_ratios) if self.speed_ratios else FIRST_SPEED_RATIO
        return overhead + run.steps * run.tokens_per_step / (run.predicted["tokens_per_s"] * ratio)

    def predicted_build_s(self, model: ModelUnderTest) -> float:
        if model.key in self.bases:
            return 0.0
        gb = model.params * 2 / 1e9
        return BUILD_FIXED_S + gb * (self.build_rate or BUILD_S_PER_GB)

    def ensure_base(self, model: ModelUnderTest, pending: list[Run]) -> Path:
        if model.key in self.bases:
            return self.bases[model.key]
        need = model.params * (2 if self.device_hint == "cuda" else 4) * 1.1 + GIB
        self.work.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(self.work).free < need:
            self.drop_unused_bases(pending)
        free = shutil.disk_usage(self.work).free
        if free < need:
            raise RuntimeError(f"not enough disk in {self.work} for the {model.key} base: "
                               f"{need / GIB:.1f} GiB needed, {free / GIB:.1f} GiB free (--work-dir elsewhere)")
        dest = self.work / "bases" / model.key
        dest.mkdir(parents=True, exist_ok=True)
        spec = dest / "spec.json"
        spec.write_text(json.dumps({"dest": str(dest), "config": model.config, "dataset": str(self.dataset),
                                    "seed": 42}), encoding="utf-8")
        log = dest / "build.log"
        print(f"building {model.key} ({model.params / 1e9:.2f}B params, random weights) ...", flush=True)
        rc, wall = run_process([sys.executable, str(Path(__file__).resolve()), "--build-base", str(spec)],
                               dest, log, self.left(), job_env(self.device_hint))
        (self.out / "builds").mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, self.out / "builds" / f"{model.key}.log")
        if rc != 0 or not (dest / "build.json").exists():
            raise RuntimeError(f"building the {model.key} base failed (rc {rc}):\n{tail(log)}")
        info = json.loads((dest / "build.json").read_text(encoding="utf-8"))
        self.device_hint = info["device"]
        self.build_rate = max(0.0, wall - BUILD_FIXED_S) / max(model.params * 2 / 1e9, 1e-9)
        print(f"built {model.key} in {wall:.1f}s on {info['built_on']} ({info.get('gpu_name') or 'no GPU'}, "
              f"attention {info['attn_implementation']})", flush=True)
        self.bases[model.key] = dest
        self.build_info[model.key] = info
        return dest

    def drop_unused_bases(self, pending: list[Run]) -> None:
        wanted = {r.model.key for r in pending}
        for key in [k for k in self.bases if k not in wanted]:
            shutil.rmtree(self.bases.pop(key), ignore_errors=True)

    def execute(self, run: Run, base: Path) -> None:
        run_dir = self.work / "runs" / run.run_id
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        cfg_path = run_dir / "job.json"
        cfg_path.write_text(json.dumps(job_config(run, base, self.dataset), indent=1), encoding="utf-8")
        rc, wall = run_process([sys.executable, str(TRAIN_SCRIPT), "--config", str(cfg_path)], run_dir,
                               run_dir / "job.log", self.left(), job_env(self.device_hint))
        out_dir = run_dir / "out"
        keep = self.out / "runs" / run.run_id
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("summary.json", "metrics.jsonl", "train.log"):
            if (out_dir / name).exists():
                shutil.copy2(out_dir / name, keep / name)
        shutil.copy2(cfg_path, keep / "job.json")
        shutil.copy2(run_dir / "job.log", keep / "job.log")  # stderr too: a crash before train.log exists
        summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8")) \
            if (out_dir / "summary.json").exists() else {"status": "failed", "error": "no summary.json"}
        metrics = read_metrics(out_dir / "metrics.jsonl")
        tps, window = steady_tokens_per_s(metrics, self.args.warmup_steps)
        run.result = {"rc": rc, "wall_s": wall, "summary": summary, "tokens_per_s": tps, "window_steps": window,
                      "build": self.build_info[run.model.key]}
        shutil.rmtree(run_dir, ignore_errors=True)  # the adapter is not needed; keep the disk for bases
        if rc is None:
            run.result["error"] = f"stopped at the budget deadline after {wall:.0f}s"
            return
        if summary.get("status") != "succeeded" or tps is None or summary.get("peak_mem_allocated_gib") is None:
            run.result["error"] = f"rc {rc}, status {summary.get('status')}: {summary.get('error')}"
            return
        step_tokens = [m["tokens_seen"] for m in metrics if "tokens_seen" in m]
        per_step = [b - a for a, b in zip([0, *step_tokens], step_tokens, strict=False)]
        if any(t != run.tokens_per_step for t in per_step):
            run.result["rows_not_full"] = (f"rows not full: tokens per step {per_step}, expected "
                                           f"{run.tokens_per_step}")
        train_s = (summary.get("durations_s") or {}).get("train") or 0.0
        self.overheads.append(max(0.0, wall - train_s))
        if run.predicted and summary.get("device") == "cuda":
            self.speed_ratios.append(tps / run.predicted["tokens_per_s"])


    def execute_baseline(self, run: Run, base: Path) -> None:
        """The plain Trainer + peft recipe on the same base, rows and steps (benchmarks/gpu_baseline.py)."""
        run_dir = self.work / "baselines" / run.run_id
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        spec = {"base": str(base), "dataset": str(self.dataset), "method": run.method, "batch": run.batch,
                "seq_len": run.seq_len, "steps": run.steps, "warmup_steps": self.args.warmup_steps,
                "lora": dict(LORA), "work": str(run_dir / "trainer"), "result": str(run_dir / "result.json")}
        (run_dir / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        log = run_dir / "baseline.log"
        print(f"baseline {run.run_id} (transformers Trainer + peft, {run.steps} steps) ...", flush=True)
        rc, wall = run_process([sys.executable, str(BASELINE_SCRIPT), "--spec", str(run_dir / "spec.json")],
                               run_dir, log, self.left(), job_env(self.device_hint))
        keep = self.out / "runs" / run.run_id
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, keep / "baseline.log")
        result = run_dir / "result.json"
        if rc == 0 and result.exists():
            run.baseline = {**json.loads(result.read_text(encoding="utf-8")), "wall_s": round(wall, 1)}
        else:
            run.baseline = {"error": f"rc {rc}" + (" (stopped at the budget deadline)" if rc is None else ""),
                            "wall_s": round(wall, 1)}
            print(f"baseline {run.run_id} failed: {run.baseline['error']}\n{tail(log)}", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def job_vs_baseline(run: Run) -> tuple[float, float] | None:
    """(job tokens/s / baseline tokens/s, job peak / baseline peak), or None without both measurements."""
    b = run.baseline or {}
    job_tps, job_peak = run.result.get("tokens_per_s"), run.result.get("summary", {}).get("peak_mem_allocated_gib")
    if not (b.get("tokens_per_s") and b.get("peak_mem_allocated_gib") and job_tps and job_peak):
        return None
    return job_tps / b["tokens_per_s"], job_peak / b["peak_mem_allocated_gib"]


def baseline_line(run: Run) -> str:
    b, s = run.baseline, run.result["summary"]
    ratios = job_vs_baseline(run)
    if ratios is None:
        return f"baseline {run.run_id}: {b.get('error', 'no measurement')}"
    return (f"baseline {run.run_id}: tokens/s {b['tokens_per_s']:.0f} (job {run.result['tokens_per_s']:.0f}, "
            f"x{ratios[0]:.2f}) | peak allocated {b['peak_mem_allocated_gib']:.2f} GiB (job "
            f"{s['peak_mem_allocated_gib']:.2f}, x{ratios[1]:.2f}) | job loss {s.get('loss', '?')}, "
            f"optimizer {s.get('optimizer', '?')}")


def fmt_err(pred: float | None, meas: float | None) -> str:
    if pred is None or not meas:
        return "n/a"
    return f"{(pred - meas) / meas:+.1%}"


def comparable(run: Run, gpu_row: dict) -> bool:
    """Measured on a GPU, and estimated for that same GPU (not the reference one a CPU run is shown with)."""
    return run.result["summary"].get("device") == "cuda" and run.predicted["gpu"] == gpu_row["gpu"]


def report_line(run: Run, on_gpu: bool) -> str:
    """Measured beside estimated; the error only where both are GPU figures (a CPU run has RSS and CPU speed)."""
    r, s, p = run.result, run.result["summary"], run.predicted or {}
    mem_err = f", {fmt_err(p.get('allocated_gib'), s['peak_mem_allocated_gib'])}" if on_gpu else ""
    tps_err = f", {fmt_err(p.get('tokens_per_s'), r['tokens_per_s'])}" if on_gpu else ""
    return (f"{run.run_id}: peak allocated {s['peak_mem_allocated_gib']:.2f} GiB (estimate "
            f"{p.get('allocated_gib', 0):.2f} on {p.get('gpu', '?')}{mem_err}), reserved "
            f"{s['peak_mem_reserved_gib']:.2f} (estimate {p.get('reserved_gib', 0):.2f}) | tokens/s "
            f"{r['tokens_per_s']:.0f} (estimate {p.get('tokens_per_s', 0):.0f}{tps_err}) | wall {r['wall_s']:.0f}s"
            + (f" | {r['rows_not_full']}" if r.get("rows_not_full") else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="calibration-out", help="where the CSV and per-run summaries go")
    parser.add_argument("--quick", action="store_true", help="one tiny Llama QLoRA run, 2 steps (CPU smoke test)")
    parser.add_argument("--models", default=DEFAULT_MODELS, help="catalog names, comma-separated")
    parser.add_argument("--methods", default="qlora,lora")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="BATCHxSEQ_LEN, comma-separated")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of tokens/s")
    parser.add_argument("--budget-s", type=float, default=480, help="total seconds, building bases included")
    parser.add_argument("--gpu", default=None, help="GPU table name for the estimate (default: the device's)")
    parser.add_argument("--work-dir", default=None, help="bases and run folders (default: a temp dir, removed)")
    parser.add_argument("--plan-only", action="store_true", help="print the run order and predicted seconds; run nothing")
    parser.add_argument("--baseline-settings", default=DEFAULT_BASELINE_SETTINGS,
                        help="BATCHxSEQ_LEN of the first model's QLoRA runs that also get the Trainer+peft baseline")
    parser.add_argument("--no-baseline", action="store_true", help="skip the transformers+peft baseline runs")
    parser.add_argument("--build-base", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build_base:
        return build_base(Path(args.build_base))
    try:
        return calibrate(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # ftplan.planner.errors.UserError: the same one-line contract as the CLI
        if type(exc).__name__ in ("UserError", "CatalogError"):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


def calibrate(args) -> int:
    if args.budget_s <= 0:
        raise UsageError(f"--budget-s must be positive, got {args.budget_s:g}")
    if args.steps < 2 or args.warmup_steps < 1 or args.warmup_steps >= max(args.steps, 2):
        raise UsageError("--steps must be >= 2 and --warmup-steps between 1 and steps-1 (tokens/s needs a "
                         "window after the warm-up)")
    try:
        import ftplan.planner.estimate.estimator  # noqa: F401 - pydantic is the planner's one dependency
    except ImportError as exc:
        raise UsageError(f"the planner cannot be imported ({exc}); run benchmarks/gpu_calibration.sh, which "
                         "installs what is missing") from None
    missing = [m for m in JOB_MODULES if importlib.util.find_spec(m) is None]
    if missing and not args.plan_only:
        raise UsageError(f"the job needs {', '.join(missing)} in this Python ({sys.executable}); run "
                         "benchmarks/gpu_calibration.sh or pip install -r remote_job/requirements.txt")
    if args.quick:
        args.steps, args.warmup_steps = 2, 1
        models, methods, settings = [tiny_model()], ["qlora"], [(1, 128)]
        baseline_settings = [(1, 128)]
    else:
        models = resolve_models(parse_list(args.models, None, "models"))
        methods = parse_list(args.methods, ("qlora", "lora"), "methods")
        settings = parse_settings(args.settings)
        baseline_settings = parse_settings(args.baseline_settings)
    args.baseline_settings = [] if args.no_baseline else baseline_settings
    if args.gpu:
        from ftplan.planner.estimate.gpus import resolve_gpu

        resolve_gpu(args.gpu)  # UserError naming close matches
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    own_work = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="ftplan-calibration-")) if own_work else Path(args.work_dir).resolve()
    os.environ.setdefault("FTPLAN_CACHE_DIR", str(work / "ftplan-cache"))  # no user cache dir needed
    session = Session(args, out, work)
    try:
        return _calibrate(session, models, methods, settings)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _calibrate(session: Session, models: list[ModelUnderTest], methods: list[str],
               settings: list[tuple[int, int]]) -> int:
    args = session.args
    vers = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)
    session.work.mkdir(parents=True, exist_ok=True)
    synthetic_alpaca(session.dataset, max(s for _, s in settings))
    runs = [Run(m, meth, b, s, args.steps) for m in models for meth in methods for b, s in settings]
    for run in runs:
        run.wants_baseline = (run.model is models[0] and run.method == "qlora"
                              and (run.batch, run.seq_len) in args.baseline_settings)
    # The estimator's GPU: --gpu, else the device's own name once a base is built; until then the
    # reference (H200, the lent machine) only orders the runs.
    ref_gpu = args.gpu or "H200"
    for run in runs:
        run.predicted = predict(run, ref_gpu, "bf16-mixed")
    # Cheapest first: fewest tokens per step, then QLoRA (what ftplan launches) before LoRA, smaller model
    # first. Process start and loading dominate a 6-step run, so the first runs cover every model early.
    runs.sort(key=lambda r: (r.tokens_per_step, METHOD_RANK[r.method], r.model.params, r.seq_len))
    if args.plan_only:
        session.device_hint = "cuda"  # the schedule the GPU box would follow, with the first-run guesses
        t = 0.0
        for run in runs:
            built = set(session.bases)
            step = session.predicted_build_s(run.model) + session.predicted_run_s(run) * (
                1 + BASELINE_SLOWDOWN * run.wants_baseline)
            session.bases.setdefault(run.model.key, Path())
            t += step
            mark = "" if t <= args.budget_s - DEADLINE_MARGIN_S else "  (past the budget: would be skipped)"
            print(f"{run.run_id}: ~{step:.0f}s{' incl. building the base' if run.model.key not in built else ''}"
                  f"{' with the baseline' if run.wants_baseline else ''}, cumulative ~{t:.0f}s{mark}")
        session.bases.clear()
        return 0
    done: list[Run] = []
    skipped: list[tuple[Run, str]] = []
    gpu_row = {"gpu": "cpu", "mem": ""}
    pending = list(runs)
    broken: dict[str, str] = {}  # model -> why its base could not be built
    failures_in_a_row = 0
    while pending:
        run = pending.pop(0)
        if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            skipped.append((run, f"not run: the last {failures_in_a_row} runs failed (see above)"))
            continue
        if run.model.key in broken:
            skipped.append((run, broken[run.model.key]))
            continue
        need = session.predicted_build_s(run.model) + session.predicted_run_s(run)
        left = session.left() - DEADLINE_MARGIN_S
        if need > left:
            skipped.append((run, f"needs ~{need:.0f}s, {max(left, 0):.0f}s of the budget left"))
            print(f"skip {run.run_id}: {skipped[-1][1]}", flush=True)
            continue
        try:
            base = session.ensure_base(run.model, [run, *pending])
        except RuntimeError as exc:
            broken[run.model.key] = str(exc).splitlines()[0]
            skipped.append((run, broken[run.model.key]))
            print(f"skip {run.run_id}: {exc}", flush=True)
            failures_in_a_row += 1
            continue
        info = session.build_info[run.model.key]
        if info["device"] == "cuda":  # a CPU run never gets a GPU name in the CSV, --gpu or not
            gpu_row = _gpu_row(args.gpu or info.get("gpu_name"), gpu_row)
        print(f"run {run.run_id} ({run.steps} steps) ...", flush=True)
        session.execute(run, base)
        if "error" in run.result:
            skipped.append((run, run.result["error"]))
            print(f"failed {run.run_id}: {run.result['error']}\n{tail(session.out / 'runs' / run.run_id / 'job.log')}",
                  flush=True)
            failures_in_a_row += 1
            continue
        failures_in_a_row = 0
        s = run.result["summary"]
        estimate_gpu = gpu_row["gpu"] if gpu_row["mem"] else ref_gpu  # the table's name, once resolved
        run.predicted = predict(run, estimate_gpu, estimator_precision(s.get("precision")))
        done.append(run)
        print(report_line(run, comparable(run, gpu_row)), flush=True)
        if run.wants_baseline:
            need = session.predicted_run_s(run) * BASELINE_SLOWDOWN
            if need > session.left() - DEADLINE_MARGIN_S:
                run.baseline = {"error": f"not run: needs ~{need:.0f}s, {max(session.left(), 0):.0f}s left"}
            else:
                session.execute_baseline(run, base)
            print(baseline_line(run), flush=True)
        session.drop_unused_bases(pending)
    return _write_and_summarize(session, done, skipped, gpu_row, vers)


def _gpu_row(device_name: str, current: dict) -> dict:
    from ftplan.planner.estimate.gpus import resolve_gpu

    try:
        gpu = resolve_gpu(device_name)
    except Exception as exc:  # noqa: BLE001 - an unknown card still yields measurements
        print(f"note: GPU '{device_name}' is not in the GPU table ({exc}); pass --gpu NAME for the estimate",
              flush=True)
        return {"gpu": device_name, "mem": ""} if current["gpu"] == "cpu" else current
    return {"gpu": gpu.name, "mem": f"{gpu.memory_gib:g}"}


def _write_and_summarize(session: Session, done: list[Run], skipped: list[tuple[Run, str]], gpu_row: dict,
                         vers: dict) -> int:
    source_id = "FTPLAN-" + datetime.now(timezone.utc).strftime("%Y%m%d")
    rows = [csv_row(i, run, source_id, gpu_row, vers) for i, run in enumerate(done, 1)]
    with (session.out / CSV_NAME).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    on_gpu = [r for r in done if comparable(r, gpu_row)]
    mem_err = [abs(r.predicted["allocated_gib"] - r.result["summary"]["peak_mem_allocated_gib"])
               / r.result["summary"]["peak_mem_allocated_gib"] for r in on_gpu]
    tps_err = [abs(r.predicted["tokens_per_s"] - r.result["tokens_per_s"]) / r.result["tokens_per_s"] for r in on_gpu]
    record = {"source_id": source_id, "versions": vers, "gpu": gpu_row, "budget_s": session.args.budget_s,
              "runs": [{"run_id": r.run_id, "predicted": r.predicted, "tokens_per_s": r.result["tokens_per_s"],
                        "peak_mem_allocated_gib": r.result["summary"]["peak_mem_allocated_gib"],
                        "peak_mem_reserved_gib": r.result["summary"]["peak_mem_reserved_gib"],
                        "wall_s": r.result["wall_s"], "device": r.result["summary"].get("device"),
                        "loss": r.result["summary"].get("loss"), "baseline": r.baseline} for r in done],
              "skipped": [{"run_id": r.run_id, "why": why} for r, why in skipped]}
    (session.out / "calibration-runs.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    if skipped:
        print("\nskipped:")
        for run, why in skipped:
            print(f"  {run.run_id}: {why}")
    if done and not on_gpu:
        print("\nno run on a GPU of the table: estimator errors are not computed (CPU RSS and CPU speed are "
              "not GPU figures; an unknown GPU needs --gpu NAME)")
    print(f"\ncsv: {session.out / CSV_NAME}")
    print(f"runs: {len(done)}")
    print(f"skipped: {len(skipped)}")
    print(f"elapsed_s: {time.monotonic() - session.started:.0f}")
    print(f"memory_median_abs_err: {statistics.median(mem_err):.3f}" if mem_err else "memory_median_abs_err: n/a")
    print(f"memory_max_abs_err: {max(mem_err):.3f}" if mem_err else "memory_max_abs_err: n/a")
    print(f"throughput_median_abs_err: {statistics.median(tps_err):.3f}" if tps_err
          else "throughput_median_abs_err: n/a")
    pairs = [(r, job_vs_baseline(r)) for r in done if r.baseline]
    pairs = [(r, ratio) for r, ratio in pairs if ratio is not None]
    for i, what in enumerate(("tokens_per_s", "peak_mem")):
        each = ", ".join(f"{r.batch}x{r.seq_len} {ratio[i]:.2f}" for r, ratio in pairs)
        print(f"job_vs_baseline_{what}: {statistics.median(ratio[i] for _, ratio in pairs):.3f} ({each})"
              if pairs else f"job_vs_baseline_{what}: n/a")
    return 0 if done else 1


if __name__ == "__main__":
    raise SystemExit(main())
