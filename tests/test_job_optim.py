"""The job's optimizer choice: paged 8-bit AdamW for QLoRA, torch's fused AdamW for LoRA/full on CUDA."""

from __future__ import annotations

import pytest
from job_helpers import use_job_modules

use_job_modules()
import job_config  # noqa: E402
import job_optim  # noqa: E402

torch = pytest.importorskip("torch")


def params():
    return [torch.nn.Parameter(torch.randn(64, 64))]


@pytest.mark.parametrize("method, device, want_class, fused", [
    ("lora", "cuda", "AdamW", True),
    ("full", "cuda", "AdamW", True),
    ("qlora", "cuda", "PagedAdamW8bit", None),
    ("lora", "cpu", "AdamW", False),
])
def test_auto_picks_fused_adamw_for_lora_and_full_on_cuda_and_paged_8bit_for_qlora(method, device, want_class,
                                                                                    fused):
    # torch builds a fused AdamW on CPU tensors too, so the CUDA choice is checked without a GPU.
    opt, chosen = job_optim.make("auto", method, params(), 1e-3, device)
    assert type(opt).__name__ == want_class
    assert chosen == ("paged_adamw_8bit" if method == "qlora" else "adamw")
    if fused is not None:
        assert opt.defaults["fused"] is fused


def test_explicit_choice_is_kept_and_the_fused_step_trains():
    opt, chosen = job_optim.make("adamw_8bit", "lora", params(), 1e-3, "cuda")
    assert chosen == "adamw_8bit" and type(opt).__name__ == "AdamW8bit"
    p = params()
    opt, _ = job_optim.make("adamw", "qlora", p, 1e-2, "cuda")
    before = p[0].detach().clone()
    p[0].grad = torch.ones_like(p[0])
    opt.step()
    assert torch.allclose(p[0], before - 1e-2, atol=1e-4)  # Adam's first step moves each weight by lr


def test_auto_is_the_job_default_and_a_bad_name_is_rejected():
    assert job_config.DEFAULTS["optimizer"] == "auto"
    assert set(job_config.OPTIMIZERS) == set(job_optim.OPTIMIZERS)
    with pytest.raises(job_config.JobConfigError, match="'optimizer' must be one of auto"):
        job_config.validate({"model": {"hf_id": "m"}, "dataset": "d.jsonl", "optimizer": "sgd"})
