"""Read a training framework's own config and say what ftplan would estimate for it (`--from-config FILE`).

Formats (detected from the content): an axolotl YAML (`base_model`), a LLaMA-Factory YAML
(`model_name_or_path` with `finetuning_type`/`stage`), a torchtune recipe YAML (`model: {_component_: ...}`)
and a Hugging Face `TrainingArguments` JSON (optionally with TRL's SFTConfig/ModelConfig keys). Each key
is either mapped onto an `ftplan estimate` option, known to change nothing the estimate models (learning
rate, logging, paths: named together on one line), or named on a line of its own: keys that change memory
or time in ways ftplan does not model, unknown keys, and contradictions (two keys that disagree).

PyYAML is imported here only: `ftplan estimate` without --from-config never pays for it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftplan.planner.errors import UserError

# Keys that do not change peak memory or tokens/s (optimisation hyper-parameters, logging, paths, eval).
_IRRELEVANT = re.compile(
    r"^(learning_rate|lr|lr_scheduler.*|warmup.*|weight_decay|adam_beta\d|adam_epsilon|max_grad_norm|seed|"
    r"output_dir|logging.*|log_.*|save.*|eval.*|do_eval|do_train|do_predict|report_to|run_name|wandb.*|"
    r"hub_.*|push_to_hub|overwrite_.*|resume_from_checkpoint|dataset_prepared_path|val_set_size|"
    r"special_tokens|tokens|chat_template|template|strict|trust_remote_code|dataloader_.*|"
    r"preprocessing_num_workers|num_workers|plot_loss|ddp_timeout|tokenizer.*|checkpointer|metric_logger|"
    r"output_.*|log_every_n_steps|log_peak_memory_stats|device|shuffle|seed|profiler|clip_grad_norm|"
    r"lora_alpha|alpha|lora_model_dir|train_on_inputs|group_by_length|is_preprocess|debug|deepspeed_config|"
    r"early_stopping.*|remove_unused_columns|label_names|load_best_model_at_end|metric_for_best_model|"
    r"greater_is_better|ignore_data_skip|disable_tqdm|prediction_loss_only|include_.*|split|val_size|"
    r"overwrite_cache|dataset_dir|dataset_text_field|max_samples|datasets|dataset|test_datasets|"
    r"neftune_noise_alpha|noisy_embedding_alpha|flash_attn_.*_fusion|hf_use_auth_token|"
    r"gradient_checkpointing_kwargs|ddp_find_unused_parameters|local_rank|optimizer_in_bwd_note)$")


@dataclass
class ConfigReading:
    """What a config says, as `ftplan estimate` options, plus one line per key not used as written."""

    fmt: str
    options: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    irrelevant: list[str] = field(default_factory=list)

    def ignore(self, key: str, why: str) -> None:
        self.lines.append(f"{key}: ignored ({why})")

    def contradict(self, key: str, why: str) -> None:
        self.lines.append(f"{key}: contradicts {why}")

    def summary(self) -> list[str]:
        out = list(self.lines)
        if self.irrelevant:
            out.append("not relevant to memory or time: " + ", ".join(sorted(self.irrelevant)))
        return out


def read_config(path: str | Path) -> ConfigReading:
    """Parse FILE and map it; UserError when it cannot be read or is no format ftplan knows."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config {path}: {exc}; pass a readable YAML or JSON file") from None
    data = _parse(text, path)
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a mapping of keys to values; pass an axolotl, LLaMA-Factory or "
                        "torchtune YAML, or a TrainingArguments JSON")
    if isinstance(data.get("model"), dict) and "_component_" in data["model"]:
        return _torchtune(data)
    if "base_model" in data:
        return _axolotl(data)
    if "finetuning_type" in data or "stage" in data or "cutoff_len" in data:
        return _llamafactory(data)
    if "per_device_train_batch_size" in data or "output_dir" in data or path.suffix == ".json":
        return _training_arguments(data)
    raise UserError(f"{path}: not an axolotl (base_model), LLaMA-Factory (finetuning_type), torchtune "
                    "(model._component_) or TrainingArguments (per_device_train_batch_size) config")


def _parse(text: str, path: Path) -> Any:
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc}); fix the file") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{path} is not valid YAML{at}; fix the file") from None


def _truthy(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.strip().lower() in ("true", "yes", "1", "auto"))


def _targets(v: Any) -> str:
    if v in ("all", "all-linear", "all_linear") or v is None:
        return "all-linear"
    items = [v] if isinstance(v, str) else list(v)
    return ",".join(str(x).strip() for x in items if str(x).strip()) or "all-linear"


def _optimizer(name: str, r: ConfigReading, key: str) -> None:
    n = str(name).lower().replace("-", "_")
    fused = "fused" in n
    table = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
             "adam": "adamw", "adamw_8bit": "adamw8bit", "adamw_bnb_8bit": "adamw8bit", "adam8bit": "adamw8bit",
             "paged_adamw_8bit": "paged_adamw8bit", "paged_adamw_32bit": "adamw", "paged_adamw": "adamw",
             "sgd": "sgd", "adafactor": "adafactor"}
    last = n.rsplit(".", 1)[-1]  # torchtune: torch.optim.AdamW / bitsandbytes.optim.PagedAdamW8bit
    last = {"adamw": "adamw", "pagedadamw8bit": "paged_adamw8bit", "adamw8bit": "adamw_8bit",
            "pagedadamw": "paged_adamw", "sgd": "sgd", "adafactor": "adafactor"}.get(last, last)
    got = table.get(n) or table.get(last)
    if got is None:
        r.ignore(key, f"optimizer '{name}' is not modelled; estimated with AdamW")
        got = "adamw"
    r.options["optimizer"] = got
    if fused:
        r.options["fused_optimizer"] = True


def _precision(r: ConfigReading, bf16: Any, fp16: Any, keys: tuple[str, str], tf32_only: bool = False) -> None:
    b, f = _truthy(bf16), _truthy(fp16)
    if b and f:
        r.contradict(keys[1], f"{keys[0]} (both set): estimated as bf16-mixed")
    if b:
        r.options["precision"] = "bf16-mixed"
    elif f:
        r.options["precision"] = "fp16-mixed"
    elif bf16 is not None or fp16 is not None:
        r.options["precision"] = "fp32"


def _zero_from_deepspeed(value: Any, r: ConfigReading, key: str) -> None:
    """ZeRO stage and offload from an inline DeepSpeed config or its file name (ds_z3_offload_config.json)."""
    text = (json.dumps(value) if isinstance(value, dict) else str(value)).lower()
    m = re.search(r"\"stage\":\s*([0-3])|z(?:ero)?[_-]?(?:stage)?[_-]?([0-3])", text)
    if not m:
        r.ignore(key, f"cannot tell the ZeRO stage from {text[:60]!r}")
        return
    stage = int(m.group(1) or m.group(2))
    r.options["zero"] = stage
    if isinstance(value, dict):
        zo = value.get("zero_optimization", {}) if isinstance(value.get("zero_optimization"), dict) else {}
        param = str((zo.get("offload_param") or {}).get("device", "none")).lower()
        opt = str((zo.get("offload_optimizer") or {}).get("device", "none")).lower()
        if param == "cpu" and stage == 3:
            r.options["offload"] = "all"
        elif opt == "cpu":
            r.options["offload"] = "optimizer"
    elif "offload" in text:
        r.options["offload"] = "all" if stage == 3 else "optimizer"


# ---- axolotl ---------------------------------------------------------------------------------------
def _axolotl(d: dict) -> ConfigReading:
    r = ConfigReading("axolotl")
    o = r.options
    adapter = d.get("adapter")
    q4, q8 = _truthy(d.get("load_in_4bit")), _truthy(d.get("load_in_8bit"))
    if adapter in ("lora", "qlora"):
        o["method"] = "qlora" if (adapter == "qlora" or q4) else "lora"
        if adapter == "qlora" and not q4 and "load_in_4bit" in d:
            r.contradict("load_in_4bit", "adapter: qlora (QLoRA loads the base in 4 bit): estimated as qlora")
    elif adapter:
        r.ignore("adapter", f"'{adapter}' is not modelled; estimated as lora")
        o["method"] = "lora"
    else:
        o["method"] = "full"
    if q8:
        r.ignore("load_in_8bit", "an 8-bit (LLM.int8) base is not modelled; estimated with a 16-bit base")
    handled = {"adapter", "load_in_4bit", "load_in_8bit", "bf16", "fp16", "tf32", "flash_attention",
               "sdp_attention", "xformers_attention", "deepspeed", "fsdp", "fsdp_config"}
    for key, v in d.items():
        if key in handled:
            continue
        if key == "base_model":
            o["model_arg"] = str(v)
        elif key in ("sequence_len", "max_seq_length"):
            o["seq_len"] = int(v)
        elif key == "micro_batch_size":
            o["batch_size"] = int(v)
        elif key == "gradient_accumulation_steps":
            o["grad_accum"] = int(v)
        elif key == "num_epochs":
            o["epochs"] = float(v)
        elif key == "lora_r":
            o["lora_r"] = int(v)
        elif key == "lora_dropout":
            o["lora_dropout"] = float(v)
        elif key == "lora_target_modules":
            o["lora_targets"] = _targets(v)
        elif key == "lora_target_linear":
            if _truthy(v):
                o["lora_targets"] = "all-linear"
        elif key == "lora_modules_to_save":
            o["modules_to_save"] = ",".join(v or [])
        elif key == "peft_use_dora":
            o["dora"] = _truthy(v)
        elif key == "optimizer":
            _optimizer(v, r, key)
        elif key == "gradient_checkpointing":
            o["grad_checkpointing"] = bool(v) and v != "false"
            if v == "offload":
                o["activation_offload"] = True
        elif key == "activation_offloading":
            o["activation_offload"] = _truthy(v)
        elif key == "sample_packing":
            o["packing"] = _truthy(v)
        elif key == "torch_compile":
            o["compile"] = _truthy(v)
        elif key in ("liger_fused_linear_cross_entropy", "cut_cross_entropy"):
            if _truthy(v):
                o["loss"] = "fused"
        elif key == "unfrozen_parameters":
            r.ignore(key, "parameter patterns are not modelled; pass --method freeze --train-layers N")
        elif key == "max_steps" and v:
            r.ignore(key, "the estimate's time is per epoch; pass --dataset-tokens for a step budget")
        elif _IRRELEVANT.match(key) or key in ("type", "path", "base_model_config", "model_type", "tokenizer_type",
                                               "is_llama_derived_model", "hub_model_id", "lora_fan_in_fan_out",
                                               "pad_to_sequence_len", "eval_sample_packing", "max_steps"):
            r.irrelevant.append(key)
        else:
            r.ignore(key, "unknown to ftplan")
    o["attention"] = "flash" if _truthy(d.get("flash_attention")) else (
        "eager" if "sdp_attention" in d and not _truthy(d.get("sdp_attention")) and
        not _truthy(d.get("xformers_attention")) else "sdpa")
    if "bf16" in d or "fp16" in d:
        _precision(r, d.get("bf16"), d.get("fp16"), ("bf16", "fp16"))
    if "deepspeed" in d:
        _zero_from_deepspeed(d["deepspeed"], r, "deepspeed")
    if d.get("fsdp"):
        o["zero"] = 3
        if "deepspeed" in d:
            r.contradict("fsdp", "deepspeed (both set): estimated as FSDP full shard")
    if adapter in ("lora", "qlora") and "lora_r" not in d:
        o["lora_r"] = 8  # axolotl's default rank
    return r


# ---- LLaMA-Factory ---------------------------------------------------------------------------------
def _llamafactory(d: dict) -> ConfigReading:
    r = ConfigReading("llamafactory")
    o = r.options
    stage = d.get("stage", "sft")
    if stage not in ("sft", "pt"):
        r.ignore("stage", f"'{stage}' trains more than one model forward (reward/reference); estimated as sft")
    ft = d.get("finetuning_type", "lora")
    qbit = d.get("quantization_bit")
    if ft == "lora":
        o["method"] = "qlora" if qbit == 4 else "lora"
        if qbit not in (None, 4):
            r.ignore("quantization_bit", f"{qbit}-bit bases are not modelled; estimated with a 16-bit base")
    elif ft in ("full", "freeze"):
        o["method"] = ft
        if qbit is not None:
            r.contradict("quantization_bit", f"finetuning_type: {ft} (only LoRA trains on a quantized base)")
    else:
        r.ignore("finetuning_type", f"'{ft}' is not modelled; estimated as lora")
        o["method"] = "lora"
    handled = {"stage", "finetuning_type", "quantization_bit", "bf16", "fp16", "pure_bf16", "flash_attn",
               "deepspeed", "quantization_method", "double_quantization"}
    for key, v in d.items():
        if key in handled:
            continue
        if key == "model_name_or_path":
            o["model_arg"] = str(v)
        elif key == "cutoff_len":
            o["seq_len"] = int(v)
        elif key == "per_device_train_batch_size":
            o["batch_size"] = int(v)
        elif key == "gradient_accumulation_steps":
            o["grad_accum"] = int(v)
        elif key == "num_train_epochs":
            o["epochs"] = float(v)
        elif key == "lora_rank":
            o["lora_r"] = int(v)
        elif key == "lora_dropout":
            o["lora_dropout"] = float(v)
        elif key == "lora_target":
            o["lora_targets"] = _targets(v.split(",") if isinstance(v, str) and v != "all" else v)
        elif key == "additional_target":
            o["modules_to_save"] = v if isinstance(v, str) else ",".join(v)
        elif key == "use_dora":
            o["dora"] = _truthy(v)
        elif key == "freeze_trainable_layers":
            o["train_layers"] = abs(int(v))
            if int(v) < 0:
                r.ignore(key, "negative counts train the bottom layers: estimated as that many top layers")
        elif key == "optim":
            _optimizer(v, r, key)
        elif key == "disable_gradient_checkpointing":
            o["grad_checkpointing"] = not _truthy(v)
        elif key == "packing" or key == "neat_packing":
            o["packing"] = _truthy(v)
        elif key == "enable_liger_kernel" or key == "use_unsloth":
            if _truthy(v):
                o["loss"] = "fused"
        elif key == "max_steps" and v and int(v) > 0:
            r.ignore(key, "the estimate's time is per epoch; pass --dataset-tokens for a step budget")
        elif key == "num_virtual_tokens":
            o["num_virtual_tokens"] = int(v)
        elif _IRRELEVANT.match(key) or key in ("lora_alpha", "pissa_init", "create_new_adapter", "max_steps"):
            r.irrelevant.append(key)
        else:
            r.ignore(key, "unknown to ftplan")
    if _truthy(d.get("pure_bf16")):
        o["precision"] = "bf16-true"
        if _truthy(d.get("fp16")):
            r.contradict("fp16", "pure_bf16 (both set): estimated as bf16-true")
    elif "bf16" in d or "fp16" in d:
        _precision(r, d.get("bf16"), d.get("fp16"), ("bf16", "fp16"))
    fa = str(d.get("flash_attn", "auto")).lower()
    o["attention"] = {"fa2": "flash", "sdpa": "sdpa", "disabled": "eager", "auto": "sdpa"}.get(fa, "sdpa")
    if "deepspeed" in d:
        _zero_from_deepspeed(d["deepspeed"], r, "deepspeed")
    if "lora_rank" not in d and o["method"] in ("lora", "qlora"):
        o["lora_r"] = 8  # LLaMA-Factory's default rank
    if "lora_target" not in d and o["method"] in ("lora", "qlora"):
        o["lora_targets"] = "all-linear"  # its default 'all'
    if "lora_dropout" not in d:
        o["lora_dropout"] = 0.0
    return r


# ---- torchtune ---------------------------------------------------------------------------------------
def _torchtune(d: dict) -> ConfigReading:
    r = ConfigReading("torchtune")
    o = r.options
    model = d["model"]
    comp = str(model["_component_"])
    builder = comp.rsplit(".", 1)[-1]  # e.g. lora_llama3_1_8b, qlora_llama3_8b, llama3_2_1b
    kind = "qlora" if builder.startswith("qlora_") else "lora" if builder.startswith("lora_") else "full"
    o["method"] = kind
    o["model_arg"] = _torchtune_model(builder.removeprefix("qlora_").removeprefix("lora_"))
    o["framework"] = "hf"
    o["precision"] = "bf16-true"  # torchtune trains in the dtype the recipe sets (bf16 by default)
    o["loss"] = "standard"
    o["lora_dropout"] = 0.0
    for key, v in model.items():
        if key == "_component_":
            continue
        if key == "lora_rank":
            o["lora_r"] = int(v)
        elif key == "lora_attn_modules":
            names = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
            o["lora_targets"] = [names.get(x, x) for x in v]
        elif key == "apply_lora_to_mlp":
            o["_lora_mlp"] = _truthy(v)
        elif key == "apply_lora_to_output":
            o["_lora_head"] = _truthy(v)
        elif key == "lora_dropout":
            o["lora_dropout"] = float(v)
        elif key == "use_dora":
            o["dora"] = _truthy(v)
        elif key in ("lora_alpha", "quantize_base"):
            if key == "quantize_base" and _truthy(v):
                o["method"] = "qlora"
            else:
                r.irrelevant.append(f"model.{key}")
        else:
            r.ignore(f"model.{key}", "unknown to ftplan")
    targets = list(o.pop("lora_targets", ["q_proj", "v_proj"]))
    if o.pop("_lora_mlp", False):
        targets += ["gate_proj", "up_proj", "down_proj"]
    if o.pop("_lora_head", False):
        targets.append("lm_head")
    if o["method"] in ("lora", "qlora"):
        o["lora_targets"] = ",".join(targets)
    for key, v in d.items():
        if key == "model":
            continue
        if key == "batch_size":
            o["batch_size"] = int(v)
        elif key == "gradient_accumulation_steps":
            o["grad_accum"] = int(v)
        elif key == "epochs":
            o["epochs"] = float(v)
        elif key == "dtype":
            o["precision"] = {"bf16": "bf16-true", "fp32": "fp32", "fp16": "fp16-mixed"}.get(str(v), "bf16-true")
        elif key == "enable_activation_checkpointing":
            o["grad_checkpointing"] = _truthy(v)
        elif key == "enable_activation_offloading":
            o["activation_offload"] = _truthy(v)
        elif key == "compile":
            o["compile"] = _truthy(v)
        elif key == "loss" and isinstance(v, dict):
            lc = str(v.get("_component_", ""))
            o["loss"] = "chunked" if "Chunked" in lc else "fused" if "Linear" in lc else "standard"
        elif key == "optimizer" and isinstance(v, dict):
            _optimizer(str(v.get("_component_", "")), r, "optimizer._component_")
            if _truthy(v.get("fused")):
                o["fused_optimizer"] = True
        elif key == "optimizer_in_bwd":
            if _truthy(v):
                r.ignore(key, "per-parameter optimizer steps in the backward free gradients early; not modelled")
        elif key == "dataset" and isinstance(v, dict):
            if "packed" in v:
                o["packing"] = _truthy(v["packed"])
            r.irrelevant.append("dataset")
        elif key == "tokenizer" and isinstance(v, dict):
            if "max_seq_len" in v and v["max_seq_len"] is not None:
                o["seq_len"] = int(v["max_seq_len"])
            r.irrelevant.append("tokenizer")
        elif key == "max_steps_per_epoch" and v is not None:
            r.ignore(key, "the estimate's time is per epoch; pass --dataset-tokens for a step budget")
        elif key in ("fsdp_cpu_offload",):
            if _truthy(v):
                o["offload"] = "optimizer"
        elif _IRRELEVANT.match(key) or key in ("lr_scheduler", "loss_scale", "fsdp_sharding_strategy",
                                               "max_steps_per_epoch",
                                               "resume_from_checkpoint", "custom_sharded_layers", "batch_size_val"):
            r.irrelevant.append(key)
        else:
            r.ignore(key, "unknown to ftplan")
    return r


def _torchtune_model(builder: str) -> str:
    """A torchtune model builder name -> the catalog name ftplan resolves (e.g. llama3_1_8b -> llama3.1-8b)."""
    m = re.match(r"^([a-z]+)(\d+(?:_\d+)?)?_(\d+(?:_\d+)?[bm])(?:_instruct)?$", builder)
    if not m:
        return builder
    family, version, size = m.group(1), (m.group(2) or "").replace("_", "."), m.group(3).replace("_", ".")
    return f"{family}{version}-{size}"


# ---- Hugging Face TrainingArguments (+ TRL SFTConfig / ModelConfig) -----------------------------------
def _training_arguments(d: dict) -> ConfigReading:
    r = ConfigReading("training_arguments")
    o = r.options
    peft = _truthy(d.get("use_peft")) or any(k in d for k in ("lora_r", "lora_target_modules"))
    q4 = _truthy(d.get("load_in_4bit"))
    o["method"] = ("qlora" if q4 else "lora") if peft else "full"
    if q4 and not peft:
        r.contradict("load_in_4bit", "full fine-tuning (a 4-bit base trains only adapters): estimated as qlora")
        o["method"] = "qlora"
    handled = {"use_peft", "load_in_4bit", "bf16", "fp16", "deepspeed", "fsdp", "fsdp_config",
               "attn_implementation", "tf32", "bf16_full_eval", "fp16_full_eval"}
    for key, v in d.items():
        if key in handled:
            continue
        if key == "model_name_or_path":
            o["model_arg"] = str(v)
        elif key in ("max_seq_length", "max_length", "model_max_length"):
            o["seq_len"] = int(v)
        elif key == "per_device_train_batch_size":
            o["batch_size"] = int(v)
        elif key == "gradient_accumulation_steps":
            o["grad_accum"] = int(v)
        elif key == "num_train_epochs":
            o["epochs"] = float(v)
        elif key == "gradient_checkpointing":
            o["grad_checkpointing"] = _truthy(v)
        elif key == "optim":
            _optimizer(v, r, key)
        elif key == "torch_compile":
            o["compile"] = _truthy(v)
        elif key == "use_liger_kernel":
            if _truthy(v):
                o["loss"] = "fused"
        elif key == "packing":
            o["packing"] = _truthy(v)
        elif key == "lora_r":
            o["lora_r"] = int(v)
        elif key == "lora_dropout":
            o["lora_dropout"] = float(v)
        elif key == "lora_target_modules":
            o["lora_targets"] = _targets(v)
        elif key == "lora_modules_to_save":
            o["modules_to_save"] = ",".join(v or [])
        elif key == "use_dora":
            o["dora"] = _truthy(v)
        elif key == "max_steps":
            if isinstance(v, int) and v > 0:
                r.ignore(key, "the estimate's time is per epoch; pass --dataset-tokens for a step budget")
        elif key == "per_device_eval_batch_size" or _IRRELEVANT.match(key) or key in (
                "bnb_4bit_quant_type", "use_bnb_nested_quant", "lora_alpha", "torch_dtype", "dtype", "max_steps"):
            r.irrelevant.append(key)
        else:
            r.ignore(key, "unknown to ftplan")
    if "bf16" in d or "fp16" in d:
        _precision(r, d.get("bf16"), d.get("fp16"), ("bf16", "fp16"))
    if "attn_implementation" in d:
        o["attention"] = {"flash_attention_2": "flash", "sdpa": "sdpa", "eager": "eager"}.get(
            str(d["attn_implementation"]), "sdpa")
    if d.get("deepspeed"):
        _zero_from_deepspeed(d["deepspeed"], r, "deepspeed")
    if d.get("fsdp"):
        o["zero"] = 3
        if "offload" in str(d.get("fsdp")):
            o["offload"] = "all"
    if peft and "lora_r" not in d:
        o["lora_r"] = 16  # TRL ModelConfig's default
    return r
