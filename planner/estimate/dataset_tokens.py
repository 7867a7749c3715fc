"""Count the training tokens of a JSONL dataset (Alpaca or chat messages) without a GPU or a download.

With a local tokenizer (`tokenizer.json` beside a local model's config.json) tokens are counted exactly
with the `tokenizers` library; otherwise from UTF-8 bytes with a bytes-per-token ratio by vocabulary
size (English text, measured on Alpaca-style data: 32k-vocab SentencePiece ~3.6 bytes/token, GPT-2-style
50k BPE ~4.0, 100k-150k BPE ~4.2, 256k ~4.3), plus a few tokens per message for the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftplan.planner.errors import UserError

TEMPLATE_TOKENS_PER_MESSAGE = 6  # role header + end-of-turn markers of common chat templates


def bytes_per_token(vocab_size: int) -> float:
    if vocab_size >= 200_000:
        return 4.3
    if vocab_size >= 100_000:
        return 4.2
    if vocab_size >= 45_000:
        return 4.0
    return 3.6


def _texts(record: object, path: Path, lineno: int) -> list[str]:
    """The strings of one record, one per message (Alpaca counts as user + assistant)."""
    where = f"{path} line {lineno}"
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object; each line must be one Alpaca or chat record")
    if "messages" in record or "conversations" in record:
        msgs = record.get("messages", record.get("conversations"))
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for msg in msgs:
            content = msg.get("content", msg.get("value")) if isinstance(msg, dict) else None
            if not isinstance(content, str):
                raise UserError(f"{where}: every message needs a string 'content'")
            out.append(content)
        return out
    if "instruction" in record or "output" in record:
        prompt = "\n".join(str(record.get(k) or "") for k in ("instruction", "input")).strip()
        return [prompt, str(record.get("output") or "")]
    if isinstance(record.get("text"), str):
        return [record["text"]]
    raise UserError(f"{where}: unknown record format (keys {', '.join(sorted(record)) or 'none'}); "
                    "expected 'messages', 'instruction'/'output' (Alpaca) or 'text'")


def _load_tokenizer(tokenizer_file: Path | None):
    if tokenizer_file is None or not tokenizer_file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is optional on the planner path
        return None
    try:
        return Tokenizer.from_file(str(tokenizer_file))
    except Exception:  # noqa: BLE001 - a broken tokenizer file falls back to the byte ratio
        return None


def _records(path: Path, fh):
    """(line number, record) pairs of a JSONL file or of a JSON array file (Alpaca's own format).

    A JSON array is recognised by its first non-blank byte; its records are numbered by the line on
    which each one starts, so an error still names a line the user can open."""
    head = fh.read(4096).lstrip()
    fh.seek(0)
    if head.startswith(b"["):
        try:
            text = fh.read().decode("utf-8")
            items = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            line = getattr(exc, "lineno", "?")
            raise UserError(f"{path} line {line}: not valid JSON ({getattr(exc, 'msg', exc)}); "
                            "pass a JSON array of records or JSONL with one object per line") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON array of records or JSONL")
        starts = _array_item_lines(text)
        for i, record in enumerate(items):
            yield (starts[i] if i < len(starts) else 1), record
        return
    for lineno, raw in enumerate(fh, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} line {lineno}: not valid JSON ({getattr(exc, 'msg', exc)}); "
                            "each line must be one JSON object") from None
        yield lineno, record


def _array_item_lines(text: str) -> list[int]:
    """Line number on which each top-level element of a JSON array starts."""
    starts, depth, line, in_str, esc = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
            if depth == 1:
                starts.append(line)
        elif ch in "[{":
            if depth == 1:
                starts.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
    return starts


def count_dataset_tokens(path: str | Path, vocab_size: int, tokenizer_file: Path | None = None,
                         max_seq_len: int | None = None) -> tuple[int, int, str]:
    """(tokens, records, how) for a JSONL or JSON-array file; each record is truncated to max_seq_len
    as a trainer would."""
    tokens, records, how, _longest = dataset_lengths(path, vocab_size, tokenizer_file, max_seq_len)
    return tokens, records, how


def dataset_lengths(path: str | Path, vocab_size: int, tokenizer_file: Path | None = None,
                    max_seq_len: int | None = None) -> tuple[int, int, str, int]:
    """(tokens, records, how, longest record) after truncation to max_seq_len: the longest record is the
    sequence length of the micro-batch that peaks when samples are padded rather than packed."""
    path = Path(path)
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise UserError(f"cannot read dataset {path}: {exc.strerror or exc}; pass a readable JSONL file") from None
    tok = _load_tokenizer(tokenizer_file)
    ratio = bytes_per_token(vocab_size)
    tokens = records = longest = 0
    with fh:
        for lineno, record in _records(path, fh):
            texts = _texts(record, path, lineno)
            if tok is not None:
                n = sum(len(tok.encode(t).ids) for t in texts)
            else:
                n = int(round(sum(len(t.encode()) for t in texts) / ratio))
            n += TEMPLATE_TOKENS_PER_MESSAGE * len(texts)
            n = min(n, max_seq_len) if max_seq_len else n
            tokens += n
            longest = max(longest, n)
            records += 1
    if records == 0:
        raise UserError(f"dataset {path} has no records; pass a JSONL file with one record per line")
    how = f"tokenizer {tokenizer_file.name}" if tok is not None else f"~{ratio} bytes/token"
    return tokens, records, how, longest
