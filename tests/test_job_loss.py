"""The job's chunked cross-entropy: the same loss and gradients as transformers' loss, without the logits."""

from __future__ import annotations

import pytest
from job_helpers import TINY_LLAMA, use_job_modules

use_job_modules()
import job_loss  # noqa: E402

torch = pytest.importorskip("torch")
IGNORE = job_loss.IGNORE


def reference_loss(hidden, weight, bias, labels):
    """transformers' ForCausalLMLoss, written out: fp32 logits, shift, mean over labelled tokens."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def random_labels(shape, vocab, gen):
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < 0.3] = IGNORE  # prompt and padding positions
    labels[:, :2] = IGNORE
    return labels


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(chunk, with_bias):
    gen = torch.Generator().manual_seed(0)
    batch, seq, dim, vocab = 3, 21, 16, 300
    hidden = torch.randn(batch, seq, dim, generator=gen, dtype=torch.float64).float().requires_grad_()
    head = torch.nn.Linear(dim, vocab, bias=with_bias)
    labels = random_labels((batch, seq), vocab, gen)

    want = reference_loss(hidden, head.weight, head.bias, labels)
    want_grads = torch.autograd.grad(want, [hidden, *head.parameters()])
    got = job_loss.chunked_cross_entropy(hidden, head, labels, chunk=chunk)
    got_grads = torch.autograd.grad(got, [hidden, *head.parameters()])

    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-5)
    # scaled losses (gradient accumulation divides by the group size) scale the gradients too
    half = torch.autograd.grad(job_loss.chunked_cross_entropy(hidden, head, labels, chunk=chunk) / 2, hidden)[0]
    assert torch.allclose(half, want_grads[0] / 2, atol=1e-6)


def test_no_labelled_token_gives_zero_loss_not_nan():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 40, bias=False)
    loss = job_loss.chunked_cross_entropy(hidden, head, torch.full((2, 5), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum().item() == 0.0


def tiny_model(method: str, vocab: int = 512, lora_targets="all-linear"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = dict(TINY_LLAMA, vocab_size=vocab)
    conf.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **conf), dtype=torch.float32)
    model.config.use_cache = False
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets,
                                                 task_type="CAUSAL_LM", init_lora_weights=False))
    return model


def tiny_batch(vocab: int = 512, batch: int = 2, seq: int = 40):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    labels = random_labels((batch, seq), vocab, gen)
    mask = torch.ones_like(ids)
    mask[1, -6:] = 0  # right padding on the second row
    labels[1, -6:] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, batch, mode):
    model.zero_grad(set_to_none=True)
    loss = job_loss.compute(model, batch, mode)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method, targets", [("lora", "all-linear"), ("full", None),
                                             ("lora", ["q_proj", "v_proj", "lm_head"])])
def test_job_loss_equals_transformers_loss_with_lora_and_full_gradients(monkeypatch, method, targets):
    # 16-token chunks, so the 60-odd labelled tokens of the batch span several chunks
    monkeypatch.setattr(job_loss, "CHUNK_LOGIT_BYTES", 4 * 512 * 16)
    model = tiny_model(method, lora_targets=targets)
    batch = tiny_batch()
    want, want_grads = loss_and_grads(model, batch, "standard")
    got, got_grads = loss_and_grads(model, batch, "chunked")
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) > 0
    if method == "lora":
        assert any("lora_" in n for n in got_grads)
    else:
        assert "lm_head.weight" in got_grads
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_eval_under_no_grad_gives_the_same_loss():
    model = tiny_model("lora").eval()
    batch = tiny_batch()
    with torch.no_grad():
        want = job_loss.compute(model, batch, "standard")
        got = job_loss.compute(model, batch, "chunked")
    assert torch.allclose(got, want, atol=1e-5)


def test_resolve_picks_what_can_run_here():
    model = tiny_model("full")
    assert job_loss.resolve("standard", "cpu", model) == "standard"
    assert job_loss.resolve("chunked", "cpu", model) == "chunked"
    assert job_loss.resolve("fused", "cpu", model) == "chunked"  # Liger needs CUDA
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: the head's output is transformed
    assert job_loss.resolve("chunked", "cpu", model) == "standard"


def test_a_liger_that_cannot_patch_leaves_the_chunked_loss(monkeypatch):
    monkeypatch.setattr(job_loss, "liger_available", lambda: True)
    assert job_loss.resolve("fused", "cuda", None) == "liger"

    def broken(_model):
        raise AttributeError("no liger kernels for this model type")

    monkeypatch.setattr(job_loss, "use_liger", broken)
    assert job_loss.prepare("fused", "cuda", tiny_model("full")) == "chunked"
    assert job_loss.prepare("chunked", "cuda", tiny_model("full")) == "chunked"


def test_a_sharded_head_weight_gets_the_models_own_loss(monkeypatch):
    model = tiny_model("lora")
    batch = tiny_batch()
    want = job_loss.compute(model, batch, "standard")
    model.get_base_model().lm_head.weight.ds_id = 7  # how DeepSpeed ZeRO-3 marks a partitioned parameter

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("the chunked loss read a sharded weight")

    monkeypatch.setattr(job_loss, "chunked_cross_entropy", must_not_run)
    assert torch.allclose(job_loss.compute(model, batch, "chunked"), want)
