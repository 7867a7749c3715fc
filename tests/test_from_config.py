"""`ftplan estimate --from-config`: an example config of each format (tests/data/configs, written from each
project's documented keys) becomes the estimate its keys describe; ignored, unknown and contradictory keys
are named one per line, never used silently; flags the user types win over the file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cli_helpers import FTPLAN_PROCESS
from click.testing import CliRunner

from ftplan.planner.cli import cli

CONFIGS = Path(__file__).parent / "data" / "configs"


def run(*args):
    res = CliRunner().invoke(cli, ["estimate", *args])
    return res


def estimate_json(config: Path, *extra: str):
    res = run("--from-config", str(config), "--gpu", "L4", "--json", *extra)
    assert res.exit_code == 0, res.output + res.stderr
    return json.loads(res.stdout), res.stderr


def test_axolotl_qlora_recipe():
    out, err = estimate_json(CONFIGS / "axolotl_llama31_qlora.yml")
    s = out["settings"]
    assert (out["model"], out["method"]) == ("llama3.1-8b", "qlora")  # adapter: qlora + load_in_4bit
    assert (s["seq_len"], s["batch_size"], s["grad_accum"], s["lora_r"]) == (4096, 2, 4, 32)
    assert (s["optimizer"], s["attention"], s["precision"], s["packing"]) == ("adamw8bit", "flash", "bf16-mixed", True)
    assert s["lora_targets"] == "all-linear" and s["lora_dropout"] == 0.05
    # Every key not used is named: learning_rate, wandb_project, ... on the "not relevant" line.
    assert "not relevant to memory or time:" in err and "learning_rate" in err and "wandb_project" in err


def test_llamafactory_qlora_sft():
    out, err = estimate_json(CONFIGS / "llamafactory_llama3_qlora_sft.yaml")
    s = out["settings"]
    assert (out["model"], out["method"]) == ("llama3.1-8b", "qlora")  # finetuning_type lora + quantization_bit 4
    assert (s["seq_len"], s["batch_size"], s["grad_accum"], s["lora_r"], s["epochs"]) == (2048, 1, 8, 8, 3.0)
    assert s["lora_targets"] == "all-linear" and s["precision"] == "bf16-mixed"
    assert "cutoff_len" not in err and "template" in err


def test_torchtune_qlora_recipe():
    out, err = estimate_json(CONFIGS / "torchtune_llama3_1_8B_qlora_single_device.yaml")
    s = out["settings"]
    assert (out["model"], out["method"]) == ("llama3.1-8b", "qlora")  # qlora_llama3_1_8b builder
    # q, v, output_proj and the MLP at rank 8 on 32 blocks: 8 x (8192 + 5120 + 8192 + 3 x 18432) x 32
    assert out["params_trainable"] == 8 * (8192 + 5120 + 8192 + 3 * (4096 + 14336)) * 32
    assert (s["batch_size"], s["grad_accum"], s["precision"], s["loss"]) == (2, 8, "bf16-true", "chunked")
    assert s["fused_optimizer"] is True and s["packing"] is False and s["lora_dropout"] == 0.0
    # Chunked cross-entropy keeps 6 bytes per logit element instead of the standard 18.
    standard, override = estimate_json(CONFIGS / "torchtune_llama3_1_8B_qlora_single_device.yaml", "--loss",
                                       "standard")
    assert standard["memory_gib"]["logits"] == pytest.approx(3 * out["memory_gib"]["logits"], rel=0.01)
    assert "loss: chunked overridden by --loss standard" in override


def test_training_arguments_json_names_unknown_keys():
    out, err = estimate_json(CONFIGS / "training_args_mistral_sft.json")
    s = out["settings"]
    assert (out["model"], out["method"]) == ("mistral-7b", "qlora")  # use_peft + load_in_4bit
    assert (s["seq_len"], s["batch_size"], s["grad_accum"], s["optimizer"]) == (1024, 4, 2, "paged_adamw8bit")
    assert s["lora_targets"] == "q_proj,k_proj,v_proj,o_proj" and s["epochs"] == 2.0
    lines = err.splitlines()
    assert any("torch_empty_cache_steps: ignored (unknown to ftplan)" in line for line in lines)


def test_flags_typed_win_over_the_file_and_say_so():
    res = run("--from-config", str(CONFIGS / "training_args_mistral_sft.json"), "--gpu", "L4", "--json",
              "--seq-len", "512")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["settings"]["seq_len"] == 512
    assert "seq_len: 1024 overridden by --seq-len 512" in res.stderr


def test_contradictory_keys_are_named(tmp_path):
    cfg = tmp_path / "axolotl.yml"
    cfg.write_text("base_model: mistralai/Mistral-7B-v0.1\nadapter: qlora\nload_in_4bit: false\n"
                   "bf16: true\nfp16: true\nmicro_batch_size: 1\nmy_custom_knob: 3\n")
    res = run("--from-config", str(cfg), "--gpu", "A10G", "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["method"] == "qlora" and out["settings"]["precision"] == "bf16-mixed"
    err = res.stderr
    assert "load_in_4bit: contradicts adapter: qlora" in err
    assert "fp16: contradicts bf16" in err
    assert "my_custom_knob: ignored (unknown to ftplan)" in err


@pytest.mark.parametrize("text, message", [
    ("not: [valid", "not valid YAML"),
    ("learning_rate: 0.1\n", "not an axolotl"),
])
def test_unreadable_or_unknown_configs_are_one_line_errors(tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    res = subprocess.run([*FTPLAN_PROCESS, "estimate", "--from-config", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_plan_reads_the_same_config():
    res = CliRunner().invoke(cli, ["plan", "--from-config", str(CONFIGS / "llamafactory_llama3_qlora_sft.yaml"),
                                   "--dataset-tokens", "1000000", "--json"])
    assert res.exit_code == 0, res.output + res.stderr
    assert "llama3.1-8b" in res.stdout
