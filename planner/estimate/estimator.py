"""The estimate: peak memory per GPU, whether it fits, tokens/s and hours, for one GPU type and count.

`estimate()` is what `ftplan estimate` and the planner call; `smallest_fit()` answers "what would fit"
when the job does not fit the GPU asked for (more GPUs with ZeRO-3, a bigger GPU, or a lighter method).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ftplan.planner.errors import UserError
from ftplan.planner.estimate.memory import MemoryEstimate, estimate_memory, trainable_params
from ftplan.planner.estimate.request import EstimateRequest
from ftplan.planner.estimate.throughput import tokens_per_second

if TYPE_CHECKING:  # pragma: no cover
    from ftplan.planner.estimate.gpus import GPU

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
    precision: str | None = None  # what was estimated: fp16-mixed on a GPU without bf16


    def as_dict(self) -> dict:
        return {
            "gpu": self.gpu.name, "gpu_count": self.gpu_count, "fits": self.fits,
            "headroom_gib": round(self.headroom_gib, 2), "memory_gib": self.memory.as_dict(),
            "throughput_tokens_per_s": round(self.tokens_per_s, 1), "training_tokens": self.training_tokens,
            "hours": None if self.hours is None else round(self.hours, 3), "notes": self.notes,
            "precision": self.precision, "memory_figures_gib": self.memory.figures(),
        }


def training_tokens(req: EstimateRequest) -> int | None:
    if req.dataset_tokens is None:
        return None
    return int(round(req.dataset_tokens * req.epochs))


def estimate(req: EstimateRequest, gpu: GPU, gpu_count: int = 1) -> Estimate:
    if gpu_count <= 0:
        raise UserError(f"--gpus must be a positive number, got {gpu_count}")
    fallback = req.precision.startswith("bf16") and not gpu.supports_bf16
    if fallback:
        # What a job on this card runs: fp16 autocast with fp32 masters (as plan and launch do).
        req = replace(req, precision="fp16-mixed")
    mem = estimate_memory(req, gpu_count)
    notes = list(mem.notes)
    usable = gpu.usable_gib
    fits = mem.total <= usable
    if fallback:
        notes.append(f"{gpu.name} has no bf16: estimated as fp16-mixed (as plan and launch do)")
    if req.method == "qlora" and gpu.vendor != "NVIDIA":
        notes.append(f"bitsandbytes 4-bit support on {gpu.vendor} GPUs is experimental")
    tps = tokens_per_second(req, gpu, gpu_count)
    tokens = training_tokens(req)
    hours = None if tokens is None else tokens / tps / 3600
    return Estimate(gpu=gpu, gpu_count=gpu_count, memory=mem, fits=fits, headroom_gib=usable - mem.total,
                    tokens_per_s=tps, training_tokens=tokens, hours=hours, notes=notes, precision=req.precision)


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


__all__ = ["EstimateRequest", "Estimate", "estimate", "estimate_memory", "smallest_fit", "trainable_params"]
