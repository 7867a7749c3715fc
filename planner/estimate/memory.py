"""Peak GPU memory of one fine-tuning step, per GPU, as a sum of named components.

The model is physical: bytes per parameter by storage format and optimizer, and the tensors autograd
keeps for the backward pass, counted per token and per block from the architecture (`ModelSpec`).
Only two numbers are fitted (allocator fragmentation, activation working set) and they live in
`catalogs/throughput.json` with the throughput table (see `scripts/fit_throughput.py`).

Conventions that decide the numbers (documented because users compare them with their own runs):
- `bf16-mixed`/`fp16-mixed` follow the Hugging Face Trainer: trained weights are fp32 masters with
  fp32 gradients and optimizer states, plus the 16-bit copy autocast keeps for the backward pass;
  frozen base weights of adapter methods are loaded in 16 bits (torch_dtype=bfloat16).
- `bf16-true` keeps everything in bf16 (torchtune, LitGPT): 2-byte weights, grads and Adam states.
- `framework="litgpt"` changes two conventions: under bf16-mixed the frozen base stays fp32 (LitGPT
  loads the checkpoint in the precision's parameter dtype) and autocast keeps a 16-bit copy of every
  frozen Linear weight for the backward pass.
  Its FSDP LoRA keeps each block's all-gathered frozen weights until the end of the backward pass
  (measured: per-GPU peak = unsharded weights + shard, LitGPT resource tables).
  Always: its lm_head is never tied (a second vocab x hidden matrix), and logits + the loss's
  log-softmax stay in the compute dtype (chunked head and loss, no upcast).
  QLoRA (Fabric's BitsandbytesPrecision, bitsandbytes 0.42): the head is NF4 too, weights are
  dequantized through fp16 (two copies of the biggest weight at a time), and the previous
  micro-batch's MatMul4Bit inputs are still alive during the next forward (see
  `_litgpt_previous_step_inputs`).
- `fp32` keeps everything in fp32 (matmuls may use TF32).
- The components before `allocator_overhead` are what `torch.cuda.max_memory_allocated()` reports;
  adding the allocator's fragmentation gives `max_memory_reserved()`; adding the CUDA context gives
  what nvidia-smi shows. `total` is the last one: what has to fit on the card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING

from ftplan.catalogs import data_path

if TYPE_CHECKING:  # pragma: no cover
    from ftplan.planner.estimate.architecture import ModelSpec
    from ftplan.planner.estimate.request import EstimateRequest

GIB = 1024**3
COMPONENTS = ("weights", "trainable", "gradients", "optimizer", "activations", "logits",
              "allocator_overhead", "cuda_context")

# NF4 storage per quantized weight: 4 bits + one fp32 absmax per 64-weight block; double quantization
# stores the absmax as 8 bits with one fp32 constant per 256 blocks (QLoRA paper, bitsandbytes defaults).
NF4_BYTES = 0.5 + 4 / 64
NF4_DQ_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
_LINEAR = ("linear", "conv1d")  # real nn.Linear/Conv1D: what peft adapts and bitsandbytes quantizes


@lru_cache(maxsize=1)
def fitted_constants() -> dict:
    """The fitted numbers (allocator, activation working set, utilisation) from catalogs/throughput.json."""
    return json.loads(data_path("throughput.json").read_text())


@dataclass
class MemoryEstimate:
    """Per-GPU peak in GiB. `total` is the sum of the components (what must fit on the card)."""

    weights: float
    trainable: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    allocator_overhead: float
    cuda_context: float
    params_total: int
    params_trainable: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(getattr(self, c) for c in COMPONENTS)

    @property
    def allocated(self) -> float:
        """What torch.cuda.max_memory_allocated() would report (no fragmentation, no context)."""
        return self.total - self.allocator_overhead - self.cuda_context

    @property
    def reserved(self) -> float:
        """What torch.cuda.max_memory_reserved() would report."""
        return self.total - self.cuda_context

    def figures(self) -> dict[str, float]:
        """The three numbers users compare with: torch's allocated and reserved peaks, and the device total
        nvidia-smi shows (reserved + CUDA context), which is what must fit."""
        return {"allocated": round(self.allocated, 3), "reserved": round(self.reserved, 3),
                "device": round(self.total, 3)}

    def as_dict(self) -> dict[str, float]:
        d = {c: round(getattr(self, c), 3) for c in COMPONENTS}
        d["total"] = round(self.total, 3)
        return d


# ---- bytes per parameter ------------------------------------------------------------------------
def _mixed(precision: str) -> bool:
    return precision in ("bf16-mixed", "fp16-mixed")


def _compute_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _master_bytes(precision: str) -> int:
    """Bytes of a trained parameter (and of its gradient)."""
    return 2 if precision == "bf16-true" else 4


def _frozen_bytes(precision: str, framework: str = "hf") -> int:
    """Bytes of a frozen base weight: 16-bit for HF (torch_dtype) unless fp32; LitGPT under *-mixed
    keeps the fp32 parameters the precision plugin creates."""
    return 4 if precision == "fp32" or (framework == "litgpt" and _mixed(precision)) else 2


def _fp32_base(req: EstimateRequest) -> bool:
    """Frozen base weights in fp32 while the matmuls run in 16 bits (autocast makes copies)."""
    return req.method != "qlora" and req.framework == "litgpt" and _mixed(req.precision)


def optimizer_state_bytes(optimizer: str, precision: str, model: ModelSpec, trainable: int, method: str) -> float:
    """Optimizer state bytes for `trainable` parameters."""
    state = _master_bytes(precision)
    if optimizer == "adamw":
        return 2 * state * trainable
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        return trainable * (2 + 2 * 4 / 2048)  # two uint8 states + one fp32 absmax per 2048-block each
    if optimizer == "sgd":
        return 0.0  # torch SGD without momentum keeps no state
    if optimizer == "adafactor":
        # Factored second moment: rows + cols per matrix instead of rows * cols; no first moment.
        mats = [m for m in model.linear_modules()]
        dense = sum(m.in_features * m.out_features * m.count for m in mats) or 1
        factored = sum((m.in_features + m.out_features) * m.count for m in mats)
        return 4 * trainable * max(factored / dense, 1e-4) if method == "full" else 4 * trainable * 0.05
    raise ValueError(f"unknown optimizer {optimizer}")


# ---- parameter bookkeeping ------------------------------------------------------------------------
def _lora_modules(model: ModelSpec, targets: str) -> list:
    """The block Linears peft adapts for `targets` (memoised on the spec: asked for several times per GPU)."""
    memo = model.__dict__.setdefault("_lora_modules_memo", {})
    if targets not in memo:
        mods = [m for m in model.linear_modules() if m.kind in _LINEAR]
        if targets.strip().lower() != "all-linear":
            wanted = [t.strip() for t in targets.split(",") if t.strip()]
            mods = [m for m in mods if any(m.name == t or m.name.endswith("." + t) for t in wanted)]
        memo[targets] = tuple(mods)
    return list(memo[targets])


def trainable_params(req: EstimateRequest) -> int:
    m = req.model
    if req.method == "full":
        return m.params_total()
    if req.method == "freeze":
        k = min(req.freeze_trainable_layers, m.num_layers)
        return k * m.params_per_block()
    if req.method in ("lora", "qlora"):
        n = m.lora_params(req.lora_r, req.lora_targets)
        if req.dora:  # one magnitude per output feature of every adapted module (peft's lora_magnitude_vector)
            n += m.num_layers * sum(x.out_features * x.count for x in _lora_modules(m, req.lora_targets))
        return n + modules_to_save_params(req)
    if req.method == "prompt":
        return req.num_virtual_tokens * m.hidden_size + modules_to_save_params(req)
    if req.method == "prefix":
        # P-tuning v2 / peft prefix tuning: a key and a value vector per layer per virtual token.
        return req.num_virtual_tokens * m.num_layers * 2 * m.num_kv_heads * m.head_dim + modules_to_save_params(req)
    raise ValueError(req.method)


def modules_to_save_params(req: EstimateRequest) -> int:
    """Parameters of the modules peft trains in full beside the adapters (`modules_to_save`): a trained copy
    of the input embedding and/or the output head (a copy of the embedding when the two are tied)."""
    if req.method not in ("lora", "qlora", "prompt", "prefix"):
        return 0
    m = req.model
    n = 0
    if "embed_tokens" in req.modules_to_save:
        n += m.vocab_size * m.hidden_size
    if "lm_head" in req.modules_to_save and not m.is_encoder:
        n += m.vocab_size * m.hidden_size + (m.vocab_size if m.lm_head_bias else 0)
    return n


def _quantized_params(model: ModelSpec) -> int:
    """Parameters bitsandbytes stores in 4 bits: the Linear layers of the blocks (not embeddings,
    the output head, norms or fused MoE experts, which stay 16-bit)."""
    return model.num_layers * sum(m.in_features * m.out_features * m.count
                                  for m in model.linear_modules() if m.kind in _LINEAR)


# ---- activations ---------------------------------------------------------------------------------
def _bnb_keeps_inputs(req: EstimateRequest) -> bool:
    return req.method == "qlora" and bool(fitted_constants()["memory"]["qlora_saves_linear_inputs"])


def _bnb_inputs_per_token_layer(req: EstimateRequest) -> float:
    """Bytes per token per block of the inputs bitsandbytes' MatMul4Bit keeps (`ctx.tensors = (A, B)`):
    the attention input, the attention output (proj input), the MLP input (shared with the attention
    input in a parallel block) and the MLP activation (down-projection input)."""
    m, c = req.model, _compute_bytes(req.precision)
    h, q = m.hidden_size, m.num_heads * m.head_dim
    inter = m.intermediate_size * (m.experts_per_token if m.num_experts > 1 else 1)
    return c * (h + q + (0 if m.parallel_block else h) + inter)


def litgpt_previous_step_input_bytes(req: EstimateRequest) -> float:
    """The previous micro-batch's leftover (see `_litgpt_previous_step_inputs`), in bytes. It assumes the
    previous micro-batch was as long as this one; a run whose only longest micro-batch is its first (LitGPT's
    2023 resource tables) peaks without it."""
    return _litgpt_previous_step_inputs(req, req.batch_size * req.seq_len)


def _litgpt_previous_step_inputs(req: EstimateRequest, tokens: int) -> float:
    """MatMul4Bit inputs of the PREVIOUS micro-batch that are still alive during this one's forward (LitGPT).

    bitsandbytes <= 0.42 (the version LitGPT pins) stores them as plain ctx attributes, which backward does
    not release (only save_for_backward tensors are); they live as long as the graph. LitGPT's loop keeps
    the graph reachable through `logits = model(input_ids, lm_head_chunk_size=128)` until the next forward
    returns, so at the end of that forward the old inputs coexist with the new activations: every block's
    inputs plus the final-norm output the quantized lm_head chunks took. HF's Trainer drops its outputs
    after backward, so it has no such term; with checkpointing LitGPT would keep only block boundaries.
    """
    if req.framework != "litgpt" or not _bnb_keeps_inputs(req) or req.grad_checkpointing:
        return 0.0
    c = _compute_bytes(req.precision)
    return tokens * (req.model.num_layers * _bnb_inputs_per_token_layer(req) + c * req.model.hidden_size)


def _eager_attention(req: EstimateRequest) -> bool:
    """Whether the seq x seq scores are materialised: eager attention, or SDPA on a model with attention
    logit soft-capping (Gemma-2), which SDPA cannot express so transformers and LitGPT fall back to eager."""
    if req.attention == "eager":
        return True
    return req.attention == "sdpa" and bool(req.model.hf_extra.get("attn_logit_softcapping"))


def _act_bytes_per_token_layer(req: EstimateRequest) -> tuple[float, float]:
    """(bytes saved for backward per token per block, bytes of one block's backward working set per token).

    Counted from what autograd keeps: the fp32 input of each RMSNorm (HF upcasts), q/k/v and the output
    for SDPA/flash, the MLP's pre-activation and activation, the input of every Linear whose weight is
    trained (a frozen Linear needs its weight, not its input, to pass gradients down), LoRA's dropout
    copies and masks; eager attention adds the softmax matrix (fp32 + 16-bit copy).
    """
    m, c = req.model, _compute_bytes(req.precision)
    h = m.hidden_size
    q = m.num_heads * m.head_dim
    kv = m.num_kv_heads * m.head_dim
    inter = m.intermediate_size * (m.experts_per_token if m.num_experts > 1 else 1)
    # RMSNorm upcasts its input to fp32 (HF, LitGPT); autocast runs layer_norm in fp32 as well.
    norm_bytes = 4 if (m.norm == "rmsnorm" or _mixed(req.precision)) and not req.compile else c
    norm = norm_bytes * h * (1 if m.parallel_block else 2)
    # transformers' SDPA/eager paths repeat k and v to every query head (repeat_kv copies) and keep the
    # copies; flash-attention reads the grouped k/v, and LitGPT's expand() is a view.
    kv_saved = q if (req.framework == "hf" and req.attention != "flash") else kv
    attn = c * (q + 2 * kv_saved) + c * q
    if _eager_attention(req):
        attn += m.num_heads * req.step_seq_len * (4 + c)  # fp32 softmax + the 16-bit copy the PV matmul keeps
        if m.hf_extra.get("attn_logit_softcapping"):
            attn += m.num_heads * req.step_seq_len * c  # tanh keeps its output
    # SwiGLU keeps gate, up and act(gate); a compiled graph fuses act * up and keeps only gate and up.
    mlp = c * ((2 if req.compile else 3) * inter if m.gated_mlp else inter)

    # Which weight groups have trained weights (need their inputs saved)?
    if req.method == "full" or req.method == "freeze":
        attn_in = mlp_in = down_in = True
        lora = []
    elif req.method in ("lora", "qlora"):
        lora = _lora_modules(m, req.lora_targets)
        names = [x.name.rsplit(".", 1)[-1] for x in lora]
        attn_in = any(n in ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query", "key", "value",
                            "q_lin", "k_lin", "v_lin") for n in names)
        down = ("down_proj", "fc2", "fc_out", "c_proj", "lin2")
        mlp_in = any(x.in_features == h and x.name.rsplit(".", 1)[-1] not in
                     ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query", "key", "value",
                      "q_lin", "k_lin", "v_lin") and x.out_features != h for x in lora)
        down_in = any(x.name.rsplit(".", 1)[-1] in down and x.in_features != h for x in lora)
    else:  # prompt / prefix: nothing inside the blocks is trained
        attn_in = mlp_in = down_in = False
        lora = []
    if _bnb_keeps_inputs(req):
        # bitsandbytes < 0.43 kept the input of every 4-bit Linear for its backward (MatMul4Bit saved A),
        # including a copy of the attention output; kept as the default because an underestimate means an
        # OOM after the instance is paid for, and many images still pin such versions.
        attn_in = mlp_in = down_in = True
        saved_inputs = _bnb_inputs_per_token_layer(req)
    else:
        saved_inputs = c * (h * attn_in + (0 if m.parallel_block else h * mlp_in) + inter * down_in)
    lora_extra = 0.0
    for x in lora:
        copies = m.experts_per_token if x.expert else x.count  # a token passes through top-k experts only
        lora_extra += c * req.lora_r * copies
        if req.lora_dropout > 0:
            lora_extra += (c + 1) * x.in_features * copies  # dropout output + bool mask, per adapted module
        if req.dora:
            # the base output (compute dtype) and the fp32 adapter output, both multiplied by the magnitude
            # (counted on peft's DoRA layer)
            lora_extra += (c + 4) * x.out_features * copies
    per_layer = norm + attn + mlp + saved_inputs + lora_extra
    working = c * (2 * inter + 2 * h)  # gradients flowing through the block being back-propagated
    return per_layer, working


def activation_bytes(req: EstimateRequest, shard: int = 1) -> float:
    """Activation bytes at the backward peak for one micro-batch on one GPU."""
    m = req.model
    tokens = req.batch_size * (req.step_seq_len + (req.num_virtual_tokens if req.method == "prompt" else 0))
    per_layer, working = _act_bytes_per_token_layer(req)
    k = fitted_constants()["memory"]["activation_working_set"]
    layers = m.num_layers
    if req.method == "freeze":
        layers = min(req.freeze_trainable_layers, m.num_layers)  # nothing below the lowest trained block
    # The residual stream is fp32 when the weights it comes from are (fp32 masters, LitGPT's fp32 base).
    hidden_dtype = 4 if (_mixed(req.precision) and (req.method == "full" or _fp32_base(req))) \
        or req.precision == "fp32" else 2
    # Activation offloading keeps what is saved for backward in CPU RAM: on the GPU only the block being
    # computed and the one being prefetched.
    resident = min(layers, 2) if req.activation_offload else layers
    if req.grad_checkpointing:
        # Each block keeps its input; one block at a time is recomputed and back-propagated.
        act = tokens * (resident * hidden_dtype * m.hidden_size + per_layer + k * working)
    else:
        act = tokens * (resident * per_layer + k * working)
    if req.dora and req.method in ("lora", "qlora"):
        # DoRA's weight norm: W + scale * B @ A of the module being run, in fp32 (two full-size temporaries).
        act += 8 * max(x.in_features * x.out_features for x in _lora_modules(m, req.lora_targets))
    # Final norm input (fp32 in HF) + embedding output.
    act += tokens * m.hidden_size * (4 + hidden_dtype)
    return act + _litgpt_previous_step_inputs(req, tokens)


def logits_bytes(req: EstimateRequest) -> float:
    """The vocabulary-sized tensors of the output head and the loss, per token x vocab element.

    - standard (HF `ForCausalLMLoss`): the 16-bit logits, and in the backward of the fp32 cross-entropy the
      saved fp32 log-softmax, the dense fp32 gradient nll_loss returns, log-softmax's exp() temporary and the
      fp32 gradient it produces (4 x 4 bytes): 18 bytes per element in bf16 (about 17 measured); a model
      whose own code does not upcast keeps all of them in the compute dtype (`loss_upcast=False`);
    - chunked (torchtune's CEWithChunkedOutputLoss): the 16-bit logits and the fp32 log-softmax of every
      chunk; the upcast copies and gradients exist one chunk at a time;
    - fused (Liger / unsloth linear cross-entropy): no logits; one chunk of hidden-size rows at a time.
    Encoders (classification heads) have no vocabulary-sized output.
    """
    if req.model.is_encoder:
        return 0.0
    c = _compute_bytes(req.precision)
    tokens = req.batch_size * req.step_seq_len
    if req.loss == "fused":
        return tokens * req.model.hidden_size * (4 + 4 + c)
    if req.loss == "standard":
        per = c + 16 if req.loss_upcast else 6 * c  # without the upcast: logits, shifted copy, 4 loss tensors
    else:
        per = c + 4
    if req.framework == "litgpt":
        # LitGPT computes the head in 128-token chunks (`model(input_ids, lm_head_chunk_size=128)`) and the
        # loss per chunk without upcasting (`chunked_cross_entropy`): the logits and the log-softmax that
        # cross_entropy saves stay in the compute dtype, and the gradients exist one chunk at a time.
        per = 2 * c
    if req.model.hf_extra.get("final_logit_softcapping"):
        per += c  # tanh(logits / cap) * cap: tanh keeps its output for the backward pass
    return tokens * req.model.vocab_size * per


# ---- QLoRA base weights ---------------------------------------------------------------------------
def _qlora_weight_bytes(req: EstimateRequest) -> float:
    """NF4 storage of the quantized Linears, 16-bit for the rest, plus the one weight being dequantized.

    HF (transformers' BitsAndBytesConfig) quantizes the block Linears only and dequantizes to the dtype
    the weights were loaded in: one 16-bit copy of the biggest Linear at a time.
    LitGPT (Fabric's BitsandbytesPrecision, no ignore_modules) replaces EVERY nn.Linear, so its own,
    always untied lm_head (vocab x hidden, copied from the embedding for tied checkpoints) is NF4 as well;
    Fabric quantizes from `weight.half()`, so the quant state is fp16 and MatMul4Bit's
    `dequantize_4bit(B).to(A.dtype)` makes a second, compute-dtype copy under bf16: the transient is
    2 + 2 bytes per weight of the biggest quantized Linear, which for 50k+ vocabularies is the lm_head.
    """
    m = req.model
    per = NF4_DQ_BYTES if req.double_quant else NF4_BYTES
    quant = _quantized_params(m)
    biggest = max(x.in_features * x.out_features for x in m.linear_modules() if x.kind in _LINEAR)
    sixteen_bit = m.params_total() - quant
    deq_bytes = 2
    if req.framework == "litgpt" and not m.is_encoder:
        head = m.vocab_size * m.hidden_size
        sixteen_bit -= min(m.params_lm_head(), head)  # an untied head's weight moves to NF4 (bias stays)
        quant += head
        biggest = max(biggest, head)
        deq_bytes += 0 if req.precision.startswith("fp16") else _compute_bytes(req.precision)
    return quant * per + sixteen_bit * 2 + deq_bytes * biggest


# ---- the estimate -----------------------------------------------------------------------------------
def as_loaded(req: EstimateRequest) -> EstimateRequest:
    """The model as the framework holds it. LitGPT's GPT has its own lm_head and never ties it: its checkpoint
    converter copies the embedding into `lm_head.weight` for tied checkpoints (Gemma, Llama 3.2), so the
    head is a second vocab x hidden matrix (trained, with gradients and states, in a full fine-tune).
    MoE experts are per-expert nn.Linear under transformers 4 (quantized, adapted by all-linear) and fused
    3-D parameters under transformers 5 (16-bit, not adapted)."""
    m = req.model
    if req.framework == "litgpt" and m.tie_word_embeddings and not m.is_encoder:
        req = replace(req, model=m.model_copy({"tie_word_embeddings": False}))
    per_expert = req.transformers_major == 4 and req.framework == "hf"
    if req.model.num_experts > 1 and req.model.moe_experts_linear != per_expert:
        req = replace(req, model=req.model.model_copy({"moe_experts_linear": per_expert}))
    return req



def estimate_memory(req: EstimateRequest, gpu_count: int = 1) -> MemoryEstimate:
    """Peak memory per GPU, by component, for `req` on `gpu_count` GPUs (DDP / ZeRO / FSDP)."""
    req = as_loaded(req)
    m = req.model
    notes: list[str] = []
    p_total = m.params_total()
    p_train = trainable_params(req)
    prec = req.precision
    opt = req.resolved_optimizer
    zero = req.resolved_zero(gpu_count)
    n = max(gpu_count, 1)

    # Base weights in their storage format.
    if req.method == "qlora":
        weights = _qlora_weight_bytes(req)
    elif req.method == "full":
        weights = p_total * _master_bytes(prec)
    else:
        frozen = p_total - (p_train if req.method == "freeze" else 0)
        weights = frozen * _frozen_bytes(prec, req.framework) + (
            p_train * _master_bytes(prec) if req.method == "freeze" else 0)
        if _fp32_base(req):
            # autocast's 16-bit copy of each frozen Linear weight is saved for the backward pass: all of
            # them without checkpointing, one block's with it (plus the output head's either way).
            lin = _quantized_params(m) // (m.num_layers if req.grad_checkpointing else 1)
            weights += 2 * (lin + m.params_lm_head())

    # Trainable tensors beyond the base weights: adapters / virtual tokens in master precision, and the
    # 16-bit copy autocast keeps of every trained fp32 weight for the backward pass.
    trainable = 0.0
    # modules_to_save copies keep the base's 16-bit dtype (peft upcasts only the adapters), and so do their
    # gradients and AdamW states.
    p_save = modules_to_save_params(req)
    p_adapt = p_train - p_save
    if req.method in ("lora", "qlora", "prompt", "prefix"):
        trainable = p_adapt * _master_bytes(prec) + p_save * _frozen_bytes(prec)
    if _mixed(prec) and req.method in ("full", "freeze"):
        trainable += p_train * 2
    gradients = p_adapt * _master_bytes(prec) + p_save * _frozen_bytes(prec)
    optimizer = optimizer_state_bytes(opt, prec, m, p_adapt, req.method)
    if p_save:
        optimizer += optimizer_state_bytes(opt, "bf16-true" if _frozen_bytes(prec) == 2 else "fp32", m, p_save,
                                           req.method)

    # Sharding over GPUs: ZeRO-1 optimizer, ZeRO-2 + gradients, ZeRO-3/FSDP + weights.
    if n > 1 and zero >= 1:
        optimizer /= n
    if n > 1 and zero >= 2:
        gradients /= n
    if n > 1 and zero >= 3:
        gathered = 2 * 2 * m.params_per_block()  # the block being computed and the next one prefetched
        if req.framework == "litgpt" and req.method not in ("full", "freeze"):
            gathered = weights  # frozen base: every block's gathered weights live until backward ends
        weights = weights / n + gathered
        trainable /= n
    if req.offload in ("optimizer", "all"):
        optimizer = 0.0
        notes.append("optimizer states (and their fp32 masters) live in CPU RAM: plan for host memory")
        if _mixed(prec) and req.method in ("full", "freeze"):
            weights -= p_train * (_master_bytes(prec) - 2) / (n if zero >= 3 else 1)
    if req.offload == "all":
        weights = 2 * 2 * m.params_per_block() + (p_total - m.num_layers * m.params_per_block()) * 2 / n
        notes.append("parameters are streamed from CPU RAM block by block (ZeRO-3 offload): slow")

    activations = activation_bytes(req)
    logits = logits_bytes(req)

    # Optimizer step: torch's foreach AdamW materialises sqrt(v) for all parameters at once. It only
    # matters when that is bigger than the activations, which are gone by then.
    # The 16-bit autocast copies, activations and logits are freed by then, so the step peak exceeds
    # the backward peak only when that temporary is bigger than all three together.
    if opt == "adamw" and req.offload == "none" and not req.fused_optimizer:
        step_temp = optimizer / 2  # one state-sized temporary
        optimizer += max(0.0, step_temp - (trainable * (req.method in ("full", "freeze")) + activations + logits))

    consts = fitted_constants()["memory"]
    allocator = consts["allocator_fragmentation"] * (activations + logits) + consts["allocator_fixed_gib"] * GIB
    context = consts["cuda_context_gib"] * GIB

    if opt == "paged_adamw8bit":
        notes.append("paged optimizer: bitsandbytes can evict its states to CPU RAM under memory pressure")
    if _eager_attention(req) and req.seq_len >= 2048:
        notes.append("eager attention keeps the seq x seq score matrix of every head; sdpa or flash does not")
    return MemoryEstimate(
        weights=weights / GIB, trainable=trainable / GIB, gradients=gradients / GIB, optimizer=optimizer / GIB,
        activations=activations / GIB, logits=logits / GIB, allocator_overhead=allocator / GIB,
        cuda_context=context / GIB, params_total=p_total, params_trainable=p_train, notes=notes,
    )
