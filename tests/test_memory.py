"""Memory estimate: exact bytes against real tensors of a tiny model, and the physics users rely on."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ftplan.planner.estimate.estimator import EstimateRequest, estimate
from ftplan.planner.estimate.gpus import resolve_gpu
from ftplan.planner.estimate.memory import GIB, estimate_memory, optimizer_state_bytes
from ftplan.planner.estimate.models import from_hf_config

TINY = dict(model_type="llama", vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=512, max_position_embeddings=256, tie_word_embeddings=False)
BIG = dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
           num_key_value_heads=8, intermediate_size=14336, max_position_embeddings=8192, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_spec():
    return from_hf_config(TINY, name="tiny")


@pytest.fixture(scope="module")
def big():
    return from_hf_config(BIG, name="llama3-8b-like")


def _hf_model(spec, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**spec.to_hf_config())
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _train_one_step(model, params):
    import torch

    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, 512, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return opt


def _state_bytes(opt) -> int:
    return sum(_bytes(v for v in s.values() if v.dim() > 0) for s in opt.state.values())


def test_full_bf16_true_matches_real_tensors(tiny_spec):
    import torch

    model = _hf_model(tiny_spec, torch.bfloat16)
    opt = _train_one_step(model, model.parameters())
    req = EstimateRequest(model=tiny_spec, method="full", precision="bf16-true", seq_len=16)
    mem = estimate_memory(req)
    assert mem.params_total == sum(p.numel() for p in model.parameters())
    assert mem.weights * GIB == _bytes(model.parameters())
    assert mem.gradients * GIB == _bytes(p.grad for p in model.parameters())
    assert optimizer_state_bytes("adamw", "bf16-true", tiny_spec, mem.params_trainable, "full") == _state_bytes(opt)


def test_lora_bf16_mixed_matches_peft(tiny_spec):
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_hf_model(tiny_spec, torch.bfloat16),
                           LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.05))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    opt = _train_one_step(model, trainable)
    req = EstimateRequest(model=tiny_spec, method="lora", lora_r=8, seq_len=16)
    mem = estimate_memory(req)
    assert mem.params_trainable == sum(p.numel() for p in trainable)
    assert mem.weights * GIB == _bytes(frozen)  # frozen base stays bf16
    assert mem.trainable * GIB == _bytes(trainable)  # peft keeps adapters in fp32
    assert mem.gradients * GIB == _bytes(p.grad for p in trainable)
    assert optimizer_state_bytes("adamw", "bf16-mixed", tiny_spec, mem.params_trainable, "lora") == _state_bytes(opt)


def test_qlora_nf4_storage_matches_bitsandbytes(tiny_spec, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _hf_model(tiny_spec, torch.bfloat16).save_pretrained(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    real = _bytes(q.parameters())
    for module in q.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            real += _bytes([state.absmax, state.state2.absmax, state.state2.code])
    mem = estimate_memory(EstimateRequest(model=tiny_spec, method="qlora", seq_len=16))
    biggest = max(m.in_features * m.out_features for m in tiny_spec.linear_modules())
    stored = mem.weights * GIB - 2 * biggest  # minus the one Linear dequantized at a time
    # Per-tensor constants (the 256-entry code table of each quantized weight) are the only difference.
    assert stored == pytest.approx(real, rel=0.03)


def test_total_is_the_sum_and_methods_order_as_expected(big):
    totals = {}
    for method in ("full", "freeze", "lora", "qlora", "prompt", "prefix"):
        mem = estimate_memory(EstimateRequest(model=big, method=method))
        assert mem.total == pytest.approx(sum(mem.as_dict()[k] for k in mem.as_dict() if k != "total"), abs=0.01)
        totals[method] = mem.total
    assert totals["qlora"] < totals["lora"] < totals["freeze"] < totals["full"]
    assert totals["prompt"] < totals["lora"]
    # Full fine-tuning in bf16-mixed costs 16-20 bytes per parameter (fp32 master, grads, two Adam states).
    per_param = totals["full"] * GIB / big.params_total()
    assert 16 <= per_param <= 21
    true_bf16 = estimate_memory(EstimateRequest(model=big, method="full", precision="bf16-true"))
    assert 8 <= true_bf16.total * GIB / big.params_total() <= 11


def test_activations_follow_checkpointing_attention_and_length(big):
    base = EstimateRequest(model=big, method="lora", seq_len=4096, grad_checkpointing=False)
    no_ckpt = estimate_memory(base).activations
    ckpt = estimate_memory(replace(base, grad_checkpointing=True)).activations
    eager = estimate_memory(replace(base, attention="eager")).activations
    assert ckpt < no_ckpt / 5
    # Eager keeps heads x seq x seq scores (fp32 softmax + bf16 copy) per layer: 32*4096^2*6 B * 32 layers.
    assert eager - no_ckpt == pytest.approx(32 * 4096**2 * 6 * 32 / GIB, rel=0.01)
    half = estimate_memory(replace(base, seq_len=2048)).activations
    assert no_ckpt == pytest.approx(2 * half, rel=0.05)


def test_logits_scale_with_vocabulary_tokens_and_loss(big):
    elements = 2 * 8192 * 128256
    req = EstimateRequest(model=big, method="qlora", seq_len=8192, batch_size=2)
    # Standard: bf16 logits + 4 fp32 tensors (saved log-softmax, nll's dense gradient, exp(), its result).
    assert estimate_memory(req).logits == pytest.approx(elements * 18 / GIB, rel=1e-6)
    # A model that does not upcast (Qwen v1's own code) keeps all six in bf16.
    assert estimate_memory(replace(req, loss_upcast=False)).logits == pytest.approx(elements * 12 / GIB, rel=1e-6)
    # Chunked: bf16 logits + every chunk's fp32 log-softmax; fused never holds the logits.
    assert estimate_memory(replace(req, loss="chunked")).logits == pytest.approx(elements * 6 / GIB, rel=1e-6)
    fused = estimate_memory(replace(req, loss="fused")).logits
    assert fused < estimate_memory(replace(req, loss="chunked")).logits / 10


def test_standard_loss_saves_fp32_log_softmax_of_every_logit(tiny_spec):
    """What HF's loss keeps for the backward pass, counted on real tensors: the fp32 log-softmax (4 bytes per
    logit element) besides the 16-bit logits; the estimate's other 12 bytes are the backward's temporaries."""
    import torch

    model = _hf_model(tiny_spec, torch.bfloat16)
    ids = torch.randint(0, 512, (1, 16))
    hidden = model.model(input_ids=ids).last_hidden_state.detach().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = model.lm_head(hidden)
        model.loss_function(logits=logits, labels=ids, vocab_size=512)
    fp32 = {t.data_ptr(): t for t in saved if t.dtype == torch.float32 and t.numel() == logits.numel()}
    assert sum(t.numel() * t.element_size() for t in fp32.values()) == 4 * logits.numel()


def test_sharding_and_offload(big):
    one = estimate_memory(EstimateRequest(model=big, method="full"), 1)
    z1 = estimate_memory(EstimateRequest(model=big, method="full", zero=1), 4)
    z2 = estimate_memory(EstimateRequest(model=big, method="full", zero=2), 4)
    z3 = estimate_memory(EstimateRequest(model=big, method="full", zero=3), 4)
    assert z1.weights == one.weights and z1.gradients == one.gradients
    assert z2.gradients == pytest.approx(one.gradients / 4)
    assert z3.weights < one.weights / 3
    assert one.total > z1.total > z2.total > z3.total
    off = estimate_memory(EstimateRequest(model=big, method="full", offload="optimizer", zero=3), 4)
    assert off.optimizer == 0 and off.total < z3.total
    assert any("CPU RAM" in n for n in off.notes)


def test_8bit_optimizers_and_adafactor_are_smaller(big):
    def opt(name):
        return estimate_memory(EstimateRequest(model=big, method="full", optimizer=name, precision="bf16-true"))

    assert opt("adamw8bit").optimizer < opt("adamw").optimizer / 1.5
    assert opt("adafactor").optimizer < opt("adamw8bit").optimizer
    assert opt("sgd").optimizer <= opt("adafactor").optimizer


def test_fit_decision_uses_driver_visible_memory(big):
    req = EstimateRequest(model=big, method="lora", seq_len=1024)
    total = estimate_memory(req).total
    a10g = estimate(req, resolve_gpu("A10G"))
    assert a10g.headroom_gib == pytest.approx(resolve_gpu("A10G").usable_gib - total)
    assert a10g.fits == (total <= resolve_gpu("A10G").usable_gib)


def test_litgpt_fp32_base_under_autocast_keeps_16bit_weight_copies(tiny_spec):
    """LitGPT bf16-mixed: the frozen base is fp32 and autocast saves a bf16 copy of every Linear weight
    for the backward pass. Counted on real tensors with saved_tensors_hooks (CPU autocast)."""
    import torch

    model = _hf_model(tiny_spec, torch.float32)
    model.requires_grad_(False)
    model.enable_input_require_grads()  # what PEFT does so adapters below the top still get gradients
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    copies: dict[int, int] = {}

    def pack(t):
        if t.dtype == torch.bfloat16 and t.dim() == 2 and shapes & {tuple(t.shape), tuple(t.shape)[::-1]}:
            copies[t.data_ptr()] = t.numel() * 2
        return t

    ids = torch.randint(0, 512, (1, 16))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    req = EstimateRequest(model=tiny_spec, method="lora", lora_r=8, seq_len=16, grad_checkpointing=False,
                          framework="litgpt")
    lit, hf = estimate_memory(req), estimate_memory(replace(req, framework="hf"))
    assert hf.weights * GIB == 2 * tiny_spec.params_total()
    fp32_extra = 2 * tiny_spec.params_total()  # 4-byte instead of 2-byte base weights
    assert (lit.weights - hf.weights) * GIB - fp32_extra == pytest.approx(sum(copies.values()), rel=0.01)
    # With checkpointing only one block's copies (and the head's) are alive at a time.
    ckpt = estimate_memory(replace(req, grad_checkpointing=True))
    assert ckpt.weights < lit.weights


def test_litgpt_fsdp_lora_keeps_gathered_frozen_weights(big):
    """LitGPT's FSDP with a frozen base peaks at the unsharded weights plus the shard (resource tables);
    HF/DeepSpeed ZeRO-3 frees each block's gathered weights, so its peak shrinks with more GPUs."""
    req = EstimateRequest(model=big, method="lora", precision="bf16-true", zero=3, framework="litgpt")
    one = estimate_memory(req, 1).weights
    lit2, lit4 = estimate_memory(req, 2).weights, estimate_memory(req, 4).weights
    assert lit2 == pytest.approx(one * 1.5) and lit4 == pytest.approx(one * 1.25)
    hf4 = estimate_memory(replace(req, framework="hf"), 4).weights
    assert hf4 < one / 3


def test_softcapped_attention_materialises_scores_even_with_sdpa(big):
    """Gemma-2's attention logit soft-capping cannot run in SDPA: the scores are materialised as in eager."""
    capped = big.model_copy(update={"hf_extra": {"attn_logit_softcapping": 50.0}})
    base = EstimateRequest(model=big, method="lora", seq_len=1024, grad_checkpointing=False)
    plain = estimate_memory(base).activations
    soft = estimate_memory(replace(base, model=capped)).activations
    eager = estimate_memory(replace(base, attention="eager")).activations
    # eager scores (fp32 softmax + bf16 copy) plus the tanh output soft-capping keeps: 8 bytes per score.
    assert soft - plain == pytest.approx(32 * 1024**2 * 8 * 32 / GIB, rel=0.01)
    assert soft > eager > plain
    flash = estimate_memory(replace(base, model=capped, attention="flash")).activations
    assert flash < plain  # flash-attention supports soft-capping and reads grouped k/v without copies


# ---- LitGPT QLoRA (Fabric BitsandbytesPrecision + bitsandbytes 0.42, the version LitGPT pins) ----------
def _nf4_from_half(weight):
    """Quantize as Fabric's `_Linear4bit._quantize_weight` does: from `weight.half()`, so the quant state
    (and what dequantize_4bit returns) is fp16."""
    import bitsandbytes.functional as bnbf

    return bnbf.quantize_4bit(weight.detach().contiguous().half(), blocksize=64, compress_statistics=False,
                              quant_type="nf4")


def _matmul4bit_v042():
    """bitsandbytes 0.42.0 `autograd/_functions.py` MatMul4Bit as released (forward: dequantize, linear,
    `ctx.tensors = (A, B)`; backward: `grad_A = grad_output @ dequantize_4bit(B).to(grad_output.dtype)`).
    Not installable here (0.42 has no CPU 4-bit kernels); the lines that decide memory are reproduced."""
    import bitsandbytes.functional as bnbf
    import torch

    class MatMul4BitV042(torch.autograd.Function):
        @staticmethod
        def forward(ctx, A, B, quant_state):
            output = torch.nn.functional.linear(A, bnbf.dequantize_4bit(B, quant_state).to(A.dtype))
            ctx.state = quant_state
            ctx.tensors = (A, B) if any(ctx.needs_input_grad[:2]) else (None, None)
            return output

        @staticmethod
        def backward(ctx, grad_output):
            _, B = ctx.tensors
            return grad_output @ bnbf.dequantize_4bit(B, ctx.state).to(grad_output.dtype), None, None

    class NF4Linear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.packed, self.state = _nf4_from_half(linear.weight)

        def forward(self, x):
            return MatMul4BitV042.apply(x, self.packed, self.state)

    return MatMul4BitV042, NF4Linear


def test_litgpt_keeps_the_previous_micro_batch_bitsandbytes_inputs(tiny_spec):
    """bitsandbytes <= 0.42 stores MatMul4Bit's input as a ctx attribute, which backward does not release.
    LitGPT's loop keeps `logits` (hence the graph) until the next forward returns, so these inputs are still
    alive then. Counted on real tensors: every quantized Linear (Fabric converts lm_head too) of a tiny
    Llama, after backward, with the logits still referenced as LitGPT's loop does."""
    import torch

    fn, nf4_linear = _matmul4bit_v042()
    model = _hf_model(tiny_spec, torch.bfloat16)
    model.requires_grad_(False)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, child_name, nf4_linear(child))
    ids = torch.randint(0, 512, (2, 16))
    embeds = model.get_input_embeddings()(ids).requires_grad_()  # adapters below: inputs need grad
    logits = model(inputs_embeds=embeds).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()

    kept, seen, stack = {}, set(), [logits.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == fn.__name__ + "Backward" and node.tensors[0] is not None:
            storage = node.tensors[0].untyped_storage()
            kept[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_fn for next_fn, _ in node.next_functions)

    req = EstimateRequest(model=tiny_spec, method="qlora", precision="bf16-true", seq_len=16, batch_size=2,
                          grad_checkpointing=False, framework="litgpt")
    from ftplan.planner.estimate.memory import litgpt_previous_step_input_bytes

    assert litgpt_previous_step_input_bytes(req) == sum(kept.values())
    # HF's Trainer drops the graph after backward; checkpointing and plain LoRA have no such inputs.
    assert litgpt_previous_step_input_bytes(replace(req, framework="hf")) == 0
    assert litgpt_previous_step_input_bytes(replace(req, grad_checkpointing=True)) == 0
    assert litgpt_previous_step_input_bytes(replace(req, method="lora")) == 0


def test_installed_bitsandbytes_no_longer_keeps_the_input():
    """Why it is a fitted switch (`qlora_saves_linear_inputs`): bitsandbytes >= 0.43 saves (None, B)."""
    import bitsandbytes as bnb
    import torch

    layer = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 64, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="nf4")
    layer = layer.to("cpu")
    out = layer(torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True))
    assert out.grad_fn.tensors[0] is None


def test_litgpt_qlora_quantizes_the_head_and_dequantizes_through_fp16(tiny_spec):
    """Fabric's BitsandbytesPrecision replaces every nn.Linear, LitGPT's lm_head included, quantizing from
    fp16: dequantize_4bit returns fp16 and MatMul4Bit's `.to(bf16)` makes a second copy. Storage measured on
    real bitsandbytes tensors; the transient is both copies of the biggest weight (here the head)."""
    import bitsandbytes.functional as bnbf
    import torch

    model = _hf_model(tiny_spec, torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    stored = 0
    for lin in linears:
        packed, state = _nf4_from_half(lin.weight)
        stored += _bytes([packed, state.absmax])
    head_packed, head_state = _nf4_from_half(model.lm_head.weight)
    fp16 = bnbf.dequantize_4bit(head_packed, head_state)
    transient = _bytes([fp16, fp16.to(torch.bfloat16)])
    assert fp16.dtype == torch.float16
    quantized = {id(p) for lin in linears for p in lin.parameters()}
    stored += _bytes(p for p in model.parameters() if id(p) not in quantized)  # embedding, norms: bf16

    req = EstimateRequest(model=tiny_spec, method="qlora", precision="bf16-true", seq_len=16,
                          double_quant=False, framework="litgpt")
    mem = estimate_memory(req)
    assert mem.weights * GIB == pytest.approx(stored + transient, rel=0.03)  # 16-float code table per weight
    hf = estimate_memory(replace(req, framework="hf"))
    assert mem.weights < hf.weights + transient / GIB  # the head shrinks to 4 bits


def test_litgpt_logits_stay_in_compute_dtype():
    """LitGPT's chunked lm_head + `chunked_cross_entropy` never upcast: cross_entropy on bf16 logits keeps a
    bf16 log-softmax, so the logits and what the loss saves are 2 + 2 bytes per token and vocabulary entry."""
    import torch

    from ftplan.planner.estimate.models import from_hf_config

    spec = from_hf_config(dict(TINY, vocab_size=1024), name="tiny-1k")
    tokens, vocab = 2 * 16, 1024
    logits = torch.randn(tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.nn.functional.cross_entropy(logits, torch.randint(0, vocab, (tokens,)), reduction="none")
    big_saved = list({t.data_ptr(): t for t in saved if t.numel() == tokens * vocab}.values())  # log-softmax
    assert [t.dtype for t in big_saved] == [torch.bfloat16]
    req = EstimateRequest(model=spec, method="lora", precision="bf16-true", seq_len=16, batch_size=2,
                          framework="litgpt")
    assert estimate_memory(req).logits * GIB == _bytes([logits]) + _bytes(big_saved)
    assert estimate_memory(replace(req, framework="hf")).logits > estimate_memory(req).logits


def test_litgpt_never_ties_the_head():
    """LitGPT's converter copies a tied checkpoint's embedding into its own lm_head: a second matrix."""
    from ftplan.planner.estimate.models import from_hf_config

    tied = from_hf_config(dict(TINY, tie_word_embeddings=True), name="tiny-tied")
    req = EstimateRequest(model=tied, method="lora", precision="bf16-true", seq_len=16, framework="litgpt")
    lit, hf = estimate_memory(req), estimate_memory(replace(req, framework="hf"))
    assert (lit.weights - hf.weights) * GIB == 2 * tied.vocab_size * tied.hidden_size
    assert lit.params_total == hf.params_total + tied.vocab_size * tied.hidden_size
