"""Tokenizer and model: load or build, quantize for QLoRA, attach LoRA, save, merge.

All heavy imports happen inside functions so `job_config`/`job_data` stay importable without torch.
"""

from __future__ import annotations

import json
import logging
import os

from job_config import JobConfigError
from job_data import CHAT_ROLE_TOKENS, DEFAULT_CHAT_TEMPLATE, normalize, read_records

log = logging.getLogger("job")

# A random-init base smaller than this is saved with the outputs (base_model/), so the adapter can be
# loaded and merged later; bigger ones (GPU calibration runs) would only cost disk and minutes.
SAVE_RANDOM_BASE_MAX_PARAMS = 300_000_000


def hf_token(cfg: dict) -> str | None:
    """The hub token comes only from the environment variable the config names."""
    return os.environ.get(cfg["hf_token_env"]) or None


# ---------------------------------------------------------------- tokenizer
def _corpus(cfg: dict) -> list[str]:
    _fmt, payloads = normalize(read_records(cfg["_paths"]["dataset"]), cfg["data_format"])
    texts = []
    for _where, p in payloads:
        if isinstance(p, str):
            texts.append(p)
        elif isinstance(p, dict):
            texts.extend([p["instruction"], p["input"], p["output"]])
        else:
            texts.extend(m["content"] for m in p)
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """A small byte-level BPE trained on the dataset, for random-init models that have no tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", *CHAT_ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=CHAT_ROLE_TOKENS)
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def load_tokenizer(cfg: dict, vocab_size: int | None):
    from transformers import AutoTokenizer

    ref = cfg["_paths"]["tokenizer"]
    if ref is None and cfg["model"]["random_init"]:
        tok = train_tokenizer(_corpus(cfg), vocab_size or 32000)
    else:
        tok = AutoTokenizer.from_pretrained(ref or cfg["model"]["hf_id"], token=hf_token(cfg))
    if not getattr(tok, "is_fast", False):
        raise JobConfigError("the job needs a fast tokenizer (offsets locate the response tokens)")
    if tok.pad_token is None:
        # Padding positions are masked (-100) and attention 0, so reusing eos as pad is safe here.
        tok.pad_token = tok.eos_token
    if vocab_size is not None and len(tok) > vocab_size:
        raise JobConfigError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab_size}")
    return tok


# ---------------------------------------------------------------- precision
def pick_dtype(precision: str, device_type: str):
    """bf16 only with native support, fp16 on older GPUs, fp32 on the CPU (device_check.pick_dtype)."""
    import device_check
    import torch

    return device_check.pick_dtype(precision, device_type, torch)


# ---------------------------------------------------------------- model
def _random_base(cfg: dict, out_dir: str, dtype, is_main: bool, barrier) -> str:
    """Build the random-init model from its config and save it; returns the folder to load from.

    Built on the main process only and loaded by all, so every rank starts from the same weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = dict(cfg["model"]["config"])
    model_type = conf.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **conf)
    path = os.path.join(out_dir, "base_model")
    # (and on each node's first process: the nodes of a multi-node run do not share out/)
    if (is_main or os.environ.get("LOCAL_RANK", "0") == "0") and not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(cfg["seed"])
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        # transformers writes only on global rank 0 once torch.distributed is up: node k > 0 needs its own copy
        model.should_save_on_this_rank = lambda is_main_process: is_main_process
        tmp = path + ".tmp"
        model.save_pretrained(tmp)
        os.replace(tmp, path)  # a half-written base is never loaded by a resumed run
        del model
    barrier()
    return path


def load_model(cfg: dict, tokenizer_vocab: int, device, dtype, is_main: bool, barrier):
    """Returns (model, info) with only the parameters to train left trainable."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out_dir = cfg["_paths"]["output_dir"]
    source = _random_base(cfg, out_dir, dtype, is_main, barrier) if cfg["model"]["random_init"] \
        else cfg["model"]["hf_id"]
    kwargs = {"dtype": dtype, "token": hf_token(cfg)}
    method = cfg["method"]
    sharded = cfg["distributed"] in ("fsdp", "zero3")
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # FSDP shards flat tensors of one dtype, so the packed 4-bit weights are stored as `dtype`.
            bnb_4bit_quant_storage=dtype if sharded else torch.uint8)
    if not sharded:
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}
    if method == "qlora":
        # What peft's prepare_model_for_kbit_training does, minus its upcast of every 16-bit parameter to
        # fp32 (embeddings, lm_head, norms: +2 bytes x 2 x vocab x hidden, and a per-forward 16-bit copy of
        # the head under autocast). They stay frozen in 16 bit, as the estimate counts them; RMSNorm
        # computes in fp32 internally and the loss upcasts the logits. LoRA weights are fp32 (peft).
        for param in model.parameters():
            param.requires_grad_(False)
        if cfg["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)  # non-reentrant:
            # no enable_input_require_grads needed
    elif cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        if method == "lora":
            model.enable_input_require_grads()
    if method in ("qlora", "lora"):
        from peft import LoraConfig, get_peft_model

        lora = cfg["lora"]
        model = get_peft_model(model, LoraConfig(
            r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora["targets"], task_type="CAUSAL_LM", bias="none"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    qconf = kwargs.get("quantization_config")
    info = {"source": "random_init" if cfg["model"]["random_init"] else source,
            "quant_type": qconf.bnb_4bit_quant_type if qconf is not None else None,
            "trainable_params": trainable, "total_params": total,
            # bitsandbytes' own NF4 layers (peft's LoRA wrappers around them share the class name).
            "linear4bit_modules": sum(1 for m in model.modules()
                                      if type(m).__module__.startswith("bitsandbytes")
                                      and type(m).__name__ == "Linear4bit")}
    return model, info


def drop_fp32_output_copy(model) -> bool:
    """accelerate's mixed precision wraps forward as convert_outputs_to_fp32(autocast(forward)): an fp32
    copy of the logits (4 x batch x seq x vocab bytes, 2 GiB for Llama-3 at 4x1024) the job never reads (it
    uses the loss). Keep the autocast, drop the conversion. Returns whether a wrapper was removed."""
    from types import MethodType

    bound = hasattr(model.forward, "__func__")
    func = model.forward.__func__ if bound else model.forward
    wrapped = getattr(func, "__wrapped__", None)
    if type(wrapped).__name__ != "ConvertOutputsToFp32":
        return False
    inner = wrapped.model_forward
    model.forward = MethodType(inner, model) if bound else inner
    return True


def drop_random_base_if_large(cfg: dict, total_params: int) -> None:
    path = os.path.join(cfg["_paths"]["output_dir"], "base_model")
    if cfg["model"]["random_init"] and total_params > SAVE_RANDOM_BASE_MAX_PARAMS and os.path.isdir(path):
        import shutil

        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- outputs
def save_outputs(cfg: dict, model, tokenizer, state_dict: dict | None = None) -> dict:
    """adapter/ (or model/ for full) and tokenizer/; returns the written paths."""
    out_dir = cfg["_paths"]["output_dir"]
    written = {}
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    written["tokenizer"] = "tokenizer"
    if cfg["method"] == "full":
        model.save_pretrained(os.path.join(out_dir, "model"), safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(os.path.join(out_dir, "model"))
        written["model"] = "model"
        return written
    adapter_dir = os.path.join(out_dir, "adapter")
    model.save_pretrained(adapter_dir, safe_serialization=True, state_dict=state_dict)
    # Point the adapter at its base: the hub id, or the saved random-init base beside it.
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(cfg_path, encoding="utf-8") as fh:
        acfg = json.load(fh)
    acfg["base_model_name_or_path"] = "../base_model" if cfg["model"]["random_init"] else cfg["model"]["hf_id"]
    with open(cfg_path, "w", encoding="utf-8") as fh:
        json.dump(acfg, fh, indent=2)
    written["adapter"] = "adapter"
    return written


def merge_adapter(cfg: dict, tokenizer) -> str:
    """Merge into a fresh 16-bit base, never into the 4-bit one (rounding would corrupt the weights)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out_dir = cfg["_paths"]["output_dir"]
    base_ref = os.path.join(out_dir, "base_model") if cfg["model"]["random_init"] else cfg["model"]["hf_id"]
    if cfg["model"]["random_init"] and not os.path.isdir(base_ref):
        raise JobConfigError("merge_adapter: the random-init base was too large to keep; nothing to merge into")
    dtype = torch.float16 if cfg["precision"] == "fp16" else torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=dtype, token=hf_token(cfg))
    merged = PeftModel.from_pretrained(base, os.path.join(out_dir, "adapter")).merge_and_unload()
    target = os.path.join(out_dir, "merged")
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return "merged"
