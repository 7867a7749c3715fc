"""Model architectures and exact parameter counts, computed from the architecture (never stored).

The catalog (`catalogs/models.json`) holds each model's config.json values; facts that are fixed by
the transformers class rather than by config.json (Qwen2's q/k/v bias, Gemma-2's four norms per
block, GPT-2's Conv1D layers, ...) live in `_TRAITS` below and fill in what an entry leaves out.

What "the parameter count" means: the count of `sum(p.numel() for p in model.parameters())` for
the class a fine-tuning job loads, i.e. `AutoModelForCausalLM` for decoders (tied input/output
embeddings counted once) and `AutoModel` for encoders (BERT/RoBERTa include the pooler; no MLM
head). Mixtral follows transformers 5: experts are fused 3D parameters (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`) and the router `mlp.gate` is a bare parameter, so none of them is an
nn.Linear and peft's "all-linear" does not target them.

Nothing heavy is imported at module level: ModelSpec is a plain frozen dataclass, validated with
pydantic (imported on demand) when built from a dict or config.json; the shipped catalog is validated
once per file content and version and read back from the user cache afterwards (`ftplan.planner.estimate.gpus.
read_validated`), so a warm `ftplan estimate` never imports pydantic. httpx/platformdirs are imported
inside the resolver.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from ftplan.planner.errors import UserError

ModelType = Literal[
    "llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3", "phi", "gptj", "gpt2", "bert", "roberta", "distilbert"
]

# Facts fixed by the transformers class of each model_type (not settable through config.json,
# except where from_hf_config reads an override such as attention_bias/mlp_bias).
_TRAITS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "mixtral": {},
    "qwen2": {"qkv_bias": True},
    "gemma2": {"norms_per_block": 4},
    "phi3": {"fused_qkv": True, "fused_gate_up": True},
    "phi": {
        "norm": "layernorm", "norms_per_block": 1, "parallel_block": True, "gated_mlp": False,
        "qkv_bias": True, "o_bias": True, "mlp_bias": True, "lm_head_bias": True,
    },
    "gptj": {
        "norm": "layernorm", "norms_per_block": 1, "parallel_block": True, "gated_mlp": False,
        "mlp_bias": True, "lm_head_bias": True,
    },
    "gpt2": {
        "position_embedding": "learned", "norm": "layernorm", "gated_mlp": False, "fused_qkv": True,
        "qkv_bias": True, "o_bias": True, "mlp_bias": True,
    },
    "bert": {
        "is_encoder": True, "position_embedding": "learned", "norm": "layernorm", "gated_mlp": False,
        "qkv_bias": True, "o_bias": True, "mlp_bias": True, "embedding_norm": True, "final_norm": False,
        "pooler": True,
    },
    "distilbert": {
        "is_encoder": True, "position_embedding": "learned", "norm": "layernorm", "gated_mlp": False,
        "qkv_bias": True, "o_bias": True, "mlp_bias": True, "embedding_norm": True, "final_norm": False,
    },
}
_TRAITS["roberta"] = dict(_TRAITS["bert"])
SUPPORTED_MODEL_TYPES = tuple(_TRAITS)

# HF module names inside one block, per layout: (attention prefix, q, k, v, o, fused qkv) and
# (mlp prefix, gate, up, down, fused gate_up). Plain (non-gated) MLPs use (in, out) names.
_ATTN_NAMES: dict[str, tuple[str, ...]] = {
    "llama": ("self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"),
    "phi": ("self_attn", "q_proj", "k_proj", "v_proj", "dense", ""),
    "gptj": ("attn", "q_proj", "k_proj", "v_proj", "out_proj", ""),
    "gpt2": ("attn", "", "", "", "c_proj", "c_attn"),
    "bert": ("attention", "self.query", "self.key", "self.value", "output.dense", ""),
    "distilbert": ("attention", "q_lin", "k_lin", "v_lin", "out_lin", ""),
}
_MLP_NAMES: dict[str, tuple[str, ...]] = {
    "llama": ("mlp", "gate_proj", "up_proj", "down_proj", "gate_up_proj"),
    "phi": ("mlp", "fc1", "fc2"),
    "gptj": ("mlp", "fc_in", "fc_out"),
    "gpt2": ("mlp", "c_fc", "c_proj"),
    "bert": ("", "intermediate.dense", "output.dense"),
    "distilbert": ("ffn", "lin1", "lin2"),
}
# Mixtral under transformers 5 + peft: the names a target list uses for the fused parameters, and
# the rank multiplier peft applies (w1 and w3 are fused into gate_up_proj, which gets rank 2r).
_MOE_PEFT_NAMES: dict[str, tuple[tuple[str, ...], int]] = {
    "mlp.gate": (("gate",), 1),
    "mlp.experts.gate_up_proj": (("w1", "w3"), 2),
    "mlp.experts.down_proj": (("w2",), 1),
}
_LAYOUT = {"mistral": "llama", "mixtral": "llama", "qwen2": "llama", "gemma2": "llama", "phi3": "llama",
           "roberta": "bert"}


@dataclass(frozen=True, kw_only=True)
class LinearModule:
    """One weight matrix of a block, by its HF module name relative to the block.

    `kind`: "linear"/"conv1d" are real nn.Linear/Conv1D modules (bitsandbytes quantizes them);
    "experts" are fused MoE expert weights (`count` experts, one 3D parameter) and "router" the MoE
    router, both bare parameters in transformers 5 that stay 16-bit under QLoRA.
    """

    name: str
    in_features: int
    out_features: int
    count: int = 1
    bias: bool
    kind: Literal["linear", "conv1d", "experts", "router"] = "linear"

    @property
    def quantizable(self) -> bool:
        """bitsandbytes replaces only nn.Linear/Conv1D, so only these are 4-bit under QLoRA."""
        return self.kind in ("linear", "conv1d")

    def params(self) -> int:
        return self.count * (self.in_features * self.out_features + (self.out_features if self.bias else 0))


def _schema():
    """The pydantic model that validates a ModelSpec's fields (built on first use: pydantic is slow to
    import and to build, and a warm start never needs it)."""
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class ModelSpecSchema(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
        hf_id: str
        aliases: list[str] = []
        family: str
        model_type: ModelType
        vocab_size: int = Field(gt=0)
        hidden_size: int = Field(gt=0)
        num_layers: int = Field(gt=0)
        num_heads: int = Field(gt=0)
        num_kv_heads: int = Field(gt=0)
        head_dim: int = Field(gt=0)
        intermediate_size: int = Field(gt=0)
        num_experts: int = Field(default=1, ge=1)
        experts_per_token: int = Field(default=1, ge=1)
        tie_word_embeddings: bool
        max_position_embeddings: int = Field(gt=0)
        is_encoder: bool = False
        random_init: bool = False
        position_embedding: Literal["rope", "learned"] = "rope"
        type_vocab_size: int = Field(default=0, ge=0)
        norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
        norms_per_block: int = Field(default=2, ge=1)
        embedding_norm: bool = False
        final_norm: bool = True
        qkv_bias: bool = False
        o_bias: bool = False
        mlp_bias: bool = False
        gated_mlp: bool = True
        fused_qkv: bool = False
        fused_gate_up: bool = False
        parallel_block: bool = False
        lm_head_bias: bool = False
        pooler: bool = False
        hf_extra: dict[str, Any] = {}

        @model_validator(mode="before")
        @classmethod
        def _fill_traits(cls, data: Any) -> Any:
            if isinstance(data, dict):
                mt = data.get("model_type")
                if mt is not None and mt not in _TRAITS:
                    raise ValueError(f"model_type '{mt}' is not supported; supported: {', '.join(_TRAITS)}")
                data = {**_TRAITS.get(mt, {}), **data}
                h, nh = data.get("hidden_size"), data.get("num_heads")
                if "head_dim" not in data and isinstance(h, int) and isinstance(nh, int) and nh > 0:
                    data["head_dim"] = data["hidden_size"] // data["num_heads"]
                data.setdefault("num_kv_heads", data.get("num_heads"))
            return data

        @model_validator(mode="after")
        def _check(self) -> ModelSpecSchema:
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
            if self.experts_per_token > self.num_experts:
                raise ValueError("experts_per_token exceeds num_experts")
            if (self.num_experts > 1) != (self.model_type == "mixtral"):
                raise ValueError("num_experts > 1 only for model_type mixtral (and mixtral needs it)")
            if self.model_type in ("gpt2", "gptj", "bert", "roberta", "distilbert", "phi") and (
                self.num_kv_heads != self.num_heads or self.head_dim * self.num_heads != self.hidden_size
            ):
                raise ValueError(f"{self.model_type} needs num_kv_heads == num_heads and head_dim * num_heads "
                                 "== hidden_size")
            return self

    return ModelSpecSchema


_schema = lru_cache(maxsize=1)(_schema)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A model architecture. Counts are methods, computed from these fields. Build it with
    `ModelSpec.model_validate(dict)` or `from_hf_config`: the constructor does not validate."""

    name: str
    hf_id: str
    aliases: list[str] = field(default_factory=list)
    family: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_experts: int = 1
    experts_per_token: int = 1
    tie_word_embeddings: bool
    max_position_embeddings: int
    is_encoder: bool = False
    random_init: bool = False
    # Architecture traits (defaults per model_type from _TRAITS).
    position_embedding: str = "rope"
    type_vocab_size: int = 0  # BERT token-type embeddings
    norm: str = "rmsnorm"  # layernorm has weight + bias
    norms_per_block: int = 2
    embedding_norm: bool = False
    final_norm: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    gated_mlp: bool = True  # gate/up/down (SwiGLU/GeGLU) vs fc_in/fc_out
    fused_qkv: bool = False
    fused_gate_up: bool = False
    parallel_block: bool = False  # attention and MLP read the same normed input (GPT-J, Phi-2)
    lm_head_bias: bool = False
    pooler: bool = False  # encoder AutoModel pooler (dense hidden->hidden)
    # config.json values that do not change the parameter count (rope, eps, activation, token ids).
    hf_extra: dict[str, Any] = field(default_factory=dict)

    __hash__ = None  # lists/dicts inside: unhashable, as the pydantic model was

    @classmethod
    def model_validate(cls, data: Any) -> ModelSpec:
        """Validated ModelSpec (pydantic.ValidationError, a ValueError, names the bad field)."""
        return cls(**_schema().model_validate(data).model_dump())

    def model_dump(self, include: set[str] | None = None, exclude_defaults: bool = False) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if include is not None and f.name not in include:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if exclude_defaults and value == default:
                continue
            out[f.name] = value
        return out

    def model_copy(self, update: dict[str, Any] | None = None) -> ModelSpec:
        return dataclasses.replace(self, **(update or {}))


    # ---- counts -------------------------------------------------------------------------
    def _norm_size(self) -> int:
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    def params_embedding(self) -> int:
        """Input embeddings: tokens (+ learned positions, token types) (+ the embedding LayerNorm)."""
        n = self.vocab_size * self.hidden_size
        if self.position_embedding == "learned":
            n += self.max_position_embeddings * self.hidden_size
        n += self.type_vocab_size * self.hidden_size
        if self.embedding_norm:
            n += self._norm_size()
        return n

    def params_lm_head(self) -> int:
        """Separate output head; 0 when tied to the input embedding or for encoders (AutoModel)."""
        if self.is_encoder or self.tie_word_embeddings:
            return 0
        return self.vocab_size * self.hidden_size + (self.vocab_size if self.lm_head_bias else 0)

    def params_norms(self) -> int:
        """Every norm weight/bias (blocks, final, embedding norm); stays 16-bit under QLoRA."""
        per = self._norm_size()
        return per * (self.num_layers * self.norms_per_block + int(self.final_norm) + int(self.embedding_norm))

    def params_pooler(self) -> int:
        return self.hidden_size * self.hidden_size + self.hidden_size if self.pooler else 0

    def params_per_block(self) -> int:
        return sum(m.params() for m in self.linear_modules()) + self.norms_per_block * self._norm_size()

    def params_total(self) -> int:
        """Exact count of the transformers model (see module docstring for which class)."""
        return (
            self.params_embedding()
            + self.num_layers * self.params_per_block()
            + int(self.final_norm) * self._norm_size()
            + self.params_lm_head()
            + self.params_pooler()
        )

    def params_active_per_token(self) -> int:
        """Parameters one token passes through: MoE counts only `experts_per_token` experts."""
        idle = sum(
            m.params() // m.count * (m.count - self.experts_per_token)
            for m in self.linear_modules()
            if m.kind == "experts"
        )
        return self.params_total() - self.num_layers * idle

    def linear_modules(self) -> list[LinearModule]:
        """The weight matrices of ONE block with their HF names relative to the block."""
        layout = _LAYOUT.get(self.model_type, self.model_type)
        conv = "conv1d" if layout == "gpt2" else "linear"
        h, q_out, kv_out = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        a_pre, q, k, v, o, qkv = _ATTN_NAMES[layout]

        def lm(prefix: str, name: str, i: int, o_: int, bias: bool, kind: str = conv, count: int = 1) -> LinearModule:
            full = f"{prefix}.{name}" if prefix else name
            return LinearModule(name=full, in_features=i, out_features=o_, bias=bias, kind=kind, count=count)

        mods: list[LinearModule] = []
        if self.fused_qkv:
            mods.append(lm(a_pre, qkv, h, q_out + 2 * kv_out, self.qkv_bias))
        else:
            mods += [lm(a_pre, q, h, q_out, self.qkv_bias), lm(a_pre, k, h, kv_out, self.qkv_bias),
                     lm(a_pre, v, h, kv_out, self.qkv_bias)]
        mods.append(lm(a_pre, o, q_out, h, self.o_bias))

        inter = self.intermediate_size
        m_pre, *m_names = _MLP_NAMES[layout]
        if self.num_experts > 1:
            e = self.num_experts
            mods += [
                lm(m_pre, "gate", h, e, False, kind="router"),
                lm(m_pre, "experts.gate_up_proj", h, 2 * inter, False, kind="experts", count=e),
                lm(m_pre, "experts.down_proj", inter, h, False, kind="experts", count=e),
            ]
        elif self.gated_mlp and self.fused_gate_up:
            mods += [lm(m_pre, m_names[3], h, 2 * inter, self.mlp_bias), lm(m_pre, m_names[2], inter, h, self.mlp_bias)]
        elif self.gated_mlp:
            mods += [lm(m_pre, m_names[0], h, inter, self.mlp_bias), lm(m_pre, m_names[1], h, inter, self.mlp_bias),
                     lm(m_pre, m_names[2], inter, h, self.mlp_bias)]
        else:
            mods += [lm(m_pre, m_names[0], h, inter, self.mlp_bias), lm(m_pre, m_names[1], inter, h, self.mlp_bias)]
        return mods

    # ---- LoRA and quantization ----------------------------------------------------------
    def params_quantizable(self) -> int:
        """Weight elements bitsandbytes stores in 4/8 bit under QLoRA: the nn.Linear/Conv1D weights of
        the blocks. Embeddings, lm_head, norms, biases, an encoder's pooler and (transformers 5)
        Mixtral's fused experts and router stay in 16 bit."""
        return self.num_layers * sum(m.count * m.in_features * m.out_features
                                     for m in self.linear_modules() if m.quantizable)

    def _lora_candidates(self) -> list[tuple[str, tuple[str, ...], int, int, int]]:
        """Per block: (full name, names a target list may use, rank multiplier * count, in, out)."""
        out = []
        for m in self.linear_modules():
            if m.name in _MOE_PEFT_NAMES:
                names, mult = _MOE_PEFT_NAMES[m.name]
            else:
                names, mult = (m.name.rsplit(".", 1)[-1], m.name), 1
            out.append((m.name, names, mult * m.count, m.in_features, m.out_features))
        return out

    def lora_target_names(self) -> list[str]:
        """Names accepted in `lora_params(targets=[...])`: short and block-relative module names."""
        names: list[str] = []
        for _, ns, *_ in self._lora_candidates():
            names += [n for n in ns if n not in names]
        names += [n for n in self._lora_outside() if n not in names]
        return names

    def _lora_outside(self) -> dict[str, tuple[tuple[str, ...], int, int]]:
        """Linear modules outside the blocks that a target list can name: {full: (names, in, out)}."""
        out: dict[str, tuple[tuple[str, ...], int, int]] = {}
        if not self.is_encoder:
            out["lm_head"] = (("lm_head",), self.hidden_size, self.vocab_size)
        if self.pooler:
            out["pooler.dense"] = (("dense", "pooler.dense"), self.hidden_size, self.hidden_size)
        return out

    def lora_params(self, r: int, targets: str | list[str] = "all-linear") -> int:
        """Trainable LoRA A+B parameters peft creates: r * (in + out) per targeted module.

        "all-linear" follows peft: every Linear/Conv1D of the blocks (and an encoder's pooler),
        never the lm_head. For Mixtral, peft (0.21, with transformers 5) maps the v4 names onto
        the fused parameters: router `gate`, `w1`+`w3` -> `experts.gate_up_proj` at rank 2r per
        expert, `w2` -> `experts.down_proj` at rank r per expert. A list (or comma-separated string)
        matches module names the way peft does: equal or dotted suffix.
        """
        if r <= 0:
            raise UserError(f"LoRA rank must be positive, got {r}; pass e.g. --lora-r 16")
        cands = self._lora_candidates()
        outside = self._lora_outside()
        if isinstance(targets, str) and targets.strip().lower() == "all-linear":
            per_block = cands
            extra = [v for k, v in outside.items() if k != "lm_head"]
        else:
            wanted = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
            if not wanted:
                raise UserError("no LoRA target modules given; pass 'all-linear' or names like q_proj,v_proj")
            valid = self.lora_target_names()
            unknown = [t for t in wanted if t not in valid]
            if unknown:
                raise UserError(
                    f"unknown LoRA target module(s) {', '.join(unknown)} for {self.name}; "
                    f"valid: all-linear, {', '.join(valid)}"
                )

            def hit(full: str, names: tuple[str, ...]) -> bool:
                if full in _MOE_PEFT_NAMES:
                    got = [n for n in names if n in wanted]
                    if got and len(got) != len(names):
                        raise UserError(f"LoRA targets {' and '.join(names)} are fused into one weight in "
                                        f"transformers 5; target both or neither")
                    return bool(got)
                return any(full == t or full.endswith("." + t) for t in wanted)

            per_block = [c for c in cands if hit(c[0], c[1])]
            extra = [v for k, v in outside.items() if hit(k, v[0])]
        n = self.num_layers * sum(r * mult * (i + o) for _, _, mult, i, o in per_block)
        return n + sum(r * (i + o) for _, i, o in extra)

    # ---- HF config ----------------------------------------------------------------------
    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict that `AutoConfig.for_model(**d)` accepts and that builds this model."""
        names = _FIELD_NAMES.get(self.model_type, _FIELD_NAMES["default"])
        d: dict[str, Any] = {"model_type": self.model_type, "vocab_size": self.vocab_size}
        for ours, theirs in names.items():
            d[theirs] = getattr(self, ours)
        if self.model_type in ("bert", "roberta"):
            d["type_vocab_size"] = self.type_vocab_size
        if self.model_type in ("llama", "mistral", "mixtral", "qwen2"):
            d["head_dim"] = self.head_dim
        if self.model_type == "llama":
            d["attention_bias"], d["mlp_bias"] = self.qkv_bias, self.mlp_bias
        if not self.is_encoder:
            d["tie_word_embeddings"] = self.tie_word_embeddings
        d.update(self.hf_extra)
        return d


ModelSpec.model_fields = {f.name: f for f in dataclasses.fields(ModelSpec)}  # pydantic-style field names


# ModelSpec field -> config.json key, per model_type.
_FIELD_NAMES: dict[str, dict[str, str]] = {
    "default": {
        "hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
        "num_kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size",
        "max_position_embeddings": "max_position_embeddings",
    },
    "gpt2": {"hidden_size": "n_embd", "num_layers": "n_layer", "num_heads": "n_head",
             "intermediate_size": "n_inner", "max_position_embeddings": "n_positions"},
    "distilbert": {"hidden_size": "dim", "num_layers": "n_layers", "num_heads": "n_heads",
                   "intermediate_size": "hidden_dim", "max_position_embeddings": "max_position_embeddings"},
}
_FIELD_NAMES["gptj"] = _FIELD_NAMES["gpt2"]
_FIELD_NAMES["gemma2"] = {**_FIELD_NAMES["default"], "head_dim": "head_dim"}
_FIELD_NAMES["mixtral"] = {**_FIELD_NAMES["default"], "num_experts": "num_local_experts",
                           "experts_per_token": "num_experts_per_tok"}
for _mt in ("bert", "roberta"):
    _FIELD_NAMES[_mt] = {k: v for k, v in _FIELD_NAMES["default"].items() if k != "num_kv_heads"}
_FIELD_NAMES["phi"] = _FIELD_NAMES["default"]

# config.json keys that say nothing about the architecture (dropped by from_hf_config).
_IGNORED_KEYS = {
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map",
    "quantization_config", "model_type", "n_ctx", "use_cache", "_attn_implementation_autoset",
}


def from_hf_config(config: dict, name: str | None = None, hf_id: str | None = None) -> ModelSpec:
    """ModelSpec from a transformers config.json dict (families of SUPPORTED_MODEL_TYPES).

    Raises ValueError naming the problem (missing field, unsupported model_type); callers that
    read a file wrap it in a UserError naming the file.
    """
    if not isinstance(config, dict):
        raise ValueError("config.json must be a JSON object")
    mt = config.get("model_type")
    if mt not in _TRAITS:
        raise ValueError(
            f"model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    names = _FIELD_NAMES.get(mt, _FIELD_NAMES["default"])
    spec: dict[str, Any] = {"model_type": mt}
    required = ("vocab_size", "hidden_size", "num_layers", "num_heads")
    for ours in ("vocab_size", *names):
        theirs = "vocab_size" if ours == "vocab_size" else names[ours]
        value = config.get(theirs)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"field '{theirs}' must be an integer, got {value!r}")
            spec[ours] = value
        elif ours in required:
            raise ValueError(f"missing field '{theirs}'")
    h = spec["hidden_size"]
    if "intermediate_size" not in spec:
        if mt in ("gpt2", "gptj"):
            spec["intermediate_size"] = 4 * h  # n_inner: null means 4 * n_embd
        else:
            raise ValueError(f"missing field '{names['intermediate_size']}'")
    if mt in ("gpt2", "gptj") and "max_position_embeddings" not in spec:
        spec["max_position_embeddings"] = config.get("n_ctx", 1024)
    spec.setdefault("max_position_embeddings", 2048)
    if config.get("head_dim") is not None and mt not in ("gpt2", "gptj", "bert", "roberta", "distilbert", "phi"):
        spec["head_dim"] = config["head_dim"]
    elif mt == "gemma2":
        spec["head_dim"] = 256
    if mt == "mixtral":
        spec.setdefault("num_experts", 8)
        spec.setdefault("experts_per_token", 2)
    if mt in ("bert", "roberta"):
        spec["type_vocab_size"] = config.get("type_vocab_size", 2)
    if mt == "llama":
        spec["qkv_bias"] = spec["o_bias"] = bool(config.get("attention_bias", False))
        spec["mlp_bias"] = bool(config.get("mlp_bias", False))
    if mt == "gemma2" and config.get("attention_bias"):
        spec["qkv_bias"] = spec["o_bias"] = True
    if mt == "phi" and config.get("qk_layernorm"):
        raise ValueError("phi with qk_layernorm=true is not supported")
    if mt == "gpt2" and config.get("add_cross_attention"):
        raise ValueError("gpt2 with add_cross_attention=true is not supported")
    default_tie = mt in ("gpt2", "gemma2", "bert", "roberta", "distilbert")
    spec["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", default_tie))
    used = {"vocab_size", "tie_word_embeddings", "head_dim", "type_vocab_size", "attention_bias", "mlp_bias",
            *names.values()}
    spec["hf_extra"] = {k: v for k, v in config.items() if k not in used and k not in _IGNORED_KEYS}
    ident = hf_id or config.get("_name_or_path") or name or f"local/{mt}"
    spec["name"] = _slug(name or ident.rsplit("/", 1)[-1])
    spec["hf_id"] = ident
    spec["family"] = mt
    from pydantic import ValidationError

    try:
        return ModelSpec.model_validate(spec)
    except ValidationError as exc:
        raise ValueError(_first_error(exc)) from None


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return s or "model"


def _first_error(exc) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else err["msg"]


# ---- the catalog ----------------------------------------------------------------------------
class CatalogError(UserError):
    """The shipped (or a given) models.json is broken."""


def _validated_catalog(text: bytes | str, path: Path) -> list[dict]:
    """Every entry of a models.json validated, as plain dicts (what the cache stores)."""
    return [spec.model_dump() for spec in _parse_catalog(text, path).values()]


def _load_catalog_file(path: Path) -> dict[str, ModelSpec]:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise CatalogError(f"cannot read model catalog {path}: {exc}; reinstall ftplan or fix the file") from None
    return _parse_catalog(text, path)


def _parse_catalog(text: bytes | str, path: Path) -> dict[str, ModelSpec]:
    from pydantic import ValidationError

    try:
        raw = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise CatalogError(f"cannot read model catalog {path}: {exc}; reinstall ftplan or fix the file") from None
    entries = raw.get("models") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise CatalogError(f"model catalog {path} must be an object with a 'models' list")
    specs: dict[str, ModelSpec] = {}
    seen: dict[str, str] = {}
    for i, entry in enumerate(entries):
        label = entry.get("name", f"#{i}") if isinstance(entry, dict) else f"#{i}"
        try:
            spec = ModelSpec.model_validate(entry)
        except ValidationError as exc:
            raise CatalogError(f"model catalog {path}: entry '{label}' is invalid: {_first_error(exc)}") from None
        for key in {spec.name, spec.hf_id.lower(), *(a.lower() for a in spec.aliases)}:
            if key in seen:
                raise CatalogError(f"model catalog {path}: '{key}' of entry '{spec.name}' is already used by "
                                   f"'{seen[key]}'; names, aliases and hf_ids must be unique")
            seen[key] = spec.name
        specs[spec.name] = spec
    return specs


@lru_cache(maxsize=1)
def _default_catalog() -> dict[str, ModelSpec]:
    from ftplan.catalogs import data_path
    from ftplan.planner.estimate.gpus import read_validated

    path = data_path("models.json")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise CatalogError(f"cannot read model catalog {path}: {exc}; reinstall ftplan or fix the file") from None
    entries = read_validated("models", text, lambda raw: _validated_catalog(raw, path), Path(__file__).read_bytes())
    return {e["name"]: ModelSpec(**e) for e in entries}


def load_catalog(path: str | Path | None = None) -> dict[str, ModelSpec]:
    """Catalog keyed by canonical name (the shipped file is parsed once per process)."""
    return _default_catalog() if path is None else _load_catalog_file(Path(path))


def _index() -> dict[str, ModelSpec]:
    idx: dict[str, ModelSpec] = {}
    for spec in load_catalog().values():
        for key in (spec.name, spec.hf_id, *spec.aliases):
            idx[key.lower()] = spec
    return idx


# ---- resolution -----------------------------------------------------------------------------
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(arg: str) -> ModelSpec:
    """Catalog name / alias / HF id (any case); local folder or config.json; else an HF id whose
    config.json is fetched from the Hub once and cached."""
    key = arg.strip()
    spec = _index().get(key.lower())
    if spec is not None:
        return spec
    path = Path(key).expanduser()
    if path.is_dir() or path.suffix == ".json" or path.is_file():
        return _from_local(path)
    if _HF_ID.match(key):
        config = _hub_config(key)
        if config is not None:
            return _spec_from_source(config, f"config.json of '{key}'", name=key.rsplit("/", 1)[-1], hf_id=key)
    raise UserError(f"unknown model '{arg}'; closest catalog names: {', '.join(_closest(key))} "
                    "(or pass a local config.json)")


def _closest(arg: str, n: int = 3) -> list[str]:
    import difflib

    idx = _index()
    out: list[str] = []
    for cutoff in (0.5, 0.0):
        for k in difflib.get_close_matches(arg.lower(), list(idx), n=10, cutoff=cutoff):
            if idx[k].name not in out:
                out.append(idx[k].name)
        if len(out) >= n:
            break
    return out[:n]


def _from_local(path: Path) -> ModelSpec:
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file} not found; pass a folder containing config.json or the config.json itself")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {file}: {exc}; pass a valid transformers config.json") from None
    folder = file.resolve().parent
    return _spec_from_source(config, str(file), name=folder.name, hf_id=str(folder))


def _spec_from_source(config: Any, source: str, name: str, hf_id: str) -> ModelSpec:
    try:
        return from_hf_config(config, name=name, hf_id=hf_id)
    except ValueError as exc:
        raise UserError(f"{source}: {exc}; pass a config.json of a supported model") from None


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("FTPLAN_OFFLINE", "HF_HUB_OFFLINE"))


def hf_config_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("ftplan")) / "hf-configs"


def _hub_config(hf_id: str) -> Any | None:
    """config.json of an HF repo: from the cache, else fetched (unless offline). None if unavailable."""
    cache = hf_config_cache_dir() / (hf_id.replace("/", "--") + ".json")
    if cache.is_file():
        try:
            return json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cached {cache} is unreadable ({exc}); delete it and retry") from None
    if _offline():
        return None
    import httpx

    from ftplan.providers.errors import scrub

    base = (os.environ.get("FTPLAN_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    token = os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{base.rstrip('/')}/{hf_id}/resolve/main/config.json"
    try:
        resp = httpx.get(url, headers=headers, timeout=5.0, follow_redirects=True)
    except (httpx.HTTPError, httpx.InvalidURL):
        return None
    if resp.status_code in (401, 403):
        raise UserError(scrub(f"config.json of '{hf_id}' is gated or private (HTTP {resp.status_code}); "
                              "set HF_TOKEN to a token with access, or pass a local config.json"))
    if resp.status_code != 200:
        return None
    try:
        config = resp.json()
    except ValueError:
        raise UserError(f"config.json of '{hf_id}' from {base} is not valid JSON; pass a local config.json") from None
    try:  # the cache is a convenience: an unwritable cache dir must not fail the command
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=1))
        tmp.replace(cache)
    except OSError:
        pass
    return config
