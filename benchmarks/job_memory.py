"""Peak memory of one training step of the job, standard loss vs chunked loss, on the CPU.

    python benchmarks/job_memory.py [--runs 3] [--batch 2] [--seq 512] [--vocab 128256]

A tiny Llama (hidden 128, 2 layers) with Llama-3's 128k vocabulary and LoRA on all linear layers, as
the job builds it: at this size the vocabulary-sized logits are nearly all of a step's activations, which
is what the chunked loss removes. Each measurement runs in a fresh process: after the model and batch are
built, freed memory is returned to the OS (malloc_trim), the kernel's peak-RSS mark is reset
(/proc/self/clear_refs 5) and one step runs (forward, loss, backward, AdamW step); the step's peak is
VmHWM minus the RSS before it. Prints `key: value` lines; medians of --runs runs, with the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB_DIR = ROOT / "remote_job"
MIB = 1024**2


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(mode: str, batch: int, seq: int, vocab: int) -> dict:
    """One step in this (fresh) process; returns the peak above the pre-step RSS, in bytes."""
    import ctypes

    sys.path.insert(0, str(JOB_DIR))
    import job_loss
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                  max_position_embeddings=max(2048, seq), tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq))
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # a prompt that is not trained on
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    t0 = time.perf_counter()
    loss = job_loss.compute(model, data, mode)
    loss.backward()
    optimizer.step()
    step_s = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {"peak_bytes": (peak - before) * 1024, "rss_before_bytes": before * 1024, "step_s": step_s,
            "loss": float(loss)}


def run_child(mode: str, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--batch", str(args.batch), "--seq",
                          str(args.seq), "--vocab", str(args.vocab)], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"error: the {mode} step failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--child", choices=("standard", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.seq, args.vocab)))
        return 0
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("error: needs Linux /proc (peak RSS reset); run it on Linux")
    results: dict[str, list[dict]] = {"standard": [], "chunked": []}
    for _ in range(args.runs):  # interleaved, so a change in machine load hits both alike
        for mode in results:
            results[mode].append(run_child(mode, args))
    tokens = args.batch * args.seq
    print(f"config: llama hidden 128 x2 layers, LoRA r8, vocab {args.vocab}, batch {args.batch} x seq {args.seq} "
          f"({tokens} tokens), fp32 CPU, {args.runs} runs each")
    print(f"full_logits_fp32_mib: {tokens * args.vocab * 4 / MIB:.0f}")
    med = {}
    for mode, runs in results.items():
        peaks = [r["peak_bytes"] / MIB for r in runs]
        med[mode] = statistics.median(peaks)
        print(f"peak_{mode}_mib: {med[mode]:.0f}")
        print(f"peak_{mode}_spread_mib: {min(peaks):.0f}-{max(peaks):.0f}")
        print(f"step_{mode}_s: {statistics.median(r['step_s'] for r in runs):.2f}")
    loss_gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(results["standard"], results["chunked"], strict=True))
    print(f"loss_abs_diff: {loss_gap:.2e}")
    print(f"peak_ratio: {med['chunked'] / med['standard']:.3f}")
    print(f"peak_reduction_pct: {100 * (1 - med['chunked'] / med['standard']):.1f}")
    print(f"load_average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
