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


def test_table_shows_usable_gib_marks_gpus_without_bf16_and_never_minus_zero():
    res = run([*MISTRAL, "--method", "qlora"])
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line.split() for line in res.output.splitlines()[3:] if line and line[0].isalnum()}
    assert rows["L4"][1] == "22.5"  # usable GiB, as the single-GPU view says, not the marketed 24
    assert rows["T4"][3].endswith("*") and "estimated as fp16-mixed" in res.output
    assert not rows["L4"][3].endswith("*")
    assert "-0.0" not in res.output
    single = run([*MISTRAL, "--method", "qlora", "--gpu", "T4", "--json"])
    assert json.loads(single.stdout)["precision"] == "fp16-mixed"


def test_detail_names_each_allocator_figure():
    res = run([*MISTRAL, "--method", "qlora", "--gpu", "L4"])
    out = res.output
    assert "max_memory_allocated()" in out and "max_memory_reserved()" in out and "nvidia-smi" in out
    figures = json.loads(run([*MISTRAL, "--method", "qlora", "--gpu", "L4", "--json"]).stdout)["memory_figures_gib"]
    assert figures["allocated"] < figures["reserved"] < figures["device"]


def test_the_default_seq_len_adapts_to_a_short_context():
    """tiny-llama (the demo model) has a 512-token context: the default 2048 must not make it an error."""
    res = run(["estimate", "--model", "tiny-llama", "--method", "qlora", "--gpu", "L4", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["settings"]["seq_len"] == 512


def test_seq_len_beyond_the_context_is_refused():
    res = run_process(["estimate", "--model", "gpt2", "--method", "lora", "--seq-len", "4096"])
    one_line_error(res, "context")


def test_qlora_that_does_not_fit_never_suggests_qlora():
    res = run(["estimate", "--model", "llama3.1-70b", "--method", "qlora", "--gpu", "T4", "--seq-len", "8192",
               "--batch-size", "8"])
    assert res.exit_code == 0 and "DOES NOT FIT" in res.output
    assert "--method qlora" not in res.output


def test_new_knobs_reach_the_estimate():
    base = json.loads(run([*MISTRAL, "--method", "lora", "--gpu", "A100-80GB", "--json"]).stdout)
    chunked = json.loads(run([*MISTRAL, "--method", "lora", "--gpu", "A100-80GB", "--json", "--loss", "chunked",
                              "--lora-dropout", "0", "--modules-to-save", "lm_head"]).stdout)
    assert chunked["memory_gib"]["logits"] < base["memory_gib"]["logits"] / 2
    assert chunked["params_trainable"] > base["params_trainable"] + 32000 * 4096 - 1
    assert chunked["settings"]["modules_to_save"] == ["lm_head"]


def test_unpacked_dataset_peaks_at_its_longest_record(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": "word " * n}) for n in (50, 100, 400)) + "\n")
    args = [*MISTRAL, "--method", "qlora", "--gpu", "L4", "--json", "--dataset", str(data)]
    padded = json.loads(run([*args, "--no-packing"]).stdout)
    packed = json.loads(run(args).stdout)
    assert padded["settings"]["peak_seq_len"] < 600 and packed["settings"]["peak_seq_len"] == 2048
    assert padded["memory_gib"]["logits"] < packed["memory_gib"]["logits"] / 3
