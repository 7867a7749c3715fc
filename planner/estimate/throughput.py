"""Training throughput: FLOPs per token by method, the GPU's dense peak, and fitted utilisation.

time per micro-batch = max(GPU time, CPU dispatch time) + the optimizer step's memory traffic / bandwidth
amortised over grad_accum micro-batches. GPU time = FLOPs / (utilisation x peak) (+ QLoRA's
dequantization traffic); CPU dispatch time = kernels launched x seconds per launch: launches are
asynchronous, so a small step is bound by whichever of the two is longer, never their sum. Utilisation
and seconds per launch are the two fitted constants, one each for every method (`catalogs/throughput.json`,
written by `scripts/fit_throughput.py`). Several GPUs wait for the collectives that do not fit behind
the compute (`communication_seconds`, from the interconnect's bandwidth: no fitted constant).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ftplan.planner.estimate.memory import _quantized_params, as_loaded, fitted_constants, trainable_params

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


def _eager(req: EstimateRequest) -> bool:
    return req.attention == "eager"


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
    if req.method == "prompt":  # the virtual tokens pass through every block with the real ones
        fwd_blocks *= (req.seq_len + req.num_virtual_tokens) / req.seq_len
    fwd = fwd_blocks + 2 * head
    # Attention has no weights, but its backward differentiates both matmuls with respect to both inputs
    # (dQ, dK, dV, dP: 2 x forward) and fused kernels recompute the scores (+0.5 x) for every method.
    attn_bwd = (2.0 if _eager(req) else 2.5) * attn
    if req.method == "full":
        bwd = 2 * (fwd - attn) + attn_bwd
    elif req.method == "freeze":
        k = min(req.freeze_trainable_layers, m.num_layers) / m.num_layers
        bwd = 2 * k * (fwd_blocks - attn) + k * attn_bwd + 2 * head
    else:
        bwd = fwd - attn + attn_bwd
        if req.method in ("lora", "qlora"):
            fwd += 2 * trainable_params(req)
            bwd += 4 * trainable_params(req)
        if "lm_head" in req.modules_to_save:
            bwd += 2 * head  # the trained head's weight gradient
    recompute = fwd_blocks if req.grad_checkpointing else 0.0
    if req.method == "freeze" and req.grad_checkpointing:
        recompute *= min(req.freeze_trainable_layers, m.num_layers) / m.num_layers
    return fwd + bwd + recompute


def kernel_launches(req: EstimateRequest) -> float:
    """Kernels one micro-batch launches (eager PyTorch, HF modules), counted per block from the architecture:
    each Linear, the norm's upcast/variance/rsqrt/scale ops, rotary embeddings, attention, the MLP's
    activation and gating, the residual adds; the backward launches about 1.5 kernels per forward op;
    a LoRA module adds dropout, A, B, scaling and the add (DoRA the weight norm too); checkpointing runs
    the forward twice. `torch.compile` fuses the elementwise chains (about a third remain)."""
    m = req.model
    linears = len(m.linear_modules())
    norm_ops = m.norms_per_block * (6 if m.norm == "rmsnorm" else 1)
    attn_ops = (8 if m.position_embedding == "rope" else 0) + 6 + (4 if req.attention == "eager" else 1)
    mlp_ops = 3 if m.gated_mlp else 1
    fwd = linears + norm_ops + attn_ops + mlp_ops + 2
    if req.method in ("lora", "qlora"):
        from ftplan.planner.estimate.memory import _lora_modules

        fwd += len(_lora_modules(m, req.lora_targets)) * (5 + (4 if req.dora else 0))
    if req.method == "qlora":
        fwd += linears  # dequantize before each 4-bit matmul
    per_block = fwd * (2.5 + (1 if req.grad_checkpointing else 0))
    launches = per_block * m.num_layers + 20  # embedding, final norm, head, loss
    if req.compile:
        launches /= 3
    return launches + optimizer_launches(req) / req.grad_accum


def optimizer_launches(req: EstimateRequest) -> float:
    """Kernels one optimizer step launches. torch's AdamW/SGD run foreach kernels over lists of tensors (a
    few dozen launches in all); transformers' Adafactor and bitsandbytes' 8-bit optimizers loop over the
    parameters in Python (about 20 and 3 kernels per trained tensor)."""
    m = req.model
    opt = req.resolved_optimizer
    per_tensor = {"adafactor": 20, "adamw8bit": 3, "paged_adamw8bit": 3}.get(opt, 0)
    if not per_tensor:
        return 30.0
    if req.method in ("full", "freeze"):
        biases = sum(1 for x in m.linear_modules() if x.bias)
        per_block = len(m.linear_modules()) + biases + m.norms_per_block * (2 if m.norm == "layernorm" else 1)
        blocks = m.num_layers if req.method == "full" else min(req.freeze_trainable_layers, m.num_layers)
        tensors = per_block * blocks + (4 if req.method == "full" else 0)
    elif req.method in ("lora", "qlora"):
        from ftplan.planner.estimate.memory import _lora_modules

        tensors = 2 * len(_lora_modules(m, req.lora_targets)) * m.num_layers
    else:
        tensors = 1
    return per_tensor * tensors


def elementwise_bytes(req: EstimateRequest) -> float:
    """Bytes per token that the memory-bound kernels between the matmuls move (each reads its inputs and
    writes its output: about three tensors' worth), counted per block from the same inventory as
    `kernel_launches`: the norms (RMSNorm upcasts to fp32 for its six ops), rotary embeddings on q and k,
    the attention kernel's transposes, the MLP's activation and gating, residual adds, model dropout, and
    each LoRA module's dropout, scaling and add. The backward moves about twice the forward's bytes and
    checkpointing repeats the forward. They run on the same stream as the matmuls: their time adds up."""
    m = req.model
    c = 4 if req.precision == "fp32" else 2
    h, q, kv = m.hidden_size, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    inter = m.intermediate_size * (m.experts_per_token if m.num_experts > 1 else 1)
    norm = m.norms_per_block * (6 * 3 * 4 * h if m.norm == "rmsnorm" else 3 * c * h)
    rope = 6 * 3 * c * (q + kv) if m.position_embedding == "rope" else 0
    attn = 4 * 3 * c * q
    if req.attention == "eager":
        attn += 4 * 3 * 4 * m.num_heads * req.seq_len  # scale, mask, softmax, dropout over the scores
    mlp = (2 if m.gated_mlp else 1) * 3 * c * inter
    residual = 2 * 3 * c * h
    dropout = 3 * 3 * c * h if m.model_type in ("bert", "roberta", "distilbert", "gpt2") else 0
    lora = 0.0
    if req.method in ("lora", "qlora"):
        from ftplan.planner.estimate.memory import _lora_modules

        for x in _lora_modules(m, req.lora_targets):
            n = m.experts_per_token if x.expert else x.count
            lora += n * (2 * 3 * c * x.out_features + (2.5 * c * x.in_features if req.lora_dropout > 0 else 0))
    fwd = norm + rope + attn + mlp + residual + dropout + lora
    if req.compile:
        fwd /= 3  # fused chains read and write once
    layers = m.num_layers
    if req.method == "freeze":
        return fwd * layers + 2 * fwd * min(req.freeze_trainable_layers, layers)
    return fwd * layers * (3 + (1 if req.grad_checkpointing else 0))


def utilisation(req: EstimateRequest, gpu: GPU) -> tuple[float, float]:
    """(fraction of dense peak the matmuls reach, CPU seconds per kernel launch).

    One fitted value each for every method: methods differ by their modelled FLOPs, launches,
    dequantization and optimizer traffic."""
    table = fitted_constants()["throughput"]
    u = table["utilisation"] * table["gpu_factor"].get(gpu.architecture, 1.0)
    return u, table["seconds_per_launch"]


def communication_seconds(req: EstimateRequest, gpu: GPU, gpu_count: int) -> float:
    """Seconds per micro-batch one GPU spends on collectives (ring algorithms, (n-1)/n of the data each way)
    over the card's interconnect (gpus.json: bidirectional GB/s, half of it each way).

    ZeRO-3/FSDP all-gathers the 16-bit weights for the forward and again for the backward and
    reduce-scatters the gradients every micro-batch; DDP and ZeRO-1/2 all-reduce the gradients (twice the
    data) once per optimizer step, i.e. amortised over grad_accum micro-batches."""
    if gpu_count <= 1:
        return 0.0
    ring = (gpu_count - 1) / gpu_count
    bw = gpu.interconnect_gbs / 2 * 1e9
    grad_bytes = 2 if req.precision in ("bf16-true", "fp16-mixed") or req.resolved_zero(gpu_count) >= 1 else 4
    train = trainable_params(req)
    if req.resolved_zero(gpu_count) >= 3:
        quant = _quantized_params(req.model) if req.method == "qlora" else 0  # gathered as NF4 (FSDP-QLoRA)
        weight_bytes = 2 * (req.model.params_total() - quant) + 0.5 * quant
        return ring * (2 * weight_bytes + train * grad_bytes) / bw
    return ring * 2 * train * grad_bytes / bw / req.grad_accum


def scaling_efficiency(req: EstimateRequest, gpu: GPU, gpu_count: int) -> float:
    """Throughput of n GPUs divided by n x one GPU's: collectives overlap the compute (NCCL streams,
    FSDP/ZeRO-3 prefetch), so a GPU waits only for the part of the communication longer than its step."""
    if gpu_count <= 1:
        return 1.0
    step = _step_seconds(req, gpu, gpu_count)
    return step / max(step, communication_seconds(req, gpu, gpu_count))


def optimizer_step_bytes(req: EstimateRequest, gpu_count: int = 1) -> float:
    """Bytes one GPU reads and writes in one optimizer step over its share of the trained parameters (memory-
    bound), gradient clipping included (the norm reads every gradient, the scale rewrites them).

    Fused AdamW (and bitsandbytes' 8-bit kernels) read param, grad and states once and write param and
    states once. torch's default foreach AdamW runs one pass per operation: weight decay (r/w p), lerp of
    m (r m, g; w m), mul + addcmul of v (r/w v twice, r g), sqrt, divide and add eps on a temporary
    (3 x r/w), addcdiv into p (r p, m, tmp; w p): 20 words per parameter instead of 7."""
    opt = req.resolved_optimizer
    w = 2 if req.precision == "bf16-true" else 4
    clip = 3 * w
    if opt == "adamw":
        per_param = (7 if req.fused_optimizer else 20) * w
    elif opt in ("adamw8bit", "paged_adamw8bit"):
        per_param = 3 * w + 2 * 2  # fused 8-bit kernel: r/w param, r grad, r/w two uint8 states
    elif opt == "adafactor":
        per_param = 6 * w  # factored second moment: update, rms and the param passes, no first moment
    else:
        per_param = 3 * w
    per_param += clip
    n = gpu_count if (gpu_count > 1 and req.resolved_zero(gpu_count) >= 1) else 1
    return trainable_params(req) * per_param / n


def _step_seconds(req: EstimateRequest, gpu: GPU, gpu_count: int = 1) -> float:
    """Seconds of one micro-batch on one GPU, without communication."""
    req = as_loaded(req)
    peak = gpu.peak_tflops(req.precision) * 1e12
    u, overhead = utilisation(req, gpu)
    tokens = req.batch_size * req.seq_len
    step = tokens * flops_per_token(req) / (u * peak) + tokens * elementwise_bytes(req) / (gpu.mem_bandwidth_gbs * 1e9)
    if req.method == "qlora":
        # Dequantising every 4-bit weight once per forward (and per recomputation/backward) is memory-bound.
        passes = 3 if req.grad_checkpointing else 2
        step += passes * _quantized_params(req.model) * 2.5 / (gpu.mem_bandwidth_gbs * 1e9)
    step = max(step, kernel_launches(req) * overhead)
    if req.offload == "none":
        # The optimizer step runs once per grad_accum micro-batches (memory-bound; on the CPU when offloaded).
        step += optimizer_step_bytes(req, gpu_count) / (gpu.mem_bandwidth_gbs * 1e9) / req.grad_accum
    else:
        step *= fitted_constants()["throughput"]["offload_slowdown"][req.offload]
    return step


def tokens_per_second(req: EstimateRequest, gpu: GPU, gpu_count: int = 1) -> float:
    """Training tokens per second over all GPUs."""
    tokens = req.batch_size * req.seq_len
    return gpu_count * scaling_efficiency(req, gpu, gpu_count) * tokens / _step_seconds(req, gpu, gpu_count)
