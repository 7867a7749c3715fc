"""The knobs users set (LoRA dropout, DoRA, modules_to_save, loss, packing, offload, compile, fused AdamW,
MoE layout): each memory term checked against real tensors on the CPU where it can be, the rest by the
physics a user relies on."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ftplan.planner.estimate.memory import GIB, activation_bytes, estimate_memory
from ftplan.planner.estimate.models import from_hf_config, load_catalog
from ftplan.planner.estimate.request import EstimateRequest

TINY = dict(model_type="llama", vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=512, max_position_embeddings=256, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny():
    return from_hf_config(TINY, name="tiny")


def _peft(spec, **lora):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec.to_hf_config()), dtype=torch.bfloat16)
    return get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", **lora))


def _saved_bytes(model, tokens: int) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of one forward (parameters excluded)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    store: dict[int, object] = {}  # the storages themselves: alive until counted, so no address is reused

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            store[ptr] = t.untyped_storage()
        return t

    ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids)
    total = sum(s.nbytes() for s in store.values())
    del out
    return total


def _per_token(model) -> float:
    return (_saved_bytes(model, 32) - _saved_bytes(model, 16)) / 16


def _est_per_token(req) -> float:
    return (activation_bytes(replace(req, seq_len=32)) - activation_bytes(replace(req, seq_len=16))) / 16


def test_lora_dropout_keeps_a_copy_of_each_adapted_input(tiny):
    """peft applies dropout per adapted module: its output (compute dtype) and mask are kept for backward."""
    real = _per_token(_peft(tiny, lora_dropout=0.1)) - _per_token(_peft(tiny, lora_dropout=0.0))
    req = EstimateRequest(model=tiny, method="lora", lora_r=8, grad_checkpointing=False, lora_dropout=0.0)
    est = _est_per_token(replace(req, lora_dropout=0.1)) - _est_per_token(req)
    assert est == pytest.approx(real, rel=0.1)


def test_dora_trainable_magnitudes_and_saved_outputs_match_peft(tiny):
    dora = _peft(tiny, lora_dropout=0.0, use_dora=True)
    req = EstimateRequest(model=tiny, method="lora", lora_r=8, grad_checkpointing=False, lora_dropout=0.0, dora=True)
    trainable = [p for p in dora.parameters() if p.requires_grad]
    assert estimate_memory(req).params_trainable == sum(p.numel() for p in trainable)
    real = _per_token(dora) - _per_token(_peft(tiny, lora_dropout=0.0))
    est = _est_per_token(req) - _est_per_token(replace(req, dora=False))
    assert est == pytest.approx(real, rel=0.1)


def test_modules_to_save_are_trained_16_bit_copies(tiny):
    model = _peft(tiny, modules_to_save=["lm_head", "embed_tokens"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    req = EstimateRequest(model=tiny, method="lora", lora_r=8, modules_to_save=("lm_head", "embed_tokens"))
    mem = estimate_memory(req)
    assert mem.params_trainable == sum(p.numel() for p in trainable)
    assert mem.trainable * GIB == sum(p.numel() * p.element_size() for p in trainable)


def test_unpacked_batches_peak_at_the_longest_sample():
    spec = load_catalog()["llama3.1-8b"]
    packed = EstimateRequest(model=spec, method="qlora", seq_len=4096)
    padded = replace(packed, packing=False, peak_seq_len=1024)
    a, b = estimate_memory(packed), estimate_memory(padded)
    assert b.logits == pytest.approx(a.logits / 4)
    assert b.activations < a.activations / 3


def test_activation_offload_keeps_two_blocks_on_the_gpu():
    spec = load_catalog()["llama3.1-8b"]
    req = EstimateRequest(model=spec, method="lora", seq_len=8192, grad_checkpointing=False)
    on = estimate_memory(replace(req, activation_offload=True)).activations
    assert on < estimate_memory(req).activations * 3 / spec.num_layers


def test_fused_adamw_has_no_foreach_temporary():
    spec = load_catalog()["llama3.2-1b"]
    req = EstimateRequest(model=spec, method="full", seq_len=256, precision="bf16-true")
    assert estimate_memory(replace(req, fused_optimizer=True)).optimizer < estimate_memory(req).optimizer


def test_compile_saves_fewer_intermediates_and_launches_fewer_kernels():
    from ftplan.planner.estimate.throughput import kernel_launches

    spec = load_catalog()["mistral-7b"]
    req = EstimateRequest(model=spec, method="lora", seq_len=2048)
    assert estimate_memory(replace(req, compile=True)).activations < estimate_memory(req).activations
    assert kernel_launches(replace(req, compile=True)) < kernel_launches(req) / 2


def test_mixtral_experts_quantized_under_transformers_4_only():
    """Mixtral QLoRA at 4 x 4096 measured 40 GiB allocated: transformers 4's per-expert Linears are 4-bit;
    transformers 5's fused 3-D experts are not quantized by bitsandbytes and stay 16-bit."""
    spec = load_catalog()["mixtral-8x7b"]
    req = EstimateRequest(model=spec, method="qlora", seq_len=4096, batch_size=4, transformers_major=5)
    v5, v4 = estimate_memory(req), estimate_memory(replace(req, transformers_major=4))
    assert v5.params_total == v4.params_total  # same parameters, another layout
    assert v5.weights > 80 and v4.weights < 30
    assert v4.allocated == pytest.approx(40, rel=0.25)


def test_transformers_default_is_what_launch_installs():
    from pathlib import Path

    from ftplan.planner.estimate.request import launch_transformers_major

    pin = (Path(__file__).parents[1] / "remote_job" / "requirements.txt").read_text()
    major = int(pin.split("transformers==", 1)[1].split(".", 1)[0])
    assert launch_transformers_major() == major


def test_unknown_knob_values_are_one_line_errors(tiny):
    from ftplan.planner.errors import UserError

    with pytest.raises(UserError, match="modules-to-save"):
        EstimateRequest(model=tiny, method="lora", modules_to_save=("wte",))
    with pytest.raises(UserError, match="--dora applies to"):
        EstimateRequest(model=tiny, method="full", dora=True)
    with pytest.raises(UserError, match="lora-dropout"):
        EstimateRequest(model=tiny, method="lora", lora_dropout=1.5)
