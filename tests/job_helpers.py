"""Tiny, offline training jobs for tests: a tiny Llama config, datasets in each format, job.json.

Shared with the SSH/launch tests. Everything is built locally: the model from a config with random
weights, the tokenizer trained by the job itself on the dataset (no hub downloads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB_DIR = ROOT / "remote_job"
TRAIN_SCRIPT = JOB_DIR / "train.py"
EXAMPLE_ALPACA = JOB_DIR / "examples" / "alpaca_small.json"

# hidden 64, 2 layers, vocab 512: a few MB, a training step in milliseconds on a CPU.
TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def use_job_modules() -> None:
    """Make the flat job modules (job_data, job_config, ...) importable, as they are on the GPU box."""
    if str(JOB_DIR) not in sys.path:
        sys.path.insert(0, str(JOB_DIR))


def alpaca_records(n: int = 40) -> list[dict]:
    records = json.loads(EXAMPLE_ALPACA.read_text(encoding="utf-8"))
    return [records[i % len(records)] for i in range(n)]


def _user_text(rec: dict) -> str:
    return rec["instruction"] + ("\n\n" + rec["input"] if rec["input"] else "")


def records_in_format(fmt: str, n: int = 40) -> list[dict]:
    """The example Alpaca records rewritten as chat, sharegpt or text records."""
    out = []
    for rec in alpaca_records(n):
        if fmt == "alpaca":
            out.append(dict(rec))
        elif fmt == "chat":
            out.append({"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                     {"role": "user", "content": _user_text(rec)},
                                     {"role": "assistant", "content": rec["output"]}]})
        elif fmt == "sharegpt":
            out.append({"conversations": [{"from": "human", "value": _user_text(rec)},
                                          {"from": "gpt", "value": rec["output"]}]})
        elif fmt == "text":
            out.append({"text": f"{_user_text(rec)} {rec['output']}"})
        else:
            raise ValueError(fmt)
    return out


def write_dataset(path: Path, fmt: str = "alpaca", n: int = 40, jsonl: bool = True) -> Path:
    records = records_in_format(fmt, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def job_config(method: str = "lora", **overrides) -> dict:
    """A config for a tiny random-init Llama: a few steps, checkpoints every 2, frequent heartbeat."""
    cfg = {
        "run_id": "r-test", "method": method,
        "model": {"hf_id": "tiny-llama", "config": dict(TINY_LLAMA), "random_init": True, "tokenizer": None},
        "dataset": "data/train.jsonl", "data_format": "auto", "eval_fraction": 0.1, "max_eval_samples": 8,
        "seq_len": 96, "batch_size": 4, "grad_accum": 1, "epochs": 1, "max_steps": 4, "learning_rate": 3e-3,
        "warmup_ratio": 0.0, "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
        "optimizer": "adamw", "precision": "auto", "gradient_checkpointing": True, "packing": False, "seed": 7,
        "checkpoint_every_steps": 2, "keep_checkpoints": 2, "heartbeat_every_s": 0.5, "output_dir": "out",
        "resume": True, "merge_adapter": False, "num_gpus": 1, "distributed": None, "stop_file": "STOP",
        "throttle_s_per_step": 0, "hf_token_env": "HF_TOKEN",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def make_job(workdir: Path, method: str = "lora", fmt: str = "alpaca", n: int = 40, **overrides) -> Path:
    """Write data/train.jsonl and job.json into workdir; returns the config path."""
    write_dataset(workdir / "data" / "train.jsonl", fmt, n)
    config_path = workdir / "job.json"
    config_path.write_text(json.dumps(job_config(method, **overrides), indent=1), encoding="utf-8")
    return config_path


def job_env(extra: dict | None = None) -> dict:
    """Offline, quiet, single-threaded-ish: the job must never reach the hub in tests."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def run_job(config_path: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the job exactly as the GPU box does: `python train.py --config job.json`, from another cwd."""
    return subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--config", str(config_path)],
                          cwd=str(config_path.parent.parent), capture_output=True, text=True, timeout=timeout,
                          env=job_env(env))


def start_job(config_path: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), "--config", str(config_path)],
                            cwd=str(config_path.parent), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=job_env(env))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_metrics(out_dir: Path) -> list[dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def tiny_tokenizer(fmt: str = "alpaca", n: int = 40, vocab_size: int = 512):
    """The tokenizer the job trains for random-init models, built in-process (for data tests)."""
    use_job_modules()
    import job_model

    texts = []
    for rec in alpaca_records(n):
        texts += [rec["instruction"], rec["input"], rec["output"]]
    return job_model.train_tokenizer(texts, vocab_size)
