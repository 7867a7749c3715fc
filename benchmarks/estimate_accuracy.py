"""Accuracy of `ftplan estimate` against every published measurement in ../shared/calibration/.

Usage: python benchmarks/estimate_accuracy.py [--csv PATH] [--quiet]

Scored sets (decided here, printed at the end):
- memory: `kind == measured`, a peak memory value, `outcome` ran (or blank), a model we can describe and a
  method ftplan models. Each row is converted to the quantity it measured: decimal GB / GiB / MiB;
  `max_memory_allocated` -> our `allocated`; NVML "used" -> our `reserved` + the context the source measured;
  sums over GPUs -> per GPU. Rows whose unit and method are unknown (Qwen "G", 2023) are compared as GiB of
  nvidia-smi's device figure: reserved memory + the pre-lazy-loading CUDA context S12 measured (1.3 GiB).
- each row's training code is mapped to `framework` (LitGPT rows -> "litgpt": fp32 base under bf16-mixed,
  FSDP keeping gathered frozen weights); LitGPT multi-GPU runs are FSDP (ZeRO-3); BERT rows without an
  attention column are eager (transformers had no SDPA for BERT before v4.41).
- S06 full fine-tunes use the stated GPU count unless 8 B/param (bf16 weights, grads, AdamW states) alone
  exceeds the measured peak on it; then the published 4xA10G machine.
- throughput: measured rows with `derived_tokens_per_s_total` (fixed token count per step).
- fits: measured rows that report only ran/OOM: the estimator's fits-on-GPU decision.
Everything else is listed as skipped with its reason. LitGPT rows (S05) train on Alpaca at its natural
length: the peak happens at the longest sample, which LitGPT puts first (1,304 tokens), so seq_len = 1304.
Being the first micro-batch, it has no equally long predecessor whose bitsandbytes inputs LitGPT would
still hold (`ftplan.planner.estimate.memory.litgpt_previous_step_input_bytes`), so that term is left out of those rows.

The two naive anchors are scored on the same memory rows: LLaMA-Factory's size-class table (GB per
billion parameters by method) and accelerate's estimate-memory rule (weights x 4 for Adam, i.e. 16 bytes
per parameter for full fine-tuning; weights only otherwise, as accelerate reports no adapter training).
"""

from __future__ import annotations

import csv
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftplan.planner.estimate.architecture import ModelSpec  # noqa: E402
from ftplan.planner.estimate.estimator import EstimateRequest, estimate  # noqa: E402
from ftplan.planner.estimate.gpus import resolve_gpu  # noqa: E402
from ftplan.planner.estimate.memory import litgpt_previous_step_input_bytes  # noqa: E402
from ftplan.planner.estimate.models import from_hf_config  # noqa: E402

DEFAULT_CSV = ROOT.parent / "shared" / "calibration" / "published-measurements.csv"
GIB = 1024**3


def _table_name(name: str) -> str | None:
    """A GPU named in ftplan's own spelling (e.g. rows from benchmarks/gpu_calibration.py: 'H200')."""
    from ftplan.planner.errors import UserError
    from ftplan.planner.estimate.gpus import resolve_gpu

    try:
        return resolve_gpu(name).name if name else None
    except UserError:
        return None


def _llama(name, vocab, h, layers, heads, kv, inter, tied=False, head_dim=None, **extra) -> ModelSpec:
    cfg = dict(model_type="llama", vocab_size=vocab, hidden_size=h, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
               tie_word_embeddings=tied, max_position_embeddings=4096)
    if head_dim:
        cfg["head_dim"] = head_dim
    spec = from_hf_config(cfg, name=name)
    return spec.model_copy(update=extra) if extra else spec


def _phi(name, vocab, h, layers, heads, inter) -> ModelSpec:
    return from_hf_config(dict(model_type="phi", vocab_size=vocab, hidden_size=h, num_hidden_layers=layers,
                               num_attention_heads=heads, intermediate_size=inter), name=name)


_PLAIN = dict(gated_mlp=False, norm="layernorm", qkv_bias=True, o_bias=True, mlp_bias=True)
# Architectures from each model's config.json (inline so the benchmark needs no network; the catalog's
# entries are used instead when a catalog exists and has the name).
ARCH: dict[str, ModelSpec] = {
    "phi-1.5": _phi("phi-1.5", 51200, 2048, 24, 32, 8192),
    "phi-2": _phi("phi-2", 51200, 2560, 32, 32, 10240),
    "stablelm-3b": _llama("stablelm-3b", 50688, 4096, 16, 32, 32, 16384, parallel_block=True, **_PLAIN),
    "llama-2-7b": _llama("llama-2-7b", 32000, 4096, 32, 32, 32, 11008),
    "llama-2-13b": _llama("llama-2-13b", 32000, 5120, 40, 40, 40, 13824),
    "falcon-7b": _llama("falcon-7b", 65024, 4544, 32, 71, 1, 18176, tied=True, parallel_block=True,
                        norms_per_block=1, **{**_PLAIN, "qkv_bias": False, "o_bias": False, "mlp_bias": False}),
    "falcon-40b": _llama("falcon-40b", 65024, 8192, 60, 128, 8, 32768, parallel_block=True,
                         **{**_PLAIN, "qkv_bias": False, "o_bias": False, "mlp_bias": False}),
    "gemma-2b": _llama("gemma-2b", 256000, 2048, 18, 8, 1, 16384, tied=True, head_dim=256),
    "gemma-7b": _llama("gemma-7b", 256000, 3072, 28, 16, 16, 24576, tied=True, head_dim=256),
    "gemma-2-2b": from_hf_config(dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, num_hidden_layers=26,
                                      num_attention_heads=8, num_key_value_heads=4, intermediate_size=9216,
                                      head_dim=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
                                 name="gemma-2-2b"),
    "gemma-2-9b": from_hf_config(dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, num_hidden_layers=42,
                                      num_attention_heads=16, num_key_value_heads=8, intermediate_size=14336,
                                      head_dim=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
                                 name="gemma-2-9b"),
    "llama-3-8b": _llama("llama-3-8b", 128256, 4096, 32, 32, 8, 14336),
    "llama-3.2-1b": _llama("llama-3.2-1b", 128256, 2048, 16, 32, 8, 8192, tied=True, head_dim=64),
    "llama-3.2-3b": _llama("llama-3.2-3b", 128256, 3072, 28, 24, 8, 8192, tied=True, head_dim=128),
    "mistral-7b": _llama("mistral-7b", 32000, 4096, 32, 32, 8, 14336),
    "phi-3-mini": from_hf_config(dict(model_type="phi3", vocab_size=32064, hidden_size=3072, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192,
                                      tie_word_embeddings=False), name="phi-3-mini"),
    "tinyllama": _llama("tinyllama", 32000, 2048, 22, 32, 4, 5632),
    # Qwen (v1) has a fused c_attn with bias and a SwiGLU MLP of width ffn/2: llama-shaped.
    "qwen-1.8b": _llama("qwen-1.8b", 151936, 2048, 24, 16, 16, 5504, qkv_bias=True),
    "qwen-7b": _llama("qwen-7b", 151936, 4096, 32, 32, 32, 11008, qkv_bias=True),
    "qwen-14b": _llama("qwen-14b", 152064, 5120, 40, 40, 40, 13696, qkv_bias=True),
    "qwen-72b": _llama("qwen-72b", 152064, 8192, 80, 64, 64, 24576, qkv_bias=True),
    "bloomz-7b1": _llama("bloomz-7b1", 250880, 4096, 30, 32, 32, 16384, tied=True, embedding_norm=True, **_PLAIN),
    "bert-large": from_hf_config(dict(model_type="bert", vocab_size=30522, hidden_size=1024, num_hidden_layers=24,
                                      num_attention_heads=16, intermediate_size=4096,
                                      max_position_embeddings=512), name="bert-large"),
}

MODEL_ALIASES = [
    (r"phi-1\.5", "phi-1.5"), (r"^phi-2", "phi-2"), (r"stablelm", "stablelm-3b"), (r"phi-3-mini", "phi-3-mini"),
    (r"llama[ -]2[ -]7b|^llama-2-7b", "llama-2-7b"), (r"llama[ -]2[ -]13b|^llama-2-13b", "llama-2-13b"),
    (r"falcon[ -]40b", "falcon-40b"), (r"falcon-7b", "falcon-7b"), (r"gemma-2-2b", "gemma-2-2b"),
    (r"gemma-2-9b", "gemma-2-9b"), (r"gemma-2b", "gemma-2b"), (r"gemma-7b", "gemma-7b"),
    (r"llama-3\.2-1b", "llama-3.2-1b"), (r"llama-3\.2-3b", "llama-3.2-3b"), (r"llama-3(\.1)?-8b", "llama-3-8b"),
    (r"mistral-7b", "mistral-7b"), (r"tiny-?llama", "tinyllama"), (r"qwen-1\.8b", "qwen-1.8b"),
    (r"qwen-7b", "qwen-7b"), (r"qwen-14b", "qwen-14b"), (r"qwen-72b", "qwen-72b"), (r"bloomz-7b1", "bloomz-7b1"),
    (r"bert-large", "bert-large"), (r"^llama-7b$", "llama-2-7b"), (r"^llama-13b$", "llama-2-13b"),
]

GPU_MAP = {"A100-SXM4-40GB": "A100", "A100": "A100", "A100-SXM4-80G": "A100-80GB-SXM", "A10G": "A10G",
           "V100-SXM2 16GB": "V100", "T4": "T4", "L4": "L4"}


def model_for(name: str) -> ModelSpec | None:
    low = name.lower()
    for pat, key in MODEL_ALIASES:
        if re.search(pat, low):
            return ARCH[key]
    return None


@dataclass
class Mapped:
    row: dict
    req: EstimateRequest
    gpu_name: str
    gpu_count: int
    measured_mem_gib: float | None  # converted to GiB of the quantity `mem_quantity` names
    mem_quantity: str  # "allocated" | "reserved" | "nvml" (reserved + the context the source's stack had)
    context_gib: float
    measured_tps: float | None
    longest_first: bool = False  # the peak micro-batch is the run's first: nothing before it as long


def _targets(row: dict, model: ModelSpec) -> str:
    t = row["lora_targets"].lower()
    if "all" in t or "c_attn" in t or "q,k,v,o,gate" in t:
        return "all-linear"
    if "projection" in t and "mlp" in t:  # LitGPT: every block linear + the head
        names = list(dict.fromkeys(m.name.rsplit(".", 1)[-1] for m in model.linear_modules()))
        return ",".join(names + (["lm_head"] if "head" in t else []))
    if "query_key_value" in t:
        return "q_proj,k_proj,v_proj"
    return "q_proj,v_proj"  # query,value / q,v / PEFT default for Llama


def _int(text: str, default: int) -> int:
    m = re.match(r"\s*(\d+)", text or "")
    return int(m.group(1)) if m else default


def _loss(r: dict) -> str:
    """The cross-entropy a row's notes name (ftplan's own calibration rows say `loss chunked`), else standard."""
    m = re.search(r"\bloss (standard|chunked|fused)\b", r["notes"])
    return m.group(1) if m else "standard"


def map_row(r: dict) -> Mapped | str:
    """The row as an EstimateRequest and the measured quantity, or the reason it is skipped."""
    if r["kind"] != "measured":
        return f"kind={r['kind']} (not a measurement)"
    method = r["method"].lower()
    if "8-bit base" in method or "llm.int8" in r["quantization"].lower():
        return "LoRA on an 8-bit (LLM.int8) base: not a method ftplan models"
    if "adapter" in method:
        return "LLaMA-Adapter: not a method ftplan models"
    if "gptq" in r["quantization"].lower():
        return "GPTQ int4 base (auto-gptq kernels, fp16): not a method ftplan models (its qlora is bitsandbytes NF4)"
    if "prefix" in method:
        return "ChatGLM's own INT4 quantization: not modelled"
    if r["extra_trainable"].lower().startswith(("embedding", "lm_head")):
        return "embedding/lm_head trained as modules_to_save: not modelled"
    model = model_for(r["model"])
    if model is None:
        return f"model '{r['model']}' not described (encoder-decoder or unknown architecture)"
    gpu_name = GPU_MAP.get(r["gpu"]) or _table_name(r["gpu"])
    if gpu_name is None:
        return f"GPU '{r['gpu']}' not in the GPU table"
    if r["source_id"] == "S06" and "ambiguous" in r["notes"]:
        return ("GPU count ambiguous (source: published only for 4xA10G, README says single-GPU) and no "
                "reading fits: 1 GPU is below the 8 B/param states, 4-GPU FSDP is half the peak")
    if r["cpu_offload"].lower().startswith("yes") and "zero-3" in r["parallelism"].lower():
        return ("ZeRO-3 parameter offload on 1 GPU: the GPU peak is DeepSpeed's live-parameter, prefetch and "
                "bucket buffers (sizes set by accelerate's unstated 'auto' config), not the model's tensors")
    if r["seq_len"] == "" and r["source_id"] != "S05":
        return "sequence length not stated"
    n = _int(r["gpu_count"], 1)
    src = r["source_id"]
    base = method.split()[0]
    prec_text = r["precision"].lower()
    if "bf16-true" in prec_text or "pure bf16" in prec_text:
        precision = "bf16-true"
    elif prec_text.startswith("fp32"):
        precision = "fp32"
    elif "fp16" in prec_text:
        precision = "fp16-mixed"
    else:
        precision = "bf16-mixed"
    opt_text = r["optimizer"].lower()
    optimizer = ("adafactor" if "adafactor" in opt_text else "adamw8bit" if "8bit" in opt_text.replace("-", "")
                 else "adamw")
    seq = 1304 if src == "S05" else _int(r["seq_len"], 512)
    ckpt = r["grad_ckpt"].lower().startswith("yes")
    attn = "eager" if "eager" in r["attention"].lower() else "sdpa"
    if not r["attention"] and model.is_encoder:
        attn = "eager"  # BERT had only eager attention in transformers before v4.41 (the S12 docs predate it)
    framework = "litgpt" if "lit" in r["framework"].lower() else "hf"
    par = r["parallelism"].lower()
    zero = 3 if ("zero-3" in par or "fsdp" in par) else 2 if "zero-2" in par else 0
    if src == "S07" and base == "full":
        zero = 3  # finetune_ds.sh defaults to ds_config_zero3.json (SOURCES.md)
    if src == "S07" and base == "qlora":
        precision = "fp16-mixed"
    if src == "S06" and base == "full" and 8 * model.params_total() / n > float(r["peak_mem"] or "inf") * 1e9:
        # bf16 weights + grads + AdamW states (8 B/param) alone exceed the measured peak on the stated GPU
        # count: the run used the 4xA10G machine the table was published for (LitGPT FSDP).
        n = 4
    if src in ("S05", "S06") and n > 1:
        zero = 3  # LitGPT's multi-GPU strategy is FSDP (full shard)
    offload = "optimizer" if r["cpu_offload"].lower().startswith("yes") else "none"
    req = EstimateRequest(
        model=model, method=base, seq_len=seq, batch_size=_int(r["micro_batch"], 1),
        grad_accum=_int(r["grad_accum"], 1), lora_r=_int(r["lora_r"], 8), lora_targets=_targets(r, model),
        optimizer=optimizer, precision=precision, offload=offload, grad_checkpointing=ckpt, attention=attn,
        zero=zero if (zero or n > 1) else None, double_quant=("dq" in r["quantization"].lower()
                                                              or "double" in r["quantization"].lower()),
        lora_dropout=0.1 if src == "S11" else 0.05, framework=framework,
        loss_upcast=src != "S07",  # Qwen v1's remote code computes the loss on bf16 logits
        loss=_loss(r), compile=r["compile"].lower().startswith("yes"))
    measured, quantity, context = None, "allocated", 0.0
    if r["peak_mem"]:
        value = float(r["peak_mem"])
        unit = r["peak_mem_unit"].lower()
        if unit.startswith("gb (decimal"):
            measured = value * 1e9 / GIB
        elif unit.startswith("mb"):
            measured = value / 1024  # NVML used // 1024**2: MiB
        else:
            measured = value  # "G", "GB as printed": GiB-based tools
        if "sum_over_gpus" in r["peak_mem_scope"]:
            measured /= n
        metric = r["peak_mem_metric"].lower()
        if "nvml" in metric or "nvidia-smi" in metric:
            quantity, context = "nvml", 1343 / 1024  # context measured by the source (S12)
        elif "not stated" in metric:
            # An unstated tool in a 2023 table: nvidia-smi's device figure, whose CUDA context before lazy
            # loading (CUDA < 12.2) is the 1.3 GiB S12 measured.
            quantity, context = "nvml", 1343 / 1024
    tps = float(r["derived_tokens_per_s_total"]) if r["derived_tokens_per_s_total"] else None
    longest_first = "first iteration uses the longest sample" in r["packed"]
    return Mapped(r, req, gpu_name, n, measured, quantity, context, tps, longest_first)


def predicted_mem(m: Mapped) -> float:
    mem = estimate(m.req, resolve_gpu(m.gpu_name), m.gpu_count).memory
    leftover = litgpt_previous_step_input_bytes(m.req) / GIB if m.longest_first else 0.0
    if m.mem_quantity == "allocated":
        return mem.allocated - leftover
    if m.mem_quantity == "reserved":
        return mem.reserved - leftover
    return mem.reserved - leftover + m.context_gib


def predicted_tps(m: Mapped) -> float:
    return estimate(m.req, resolve_gpu(m.gpu_name), m.gpu_count).tokens_per_s


def llamafactory_gib(m: Mapped) -> float:
    """LLaMA-Factory's table: GB per billion parameters (x) by method."""
    b = m.req.model.params_total() / 1e9
    method, prec = m.req.method, m.req.precision
    if method == "full":
        gb = (8 if prec == "bf16-true" else 18) * b
    elif method in ("lora", "freeze", "prompt", "prefix"):
        gb = 2 * b
    else:
        gb = b / 2
    return gb * 1e9 / GIB / (m.gpu_count if m.req.method == "full" else 1)


def accelerate_gib(m: Mapped) -> float:
    """accelerate estimate-memory: weights in the load dtype; x4 for Adam training (full fine-tune only)."""
    p = m.req.model.params_total()
    bytes_w = 4 if m.req.precision == "fp32" else 2
    if m.req.method == "qlora":
        bytes_w = 0.5
    mult = 4 if m.req.method == "full" else 1
    return p * bytes_w * mult / GIB / (m.gpu_count if m.req.method == "full" else 1)


def load_rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def collect(path: Path = DEFAULT_CSV):
    mem_rows, tps_rows, fit_rows, skipped = [], [], [], []
    for r in load_rows(path):
        mapped = map_row(r)
        if isinstance(mapped, str):
            skipped.append((r["row_id"], r["model"], mapped))
            continue
        outcome = r["outcome"].lower()
        if outcome and outcome not in ("ran",):
            fit_rows.append(mapped) if outcome == "oom" or outcome.startswith("ran") else skipped.append(
                (r["row_id"], r["model"], f"outcome '{r['outcome']}'"))
            continue
        if mapped.measured_mem_gib is not None:
            mem_rows.append(mapped)
        if mapped.measured_tps is not None:
            tps_rows.append(mapped)
        if mapped.measured_mem_gib is None and mapped.measured_tps is None:
            if outcome == "ran":
                fit_rows.append(mapped)
            else:
                skipped.append((r["row_id"], r["model"], "no memory or token-count throughput figure"))
    return mem_rows, tps_rows, fit_rows, skipped


def _rel(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def leave_one_source_out(mem_rows, tps_rows, quiet: bool) -> tuple[list[float], list[float]]:
    """For each source: refit every fitted constant (scripts/fit_throughput.fit) on the OTHER sources' rows,
    then score this source's rows with them. Returns the pooled absolute errors (memory, throughput)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import fit_throughput

    mem_err, tps_err = [], []
    sources = sorted({m.row["source_id"] for m in mem_rows + tps_rows})
    if not quiet:
        print("\n# leave-one-source-out (constants refitted without the source, then its rows scored)")
        print("source  mem_rows  mem_median  mem_max  tps_rows  tps_median")
    for src in sources:
        consts = fit_throughput.fit([m for m in mem_rows if m.row["source_id"] != src],
                                    [m for m in tps_rows if m.row["source_id"] != src], log=lambda _msg: None)
        with fit_throughput.constants(consts):
            me = [abs(_rel(predicted_mem(m), m.measured_mem_gib)) for m in mem_rows if m.row["source_id"] == src]
            te = [abs(_rel(predicted_tps(m), m.measured_tps)) for m in tps_rows if m.row["source_id"] == src]
        mem_err += me
        tps_err += te
        if not quiet:
            print(f"{src:<7} {len(me):>8} {statistics.median(me) if me else float('nan'):>11.3f} "
                  f"{max(me) if me else float('nan'):>8.3f} {len(te):>9} "
                  f"{statistics.median(te) if te else float('nan'):>11.3f}")
    return mem_err, tps_err


def main(argv: list[str]) -> int:
    path = Path(argv[argv.index("--csv") + 1]) if "--csv" in argv else DEFAULT_CSV
    quiet = "--quiet" in argv
    mem_rows, tps_rows, fit_rows, skipped = collect(path)

    mem_err, lf_err, acc_err = [], [], []
    if not quiet:
        print("# memory (GiB, per GPU)\nrow  source model                method  gpus measured  ftplan   err    llamafactory accelerate")
    for m in mem_rows:
        p, lf, ac = predicted_mem(m), llamafactory_gib(m), accelerate_gib(m)
        e = _rel(p, m.measured_mem_gib)
        mem_err.append(abs(e))
        lf_err.append(abs(_rel(lf, m.measured_mem_gib)))
        acc_err.append(abs(_rel(ac, m.measured_mem_gib)))
        if not quiet:
            print(f"{m.row['row_id']:>4} {m.row['source_id']:<6} {m.req.model.name:<20} {m.req.method:<7} "
                  f"{m.gpu_count:>4} {m.measured_mem_gib:8.2f} {p:8.2f} {e:+6.1%} {lf:10.2f} {ac:10.2f}")
    tps_err = []
    if not quiet:
        print("\n# throughput (tokens/s, all GPUs)\nrow  source model                method  gpu            measured   ftplan   err")
    for m in tps_rows:
        p = predicted_tps(m)
        e = _rel(p, m.measured_tps)
        tps_err.append(abs(e))
        if not quiet:
            print(f"{m.row['row_id']:>4} {m.row['source_id']:<6} {m.req.model.name:<20} {m.req.method:<7} "
                  f"{m.gpu_count}x{m.gpu_name:<12} {m.measured_tps:8.0f} {p:8.0f} {e:+6.1%}")
    right = 0
    if not quiet:
        print("\n# fits (ran / OOM)\nrow  model                method  gpu       outcome  ftplan_total_gib  ftplan_fits")
    for m in fit_rows:
        gpu = resolve_gpu(m.gpu_name)
        est = estimate(m.req, gpu, m.gpu_count)
        ran = m.row["outcome"].lower().startswith("ran")
        right += est.fits == ran
        if not quiet:
            print(f"{m.row['row_id']:>4} {m.req.model.name:<20} {m.req.method:<7} {m.gpu_count}x{gpu.name:<8} "
                  f"{m.row['outcome']:<8} {est.memory.total:8.1f} {str(est.fits):>8}")
    if not quiet:
        print("\n# skipped rows")
        for rid, model, why in skipped:
            print(f"{rid:>4} {model[:30]:<30} {why}")
    loso_mem, loso_tps = leave_one_source_out(mem_rows, tps_rows, quiet)
    print(f"\nmemory_rows: {len(mem_rows)}")
    print(f"throughput_rows: {len(tps_rows)}")
    print(f"fits_rows: {len(fit_rows)}")
    print(f"skipped_rows: {len(skipped)}")
    print(f"fits_accuracy: {right / max(len(fit_rows), 1):.3f}")
    print(f"throughput_max_abs_err: {max(tps_err):.3f}")
    print(f"llamafactory_memory_median_abs_err: {statistics.median(lf_err):.3f}")
    print(f"accelerate_memory_median_abs_err: {statistics.median(acc_err):.3f}")
    print(f"memory_median_abs_err: {statistics.median(mem_err):.3f}")
    print(f"memory_max_abs_err: {max(mem_err):.3f}")
    print(f"throughput_median_abs_err: {statistics.median(tps_err):.3f}")
    print(f"loso_memory_median_abs_err: {statistics.median(loso_mem):.3f}")
    print(f"loso_memory_max_abs_err: {max(loso_mem):.3f}")
    print(f"loso_throughput_median_abs_err: {statistics.median(loso_tps):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
