"""Model architectures and exact parameter counts, computed from the architecture (never stored).

The catalog (`catalogs/models.json`, read by `ftplan.planner.estimate.models`) holds each model's
config.json values; facts that are fixed by the transformers class rather than by config.json (Qwen2's
q/k/v bias, Gemma-2's four norms per block, GPT-2's Conv1D layers, ...) live in `_TRAITS` below and fill
in what an entry leaves out.

What "the parameter count" means: the count of `sum(p.numel() for p in model.parameters())` for
the class a fine-tuning job loads, i.e. `AutoModelForCausalLM` for decoders (tied input/output
embeddings counted once) and `AutoModel` for encoders (BERT/RoBERTa include the pooler; no MLM
head). Mixtral follows transformers 5 by default: experts are fused 3D parameters
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) and the router `mlp.gate` is a bare parameter,
so none of them is an nn.Linear and peft's "all-linear" does not target them. `moe_experts_linear=True`
is transformers 4's layout: `block_sparse_moe.experts.N.w1/w2/w3` and the router `gate` are nn.Linear
(bitsandbytes quantizes them; peft adapts them).

ModelSpec is a plain frozen dataclass, validated with pydantic (`model_schema`, imported on demand).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
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
    expert: bool = False  # one of `count` MoE experts (a token passes through experts_per_token of them)

    @property
    def quantizable(self) -> bool:
        """bitsandbytes replaces only nn.Linear/Conv1D, so only these are 4-bit under QLoRA."""
        return self.kind in ("linear", "conv1d")

    def params(self) -> int:
        return self.count * (self.in_features * self.out_features + (self.out_features if self.bias else 0))




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
    moe_experts_linear: bool = False  # transformers 4 MoE layout: per-expert nn.Linear (see module docstring)
    # config.json values that do not change the parameter count (rope, eps, activation, token ids).
    hf_extra: dict[str, Any] = field(default_factory=dict)

    __hash__ = None  # lists/dicts inside: unhashable, as the pydantic model was

    @classmethod
    def model_validate(cls, data: Any) -> ModelSpec:
        """Validated ModelSpec (pydantic.ValidationError, a ValueError, names the bad field)."""
        from ftplan.planner.estimate.model_schema import schema

        return cls(**schema().model_validate(data).model_dump())

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
            if m.expert
        )
        return self.params_total() - self.num_layers * idle

    def linear_modules(self) -> list[LinearModule]:
        """The weight matrices of ONE block with their HF names relative to the block (built once per spec:
        the all-GPU table asks for them hundreds of times)."""
        cached = self.__dict__.get("_linear_cache")
        if cached is None:
            cached = tuple(self._build_linear_modules())
            object.__setattr__(self, "_linear_cache", cached)  # frozen: a derived value, not a field
        return list(cached)

    def _build_linear_modules(self) -> list[LinearModule]:
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
        if self.num_experts > 1 and self.moe_experts_linear:
            e = self.num_experts
            mods += [
                lm("block_sparse_moe", "gate", h, e, False),
                LinearModule(name="block_sparse_moe.experts.w1", in_features=h, out_features=inter, bias=False,
                             count=e, expert=True),
                LinearModule(name="block_sparse_moe.experts.w3", in_features=h, out_features=inter, bias=False,
                             count=e, expert=True),
                LinearModule(name="block_sparse_moe.experts.w2", in_features=inter, out_features=h, bias=False,
                             count=e, expert=True),
            ]
        elif self.num_experts > 1:
            e = self.num_experts
            mods += [
                lm(m_pre, "gate", h, e, False, kind="router"),
                lm(m_pre, "experts.gate_up_proj", h, 2 * inter, False, kind="experts", count=e),
                lm(m_pre, "experts.down_proj", inter, h, False, kind="experts", count=e),
            ]
            mods[-2:] = [dataclasses.replace(x, expert=True) for x in mods[-2:]]
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
        key = (r, targets if isinstance(targets, str) else tuple(targets))
        memo = self.__dict__.setdefault("_lora_memo", {})  # a derived value per (rank, targets)
        if key not in memo:
            memo[key] = self._lora_params(r, targets)
        return memo[key]

    def _lora_params(self, r: int, targets: str | list[str]) -> int:
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
