"""From a project file (`ftplan.toml`) to the estimator, the optimizer and the job config.

`ftplan launch` describes the job in `ProjectConfig.job`; the estimator and the optimizer take an
`EstimateRequest`, the remote job a JSON config. This module is the one place that says what the launched
job will actually run on an offer's GPU (`job_settings`): the loss, precision, optimizer (fused or not),
packing, LoRA dropout and checkpointing. Both the estimate a launch prints and the job config it ships are
built from it, so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftplan.planner.errors import UserError

# project file spot policy -> optimizer market filter
_MARKETS = {"on-demand": "on-demand", "spot": "spot", "auto": "any"}
# providers that are machines, not catalogs: never planned from the catalog
_NOT_CATALOG = ("local", "ssh")
# job optimizer name (remote_job/job_optim.py) -> estimator optimizer name
_OPTIMIZER_NAMES = {"paged_adamw_8bit": "paged_adamw8bit", "adamw_8bit": "adamw8bit", "paged_adamw": "adamw",
                    "adamw": "adamw"}
# The loss `ftplan launch`'s job runs unless ftplan.toml says otherwise, in the estimator's terms. The job's
# `fused` (Liger) and `chunked` (remote_job/job_loss.py: one chunk of fp32 logits at a time, gradients taken
# in the forward pass) both keep no full-vocabulary logits: the estimator's `fused` term. Its `chunked` is
# torchtune's loss, which keeps every chunk's logits until the backward pass.
LAUNCH_LOSS = "fused"


@dataclass(frozen=True)
class JobSettings:
    """What the job will run on one offer's GPU: the job config's values and the estimator's for each."""

    device: str                # "cuda" on a known NVIDIA GPU, else "unknown" (local/ssh/CPU)
    loss: str                  # job config `loss` (fused | chunked | standard)
    loss_estimate: str         # estimator --loss for what runs
    precision: str             # job config `precision`: bf16 | fp16 on a known GPU, auto elsewhere
    precision_estimate: str    # bf16-mixed | fp16-mixed
    optimizer: str             # job config `optimizer` as written in ftplan.toml
    optimizer_estimate: str    # estimator --optimizer for the one the job chooses
    fused_optimizer: bool      # torch AdamW(fused=True) on CUDA; bitsandbytes' kernels need no foreach temporaries
    packing: bool
    lora_dropout: float
    gradient_checkpointing: bool
    distributed: str | None    # job config `distributed`: "fsdp" for a full fine-tune on several GPUs, else DDP


def _logits_transformed(spec) -> bool:
    """Models whose logits are soft-capped or scaled: the job falls back to the standard loss for them."""
    from ftplan.remote_job.job_loss import _LOGIT_TRANSFORMS

    extra = getattr(spec, "hf_extra", {}) or {}
    return any(extra.get(key) not in (None, 1, 1.0) for key in _LOGIT_TRANSFORMS)


def job_settings(cfg, gpu: str | None, spec=None, gpu_count: int = 1) -> JobSettings:
    """What the launched job runs on `gpu_count` x `gpu` (an offer's GPU; None or "cpu" for a machine not in
    the table)."""
    from ftplan.planner.estimate.gpus import resolve_gpu
    from ftplan.remote_job.job_optim import choose

    j = cfg.job
    if spec is None:
        from ftplan.planner.estimate.models import resolve_model

        spec = resolve_model(j.model)
    card = None
    if gpu and str(gpu).lower() not in ("cpu", "unknown"):
        try:
            card = resolve_gpu(str(gpu))
        except UserError:
            card = None
    cuda = card is not None and card.vendor == "NVIDIA"
    # remote_job/device_check.pick_dtype: bf16 where the GPU has it natively (capability >= 8.0), else fp16.
    bf16 = card is None or card.supports_bf16
    chosen = choose(j.optimizer, j.method)
    # Several GPUs: the estimator shards a full fine-tune (ZeRO-3 / FSDP full shard) and keeps (Q)LoRA whole
    # per GPU (DDP); the job is told the same. A sharded head makes the job use the standard loss.
    distributed = "fsdp" if gpu_count > 1 and j.method == "full" else None
    loss_estimate = ("standard" if j.loss == "standard" or _logits_transformed(spec) or distributed
                     else LAUNCH_LOSS)
    return JobSettings(
        device="cuda" if cuda else "unknown", loss=j.loss, loss_estimate=loss_estimate,
        precision=("bf16" if bf16 else "fp16") if card is not None else "auto",
        precision_estimate="bf16-mixed" if bf16 else "fp16-mixed",
        optimizer=j.optimizer, optimizer_estimate=_OPTIMIZER_NAMES[chosen],
        fused_optimizer=(chosen == "adamw" and cuda) or chosen == "paged_adamw",
        packing=j.packing, lora_dropout=j.lora_dropout, gradient_checkpointing=j.gradient_checkpointing,
        distributed=distributed)


def request_from_config(cfg, dataset: Path | None, *, gpu_count: int = 1, gpu: str | None = None):
    """The EstimateRequest for the project's job as it will run on `gpu` (`job_settings`); tokens come from
    the dataset file when given. Without a GPU (planning across the catalog) the precision is bf16 and the
    optimizer the CUDA one: `launch_offers` re-plans GPUs without bf16 in fp16, as the job runs there."""
    from ftplan.planner.estimate.dataset_tokens import dataset_lengths
    from ftplan.planner.estimate.estimator import EstimateRequest
    from ftplan.planner.estimate.models import resolve_model

    j = cfg.job
    spec = resolve_model(j.model)
    s = job_settings(cfg, gpu if gpu is not None else "A100-80GB", spec, gpu_count)
    tokens = None
    longest = None
    epochs = float(j.epochs)
    if dataset is not None:
        tokens, _, _, longest = dataset_lengths(dataset, spec.vocab_size, max_seq_len=j.seq_len)
        if j.max_steps:  # upper bound: every micro-batch full
            tokens = min(tokens * j.epochs, j.max_steps * j.batch_size * j.grad_accum * j.seq_len * gpu_count)
            epochs = 1.0
    targets = j.lora_targets if isinstance(j.lora_targets, str) else ",".join(j.lora_targets)
    return EstimateRequest(model=spec, method=j.method, seq_len=j.seq_len, batch_size=j.batch_size,
                           grad_accum=j.grad_accum, lora_r=j.lora_r, lora_alpha=j.lora_alpha,
                           lora_targets=targets or "all-linear", lora_dropout=s.lora_dropout,
                           optimizer=s.optimizer_estimate, fused_optimizer=s.fused_optimizer,
                           precision=s.precision_estimate, loss=s.loss_estimate,
                           packing=s.packing, peak_seq_len=None if s.packing else longest,
                           grad_checkpointing=s.gradient_checkpointing,
                           dataset_tokens=int(tokens) if tokens is not None else None, epochs=epochs)


def job_config_settings(cfg, gpu: str | None, gpu_count: int = 1) -> dict:
    """The job config keys `job_settings` decides (merged into launch_plan.build_job_config's dict)."""
    s = job_settings(cfg, gpu, gpu_count=max(1, int(gpu_count)))
    return {"loss": s.loss, "precision": s.precision, "optimizer": s.optimizer, "packing": s.packing,
            "gradient_checkpointing": s.gradient_checkpointing, "distributed": s.distributed}


def launch_offers(cfg, dataset: Path | None):
    """Feasible catalog offers for the project's job, cheapest expected total first (optimizer.RankedOffer).

    GPUs with bf16 are planned in bf16, the others (T4, V100) in fp16: what the job picks on each.
    Raises UserError when nothing fits, naming the cheapest offer that fits and its total when the
    budget is what rules everything out."""
    providers = tuple(p for p in cfg.launch.providers if p not in _NOT_CATALOG)
    if not providers:
        return []
    request = request_from_config(cfg, dataset)
    if request.dataset_tokens is None:
        raise UserError("a launch needs the dataset's size to plan: set job.dataset in ftplan.toml or pass --dataset")
    offers = _plan(cfg, request, providers, cfg.launch.budget_usd)
    if not offers and cfg.launch.budget_usd is not None:
        unbounded = _plan(cfg, request, providers, None)
        if unbounded:
            cheapest = unbounded[0]
            raise UserError(
                f"nothing fits within the ${cfg.launch.budget_usd:g} budget; the cheapest offer that fits is "
                f"{cheapest.provider} {cheapest.instance_type} at ${cheapest.total_usd:.2f} in total: "
                f"raise --budget to at least {cheapest.total_usd:.2f}")
    return offers


def _plan(cfg, request, providers: tuple[str, ...], budget: float | None):
    """Offers on bf16 GPUs planned with `request`, those on GPUs without bf16 with its fp16 twin; one list."""
    from dataclasses import replace

    from ftplan.planner.estimate.gpus import table_gpus
    from ftplan.planner.pricing.optimizer import Filters, plan_offers

    def filters(gpus: tuple[str, ...] = ()) -> Filters:
        return Filters(providers=providers, regions=tuple(cfg.launch.regions), gpus=gpus,
                       market=_MARKETS.get(cfg.launch.spot, "any"),
                       nodes=cfg.launch.nodes)  # None: one node, or several where the plan finds it helps

    offers = list(plan_offers(request, filters(), budget).offers)
    fp16_only = tuple(g.name for g in table_gpus() if not g.supports_bf16 and g.vendor == "NVIDIA")
    # (only while the optimizer rejects bf16-less GPUs outright: never the same offer twice)
    if fp16_only and request.precision == "bf16-mixed" and not any(o.gpu in fp16_only for o in offers):
        fp16 = replace(request, precision="fp16-mixed")
        offers += plan_offers(fp16, filters(fp16_only), budget).offers
    return sorted(offers, key=lambda o: o.total_usd)
