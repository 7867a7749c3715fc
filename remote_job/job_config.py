"""The job's one JSON config: defaults, validation, path resolution.

Plain Python on purpose: the GPU box has only torch/transformers/peft/bitsandbytes, no pydantic.
Every key is documented in CONFIG.md; an unknown key is an error so a typo never silently trains
with a default.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

METHODS = ("qlora", "lora", "full")
DATA_FORMATS = ("auto", "alpaca", "chat", "sharegpt", "text")
OPTIMIZERS = ("auto", "paged_adamw_8bit", "adamw_8bit", "paged_adamw", "adamw")  # job_optim.py
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DISTRIBUTED = (None, "ddp", "fsdp", "zero2", "zero3")
LOSSES = ("fused", "chunked", "standard")  # job_loss.py: fused = Liger on CUDA, else chunked

DEFAULTS: dict[str, Any] = {
    "run_id": "run",
    "method": "qlora",
    "model": {"hf_id": None, "config": None, "random_init": False, "tokenizer": None},
    "dataset": None,
    "data_format": "auto",
    "eval_fraction": 0.1,
    "max_eval_samples": 200,
    "seq_len": 512,
    "batch_size": 1,
    "grad_accum": 1,
    "epochs": 1,
    "max_steps": None,
    "learning_rate": 2e-4,
    "warmup_ratio": 0.03,
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"},
    "optimizer": "auto",
    "precision": "auto",
    "gradient_checkpointing": True,
    "packing": False,
    "loss": "fused",
    "seed": 42,
    "checkpoint_every_steps": 50,
    "keep_checkpoints": 2,
    "heartbeat_every_s": 5,
    "output_dir": "out",
    "resume": True,
    "merge_adapter": False,
    "num_gpus": 1,
    "expect_gpu": None,  # true: the machine was rented with GPUs; the job refuses to fall back to the CPU
    "distributed": None,
    "nnodes": 1,             # > 1: torchrun's c10d rendezvous over several machines (job_distributed.py)
    "node_rank": 0,
    "rdzv_endpoint": None,   # "host:port" every node reaches (node 0's private address)
    "rdzv_id": None,         # default: run_id
    "stop_file": "STOP",
    "throttle_s_per_step": 0,
    "hf_token_env": "HF_TOKEN",
}


class JobConfigError(ValueError):
    """The config or the data is wrong; the message says what and how to fix it."""


def _merge(section: str, defaults: dict, given: Any) -> dict:
    if given is None:
        return copy.deepcopy(defaults)
    if not isinstance(given, dict):
        raise JobConfigError(f"'{section}' must be an object, got {type(given).__name__}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise JobConfigError(f"unknown key(s) in '{section}': {', '.join(unknown)}; allowed: {', '.join(defaults)}")
    out = copy.deepcopy(defaults)
    out.update(given)
    return out


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise JobConfigError(message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate(raw: Any) -> dict:
    """Return a complete config (defaults filled in) or raise JobConfigError naming the bad key."""
    if not isinstance(raw, dict):
        raise JobConfigError("the job config must be a JSON object")
    cfg = _merge("config", DEFAULTS, raw)
    cfg["model"] = _merge("model", DEFAULTS["model"], raw.get("model"))
    cfg["lora"] = _merge("lora", DEFAULTS["lora"], raw.get("lora"))

    _check(isinstance(cfg["run_id"], str) and cfg["run_id"] != "", "'run_id' must be a non-empty string")
    _check(cfg["method"] in METHODS, f"'method' must be one of {', '.join(METHODS)}, got {cfg['method']!r}")
    model = cfg["model"]
    if model["random_init"]:
        _check(isinstance(model["config"], dict) and "model_type" in model["config"],
               "'model.random_init' needs 'model.config': a config.json object with a 'model_type'")
    else:
        _check(isinstance(model["hf_id"], str) and model["hf_id"] != "",
               "'model.hf_id' is required unless 'model.random_init' is true")
    _check(model["tokenizer"] is None or isinstance(model["tokenizer"], str),
           "'model.tokenizer' must be null or a path/hub id string")
    _check(isinstance(cfg["dataset"], str) and cfg["dataset"] != "", "'dataset' (a file path) is required")
    _check(cfg["data_format"] in DATA_FORMATS,
           f"'data_format' must be one of {', '.join(DATA_FORMATS)}, got {cfg['data_format']!r}")
    _check(_is_num(cfg["eval_fraction"]) and 0 <= cfg["eval_fraction"] < 1, "'eval_fraction' must be in [0, 1)")
    for key in ("max_eval_samples", "keep_checkpoints"):
        _check(_is_int(cfg[key]) and cfg[key] >= 0, f"'{key}' must be an integer >= 0")
    for key in ("seq_len", "batch_size", "grad_accum", "epochs", "checkpoint_every_steps", "num_gpus"):
        _check(_is_int(cfg[key]) and cfg[key] >= 1, f"'{key}' must be an integer >= 1")
    _check(cfg["max_steps"] is None or (_is_int(cfg["max_steps"]) and cfg["max_steps"] >= 1),
           "'max_steps' must be null or an integer >= 1")
    _check(_is_num(cfg["learning_rate"]) and cfg["learning_rate"] > 0, "'learning_rate' must be > 0")
    _check(_is_num(cfg["warmup_ratio"]) and 0 <= cfg["warmup_ratio"] < 1, "'warmup_ratio' must be in [0, 1)")
    lora = cfg["lora"]
    _check(_is_int(lora["r"]) and lora["r"] >= 1, "'lora.r' must be an integer >= 1")
    _check(_is_num(lora["alpha"]) and lora["alpha"] > 0, "'lora.alpha' must be > 0")
    _check(_is_num(lora["dropout"]) and 0 <= lora["dropout"] < 1, "'lora.dropout' must be in [0, 1)")
    targets = lora["targets"]
    _check(targets == "all-linear" or (isinstance(targets, list) and targets
                                       and all(isinstance(t, str) for t in targets)),
           "'lora.targets' must be \"all-linear\" or a list of module names like [\"q_proj\", \"v_proj\"]")
    _check(cfg["optimizer"] in OPTIMIZERS, f"'optimizer' must be one of {', '.join(OPTIMIZERS)}")
    _check(cfg["loss"] in LOSSES, f"'loss' must be one of {', '.join(LOSSES)}, got {cfg['loss']!r}")
    _check(cfg["precision"] in PRECISIONS, f"'precision' must be one of {', '.join(PRECISIONS)}")
    for key in ("gradient_checkpointing", "packing", "resume", "merge_adapter"):
        _check(isinstance(cfg[key], bool), f"'{key}' must be true or false")
    _check(_is_int(cfg["seed"]), "'seed' must be an integer")
    _check(_is_num(cfg["heartbeat_every_s"]) and cfg["heartbeat_every_s"] > 0, "'heartbeat_every_s' must be > 0")
    _check(_is_num(cfg["throttle_s_per_step"]) and cfg["throttle_s_per_step"] >= 0,
           "'throttle_s_per_step' must be >= 0")
    _check(cfg["distributed"] in DISTRIBUTED,
           f"'distributed' must be null, \"ddp\", \"fsdp\", \"zero2\" or \"zero3\", got {cfg['distributed']!r}")
    _check_nodes(cfg)
    _check(not (cfg["distributed"] and cfg["num_gpus"] * cfg["nnodes"] < 2),
           "'distributed' needs 'num_gpus' >= 2 or 'nnodes' >= 2")
    _check(cfg["expect_gpu"] is None or isinstance(cfg["expect_gpu"], bool), "'expect_gpu' must be null, true or false")
    _check(not (cfg["method"] == "qlora" and cfg["distributed"] == "zero3"),
           "QLoRA with ZeRO-3 is not supported by this job; use \"fsdp\" or \"zero2\"")
    for key in ("output_dir", "stop_file", "hf_token_env"):
        _check(isinstance(cfg[key], str) and cfg[key] != "", f"'{key}' must be a non-empty string")
    _check(not (cfg["merge_adapter"] and cfg["method"] == "full"), "'merge_adapter' only applies to lora/qlora")
    return cfg


def _check_nodes(cfg: dict) -> None:
    """Several nodes: each node's config differs only in node_rank; all name the same rendezvous."""
    _check(_is_int(cfg["nnodes"]) and cfg["nnodes"] >= 1, "'nnodes' must be an integer >= 1")
    _check(_is_int(cfg["node_rank"]) and 0 <= cfg["node_rank"] < cfg["nnodes"],
           f"'node_rank' must be an integer from 0 to nnodes - 1 ({cfg['nnodes'] - 1}), got {cfg['node_rank']!r}")
    _check(cfg["rdzv_id"] is None or (isinstance(cfg["rdzv_id"], str) and cfg["rdzv_id"] != ""),
           "'rdzv_id' must be null (the run_id) or a non-empty string")
    ep = cfg["rdzv_endpoint"]
    if cfg["nnodes"] == 1:
        _check(ep is None, "'rdzv_endpoint' only applies with 'nnodes' > 1")
        return
    host, _, port = ep.rpartition(":") if isinstance(ep, str) else ("", "", "")
    _check(bool(host) and port.isdigit() and 0 < int(port) < 65536,
           f"'rdzv_endpoint' must be \"host:port\" (node 0's private address), got {ep!r}")


def load(path: str) -> dict:
    """Read, validate and resolve a config file; relative paths are taken from the config's folder."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise JobConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise JobConfigError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    cfg = validate(raw)
    base = os.path.dirname(os.path.abspath(path))
    cfg["_config_dir"] = base
    cfg["_paths"] = {
        "dataset": os.path.join(base, cfg["dataset"]),
        "output_dir": os.path.join(base, cfg["output_dir"]),
        "stop_file": os.path.join(base, cfg["stop_file"]),
        "tokenizer": _local_or_hub(base, cfg["model"]["tokenizer"]),
    }
    return cfg


def _local_or_hub(base: str, ref: str | None) -> str | None:
    """A tokenizer reference is a local folder if one exists there, else a hub id."""
    if ref is None:
        return None
    candidate = os.path.join(base, ref)
    return candidate if os.path.isdir(candidate) else ref


def public_view(cfg: dict) -> dict:
    """The config as written in summary.json: no resolved absolute paths (they hold the user's home)."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}
