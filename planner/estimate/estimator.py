"""The estimate: peak memory per GPU, whether it fits, tokens/s and hours, for one GPU type and count.

`estimate()` is what `ftplan estimate` and the planner call; `smallest_fit()` answers "what would fit"
when the job does not fit the GPU asked for (more GPUs with ZeRO-3, a bigger GPU, or a lighter method).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ftplan.planner.errors import UserError
from ftplan.planner.estimate.memory import MemoryEstimate, estimate_memory, trainable_params
from ftplan.planner.estimate.throughput import tokens_per_second

if TYPE_CHECKING:  # pragma: no cover
    from ftplan.planner.estimate.gpus import GPU
    from ftplan.planner.estimate.models import ModelSpec

METHODS = ("full", "freeze", "lora", "qlora", "prompt", "prefix")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd", "adafactor")
PRECISIONS = ("bf16-mixed", "bf16-true", "fp16-mixed", "fp32")
OFFLOADS = ("none", "optimizer", "all")
ATTENTIONS = ("sdpa", "flash", "eager")
# Training code whose conventions change what is stored (see ftplan.planner.estimate.memory's docstring): "hf" is the
# transformers Trainer / PEFT / accelerate / DeepSpeed stack ftplan's own job uses; "litgpt" is LitGPT.
FRAMEWORKS = ("hf", "litgpt")


@dataclass
class EstimateRequest:
    model: ModelSpec
    method: str
    seq_len: int = 2048
    batch_size: int = 1
    grad_accum: int = 1
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: str = "all-linear"
    lora_dropout: float = 0.05
    optimizer: str | None = None  # None: paged_adamw8bit for qlora, adamw otherwise
    precision: str = "bf16-mixed"
    offload: str = "none"
    grad_checkpointing: bool = True
    attention: str = "sdpa"
    zero: int | None = None  # None: 0 (DDP) on one GPU, 3 (FSDP full shard) on several for full/freeze
    freeze_trainable_layers: int = 2
    num_virtual_tokens: int = 20
    double_quant: bool = True
    dataset_tokens: int | None = None
    epochs: float = 1.0
    framework: str = "hf"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the first bad field and how to fix it."""
        for name, allowed in (("method", METHODS), ("precision", PRECISIONS), ("offload", OFFLOADS),
                              ("attention", ATTENTIONS), ("framework", FRAMEWORKS)):
            value = getattr(self, name)
            if value not in allowed:
                raise UserError(f"unknown {name} '{value}'; choose one of {', '.join(allowed)}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        for name in ("seq_len", "batch_size", "grad_accum", "lora_r", "num_virtual_tokens",
                     "freeze_trainable_layers"):
            if getattr(self, name) <= 0:
                flag = name.replace("_", "-")
                raise UserError(f"--{flag} must be a positive number, got {getattr(self, name)}")
        if self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.dataset_tokens is not None and self.dataset_tokens <= 0:
            raise UserError(f"--dataset-tokens must be positive, got {self.dataset_tokens}")
        if self.zero is not None and self.zero not in (0, 1, 2, 3):
            raise UserError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.offload == "all" and self.zero not in (None, 3):
            raise UserError("--offload all needs ZeRO-3 (parameters are sharded to CPU); pass --zero 3")
        if self.method in ("lora", "qlora"):
            self.model.lora_params(self.lora_r, self.lora_targets)  # validates target names

    @property
    def resolved_optimizer(self) -> str:
        if self.optimizer:
            return self.optimizer
        return "paged_adamw8bit" if self.method == "qlora" else "adamw"

    def resolved_zero(self, gpu_count: int) -> int:
        if self.zero is not None:
            return self.zero
        if gpu_count > 1 and self.method in ("full", "freeze"):
            return 3
        if self.offload != "none":
            return 3 if self.offload == "all" else 2
        return 0


@dataclass
class Estimate:
    gpu: GPU
    gpu_count: int
    memory: MemoryEstimate
    fits: bool
    headroom_gib: float
    tokens_per_s: float
    training_tokens: int | None
    hours: float | None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "gpu": self.gpu.name, "gpu_count": self.gpu_count, "fits": self.fits,
            "headroom_gib": round(self.headroom_gib, 2), "memory_gib": self.memory.as_dict(),
            "throughput_tokens_per_s": round(self.tokens_per_s, 1), "training_tokens": self.training_tokens,
            "hours": None if self.hours is None else round(self.hours, 3), "notes": self.notes,
        }


def training_tokens(req: EstimateRequest) -> int | None:
    if req.dataset_tokens is None:
        return None
    return int(round(req.dataset_tokens * req.epochs))


def estimate(req: EstimateRequest, gpu: GPU, gpu_count: int = 1) -> Estimate:
    if gpu_count <= 0:
        raise UserError(f"--gpus must be a positive number, got {gpu_count}")
    mem = estimate_memory(req, gpu_count)
    notes = list(mem.notes)
    usable = gpu.usable_gib
    fits = mem.total <= usable
    prec = req.precision
    if prec.startswith("bf16") and not gpu.supports_bf16:
        notes.append(f"{gpu.name} has no bf16: the job runs in fp16 (use --precision fp16-mixed)")
    if req.method == "qlora" and gpu.vendor != "NVIDIA":
        notes.append(f"bitsandbytes 4-bit support on {gpu.vendor} GPUs is experimental")
    tps = tokens_per_second(req, gpu, gpu_count)
    tokens = training_tokens(req)
    hours = None if tokens is None else tokens / tps / 3600
    return Estimate(gpu=gpu, gpu_count=gpu_count, memory=mem, fits=fits, headroom_gib=usable - mem.total,
                    tokens_per_s=tps, training_tokens=tokens, hours=hours, notes=notes)


@dataclass
class FitSuggestion:
    kind: str  # "gpu_count" | "gpu" | "method"
    text: str
    estimate: Estimate


def smallest_fit(req: EstimateRequest, gpu: GPU, gpu_count: int = 1, max_gpus: int = 8,
                 gpus: list[GPU] | None = None) -> list[FitSuggestion]:
    """What would fit when `req` does not fit `gpu_count` x `gpu`: the smallest GPU count of the same
    type (ZeRO-3 sharding for full/freeze), the smallest single GPU that fits, and the lightest change of
    method (lora -> qlora, full -> lora -> qlora) on the GPU asked for."""
    from ftplan.planner.estimate.gpus import table_gpus

    out: list[FitSuggestion] = []
    for n in (2, 4, 8):
        if gpu_count < n <= max_gpus:
            e = estimate(req, gpu, n)
            if e.fits:
                zero = req.resolved_zero(n)
                out.append(FitSuggestion("gpu_count", f"{n}x {gpu.name} (ZeRO-{zero})", e))
                break
    for other in gpus or table_gpus():
        if other.usable_gib > gpu.usable_gib or gpu_count > 1:
            e = estimate(req, other, 1)
            if e.fits:
                out.append(FitSuggestion("gpu", f"1x {other.name} ({other.memory_gib:g} GB)", e))
                break
    lighter = {"full": ["lora", "qlora"], "freeze": ["lora", "qlora"], "lora": ["qlora"],
               "prefix": ["qlora"], "prompt": ["qlora"]}.get(req.method, [])
    for method in lighter:
        alt = replace(req, method=method, optimizer=None if req.optimizer is None else req.optimizer)
        e = estimate(alt, gpu, gpu_count)
        if e.fits:
            out.append(FitSuggestion("method", f"--method {method} on {gpu_count}x {gpu.name}", e))
            break
    if not out and req.batch_size > 1:
        alt = replace(req, batch_size=1, grad_accum=req.grad_accum * req.batch_size)
        e = estimate(alt, gpu, gpu_count)
        if e.fits:
            out.append(FitSuggestion("batch", f"--batch-size 1 --grad-accum {alt.grad_accum}", e))
    return out


__all__ = ["FRAMEWORKS", "EstimateRequest", "Estimate", "estimate", "estimate_memory", "smallest_fit", "trainable_params"]
