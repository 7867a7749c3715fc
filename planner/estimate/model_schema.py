"""The pydantic schema that validates a ModelSpec's fields (built on first use: pydantic is slow to
import and to build, and a warm start never needs it)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

from ftplan.planner.estimate.architecture import _TRAITS, ModelType


@lru_cache(maxsize=1)
def schema():
    """The pydantic model class for ModelSpec."""
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
        moe_experts_linear: bool = False
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
