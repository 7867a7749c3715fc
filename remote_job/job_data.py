"""Training data: detect the format, tokenize with loss only on responses, pack, batch.

Labels are -100 on prompt, template and padding positions. Padding is added by `collate` with
label -100 explicitly, never by copying pad ids into the labels: a trainer that does that (and
shifts labels against the prompt) teaches the model to emit padding.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass

from job_config import JobConfigError

IGNORE = -100

# Used when the tokenizer has no chat template (base models, tokenizers trained by the job).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHAT_ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None  # packed rows only: restart at 0 for each record


# ---------------------------------------------------------------- reading
def read_records(path: str) -> list[tuple[str, dict]]:
    """Return [(where, record)] from a .json array or a JSONL file; `where` names the line for errors."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise JobConfigError(f"dataset not found: {path}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JobConfigError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
        out = [(f"{path} record {i + 1}", item) for i, item in enumerate(items)]
    else:
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise JobConfigError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
            out.append((f"{path} line {lineno}", item))
    if not out:
        raise JobConfigError(f"{path} holds no records")
    for where, item in out:
        if not isinstance(item, dict):
            raise JobConfigError(f"{where}: each record must be a JSON object")
    return out


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    raise JobConfigError(
        "cannot tell the data format from keys " + ", ".join(sorted(record))
        + "; expected instruction/input/output (alpaca), messages (chat), conversations (sharegpt) or text")


def _need_str(where: str, rec: dict, key: str, optional: bool = False) -> str:
    value = rec.get(key, "" if optional else None)
    if not isinstance(value, str):
        raise JobConfigError(f"{where}: '{key}' must be a string")
    return value


def _messages(where: str, turns: object, role_key: str, content_key: str, roles: dict | None) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise JobConfigError(f"{where}: expected a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
            raise JobConfigError(f"{where}: turn {i + 1} needs a string '{content_key}'")
        role = turn.get(role_key)
        if roles is not None:
            role = roles.get(str(role).lower())
        if role not in ("system", "user", "assistant"):
            raise JobConfigError(f"{where}: turn {i + 1} has unknown role {turn.get(role_key)!r}")
        out.append({"role": role, "content": turn[content_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise JobConfigError(f"{where}: no assistant turn to learn from")
    return out


def normalize(records: list[tuple[str, dict]], data_format: str) -> tuple[str, list[tuple[str, object]]]:
    """Check every record against one format. Returns (format, [(where, payload)]).

    payload: a messages list (chat, sharegpt), an alpaca dict, or a string (text).
    """
    fmt = detect_format(records[0][1]) if data_format == "auto" else data_format
    out: list[tuple[str, object]] = []
    for where, rec in records:
        if fmt == "chat":
            if "messages" not in rec:
                raise JobConfigError(f"{where}: missing 'messages' (the file was read as chat format)")
            out.append((where, _messages(where, rec["messages"], "role", "content", None)))
        elif fmt == "sharegpt":
            if "conversations" not in rec:
                raise JobConfigError(f"{where}: missing 'conversations' (the file was read as ShareGPT format)")
            out.append((where, _messages(where, rec["conversations"], "from", "value", SHAREGPT_ROLES)))
        elif fmt == "alpaca":
            if "instruction" not in rec or "output" not in rec:
                raise JobConfigError(f"{where}: needs 'instruction' and 'output' (the file was read as Alpaca format)")
            out.append((where, {"instruction": _need_str(where, rec, "instruction"),
                                "input": _need_str(where, rec, "input", optional=True),
                                "output": _need_str(where, rec, "output")}))
        else:
            out.append((where, _need_str(where, rec, "text")))
    return fmt, out


# ---------------------------------------------------------------- tokenizing
def ensure_chat_template(tokenizer) -> bool:
    """Give template-less tokenizers the job's simple template; returns True if it was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def _encode_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> Example:
    """Tokenize `text`; a token is trained on if it starts inside one of the character spans."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = []
    for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=True):
        inside = any(a <= start < b for a, b in spans) and end > start
        labels.append(tok if inside else IGNORE)
    return Example(ids, labels)


def _prepend_bos(tokenizer, text: str) -> str:
    bos = tokenizer.bos_token
    if bos and not text.startswith(bos):
        return bos + text
    return text


def encode_chat(tokenizer, messages: list[dict]) -> Example:
    """Render with the chat template; train on each assistant turn (its content and end-of-turn marker)."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise JobConfigError(
                "the tokenizer's chat template renders earlier turns differently once later turns are added, "
                "so response tokens cannot be located; use a tokenizer with a prefix-stable template")
        # Train up to the end-of-turn marker, not on the whitespace the template puts after it.
        spans.append((len(before), len(upto.rstrip())))
    return _encode_spans(tokenizer, full, spans)


def encode_alpaca(tokenizer, rec: dict, use_chat_template: bool) -> Example:
    if use_chat_template:
        user = rec["instruction"] + ("\n\n" + rec["input"] if rec["input"] else "")
        return encode_chat(tokenizer, [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}])
    template = ALPACA_PROMPT_INPUT if rec["input"] else ALPACA_PROMPT
    prompt = _prepend_bos(tokenizer, template.format(**rec))
    text = prompt + rec["output"] + (tokenizer.eos_token or "")
    return _encode_spans(tokenizer, text, [(len(prompt), len(text))])


def encode_text(tokenizer, text: str) -> Example:
    text = _prepend_bos(tokenizer, text) + (tokenizer.eos_token or "")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Example(list(ids), list(ids))


def encode_all(tokenizer, fmt: str, payloads: list[tuple[str, object]]) -> list[Example]:
    use_chat = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for _where, payload in payloads:
        if fmt in ("chat", "sharegpt"):
            out.append(encode_chat(tokenizer, payload))
        elif fmt == "alpaca":
            out.append(encode_alpaca(tokenizer, payload, use_chat))
        else:
            out.append(encode_text(tokenizer, payload))
    return out


def fit_to_length(examples: Iterable[Example], seq_len: int, fmt: str) -> tuple[list[Example], int]:
    """Text is cut into seq_len chunks (continued pre-training); other formats are truncated.

    Returns (examples, dropped): an example whose responses fall entirely past seq_len is dropped,
    since it would contribute no loss.
    """
    out, dropped = [], 0
    for ex in examples:
        if fmt == "text":
            for i in range(0, len(ex.input_ids), seq_len):
                chunk = Example(ex.input_ids[i : i + seq_len], ex.labels[i : i + seq_len])
                if len(chunk.input_ids) > 1:
                    out.append(chunk)
            continue
        ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len])
        if all(label == IGNORE for label in ex.labels[1:]):
            dropped += 1
            continue
        out.append(ex)
    return out, dropped


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Put whole records into rows of at most seq_len tokens (next-fit), without contaminating them.

    Each record keeps its own position ids (0, 1, ...), from which the model builds a block-diagonal
    causal mask (job_loss.model_inputs), and its first token is not a target: in a row it would be
    predicted from the previous record's last token. So a packed row's loss is the token-weighted sum
    of its records' losses run alone. A record is never split across rows (it would lose its context).
    """
    rows: list[Example] = []
    row = Example([], [], [])
    for ex in examples:
        if row.input_ids and len(row.input_ids) + len(ex.input_ids) > seq_len:
            rows.append(row)
            row = Example([], [], [])
        row.input_ids.extend(ex.input_ids[:seq_len])
        row.labels.extend([IGNORE, *ex.labels[1:seq_len]])
        row.position_ids.extend(range(min(len(ex.input_ids), seq_len)))
    if row.input_ids:
        rows.append(row)
    return rows


def split(examples: list[Example], eval_fraction: float, max_eval: int, seed: int) -> tuple[list, list]:
    """Seeded split so a resumed run holds out exactly the same records."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(int(round(len(examples) * eval_fraction)), max_eval)
    if eval_fraction > 0 and max_eval > 0 and n_eval == 0 and len(examples) >= 2:
        n_eval = 1
    n_eval = min(n_eval, len(examples) - 1)
    eval_idx = set(order[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in eval_idx]
    held = [ex for i, ex in enumerate(examples) if i in eval_idx]
    return train, held


def collate(batch: list[Example], pad_id: int):
    """Right-pad to the longest row: input pad_id, attention 0, label -100.

    Packed rows also get position_ids; the padding after them counts 0, 1, ... as a record of its own,
    so it is a separate block of the packed attention mask (and has no labels).
    """
    import torch

    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    packed = any(ex.position_ids is not None for ex in batch)
    positions = torch.zeros((len(batch), width), dtype=torch.long) if packed else None
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
        if packed:
            positions[row, :n] = torch.tensor(ex.position_ids if ex.position_ids is not None else range(n))
            positions[row, n:] = torch.arange(width - n)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if packed:
        out["position_ids"] = positions
    return out


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches (indices) for one epoch: a seeded shuffle, dealt round-robin to ranks.

    Every rank gets the same number of batches (the shortest share), so no rank waits forever in a
    collective; the few records cut off go to a different rank next epoch.
    """
    order = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    per_rank = len(order) // world if world > 1 else len(order)
    mine = order[rank::world][:per_rank]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def load_dataset(path: str, data_format: str, tokenizer, seq_len: int, packing: bool,
                 eval_fraction: float, max_eval: int, seed: int) -> dict:
    """Everything the loop needs: train/eval examples and what was detected, for the log and summary."""
    fmt, payloads = normalize(read_records(path), data_format)
    if fmt in ("chat", "sharegpt"):
        ensure_chat_template(tokenizer)
    examples, dropped = fit_to_length(encode_all(tokenizer, fmt, payloads), seq_len, fmt)
    if not examples:
        raise JobConfigError(f"{path}: no example has a response within seq_len={seq_len}; raise seq_len")
    train, held = split(examples, eval_fraction, max_eval, seed)
    if packing:
        train = pack(train, seq_len)
    return {"format": fmt, "records": len(payloads), "dropped": dropped, "train": train, "eval": held}
