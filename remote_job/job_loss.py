"""The training loss without the full-vocabulary logits.

A causal LM's standard loss builds fp32 logits of shape (tokens, vocab): with Llama-3's 128k vocabulary
that is 2 GiB at 4k tokens, plus as much again for their gradient, the largest activation of a (Q)LoRA
step. Here the model is run with `logits_to_keep=1`, the final hidden states are taken from the
backbone, and the cross-entropy is computed chunk by chunk over the tokens that have a label:

- `chunked` (plain PyTorch, any device): each chunk's logits are built in fp32, reduced to a loss and,
  when training, turned at once into the gradients w.r.t. the hidden states and the head's weight
  (softmax - one-hot), then freed; backward only scales the stored gradients. Peak: one chunk's logits.
  A head that is not a plain `nn.Linear` (LoRA on lm_head, a quantized head) is run per chunk under
  activation checkpointing instead: backward recomputes one chunk at a time.
- `fused`: Liger's fused linear cross-entropy (Triton) on CUDA when `liger-kernel` is installed, applied
  to the model instance at load time (`use_liger`); elsewhere the job falls back to `chunked`.
- `standard`: `model(**batch, labels=...).loss`, the transformers loss.

All three give the mean over the labelled tokens after the causal shift (labels -100 are skipped), as
transformers does. Models whose logits are soft-capped or scaled (Gemma-2, Cohere, Granite) get the
standard loss: the chunked head would have to reproduce each model's own transform. So do models whose
head weight is sharded (FSDP, ZeRO-3): outside their forward the weight is not whole.
"""

from __future__ import annotations

import logging

IGNORE = -100
LOSSES = ("fused", "chunked", "standard")
# Bytes of fp32 logits per chunk: small next to a step's activations, large enough for efficient matmuls
# (128 tokens per chunk at a 128k vocabulary).
CHUNK_LOGIT_BYTES = 64 * 1024**2
MIN_CHUNK_TOKENS = 16
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

log = logging.getLogger("job")


# ---------------------------------------------------------------- choosing
def resolve(requested: str, device_type: str, model=None) -> str:
    """What actually runs: 'liger', 'chunked' or 'standard' (written to summary.json)."""
    if requested == "standard":
        return "standard"
    if model is not None and _logit_transform(model):
        log.info("loss: standard (the model transforms its logits with %s)", _logit_transform(model))
        return "standard"
    if requested == "fused" and device_type == "cuda" and liger_available():
        return "liger"
    return "chunked"


def prepare(requested: str, device_type: str, model) -> str:
    """resolve(), then patch the model for Liger; a Liger that fails to patch leaves the chunked loss."""
    mode = resolve(requested, device_type, model)
    if mode == "liger":
        try:
            use_liger(model)
        except Exception as exc:  # noqa: BLE001 - an optional kernel package must never stop the run
            log.warning("loss: Liger could not patch this model (%s: %s); using the chunked loss",
                        type(exc).__name__, exc)
            return "chunked"
    return mode


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def use_liger(model) -> None:
    """Patch the loaded model in place with Liger's kernels (fused linear CE, RMSNorm, SwiGLU, RoPE).

    transformers' own integration (what `Trainer(use_liger_kernel=True)` calls): it unwraps peft and
    dispatches on the model type. The patched forward returns the fused loss when training with labels.
    """
    from transformers.integrations.liger import apply_liger_kernel

    apply_liger_kernel(model, {})


def _hf_model(model):
    """The transformers model inside accelerate/DDP and peft wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _head_is_sharded(model, head) -> bool:
    """FSDP and ZeRO-3 hold the head's weight in pieces outside their forward: only the model's own loss
    can use it there."""
    wrapper = model
    while hasattr(wrapper, "module"):
        if "FullyShardedDataParallel" in type(wrapper).__name__:
            return True
        wrapper = wrapper.module
    weight = getattr(head, "weight", None)
    return weight is None or weight.numel() == 0 or hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor"


def _logit_transform(model) -> str | None:
    config = getattr(_hf_model(model), "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return name
    return None


# ---------------------------------------------------------------- the model call
def model_inputs(model, batch: dict) -> dict:
    """Inputs for the model's forward, without labels.

    Packed rows carry position_ids that restart at 0 for each record. Without a 2-D attention mask,
    transformers derives a block-diagonal causal mask from them (masking_utils.find_packed_sequence_indices,
    for SDPA, eager and flex attention), so no token attends across a record boundary; right padding needs
    no mask under causal attention (its positions have label -100). flash-attention's varlen path reads the
    boundaries from position_ids only for a single row, so rows are flattened into one for it.
    """
    inputs = {"input_ids": batch["input_ids"]}
    if "position_ids" not in batch:
        inputs["attention_mask"] = batch["attention_mask"]
        return inputs
    inputs["position_ids"] = batch["position_ids"]
    attn = str(getattr(getattr(_hf_model(model), "config", None), "_attn_implementation", "") or "")
    if "flash" in attn and batch["input_ids"].shape[0] > 1:
        inputs = {k: v.reshape(1, -1) for k, v in inputs.items()}
    return inputs


def compute(model, batch: dict, mode: str):
    """The batch's mean loss over labelled tokens. `mode` is what `resolve` returned."""
    inputs = model_inputs(model, batch)
    labels = batch["labels"]
    if inputs["input_ids"].shape != labels.shape:
        labels = labels.reshape(inputs["input_ids"].shape)
    hf = _hf_model(model)
    if mode in ("standard", "liger") or _head_is_sharded(model, hf.get_output_embeddings()):
        return model(**inputs, labels=labels).loss
    import torch

    captured = {}

    def grab(_module, _args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state
        # The head must run in the precision the model ran in (accelerate autocasts inside forward only).
        kind = captured["hidden"].device.type
        if torch.is_autocast_enabled(kind):
            captured["dtype"] = torch.get_autocast_dtype(kind)

    handle = hf.base_model.register_forward_hook(grab)
    try:
        model(**inputs, logits_to_keep=1)  # the head sees one position: a (batch, 1, vocab) output
    finally:
        handle.remove()
    return chunked_cross_entropy(captured["hidden"], hf.get_output_embeddings(), labels,
                                 compute_dtype=captured.get("dtype"))


# ---------------------------------------------------------------- the chunked loss
def chunk_tokens(vocab: int, n: int) -> int:
    return max(MIN_CHUNK_TOKENS, min(n, CHUNK_LOGIT_BYTES // (4 * vocab)))


def chunked_cross_entropy(hidden, head, labels, chunk: int | None = None, compute_dtype=None):
    """Mean causal-LM cross-entropy of `head(hidden)` against `labels`, one chunk of tokens at a time.

    hidden: (batch, seq, dim) final hidden states; labels: (batch, seq) with -100 where nothing is learnt.
    Position i predicts labels[i + 1], as in transformers' ForCausalLMLoss. compute_dtype: the autocast
    dtype the model ran under (None: no autocast); logits are always reduced in fp32.
    """
    import contextlib

    import torch

    dim = hidden.shape[-1]
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE
    # Only labelled positions reach the head: prompt tokens need no logits at all.
    h = hidden[:, :-1].reshape(-1, dim)[keep]
    y = targets[keep]
    n = y.numel()
    if n == 0:
        return hidden.sum() * 0.0  # nothing to learn here; keeps the graph (and DDP) intact
    weight = head.weight
    chunk = chunk or chunk_tokens(weight.shape[0], n)
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    if needs_grad and type(head) is torch.nn.Linear:
        dtype = compute_dtype or torch.promote_types(h.dtype, weight.dtype)
        return _LinearCrossEntropy.apply(h, weight, head.bias, y, chunk, dtype)
    autocast = (torch.autocast(h.device.type, dtype=compute_dtype) if compute_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        if not needs_grad:
            with torch.no_grad():
                return sum(_chunk_sum(head, h[s : s + chunk], y[s : s + chunk]) for s in range(0, n, chunk)) / n
        from torch.utils.checkpoint import checkpoint

        return sum(checkpoint(_chunk_sum, head, h[s : s + chunk], y[s : s + chunk], use_reentrant=False)
                   for s in range(0, n, chunk)) / n


def _chunk_sum(head, h, y):
    import torch

    return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")


def _make_function():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Loss and gradients of mean CE(h @ W^T + b, y), computed chunk by chunk in the forward pass."""

        @staticmethod
        def forward(ctx, h, weight, bias, y, chunk, dtype):
            n = y.numel()
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            w = weight.to(dtype)  # one cast per step (a frozen fp32 head under bf16 autocast), not per chunk
            b = bias.to(dtype) if bias is not None else None
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros_like(weight) if need_w else None
            grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, n, chunk):
                hc, yc = h[s : s + chunk].to(dtype), y[s : s + chunk]
                logits = hc @ w.t()
                if b is not None:
                    logits = logits + b
                logits = logits.float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
                # d(sum CE)/d logits = softmax - one_hot, built in place of the logits; scaled to the mean.
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(yc.numel(), device=grad.device), yc] -= 1.0
                grad.div_(n)
                if need_h:
                    grad_h[s : s + chunk] = grad.to(dtype) @ w
                if need_w:
                    grad_w.addmm_(grad.t().to(grad_w.dtype), hc.to(grad_w.dtype))
                if need_b:
                    grad_b += grad.sum(0)
                del logits, grad
            ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
            ctx.present = (need_h, need_w, need_b)
            ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
            return total / n

        @staticmethod
        def backward(ctx, grad_out):
            saved = iter(ctx.saved_tensors)
            out = []
            for present, dtype in zip(ctx.present, ctx.dtypes, strict=True):
                out.append((next(saved) * grad_out).to(dtype) if present else None)
            return (*out, None, None, None)

    return LinearCrossEntropy


class _Lazy:
    """Builds the autograd Function on first use, so importing this module does not import torch."""

    fn = None

    @classmethod
    def apply(cls, *args):
        if cls.fn is None:
            cls.fn = _make_function()
        return cls.fn.apply(*args)


_LinearCrossEntropy = _Lazy
