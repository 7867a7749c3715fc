"""Packing without contamination: a packed batch's loss is its records' losses run alone, token-weighted."""

from __future__ import annotations

import pytest
from job_helpers import TINY_LLAMA, records_in_format, tiny_tokenizer, use_job_modules

use_job_modules()
import job_data  # noqa: E402
import job_loss  # noqa: E402

torch = pytest.importorskip("torch")
IGNORE = job_data.IGNORE


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def records(tok):
    encoded = [job_data.encode_alpaca(tok, r, True) for r in records_in_format("alpaca", 12)]
    return job_data.fit_to_length(encoded, 96, "alpaca")[0]  # as load_dataset does before packing


def tiny_llama(attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = dict(TINY_LLAMA, initializer_range=0.2)  # wider than the default, so context changes outputs
    conf.pop("model_type")
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **conf), dtype=torch.float32,
                                             attn_implementation=attn)
    model.config.use_cache = False
    return model.eval()


def alone(model, ex, mode):
    """(mean loss, labelled tokens) of one record in a batch of its own, as an unpacked run sees it."""
    batch = job_data.collate([ex], 0)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    return job_loss.compute(model, batch, mode), n


def test_pack_keeps_records_whole_with_their_own_positions(records):
    rows = job_data.pack(records, 96)
    assert all(len(r.input_ids) <= 96 for r in rows) and len(rows) < len(records)
    assert [t for r in rows for t in r.input_ids] == [t for ex in records for t in ex.input_ids]
    starts = [i for r in rows for i, p in enumerate(r.position_ids) if p == 0]
    assert len(starts) == len(records)  # every record starts again at position 0
    for row in rows:
        assert row.position_ids[0] == 0 and len(row.position_ids) == len(row.input_ids)
        for i, p in enumerate(row.position_ids):
            if p == 0:
                assert row.labels[i] == IGNORE  # never predicted from the previous record's last token
    # every label a record trains on alone is still trained on when packed
    assert sum(lab != IGNORE for r in rows for lab in r.labels) == sum(
        lab != IGNORE for ex in records for lab in ex.labels[1:])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["standard", "chunked"])
def test_packed_loss_equals_the_records_losses_run_alone(records, attn, mode):
    model = tiny_llama(attn)
    rows = job_data.pack(records, 192)[:2]  # a batch of two packed rows, the shorter one padded
    in_rows = records[: sum(r.position_ids.count(0) for r in rows)]
    batch = job_data.collate(rows, 0)
    assert "position_ids" in batch and batch["attention_mask"].sum() < batch["attention_mask"].numel()
    with torch.no_grad():
        packed = job_loss.compute(model, batch, mode)
        parts = [alone(model, ex, mode) for ex in in_rows]
    expected = sum(loss * n for loss, n in parts) / sum(n for _, n in parts)
    assert len(in_rows) >= 4
    assert abs(packed.item() - expected.item()) < 1e-4

    # The defect this replaces: the same rows without their positions let records attend to each other.
    plain = {k: v for k, v in batch.items() if k != "position_ids"}
    with torch.no_grad():
        contaminated = job_loss.compute(model, plain, mode)
    assert abs(contaminated.item() - expected.item()) > 1e-3


def test_packed_gradients_equal_the_records_gradients(records):
    model = tiny_llama("sdpa")
    row = job_data.pack(records[:3], 512)[0]
    batch = job_data.collate([row], 0)
    total = sum(n for _, n in (alone(model, ex, "standard") for ex in records[:3]))
    model.zero_grad()
    job_loss.compute(model, batch, "chunked").backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for ex in records[:3]:
        loss, n = alone(model, ex, "chunked")
        (loss * n / total).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(packed[name], p.grad, atol=1e-5), name


def test_flash_attention_gets_one_flattened_row(records):
    model = tiny_llama("sdpa")
    batch = job_data.collate(job_data.pack(records, 192)[:2], 0)
    assert set(job_loss.model_inputs(model, batch)) == {"input_ids", "position_ids"}  # no 2-D mask
    model.config._attn_implementation = "flash_attention_2"  # varlen reads boundaries from one row only
    flat = job_loss.model_inputs(model, batch)
    assert flat["input_ids"].shape == (1, batch["input_ids"].numel())
    assert torch.equal(flat["position_ids"][0], batch["position_ids"].reshape(-1))
