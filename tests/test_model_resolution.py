"""`resolve_model`: catalog names/aliases/HF ids, local config.json, and the Hub fetch with its cache.

The Hub is a real HTTP server on 127.0.0.1 (pytest-httpserver) reached through FTPLAN_HF_ENDPOINT;
the cache lives under a temporary XDG_CACHE_HOME.
"""

from __future__ import annotations

import json

import pytest

from ftplan.planner import cli as cli_module
from ftplan.planner.errors import UserError
from ftplan.planner.estimate.models import hf_config_cache_dir, load_catalog, resolve_model

# Verbatim config.json files from the Hugging Face Hub.
GPT2_CONFIG = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12,
    "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257,
}
QWEN25_05B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
    "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
}
LLAMA31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
CATALOG = load_catalog()


@pytest.mark.parametrize(
    ("arg", "name"),
    [
        ("mistral-7b", "mistral-7b"),
        ("Mistral", "mistral-7b"),
        ("mistralai/Mistral-7B-v0.1", "mistral-7b"),
        ("MISTRALAI/MISTRAL-7B-V0.1", "mistral-7b"),
        ("  llama-3.1-8b ", "llama3.1-8b"),
        ("meta-llama/Llama-3.1-8B", "llama3.1-8b"),
        ("Qwen/Qwen2.5-7B", "qwen2.5-7b"),
        ("qwen-2.5-7b", "qwen2.5-7b"),
        ("bert-base-uncased", "bert-base"),
        ("google/gemma-2-9b", "gemma2-9b"),
        ("tiny", "tiny-llama"),
    ],
)
def test_catalog_lookup(arg, name):
    assert resolve_model(arg).name == name


def test_every_alias_and_hf_id_resolves_to_its_entry():
    for spec in CATALOG.values():
        for key in (spec.name, spec.hf_id, *spec.aliases):
            assert resolve_model(key.upper()) is spec


def test_local_folder_and_config_file(tmp_path):
    folder = tmp_path / "my-gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(GPT2_CONFIG))
    spec = resolve_model(str(folder))
    assert spec.model_type == "gpt2" and spec.name == "my-gpt2"
    assert spec.hf_id == str(folder)
    assert spec.params_total() == CATALOG["gpt2"].params_total()
    assert spec.intermediate_size == 4 * 768  # n_inner missing -> 4 * n_embd, as transformers does

    cfg = tmp_path / "llama" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(LLAMA31_8B_CONFIG))
    spec = resolve_model(str(cfg))
    assert spec.params_total() == CATALOG["llama3.1-8b"].params_total()
    assert spec.lora_params(16) == CATALOG["llama3.1-8b"].lora_params(16)
    assert spec.to_hf_config()["rope_scaling"]["rope_type"] == "llama3"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({k: v for k, v in GPT2_CONFIG.items() if k != "n_embd"}), "missing field 'n_embd'"),
        (json.dumps({**QWEN25_05B_CONFIG, "model_type": "mamba"}), "model_type 'mamba' is not supported"),
        (json.dumps({**QWEN25_05B_CONFIG, "num_key_value_heads": 5}), "num_kv_heads 5"),
        (json.dumps({**QWEN25_05B_CONFIG, "hidden_size": "wide"}), "hidden_size"),
    ],
)
def test_bad_local_config_names_the_file(tmp_path, content, problem):
    cfg = tmp_path / "config.json"
    cfg.write_text(content)
    with pytest.raises(UserError) as err:
        resolve_model(str(tmp_path))
    assert str(cfg) in str(err.value) and problem in str(err.value)


def test_missing_local_config(tmp_path):
    with pytest.raises(UserError, match=r"config.json not found"):
        resolve_model(str(tmp_path))


def test_unknown_offline_lists_close_names(monkeypatch, httpserver, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("FTPLAN_HF_ENDPOINT", httpserver.url_for("/"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        resolve_model("mistrall-7b")
    msg = str(err.value)
    assert msg.startswith("unknown model 'mistrall-7b'; closest catalog names: mistral-7b")
    assert msg.endswith("(or pass a local config.json)")

    # An HF id offline: say why it was not fetched and how to proceed, not "unknown model".
    with pytest.raises(UserError) as err:
        resolve_model("acme/qwen2.5-7b-chat")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE is set" in msg and "qwen2.5-7b" in msg and "local config.json" in msg
    assert "unknown model" not in msg
    assert len(httpserver.log) == 0  # offline: the Hub was never asked


@pytest.fixture
def hub(monkeypatch, httpserver, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FTPLAN_HF_ENDPOINT", httpserver.url_for("/"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("FTPLAN_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return httpserver


def test_hub_config_fetched_once_then_cached(hub, monkeypatch):
    hub.expect_oneshot_request("/acme/qwen-ft/resolve/main/config.json", method="GET").respond_with_json(
        QWEN25_05B_CONFIG
    )
    spec = resolve_model("acme/qwen-ft")
    assert spec.hf_id == "acme/qwen-ft" and spec.name == "qwen-ft"
    assert spec.params_total() == CATALOG["qwen2.5-0.5b"].params_total()
    assert (hf_config_cache_dir() / "acme--qwen-ft.json").is_file()
    assert len(hub.log) == 1

    # Second time: from the cache, even offline and with the server gone quiet.
    monkeypatch.setenv("FTPLAN_OFFLINE", "1")
    again = resolve_model("acme/qwen-ft")
    assert again.params_total() == spec.params_total()
    assert len(hub.log) == 1


def test_hub_not_found_lists_close_names(hub):
    hub.expect_request("/acme/gemma2-9b-tuned/resolve/main/config.json").respond_with_data("Entry not found", status=404)
    with pytest.raises(UserError, match=r"unknown model 'acme/gemma2-9b-tuned'; closest catalog names: gemma2-9b"):
        resolve_model("acme/gemma2-9b-tuned")
    assert not (hf_config_cache_dir() / "acme--gemma2-9b-tuned.json").exists()


def test_hub_gated_sends_token_but_never_shows_it(hub, monkeypatch):
    token = "hf_SecretTokenValue123456"
    monkeypatch.setenv("HF_TOKEN", token)
    hub.expect_request("/meta-llama/Llama-9-8B/resolve/main/config.json").respond_with_data(
        f"Access to model meta-llama/Llama-9-8B is restricted. token {token}", status=401
    )
    with pytest.raises(UserError) as err:
        resolve_model("meta-llama/Llama-9-8B")
    assert "gated or private" in str(err.value) and "HF_TOKEN" in str(err.value)
    assert token not in str(err.value)
    request, _ = hub.log[0]
    assert request.headers["Authorization"] == f"Bearer {token}"


def test_hub_unreachable_says_so_and_how_to_proceed(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("FTPLAN_OFFLINE", raising=False)
    monkeypatch.setenv("FTPLAN_HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(UserError) as err:
        resolve_model("Qwen/Qwen2.5-7B-Instruct-x")
    msg = str(err.value)
    assert "could not be reached" in msg and "unknown model" not in msg
    assert "closest: " in msg and "local config.json" in msg


def test_cli_prints_one_line_and_exits_2(monkeypatch, capsys, tmp_path):
    """Through the real CLI entry point: a command that resolves --model, as estimate/plan do."""
    monkeypatch.setitem(cli_module.COMMANDS, "show-model", ("test_model_resolution:show_model", "test only"))
    bad = tmp_path / "config.json"
    bad.write_text("{oops")
    for args, expected in [
        (["show-model", "no-such-model"], "error: unknown model 'no-such-model'; closest catalog names: "),
        (["show-model", str(tmp_path)], f"error: cannot read {bad}: "),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli_module.main(args)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1
    assert cli_module.main(["show-model", "Mistral"]) == 0
    assert capsys.readouterr().out.strip() == "mistral-7b 7241732096"


def _show_model_command():
    import click

    @click.command()
    @click.argument("model")
    def show(model):
        spec = resolve_model(model)
        click.echo(f"{spec.name} {spec.params_total()}")

    return show


show_model = _show_model_command()
