"""The weights download that runs while bootstrap.sh installs the environment (remote_job/fetch_weights.py):
which files of a Hub repo it takes, what it skips, and that a failure is recorded without the token and
without failing the bootstrap (the job's own load reports it). bootstrap.sh's ordering is in
test_bootstrap_fetch.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from job_helpers import JOB_DIR, use_job_modules

use_job_modules()
import fetch_weights  # noqa: E402

# Root listings as the Hub returns them (list_repo_files), abridged to what differs between layouts.
LLAMA_31 = ["LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
            "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
            "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors", "model.safetensors.index.json",
            "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
            "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
MISTRAL_V03 = ["config.json", "consolidated.safetensors", "generation_config.json",
               "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
               "model-00003-of-00003.safetensors", "model.safetensors.index.json", "params.json",
               "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer.model.v3",
               "tokenizer_config.json"]
GPT2 = ["64-8bits.tflite", "config.json", "flax_model.msgpack", "generation_config.json", "merges.txt",
        "model.safetensors", "onnx/decoder_model.onnx", "pytorch_model.bin", "rust_model.ot", "tf_model.h5",
        "tokenizer.json", "tokenizer_config.json", "vocab.json"]
BIN_ONLY = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json", "training_args.bin"]


def test_llama_takes_the_safetensors_shards_not_the_original_pth():
    assert fetch_weights.select_files(LLAMA_31) == [
        "config.json", "generation_config.json", "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors",
        "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def test_mistral_skips_the_consolidated_copy_of_the_same_weights():
    chosen = fetch_weights.select_files(MISTRAL_V03)
    assert "consolidated.safetensors" not in chosen and "params.json" not in chosen
    assert "model-00003-of-00003.safetensors" in chosen and "tokenizer.model" in chosen


def test_gpt2_takes_safetensors_and_its_bpe_files_only():
    assert fetch_weights.select_files(GPT2) == ["config.json", "generation_config.json", "merges.txt",
                                                "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                                "vocab.json"]


def test_a_repo_without_safetensors_gets_its_pytorch_shards():
    chosen = fetch_weights.select_files(BIN_ONLY)
    assert "pytorch_model-00002-of-00002.bin" in chosen and "pytorch_model.bin.index.json" in chosen
    assert "training_args.bin" not in chosen


def test_demo_and_local_models_are_not_downloaded(tmp_path, monkeypatch):
    assert fetch_weights.hub_repo({"model": {"hf_id": "tiny-llama", "random_init": True}}) is None
    assert fetch_weights.hub_repo({"model": {"hf_id": str(tmp_path), "random_init": False}}) is None
    monkeypatch.chdir(tmp_path)  # the run dir, where a model folder shipped in the bundle sits
    (tmp_path / "model").mkdir()
    assert fetch_weights.hub_repo({"model": {"hf_id": "model", "random_init": False}}) is None
    assert fetch_weights.hub_repo({"model": {"hf_id": "meta-llama/Llama-3.1-8B"}}) == "meta-llama/Llama-3.1-8B"
    assert fetch_weights.hub_repo({"model": {"hf_id": "gpt2"}}) == "gpt2"  # a Hub id without an owner


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failed_download_is_recorded_without_the_token_and_exits_0(tmp_path):
    token = "hf_" + "Q" * 34
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"model": {"hf_id": "meta-llama/Llama-3.1-8B", "random_init": False},
                                  "hf_token_env": "MY_TOKEN"}))
    record = tmp_path / "record.json"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "MY_TOKEN": token,
           "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    proc = subprocess.run([sys.executable, str(JOB_DIR / "fetch_weights.py"), "--config", str(config),
                           "--record", str(record)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(record.read_text())
    assert rec["status"] == "failed" and rec["repo"] == "meta-llama/Llama-3.1-8B" and rec["transfer"] == "hf_xet"
    assert "Connect" in rec["error"] and rec["finished_at"] >= rec["started_at"]
    assert token not in proc.stdout + proc.stderr + record.read_text()


def test_a_random_init_job_skips_the_download(tmp_path):
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"model": {"hf_id": "tiny", "random_init": True, "config": {}}}))
    record = tmp_path / "record.json"
    assert fetch_weights.main(["--config", str(config), "--record", str(record)]) == 0
    assert json.loads(record.read_text())["status"] == "skipped"
