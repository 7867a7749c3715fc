"""The model catalog: every entry's computed counts equal what transformers/peft actually build.

Models are built on the meta device (no memory, no weights), so even the 70B entries take well
under a second each.
"""

from __future__ import annotations

import json
import warnings

import pytest

from ftplan.planner.errors import UserError
from ftplan.planner.estimate.architecture import ModelSpec
from ftplan.planner.estimate.models import CatalogError, from_hf_config, load_catalog

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CATALOG = load_catalog()

# Parameter counts published on each model's Hugging Face page (safetensors metadata / model card).
# They check the catalog *data* (the meta-device test below checks the counting code).
PUBLISHED = {
    "gpt2": 124_439_808, "gpt2-xl": 1_557_611_200, "bert-base": 109_482_240, "bert-large": 335_141_888,
    "roberta-base": 124_645_632, "distilbert-base": 66_362_880, "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704, "llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192, "llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496,
    "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824, "qwen1.5-1.8b": 1_836_828_672,
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512, "qwen2.5-14b": 14_770_033_664, "qwen2.5-32b": 32_763_876_352,
    "qwen2.5-72b": 72_706_203_648, "phi-2": 2_779_683_840, "phi-3-mini": 3_821_079_552,
    "gemma2-2b": 2_614_341_888, "gemma2-9b": 9_241_705_984, "gemma2-27b": 27_227_128_320,
    "gpt-j-6b": 6_050_882_784,
}


SMALL_MIXTRAL = from_hf_config({
    "model_type": "mixtral", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
}, name="small-mixtral")


def build_meta(spec: ModelSpec):
    """The transformers model for `spec` on the meta device (AutoModel for encoders)."""
    cfg = transformers.AutoConfig.for_model(**spec.to_hf_config())
    auto = transformers.AutoModel if spec.is_encoder else transformers.AutoModelForCausalLM
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto.from_config(cfg)


def first_block(model, spec: ModelSpec):
    """Block 0: the first ModuleList with one entry per layer."""
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == spec.num_layers:
            return mod[0]
    raise AssertionError("no block list found")


@pytest.fixture(scope="module")
def meta_models():
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_meta(CATALOG[name])
        return cache[name]

    return get


def test_catalog_has_required_models_and_unique_names():
    required = {
        "gpt2", "gpt2-xl", "bert-base", "bert-large", "roberta-base", "distilbert-base", "qwen1.5-1.8b",
        "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b",
        "llama2-7b", "llama2-13b", "llama2-70b", "llama3.1-8b", "llama3.1-70b", "llama3.2-1b", "llama3.2-3b",
        "mistral-7b", "mixtral-8x7b", "phi-2", "phi-3-mini", "gemma2-2b", "gemma2-9b", "gemma2-27b", "gpt-j-6b",
        "tiny-llama",
    }
    assert len(CATALOG) >= 25
    assert required <= set(CATALOG)
    keys = [k.lower() for s in CATALOG.values() for k in {s.name, s.hf_id, *s.aliases}]
    assert len(keys) == len(set(keys)), "a name/alias/hf_id is used twice"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_total_matches_published_count(name):
    assert CATALOG[name].params_total() == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_counts_equal_transformers(name, meta_models):
    spec = CATALOG[name]
    model = meta_models(name)
    assert spec.params_total() == sum(p.numel() for p in model.parameters())

    block = first_block(model, spec)
    assert spec.params_per_block() == sum(p.numel() for p in block.parameters())
    # Every declared weight matrix exists in block 0 with the declared shape and bias.
    for lm in spec.linear_modules():
        mod = block.get_submodule(lm.name.rsplit(".", 1)[0]) if lm.kind == "experts" else block.get_submodule(lm.name)
        if lm.kind == "experts":
            shape = tuple(getattr(mod, lm.name.rsplit(".", 1)[1]).shape)
            assert shape == (lm.count, lm.out_features, lm.in_features), lm.name
            continue
        weight = mod.weight
        if lm.kind == "conv1d":  # Conv1D stores (in, out)
            assert tuple(weight.shape) == (lm.in_features, lm.out_features), lm.name
            assert type(mod).__name__ == "Conv1D"
        else:
            assert tuple(weight.shape) == (lm.out_features, lm.in_features), lm.name
            assert isinstance(mod, torch.nn.Linear) == (lm.kind == "linear"), lm.name
        assert (getattr(mod, "bias", None) is not None) == lm.bias, lm.name
    # ... and nothing else in the block is a Linear/Conv1D.
    declared = {lm.name for lm in spec.linear_modules()}
    for mname, mod in block.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            assert mname in declared, f"undeclared linear {mname}"

    norms = sum(p.numel() for n, m in model.named_modules() if "norm" in type(m).__name__.lower()
                for p in m.parameters(recurse=False))
    assert spec.params_norms() == norms

    out = model.get_output_embeddings() if not spec.is_encoder else None
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    expected_head = 0 if out is None or tied else sum(p.numel() for p in out.parameters())
    assert spec.params_lm_head() == expected_head
    assert spec.tie_word_embeddings == tied or spec.is_encoder


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_hf_config_round_trip(name):
    """to_hf_config -> transformers config -> its to_dict() (what save_pretrained writes) -> from_hf_config."""
    spec = CATALOG[name]
    cfg = transformers.AutoConfig.for_model(**spec.to_hf_config())
    back = from_hf_config(cfg.to_dict(), name=spec.name, hf_id=spec.hf_id)
    arch = set(ModelSpec.model_fields) - {"aliases", "family", "hf_extra", "random_init"}
    assert back.model_dump(include=arch) == spec.model_dump(include=arch)
    assert back.params_total() == spec.params_total()


def peft_trainable(model, targets, r: int = 16) -> int:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(target_modules=targets, r=r))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("name", "targets"),
    [
        ("tiny-llama", "all-linear"),
        ("gpt2", "all-linear"),  # Conv1D
        ("gpt2", ["c_proj"]),  # matches attn.c_proj and mlp.c_proj
        ("phi-3-mini", "all-linear"),  # fused qkv_proj / gate_up_proj
        ("phi-2", ["q_proj", "v_proj", "dense"]),
        ("gemma2-2b", "all-linear"),
        ("qwen2.5-0.5b", ["q_proj", "v_proj"]),
        ("qwen2.5-0.5b", ["q_proj", "lm_head"]),
        ("bert-base", "all-linear"),  # includes the pooler, as peft does on AutoModel
        ("bert-base", ["dense"]),
        ("small-mixtral", "all-linear"),  # router + fused experts (gate_up at rank 2r)
        ("small-mixtral", ["q_proj", "w2", "gate"]),
        ("small-mixtral", ["w1", "w3"]),
    ],
)
def test_lora_params_equal_peft(name, targets):
    # Mixtral-8x7B under peft takes ~10 s even on meta; the formula is the same at any size.
    spec = SMALL_MIXTRAL if name == "small-mixtral" else CATALOG[name]
    # A fresh model each time: get_peft_model changes the model in place.
    assert spec.lora_params(16, targets) == peft_trainable(build_meta(spec), targets)


def test_lora_params_string_list_and_errors():
    spec = CATALOG["llama3.1-8b"]
    assert spec.lora_params(8, "q_proj, v_proj") == spec.lora_params(8, ["q_proj", "v_proj"])
    assert spec.lora_params(8, ["self_attn.q_proj"]) == spec.lora_params(8, ["q_proj"])
    assert spec.lora_params(16, "all-linear") == 2 * spec.lora_params(8, "all-linear")
    with pytest.raises(UserError, match=r"c_attn.*valid: all-linear, q_proj"):
        spec.lora_params(16, ["q_proj", "c_attn"])
    with pytest.raises(UserError, match="w1 and w3"):
        CATALOG["mixtral-8x7b"].lora_params(16, ["w1"])
    with pytest.raises(UserError, match="rank"):
        spec.lora_params(0)


def test_linear_modules_consistent_with_block_and_quantizable():
    for spec in CATALOG.values():
        mods = spec.linear_modules()
        norms_per_block = (spec.params_norms() - spec.hidden_size * (2 if spec.norm == "layernorm" else 1)
                           * (int(spec.final_norm) + int(spec.embedding_norm))) // spec.num_layers
        assert sum(m.params() for m in mods) + norms_per_block == spec.params_per_block(), spec.name
        weights = sum(m.count * m.in_features * m.out_features for m in mods if m.kind in ("linear", "conv1d"))
        assert spec.params_quantizable() == spec.num_layers * weights
    mix = CATALOG["mixtral-8x7b"]
    assert {m.kind for m in mix.linear_modules()} == {"linear", "router", "experts"}
    # Under QLoRA (transformers 5) Mixtral's fused experts stay 16-bit: only attention is quantized.
    assert mix.params_quantizable() < mix.params_total() // 20


def test_active_params_moe(meta_models):
    mix = CATALOG["mixtral-8x7b"]
    model = meta_models("mixtral-8x7b")
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    idle = experts * (mix.num_experts - mix.experts_per_token) // mix.num_experts
    assert mix.params_active_per_token() == mix.params_total() - idle
    dense = CATALOG["mistral-7b"]
    assert dense.params_active_per_token() == dense.params_total()


def test_tiny_llama_is_the_documented_demo_model():
    tiny = CATALOG["tiny-llama"]
    assert tiny.random_init and tiny.hf_id == "ftplan/tiny-llama"
    cfg = transformers.AutoConfig.for_model(**tiny.to_hf_config())
    assert type(cfg).__name__ == "LlamaConfig"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings) == (128, 512, 512)
    assert cfg.tie_word_embeddings is False
    # It really runs: a forward pass with random weights on CPU.
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    out = model(torch.randint(0, 512, (1, 8)))
    assert tuple(out.logits.shape) == (1, 8, 512)


def _write_catalog(tmp_path, entries):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": entries}))
    return path


def _entry(**over):
    base = CATALOG["mistral-7b"].model_dump(exclude_defaults=True)
    base.update(over)
    return base


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([_entry(hidden_size="big")], r"entry 'mistral-7b' is invalid: hidden_size"),
        ([_entry(num_kv_heads=5)], r"entry 'mistral-7b' is invalid: .*num_kv_heads 5"),
        ([_entry(model_type="mamba")], r"entry 'mistral-7b' is invalid: .*model_type 'mamba' is not supported"),
        ([_entry(params=7_000_000_000)], r"entry 'mistral-7b' is invalid: params: Extra inputs"),
        ([_entry(), _entry(name="other", hf_id="x/y", aliases=["MISTRAL"])], r"'mistral' of entry 'other' is already used"),
    ],
)
def test_broken_catalog_entries_are_reported(tmp_path, entries, message):
    with pytest.raises(CatalogError, match=message) as err:
        load_catalog(_write_catalog(tmp_path, entries))
    assert str(tmp_path / "models.json") in str(err.value)


def test_unparseable_catalog_file(tmp_path):
    path = tmp_path / "models.json"
    path.write_text("{not json")
    with pytest.raises(CatalogError, match="cannot read model catalog"):
        load_catalog(path)
    path.write_text("[]")
    with pytest.raises(CatalogError, match="'models' list"):
        load_catalog(path)
