"""How one (GPU type, count) or (GPU type, count, nodes) holds the job: the estimator as the optimizer's evaluator.

`rank` (optimizer.py) only needs a callable that answers a `Need` per group of offers; this module is the
one that asks the estimator (memory, throughput, the inter-node link) and caches per (precision, count).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ftplan.planner.errors import UserError
from ftplan.planner.pricing.optimizer import Evaluator, Need, NodesEvaluator

if TYPE_CHECKING:  # pragma: no cover
    from ftplan.planner.estimate.request import EstimateRequest


def _strategy(count: int, zero: int) -> str:
    if count == 1:
        return "single" if zero == 0 else f"zero{zero}"
    return "ddp" if zero == 0 else f"zero{zero}"


def estimate_evaluators(request: EstimateRequest, headroom: float = 0.10,
                        corrections: dict | None = None) -> tuple[Evaluator, NodesEvaluator]:
    """Evaluator backed by the estimator (ftplan.planner.estimate.memory + ftplan.planner.estimate.throughput) for one job.

    Several GPUs run data-parallel when one GPU holds the job; when it does not (and the user did not
    pin --zero), the same instance is tried with ZeRO-3 sharding, the slower but leaner layout.
    Peak memory does not depend on the GPU type, only on count and sharding, so it is computed once per
    (count, ZeRO stage): this is what keeps a plan over ~120 (GPU, count) pairs fast.
    `corrections` (lower-case GPU name -> ftplan.planner.runs.corrections.Correction) scales throughput and peak by
    what finished runs of the same model and method measured on that GPU.
    The second evaluator is the same job over several nodes (internode.node_link: the slower of NVLink and
    the node's network bounds the collectives); memory shards over every GPU of every node."""
    from dataclasses import replace

    from ftplan.planner.estimate.estimator import training_tokens
    from ftplan.planner.estimate.gpus import resolve_gpu
    from ftplan.planner.estimate.internode import node_link
    from ftplan.planner.estimate.memory import estimate_memory
    from ftplan.planner.estimate.throughput import tokens_per_second

    tokens = training_tokens(request)
    if tokens is None:
        raise UserError("planning needs the dataset size: pass --dataset FILE or --dataset-tokens N")
    # GPUs without bf16 (T4, V100, P100, K80) run the job in fp16 autocast (as `estimate` and the launched job
    # do), so they are estimated that way rather than rejected.
    fp16 = replace(request, precision="fp16-mixed") if request.precision.startswith("bf16") else request
    peaks: dict[tuple[str, int, bool], float] = {}

    def peak(req: EstimateRequest, count: int, sharded: bool) -> float:
        key = (req.precision, count, sharded)
        if key not in peaks:
            peaks[key] = estimate_memory(replace(req, zero=3) if sharded else req, count).total
        return peaks[key]

    def card(gpu_name: str):
        """The GPU, or the Need that says why it cannot run the job."""
        try:
            gpu = resolve_gpu(gpu_name)
        except UserError:
            return Need(reason=f"{gpu_name} is not in the GPU table")
        if gpu.vendor != "NVIDIA":
            return Need(reason=f"{gpu.name} is a {gpu.vendor} GPU; the training job needs CUDA")
        return gpu

    def need(gpu, count: int, link_gpu=None, bound: str = "") -> Need:
        base = request if gpu.supports_bf16 else fp16
        req = base
        total = peak(base, count, False)
        if (count > 1 and request.zero is None and request.resolved_zero(count) != 3
                and total * (1 + headroom) > gpu.usable_gib):
            req = replace(base, zero=3)
            total = peak(base, count, True)
        tps = tokens_per_second(req, link_gpu or gpu, count)
        corr = (corrections or {}).get(gpu.name.lower())
        if corr is not None:
            tps *= corr.throughput_factor or 1.0
            total *= corr.memory_factor or 1.0
        hours = tokens / tps / 3600
        return Need(peak_gib=total, train_hours=hours, usable_gib=gpu.usable_gib,
                    strategy=_strategy(count, req.resolved_zero(count)) + ("" if base is request else " fp16"),
                    bounding_link=bound)

    def evaluate(gpu_name: str, count: int) -> Need:
        gpu = card(gpu_name)
        return gpu if isinstance(gpu, Need) else need(gpu, count)

    def evaluate_nodes(gpu_name: str, count: int, nodes: int, network) -> Need:
        gpu = card(gpu_name)
        if isinstance(gpu, Need):
            return gpu
        linked, bound = node_link(gpu, count, nodes, network)
        return need(gpu, count * nodes, linked, bound)

    return evaluate, evaluate_nodes


def download_minutes(request: EstimateRequest, gib_per_min: float) -> float:
    """Minutes to fetch the base model's 16-bit weights on the instance (part of setup and of every restart)."""
    return request.model.params_total() * 2 / 2**30 / gib_per_min
