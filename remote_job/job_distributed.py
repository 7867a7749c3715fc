"""Several GPUs: relaunch under torchrun and hand the chosen engine to accelerate.

The engines are existing ones: DDP (torch), FSDP (torch, via accelerate's plugin) and DeepSpeed ZeRO
(config generated here, engine from the `deepspeed` package). Nothing here reimplements sharding.

Several nodes (`nnodes` > 1): every node runs the same job with its own `node_rank`, and torchrun's c10d
rendezvous at `rdzv_endpoint` joins them. c10d numbers the nodes in its own order (sorted host/pid), not
by --node-rank, so each worker re-derives its global rank as node_rank x nproc + local rank before the
process group exists (`pin_global_rank`): global rank 0, which writes checkpoints, the adapter and the
summary, is always on node 0, the node the launcher pulls from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

WORKER_ENV = "FTPLAN_JOB_WORKER"


def is_worker() -> bool:
    """True inside a process started by torchrun (or any launcher that sets WORLD_SIZE)."""
    return os.environ.get(WORKER_ENV) == "1" or "LOCAL_RANK" in os.environ


def needs_launcher(cfg: dict) -> bool:
    return (cfg["num_gpus"] > 1 or cfg.get("nnodes", 1) > 1) and not is_worker()


def launch_command(cfg: dict, config_path: str, train_script: str) -> list[str]:
    """`python -m torch.distributed.run` rather than a `torchrun` on PATH: same interpreter, same venv.

    One node: --standalone (a private rendezvous on a free local port). Several: c10d at rdzv_endpoint;
    --node-rank is passed for the logs (c10d itself ignores it; see pin_global_rank)."""
    head = [sys.executable, "-m", "torch.distributed.run"]
    if cfg.get("nnodes", 1) > 1:
        head += ["--nnodes", str(cfg["nnodes"]), "--node-rank", str(cfg["node_rank"]), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", cfg["rdzv_endpoint"], "--rdzv-id", cfg["rdzv_id"] or cfg["run_id"]]
    else:
        head.append("--standalone")
    return [*head, f"--nproc_per_node={cfg['num_gpus']}", train_script, "--config", config_path]


def pin_global_rank(cfg: dict) -> None:
    """In a worker of a multi-node run, before torch.distributed starts: RANK = node_rank x nproc + local rank.

    The ranks stay unique and dense (every node runs num_gpus workers), the store and world size are
    torchrun's; only which process is rank 0 changes, to local rank 0 of node_rank 0."""
    if cfg.get("nnodes", 1) < 2 or "LOCAL_RANK" not in os.environ:
        return
    nproc = int(os.environ.get("LOCAL_WORLD_SIZE", cfg["num_gpus"]))
    os.environ["RANK"] = str(cfg["node_rank"] * nproc + int(os.environ["LOCAL_RANK"]))


def run_launcher(cfg: dict, config_path: str, train_script: str) -> int:
    """Start the workers and wait. The caller turns SIGTERM into the stop file: every rank then sees
    the same request at a step boundary and checkpoints together, instead of torchrun killing them."""
    env = dict(os.environ, **{WORKER_ENV: "1"})
    proc = subprocess.Popen(launch_command(cfg, config_path, train_script), env=env)
    while True:
        try:
            return proc.wait()
        except InterruptedError:
            continue


def deepspeed_config(cfg: dict, stage: int, dtype_name: str) -> dict:
    """A ZeRO-2/3 config for the plan. Batch keys are 'auto' so accelerate fills them consistently."""
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_gather_16bit_weights_on_model_save": True})
    return {
        "train_micro_batch_size_per_gpu": cfg["batch_size"],
        "gradient_accumulation_steps": cfg["grad_accum"],
        "gradient_clipping": 1.0,
        "bf16": {"enabled": dtype_name == "bf16"},
        "fp16": {"enabled": dtype_name == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }


def accelerator_kwargs(cfg: dict, dtype_name: str, out_dir: str, use_cpu: bool) -> dict:
    """Keyword arguments for accelerate.Accelerator for this plan."""
    kwargs: dict = {"cpu": use_cpu, "gradient_accumulation_steps": 1}
    mode = cfg["distributed"]
    if cfg["num_gpus"] * cfg.get("nnodes", 1) < 2 or mode in (None, "ddp"):
        return kwargs
    if mode == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False,
            activation_checkpointing=False)
        return kwargs
    from accelerate import DeepSpeedPlugin

    ds = deepspeed_config(cfg, 2 if mode == "zero2" else 3, dtype_name)
    path = os.path.join(out_dir, "deepspeed.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(ds, fh, indent=1)
    kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=path)
    return kwargs
