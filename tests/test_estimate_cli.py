"""`ftplan estimate` as a user runs it: output contract, JSON keys, bad input -> one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cli_helpers import FTPLAN_PROCESS
from click.testing import CliRunner

from ftplan.planner.cli import cli

MISTRAL = ["estimate", "--model", "mistral-7b"]


def run(args):
    return CliRunner().invoke(cli, args)


def run_process(args, tmp_path=None):
    """The real console entry point in a fresh process (exit code and stderr as a shell sees them)."""
    return subprocess.run([*FTPLAN_PROCESS, *args], capture_output=True, text=True, cwd=tmp_path)


def test_json_with_gpu_has_the_contract_keys_and_total_is_the_sum():
    res = run([*MISTRAL, "--method", "qlora", "--gpu", "L4", "--dataset-tokens", "2000000", "--epochs", "2",
               "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["model"] == "mistral-7b"
    assert out["params_total"] > 7e9 and 0 < out["params_trainable"] < 0.01 * out["params_total"]
    mem = out["memory_gib"]
    parts = ["weights", "trainable", "gradients", "optimizer", "activations", "logits", "allocator_overhead",
             "cuda_context"]
    assert mem["total"] == pytest.approx(sum(mem[p] for p in parts), abs=0.01)
    assert out["fits"] is True
    assert out["throughput_tokens_per_s"] > 0
    assert out["hours"] == pytest.approx(4_000_000 / out["throughput_tokens_per_s"] / 3600, rel=0.01)


def test_without_gpu_lists_every_gpu_type_with_fit_and_time():
    res = run([*MISTRAL, "--method", "lora", "--dataset-tokens", "1000000", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    by_name = {g["gpu"]: g for g in out["gpus"]}
    assert {"T4", "L4", "A100-80GB", "H100-SXM"} <= set(by_name)
    assert by_name["T4"]["fits"] is False and by_name["A100-80GB"]["fits"] is True
    assert by_name["H100-SXM"]["hours"] < by_name["L4"]["hours"]
    assert "memory_gib" in out and out["params_total"] > 7e9
    table = run([*MISTRAL, "--method", "lora"])
    assert table.exit_code == 0 and "A100-80GB" in table.output and "tokens/s" in table.output


def test_not_fitting_is_reported_with_what_would_fit_not_an_error():
    res = run([*MISTRAL, "--method", "full", "--gpu", "A10G"])
    assert res.exit_code == 0, res.output
    assert "DOES NOT FIT" in res.output
    assert "would fit:" in res.output and "--method lora" in res.output
    out = json.loads(run([*MISTRAL, "--method", "full", "--gpu", "A10G", "--json"]).output)
    assert out["fits"] is False and out["headroom_gib"] < 0
    assert {s["kind"] for s in out["would_fit"]} >= {"gpu", "method"}


def test_dataset_file_is_counted(tmp_path):
    data = tmp_path / "train.jsonl"
    lines = [{"instruction": "Summarise the text.", "input": "word " * 200, "output": "A summary."},
             {"messages": [{"role": "user", "content": "hello " * 100}, {"role": "assistant", "content": "hi"}]}]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = json.loads(run([*MISTRAL, "--method", "qlora", "--gpu", "L4", "--dataset", str(data), "--json"]).output)
    # ~1,800 bytes of English at ~3.6 bytes/token plus the chat-template tokens: a few hundred tokens.
    assert 300 < out["training_tokens"] < 800
    assert "2 records" in out["dataset"]


def one_line_error(res, *needles):
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_unknown_model_suggests_names():
    one_line_error(run_process(["estimate", "--model", "mistral-7", "--method", "lora"]), "mistral-7b")


def test_unknown_method():
    one_line_error(run_process([*MISTRAL, "--method", "dora"]), "--method")


def test_unknown_gpu_suggests_names():
    one_line_error(run_process([*MISTRAL, "--method", "lora", "--gpu", "H10"]), "H100")


@pytest.mark.parametrize(("flag", "value"), [("--seq-len", "0"), ("--batch-size", "-2"), ("--gpus", "0"),
                                             ("--lora-r", "0"), ("--epochs", "0"), ("--dataset-tokens", "-5")])
def test_zero_or_negative_numbers(flag, value):
    one_line_error(run_process([*MISTRAL, "--method", "lora", flag, value]), flag)


def test_unknown_lora_target():
    one_line_error(run_process([*MISTRAL, "--method", "lora", "--lora-targets", "q_proj,wq"]), "wq")


def test_malformed_config_json(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama", "hidden_size": ')
    one_line_error(run_process(["estimate", "--model", str(bad), "--method", "lora"]), "config.json")


def test_unreadable_dataset_names_the_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    one_line_error(run_process([*MISTRAL, "--method", "lora", "--dataset", str(data)]), "line 2")
    data.write_text('{"prompt": "a"}\n')
    one_line_error(run_process([*MISTRAL, "--method", "lora", "--dataset", str(data)]), "line 1")
    one_line_error(run_process([*MISTRAL, "--method", "lora", "--dataset", str(tmp_path / "missing.jsonl")]),
                   "missing.jsonl")


def test_estimate_path_imports_no_heavy_libraries():
    probe = ("import sys, io, contextlib\nfrom ftplan.planner.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    try:\n        main(['estimate', '--model', 'mistral-7b', '--method', 'qlora'])\n"
             "    except SystemExit:\n        pass\n"
             "heavy = ('torch', 'transformers', 'peft', 'bitsandbytes', 'boto3', 'google.cloud', 'runpod', 'paramiko')\n"
             "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_framework_changes_the_base_weights_and_bad_value_is_one_line():
    def weights(fw):
        res = run([*MISTRAL, "--method", "lora", "--gpu", "A100-80GB", "--framework", fw, "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.output)["memory_gib"]["weights"]

    # LitGPT's bf16-mixed keeps the frozen base in fp32: at least twice the 16-bit weights.
    assert weights("litgpt") > 2 * weights("hf")
    one_line_error(run_process([*MISTRAL, "--method", "lora", "--framework", "axolotl"]), "--framework")
