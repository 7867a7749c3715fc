"""The job's data pipeline: format detection, response-only labels, padding, packing, config checks."""

from __future__ import annotations

import json

import pytest
from job_helpers import records_in_format, tiny_tokenizer, use_job_modules, write_dataset

use_job_modules()
import job_config  # noqa: E402
import job_data  # noqa: E402
from job_config import JobConfigError  # noqa: E402

IGNORE = job_data.IGNORE


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def plain_tok(tok):
    """A template-less tokenizer (a base model's): Alpaca uses the '### Instruction' prompt."""
    t = tiny_tokenizer()
    t.chat_template = None
    return t


def trained_text(tokenizer, ex) -> str:
    return tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE])


def untrained_text(tokenizer, ex) -> str:
    return tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE])


def test_alpaca_without_template_trains_only_on_response_and_eos(plain_tok):
    rec = {"instruction": "Translate the sentence into French.", "input": "Good morning, how are you?",
           "output": "Bonjour, comment allez-vous ?"}
    ex = job_data.encode_alpaca(plain_tok, rec, use_chat_template=False)
    assert trained_text(plain_tok, ex) == rec["output"] + "</s>"
    prompt = untrained_text(plain_tok, ex)
    assert "### Instruction:" in prompt and rec["input"] in prompt and rec["output"] not in prompt
    # the prompt comes first, entirely masked; then the response, entirely trained
    first = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)
    assert all(lab == IGNORE for lab in ex.labels[:first]) and all(lab != IGNORE for lab in ex.labels[first:])
    assert ex.input_ids[0] == plain_tok.bos_token_id


def test_chat_multi_turn_trains_on_every_assistant_turn_only(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome."}]
    ex = job_data.encode_chat(tok, messages)
    trained = trained_text(tok, ex)
    assert "Paris.</s>" in trained and "Rome.</s>" in trained
    for not_trained in ("Be brief.", "capital of France", "And of Italy?", "<|user|>"):
        assert not_trained not in trained
        assert not_trained in untrained_text(tok, ex)


@pytest.mark.parametrize("fmt", ["alpaca", "chat", "sharegpt", "text"])
@pytest.mark.parametrize("jsonl", [True, False])
def test_each_format_is_detected_and_read(tmp_path, tok, fmt, jsonl):
    path = write_dataset(tmp_path / ("d.jsonl" if jsonl else "d.json"), fmt, n=12, jsonl=jsonl)
    data = job_data.load_dataset(str(path), "auto", tok, seq_len=512, packing=False, eval_fraction=0.25,
                                 max_eval=10, seed=1)
    assert data["format"] == fmt and data["records"] == 12
    assert len(data["eval"]) == 3 and len(data["train"]) == 9
    outputs = [r["output"] for r in records_in_format("alpaca", 12)]
    for ex in data["train"]:
        labelled = [lab for lab in ex.labels if lab != IGNORE]
        if fmt == "text":
            assert ex.labels == ex.input_ids  # continued pre-training: every token counts
        else:
            assert 0 < len(labelled) < len(ex.labels)
            assert trained_text(tok, ex).removesuffix("</s>") in outputs


def test_long_text_is_chunked_not_truncated(tmp_path, tok):
    path = tmp_path / "t.jsonl"
    long_text = " ".join(r["output"] for r in records_in_format("alpaca", 30))
    path.write_text(json.dumps({"text": long_text}) + "\n", encoding="utf-8")
    data = job_data.load_dataset(str(path), "auto", tok, 32, False, 0.0, 0, 1)
    rows = data["train"]
    assert len(rows) > 3 and all(len(r.input_ids) <= 32 for r in rows)
    assert sum(len(r.input_ids) for r in rows) >= len(tok(long_text)["input_ids"]) - len(rows)


def test_bad_record_error_names_the_first_bad_line(tmp_path):
    lines = [json.dumps(r) for r in records_in_format("chat", 6)]
    lines[3] = json.dumps({"messages": [{"role": "user", "content": "hi"}]})  # no assistant turn
    lines[4] = "{not json"
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(JobConfigError, match=r"line 5: not valid JSON"):
        job_data.read_records(str(path))
    lines[4] = lines[0]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(JobConfigError, match=r"c\.jsonl line 4: no assistant turn"):
        job_data.normalize(job_data.read_records(str(path)), "auto")


def test_mixed_formats_and_unknown_roles_are_rejected(tmp_path):
    path = tmp_path / "m.jsonl"
    recs = records_in_format("alpaca", 3) + records_in_format("text", 1)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    with pytest.raises(JobConfigError, match=r"line 4: needs 'instruction' and 'output'"):
        job_data.normalize(job_data.read_records(str(path)), "auto")
    bad = {"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}
    path.write_text(json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(JobConfigError, match=r"line 1: turn 1 has unknown role 'robot'"):
        job_data.normalize(job_data.read_records(str(path)), "auto")


def test_padding_gets_label_minus_100_even_when_pad_is_eos(plain_tok):
    plain_tok.pad_token = plain_tok.eos_token  # what the job does for tokenizers without a pad token
    short = job_data.encode_alpaca(plain_tok, {"instruction": "Hi?", "input": "", "output": "Hello."}, False)
    long = job_data.encode_alpaca(plain_tok, records_in_format("alpaca", 1)[0], False)
    batch = job_data.collate([short, long], plain_tok.pad_token_id)
    n = len(short.input_ids)
    assert batch["input_ids"].shape[1] == len(long.input_ids) > n
    assert batch["labels"][0, n:].eq(IGNORE).all() and batch["attention_mask"][0, n:].eq(0).all()
    assert batch["input_ids"][0, n:].eq(plain_tok.eos_token_id).all()
    # the response's own eos is still a target: the model learns to stop, not to pad
    assert batch["labels"][0, n - 1].item() == plain_tok.eos_token_id
    assert batch["labels"][0, :n].tolist() == short.labels


def test_packing_packs_train_rows_only_and_gives_them_positions(tmp_path, tok):
    path = write_dataset(tmp_path / "d.jsonl", "alpaca", n=20)
    plain = job_data.load_dataset(str(path), "auto", tok, 256, False, 0.2, 10, seed=1)
    packed = job_data.load_dataset(str(path), "auto", tok, 256, True, 0.2, 10, seed=1)
    assert packed["eval"] == plain["eval"] and all(ex.position_ids is None for ex in packed["eval"])
    rows = packed["train"]
    assert len(rows) < len(plain["train"]) and all(len(r.input_ids) <= 256 for r in rows)
    assert sum(r.position_ids.count(0) for r in rows) == len(plain["train"])  # one start per record
    assert sum(len(r.input_ids) for r in rows) == sum(len(ex.input_ids) for ex in plain["train"])
    batch = job_data.collate(rows[:2], tok.pad_token_id)
    assert batch["position_ids"].shape == batch["input_ids"].shape


def test_responses_cut_off_by_seq_len_are_dropped(tok):
    examples = [job_data.encode_alpaca(tok, r, True) for r in records_in_format("alpaca", 10)]
    kept, dropped = job_data.fit_to_length(examples, 12, "alpaca")
    assert dropped == 10 - len(kept) > 0
    assert all(any(lab != IGNORE for lab in ex.labels[1:]) for ex in kept)


def test_epoch_batches_are_disjoint_across_ranks_and_reproducible():
    a = job_data.epoch_batches(11, 2, epoch=0, seed=5, rank=0, world=2)
    b = job_data.epoch_batches(11, 2, epoch=0, seed=5, rank=1, world=2)
    assert len(a) == len(b)
    assert not {i for x in a for i in x} & {i for x in b for i in x}
    assert a == job_data.epoch_batches(11, 2, epoch=0, seed=5, rank=0, world=2)
    assert a != job_data.epoch_batches(11, 2, epoch=1, seed=5, rank=0, world=2)


def test_config_defaults_and_paths_relative_to_config_folder(tmp_path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "job.json"
    path.write_text(json.dumps({"model": {"hf_id": "mistralai/Mistral-7B-v0.1"}, "dataset": "d/train.jsonl"}))
    cfg = job_config.load(str(path))
    assert cfg["method"] == "qlora" and cfg["lora"]["r"] == 16 and cfg["seq_len"] == 512
    assert cfg["_paths"]["dataset"] == str(tmp_path / "cfg" / "d" / "train.jsonl")
    assert cfg["_paths"]["stop_file"] == str(tmp_path / "cfg" / "STOP")
    assert "_paths" not in job_config.public_view(cfg)


def test_example_config_is_valid():
    from job_helpers import JOB_DIR

    cfg = job_config.load(str(JOB_DIR / "job_config.example.json"))
    assert set(job_config.public_view(cfg)) == set(job_config.DEFAULTS)


@pytest.mark.parametrize("patch, message", [
    ({"learnig_rate": 1e-4}, r"unknown key\(s\) in 'config': learnig_rate"),
    ({"lora": {"rank": 8}}, r"unknown key\(s\) in 'lora': rank"),
    ({"method": "dora"}, r"'method' must be one of qlora, lora, full"),
    ({"seq_len": 0}, r"'seq_len' must be an integer >= 1"),
    ({"distributed": "zero2"}, r"'distributed' needs 'num_gpus' >= 2"),
    ({"model": {"hf_id": None, "random_init": True}}, r"'model.random_init' needs 'model.config'"),
])
def test_bad_config_is_rejected_with_the_key_named(patch, message):
    raw = {"model": {"hf_id": "m"}, "dataset": "d.jsonl", **patch}
    with pytest.raises(JobConfigError, match=message):
        job_config.validate(raw)
