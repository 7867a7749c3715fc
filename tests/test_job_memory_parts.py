"""The memory the job allocates is the memory the estimate counts (issue 19 item 6), proven on the CPU.

The model is built exactly as the job builds it on a GPU (bf16 load, NF4 + double quantization, LoRA on
all linear layers), then each parameter group's dtype and bytes are checked against the estimator's parts.
"""

from __future__ import annotations

import pytest
from job_helpers import make_job, use_job_modules

use_job_modules()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import job_config
    import job_model
    import torch

    from ftplan.planner.estimate.models import resolve_model

    spec = resolve_model("tiny-llama")
    tmp = tmp_path_factory.mktemp("mem")
    cfg = job_config.load(str(make_job(tmp, method="qlora", model={"config": spec.to_hf_config()},
                                       lora={"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear"})))
    model, info = job_model.load_model(cfg, spec.vocab_size, "cpu", torch.bfloat16, True, lambda: None)
    return spec, model, info


def test_parameter_groups_match_the_estimate(built):
    import torch

    from ftplan.planner.estimate.memory import NF4_DQ_BYTES, _quantized_params, estimate_memory
    from ftplan.planner.estimate.request import EstimateRequest

    spec, model, _info = built
    quant_bytes = sixteen = trainable = 0
    for name, p in model.named_parameters():
        if type(p).__name__ == "Params4bit":
            assert p.dtype == torch.uint8 and not p.requires_grad
            quant_bytes += p.numel() * p.element_size()
        elif p.requires_grad:
            assert "lora_" in name and p.dtype == torch.float32, name  # LoRA weights train in fp32
            trainable += p.numel()
        else:
            # frozen non-quantized weights (embeddings, lm_head, norms) stay 16-bit: no fp32 upcast
            assert p.dtype == torch.bfloat16, (name, p.dtype)
            sixteen += p.numel()
    quantized = _quantized_params(spec)
    assert quant_bytes == quantized // 2  # two NF4 values per byte
    assert sixteen == spec.params_total() - quantized
    req = EstimateRequest(model=spec, method="qlora", lora_r=8, lora_alpha=16, lora_targets="all-linear")
    est = estimate_memory(req)
    assert trainable == est.params_trainable
    assert est.trainable * 1024**3 == pytest.approx(trainable * 4, rel=1e-6)
    # weights = NF4 (+ absmax and double-quant constants) + 16-bit rest + one dequantized Linear at a time
    biggest = max(x.in_features * x.out_features for x in spec.linear_modules() if x.kind in ("linear", "conv1d"))
    expected = quantized * NF4_DQ_BYTES + sixteen * 2 + 2 * biggest
    assert est.weights * 1024**3 == pytest.approx(expected, rel=0.02)


def test_no_fp32_copy_of_the_logits_after_prepare(built):
    """accelerate converts the outputs of a mixed-precision forward to fp32; the job drops that copy."""
    import job_model
    import torch
    from accelerate import Accelerator

    spec, model, _info = built
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # another test in this process made one
    acc = Accelerator(cpu=True, mixed_precision="bf16")
    prepared = acc.prepare(model)
    ids = torch.randint(0, spec.vocab_size, (2, 16))
    assert prepared(input_ids=ids).logits.dtype == torch.float32  # accelerate's conversion
    assert job_model.drop_fp32_output_copy(acc.unwrap_model(prepared))
    out = prepared(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
