#!/usr/bin/env python3
"""The real job over two "nodes" on this machine, beside the same job on one node.

    .venv/bin/python benchmarks/multinode_local.py [--steps 20] [--runs 3]

Two folders, one bundle copy each (job.json + data; the tiny Llama of tests/job_helpers in a local
"hub" folder both load), two `train.py` launchers with node_rank 0 and 1: torchrun's c10d rendezvous on
127.0.0.1, gloo on the CPU, DDP of a LoRA job, one process per node. Then the same config with
nnodes = 1. tokens/s are the job's own (summary.json `tokens_per_s`: training steps only).
On a CPU box the two "nodes" share its cores, so this proves the path and shows the rendezvous and
all-reduce cost; it says nothing about a real network. Medians of --runs; ends with `key: value` lines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # job_helpers: the tiny offline job the tests use

from job_helpers import TINY_LLAMA, TRAIN_SCRIPT, job_env, make_job, tiny_tokenizer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_base(folder: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    conf = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    AutoModelForCausalLM.from_config(LlamaConfig(**{**conf, "vocab_size": len(tok)})).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def run_nodes(root: Path, base: str, nnodes: int, steps: int) -> dict:
    """Start one launcher per node, wait for all; node 0's summary."""
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for rank in range(nnodes):
        extra = {"nnodes": nnodes, "node_rank": rank, "rdzv_endpoint": endpoint} if nnodes > 1 else {}
        cfg = make_job(root / f"node{rank}", method="lora", n=160, max_steps=steps, batch_size=4,
                       checkpoint_every_steps=10 * steps, eval_fraction=0.0,
                       model={"hf_id": base, "config": None, "random_init": False}, **extra)
        procs.append(subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), "--config", str(cfg)],
                                      cwd=str(cfg.parent), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=job_env({"GLOO_SOCKET_IFNAME": "lo"})))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{nnodes}-node run failed:\n" + "\n".join(o[-2000:] for o in outs))
    return json.loads((root / "node0" / "out" / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ftplan-multinode-"))
    try:
        base = tiny_base(tmp / "hub" / "tiny-llama")
        two, one = [], []
        for k in range(args.runs):
            two.append(run_nodes(tmp / f"two-{k}", base, 2, args.steps))
            one.append(run_nodes(tmp / f"one-{k}", base, 1, args.steps))
        last = two[-1]
        adapters = sorted(str(p.relative_to(tmp / f"two-{args.runs - 1}"))
                          for p in (tmp / f"two-{args.runs - 1}").glob("node*/out/adapter/adapter_model.safetensors"))
        print(f"runs: {args.runs} (medians)")
        print(f"nodes: {last['config']['nnodes']}")
        print(f"processes: {last['num_processes']}")
        print(f"steps: {last['steps']}")
        print(f"first_loss: {last['losses'][0][1]:.4f}")
        print(f"last_loss: {last['losses'][-1][1]:.4f}")
        print(f"adapters_written: {len(adapters)} ({', '.join(adapters)})")
        print(f"tokens_per_s: {statistics.median(s['tokens_per_s'] for s in two):.1f}")
        print(f"single_node_tokens_per_s: {statistics.median(s['tokens_per_s'] for s in one):.1f}")
        print(f"train_s: {statistics.median(s['durations_s']['train'] for s in two):.2f}")
        print(f"single_node_train_s: {statistics.median(s['durations_s']['train'] for s in one):.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
