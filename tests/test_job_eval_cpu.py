"""The shipped demo model's eval path on any CPU (issue 11 item 18).

On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights in eval mode and asserts shapes that small models
fail ("N must be divisible by block_n"). The CPU under test here may lack that feature, so the test turns
bitsandbytes' own per-layer flag on, as such a CPU would, and runs the job's evaluate() on the catalog's
tiny-llama built and quantized exactly as the job does.
"""

from __future__ import annotations

import math

import pytest
from job_helpers import make_job, tiny_tokenizer, use_job_modules

use_job_modules()

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("intermediate", [None, 176])  # the catalog's shape, and the old one that crashed
def test_qlora_eval_on_a_cpu_with_avx512_bf16(tmp_path, intermediate):
    import job_config
    import job_data
    import job_model
    import torch
    import train
    from accelerate import Accelerator

    from ftplan.planner.estimate.models import resolve_model

    hf = resolve_model("tiny-llama").to_hf_config()
    if intermediate:
        hf["intermediate_size"] = intermediate
    cfg = job_config.load(str(make_job(tmp_path, method="qlora", model={"config": hf})))
    tok = tiny_tokenizer(vocab_size=hf["vocab_size"])
    data = job_data.load_dataset(cfg["_paths"]["dataset"], "auto", tok, 96, False, 0.2, 8, 7)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # another test in this process made one
    acc = Accelerator(cpu=True)
    model, info = job_model.load_model(cfg, len(tok), acc.device, torch.float32, True, lambda: None)
    assert info["linear4bit_modules"] == 14
    layers = [m for m in model.modules()
              if type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit"]
    for m in layers:
        m.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on an AVX512-BF16 CPU
    loss = train.evaluate(acc, model, data["eval"], 4, tok.pad_token_id)
    assert loss is not None and math.isfinite(loss)
    # the weights were never repacked for the CPU kernel (training would then use them too)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert model.training  # evaluate() hands the model back in train mode
