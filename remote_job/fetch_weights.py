"""Download the job's base model into the Hub cache while bootstrap.sh installs the rest of the environment.

    python job/fetch_weights.py --config job.json --record .ftplan-download.json

bootstrap.sh installs huggingface_hub (and hf_xet) alone first, starts this in the background, installs the
rest, then waits for it before training. The job loads from the same cache (same HF_HOME), so it finds the
files there. Only what the job loads is fetched: the root's safetensors (not *.bin/*.pth or original/ when
safetensors exist), config, generation config and tokenizer files.

A failure (gated model, no token, no network) is recorded and the exit status is still 0: the job's own
load path then reports the error as it always has. The token (from the env variable the job config names,
HF_TOKEN by default) is passed to the Hub client, never printed: errors are scrubbed of it.

The record (JSON, written atomically) feeds summary.json's `bootstrap` field: status, download_s,
download_bytes (bytes that arrived in the cache, not those already there), files, transfer.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time

# The files transformers reads to build the model and its tokenizer (root of the repo only).
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                      "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                      "chat_template.jinja", "chat_template.json", "*.tiktoken")
TORCH_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


def select_files(repo_files: list[str]) -> list[str]:
    """The files of a Hub repo that the job loads, sorted.

    Weights: the root's `model*.safetensors` shards and their index when there are any (a repo such as
    Mistral's also has `consolidated.safetensors`, the same weights in another layout), else any root
    *.safetensors, else the PyTorch `.bin` shards (what transformers falls back to). Never sub-folders
    (`original/`, `onnx/`, quantised variants) and never `.pth`/`.gguf`.
    """
    root = [f for f in repo_files if "/" not in f]
    safetensors = [f for f in root if f.endswith(".safetensors")]
    model_shards = [f for f in safetensors if f.startswith("model")]
    if model_shards:
        weights = model_shards + [f for f in root if f == "model.safetensors.index.json"]
    elif safetensors:
        weights = safetensors + [f for f in root if f.endswith(".safetensors.index.json")]
    else:
        weights = [f for f in root if any(fnmatch.fnmatch(f, p) for p in TORCH_WEIGHTS)]
    extra = [f for f in root if f in CONFIG_FILES or any(fnmatch.fnmatch(f, p) for p in TOKENIZER_PATTERNS)]
    return sorted(set(weights + extra))


def hub_repo(cfg: dict) -> str | None:
    """The Hub repo id to prefetch, or None: random-init (demo) models and local folders are not downloaded."""
    model = cfg.get("model") or {}
    ref = model.get("hf_id")
    if model.get("random_init") or not isinstance(ref, str) or not ref:
        return None
    if os.path.exists(ref) or ref.startswith((".", "/", "~")) or ref.count("/") > 1:  # a folder (cwd: the run dir)
        return None
    return ref


def transfer_env() -> str:
    """Turn on the Hub's fast transfer, before huggingface_hub is imported (it reads these at import)."""
    import importlib.util

    if importlib.util.find_spec("hf_xet") is not None:
        os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")
        return "hf_xet"
    if importlib.util.find_spec("hf_transfer") is not None:  # older hubs on an image's own Python
        os.environ.setdefault("HF_HUB_ENABLE_HF_TRANSFER", "1")
        return "hf_transfer"
    return "http"


def _cache_bytes(folder: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


def scrub(text: str, token: str | None) -> str:
    text = text.replace(token, "***") if token else text
    import re

    return re.sub(r"hf_[A-Za-z0-9]{20,}", "hf_***", text)


def fetch(repo: str, token: str | None) -> dict:
    """Download the selected files of `repo` into the Hub cache; returns the record (never raises)."""
    transfer = transfer_env()
    t0 = time.time()
    blobs = None
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.file_download import repo_folder_name

        blobs = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo, repo_type="model"), "blobs")
        before = _cache_bytes(blobs)
        files = select_files(HfApi().list_repo_files(repo, token=token))
        if not any(f.endswith((".safetensors", ".bin")) for f in files):
            return {"status": "failed", "repo": repo, "transfer": transfer, "download_s": round(time.time() - t0, 3),
                    "error": f"no weights at the root of {repo} (safetensors or pytorch_model*.bin)"}
        snapshot_download(repo, allow_patterns=files, token=token)
        return {"status": "ok", "repo": repo, "transfer": transfer, "files": len(files),
                "download_s": round(time.time() - t0, 3), "download_bytes": _cache_bytes(blobs) - before}
    except Exception as exc:  # noqa: BLE001 - recorded; the job's own load reports it to the user
        record = {"status": "failed", "repo": repo, "transfer": transfer, "download_s": round(time.time() - t0, 3),
                  "error": scrub(f"{type(exc).__name__}: {exc}", token)[:500]}
        if blobs and os.path.isdir(blobs):
            record["download_bytes"] = max(0, _cache_bytes(blobs) - before)
        return record


def write_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the job config (job.json)")
    parser.add_argument("--record", required=True, help="where the JSON record goes")
    args = parser.parse_args(argv)
    started = time.time()
    try:
        with open(args.config, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as exc:
        record = {"status": "skipped", "reason": f"config unreadable ({type(exc).__name__}); the job reports it"}
    else:
        repo = hub_repo(cfg)
        if repo is None:
            record = {"status": "skipped", "reason": "random-init or local model: nothing to download"}
        else:
            record = fetch(repo, os.environ.get(cfg.get("hf_token_env") or "HF_TOKEN") or None)
    record.update(started_at=round(started, 3), finished_at=round(time.time(), 3))
    write_atomic(args.record, record)
    shown = {k: v for k, v in record.items() if k != "error"}
    print(f"[ftplan-fetch] {json.dumps(shown)}" + (f" error: {record['error']}" if "error" in record else ""),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
