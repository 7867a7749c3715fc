"""Training throughput: FLOPs per token by method, the GPU's dense peak, and fitted utilisation.

time per micro-batch = FLOPs / (utilisation x peak) + per-block launch overhead + the optimizer step's
memory traffic / bandwidth amortised over grad_accum micro-batches, where utilisation and
the overhead are fitted per method to the published measurements (`catalogs/throughput.json`, written
by `scripts/fit_throughput.py`). Several GPUs multiply by a scaling efficiency per parallelism.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ftplan.planner.estimate.memory import _quantized_params, fitted_constants, trainable_params

if TYPE_CHECKING:  # pragma: no cover
    from ftplan.planner.estimate.gpus import GPU
    from ftplan.planner.estimate.request import EstimateRequest


def _matmul_params(req: EstimateRequest) -> tuple[float, float]:
    """(parameters a token multiplies with inside the blocks, in the output head)."""
    m = req.model
    blocks = m.num_layers * sum(
        x.in_features * x.out_features * (m.experts_per_token if x.expert else x.count)
        for x in m.linear_modules())
    head = 0 if m.is_encoder else m.vocab_size * m.hidden_size
    return float(blocks), float(head)


def flops_per_token(req: EstimateRequest) -> float:
    """Training FLOPs per token (forward, backward, recomputation) for the method.

    - full: backward = 2 x forward (activation and weight gradients);
    - lora/qlora/prompt/prefix: the frozen base still back-propagates activation gradients (1 x forward),
      the adapters add their own 6 FLOPs per parameter;
    - freeze: only the top k blocks are back-propagated;
    - gradient checkpointing recomputes the blocks' forward once;
    - attention: 2 x seq x d per layer per token forward for causal models (4 x for encoders).
    """
    m = req.model
    blocks, head = _matmul_params(req)
    causal = 1 if m.is_encoder else 0.5
    seq = req.seq_len + (req.num_virtual_tokens if req.method in ("prompt", "prefix") else 0)
    attn = 4 * causal * seq * m.num_heads * m.head_dim * m.num_layers
    fwd_blocks = 2 * blocks + attn
    fwd = fwd_blocks + 2 * head
    if req.method == "full":
        bwd = 2 * fwd
    elif req.method == "freeze":
        k = min(req.freeze_trainable_layers, m.num_layers) / m.num_layers
        bwd = 2 * k * fwd_blocks + 2 * head
    else:
        bwd = fwd
        if req.method in ("lora", "qlora"):
            fwd += 2 * trainable_params(req)
            bwd += 4 * trainable_params(req)
    recompute = fwd_blocks if req.grad_checkpointing else 0.0
    if req.method == "freeze" and req.grad_checkpointing:
        recompute *= min(req.freeze_trainable_layers, m.num_layers) / m.num_layers
    return fwd + bwd + recompute


def _method_key(req: EstimateRequest) -> str:
    return {"freeze": "full", "prefix": "lora", "prompt": "lora"}.get(req.method, req.method)


def utilisation(req: EstimateRequest, gpu: GPU) -> tuple[float, float]:
    """(fraction of dense peak the matmuls reach, seconds of launch overhead per block per micro-batch)."""
    table = fitted_constants()["throughput"]
    u = table["utilisation"][_method_key(req)]
    u *= table["gpu_factor"].get(gpu.architecture, 1.0)
    return u, table["overhead_s_per_block"][_method_key(req)]


def scaling_efficiency(req: EstimateRequest, gpu: GPU, gpu_count: int) -> float:
    """Throughput of n GPUs divided by n x one GPU's: gradient all-reduce (DDP/ZeRO-1/2) or weight
    all-gathers (ZeRO-3/FSDP) that are not hidden behind compute; worse without NVLink."""
    if gpu_count <= 1:
        return 1.0
    table = fitted_constants()["throughput"]["scaling"]
    zero = req.resolved_zero(gpu_count)
    loss = table["zero3_loss_per_doubling"] if zero >= 3 else table["ddp_loss_per_doubling"]
    if "nvlink" not in gpu.interconnect.lower() and "infinity" not in gpu.interconnect.lower():
        loss *= table["pcie_penalty"]
    return max(0.2, (1 - loss) ** math.log2(gpu_count))


def optimizer_step_bytes(req: EstimateRequest, gpu_count: int = 1) -> float:
    """Bytes one GPU reads and writes in one optimizer step: a memory-bound pass over its share of the
    trained parameters (param, grad, states read; param, states written; + the 16-bit copy under *-mixed)."""
    opt = req.resolved_optimizer
    w = 2 if req.precision == "bf16-true" else 4
    state = {"adamw": 2 * w, "adamw8bit": 2, "paged_adamw8bit": 2, "sgd": 0, "adafactor": 0.1 * w}[opt]
    per_param = 2 * w + w + 2 * state + (2 if req.precision in ("bf16-mixed", "fp16-mixed") else 0)
    n = gpu_count if (gpu_count > 1 and req.resolved_zero(gpu_count) >= 1) else 1
    return trainable_params(req) * per_param / n


def tokens_per_second(req: EstimateRequest, gpu: GPU, gpu_count: int = 1) -> float:
    """Training tokens per second over all GPUs."""
    peak = gpu.peak_tflops(req.precision) * 1e12
    u, overhead = utilisation(req, gpu)
    tokens = req.batch_size * req.seq_len
    step = tokens * flops_per_token(req) / (u * peak) + overhead * req.model.num_layers
    if req.method == "qlora":
        # Dequantising every 4-bit weight once per forward (and per recomputation/backward) is memory-bound.
        passes = 3 if req.grad_checkpointing else 2
        step += passes * _quantized_params(req.model) * 2.5 / (gpu.mem_bandwidth_gbs * 1e9)
    if req.offload == "none":
        # The optimizer step runs once per grad_accum micro-batches (memory-bound; on the CPU when offloaded).
        step += optimizer_step_bytes(req, gpu_count) / (gpu.mem_bandwidth_gbs * 1e9) / req.grad_accum
    else:
        step *= fitted_constants()["throughput"]["offload_slowdown"][req.offload]
    return gpu_count * scaling_efficiency(req, gpu, gpu_count) * tokens / step
