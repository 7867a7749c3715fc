"""From a project file (`ftplan.toml`) to the estimator and the optimizer.

`ftplan launch` describes the job in `ProjectConfig.job`; the estimator and the optimizer take an
`EstimateRequest`. This module is the one place that translates between the two, so that the plan a
launch acts on is exactly the plan `ftplan plan` would print for the same settings.
"""

from __future__ import annotations

from pathlib import Path

from ftplan.planner.errors import UserError

# project file spot policy -> optimizer market filter
_MARKETS = {"on-demand": "on-demand", "spot": "spot", "auto": "any"}
# providers that are machines, not catalogs: never planned from the catalog
_NOT_CATALOG = ("local", "ssh")


def request_from_config(cfg, dataset: Path | None, *, gpu_count: int = 1):
    """The EstimateRequest for the project's job; tokens come from the dataset file when given."""
    from ftplan.planner.estimate.dataset_tokens import count_dataset_tokens
    from ftplan.planner.estimate.estimator import EstimateRequest
    from ftplan.planner.estimate.models import resolve_model

    j = cfg.job
    spec = resolve_model(j.model)
    tokens = None
    epochs = float(j.epochs)
    if dataset is not None:
        tokens, _, _ = count_dataset_tokens(dataset, spec.vocab_size, max_seq_len=j.seq_len)
        if j.max_steps:  # upper bound: every micro-batch full
            tokens = min(tokens * j.epochs, j.max_steps * j.batch_size * j.grad_accum * j.seq_len * gpu_count)
            epochs = 1.0
    targets = j.lora_targets if isinstance(j.lora_targets, str) else ",".join(j.lora_targets)
    optimizer = {"paged_adamw_8bit": "paged_adamw8bit", "adamw_8bit": "adamw8bit"}.get(j.optimizer, j.optimizer)
    if optimizer == "paged_adamw":
        optimizer = "adamw"
    return EstimateRequest(model=spec, method=j.method, seq_len=j.seq_len, batch_size=j.batch_size,
                           grad_accum=j.grad_accum, lora_r=j.lora_r, lora_alpha=j.lora_alpha,
                           lora_targets=targets or "all-linear", lora_dropout=j.lora_dropout,
                           optimizer=optimizer, grad_checkpointing=j.gradient_checkpointing,
                           dataset_tokens=int(tokens) if tokens is not None else None, epochs=epochs)


def launch_offers(cfg, dataset: Path | None):
    """Feasible catalog offers for the project's job, cheapest expected total first (optimizer.RankedOffer).

    Raises UserError when nothing fits, naming the cheapest offer that fits and its total when the
    budget is what rules everything out."""
    from ftplan.planner.pricing.optimizer import Filters, plan_offers

    providers = tuple(p for p in cfg.launch.providers if p not in _NOT_CATALOG)
    if not providers:
        return []
    request = request_from_config(cfg, dataset)
    if request.dataset_tokens is None:
        raise UserError("a launch needs the dataset's size to plan: set job.dataset in ftplan.toml or pass --dataset")
    filters = Filters(providers=providers, regions=tuple(cfg.launch.regions),
                      market=_MARKETS.get(cfg.launch.spot, "any"),
                      nodes=1)  # the launcher starts one machine per run: never a multi-node offer (yet)
    result = plan_offers(request, filters, cfg.launch.budget_usd)
    offers = result.offers
    if not offers and cfg.launch.budget_usd is not None:
        unbounded = plan_offers(request, filters, None).offers
        if unbounded:
            cheapest = unbounded[0]
            raise UserError(
                f"nothing fits within the ${cfg.launch.budget_usd:g} budget; the cheapest offer that fits is "
                f"{cheapest.provider} {cheapest.instance_type} at ${cheapest.total_usd:.2f} in total: "
                f"raise --budget to at least {cheapest.total_usd:.2f}")
    return offers
