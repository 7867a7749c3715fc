"""The Python API: `estimate`, `plan`, `launch`, `runs`, `report` - the CLI's commands as functions.

Each returns the typed result the command prints (`ftplan.results`); `result.to_dict()` is its `--json`.
Bad input raises `ftplan.UserError` with the same one-line message the CLI prints. Everything heavy
(pydantic, the SQLite store, paramiko, provider SDKs) is imported inside the function that needs it, so
`import ftplan` and `ftplan.estimate(...)` never load torch, paramiko or a cloud SDK.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ftplan.results import (
    EstimateResult,
    FitHint,
    LaunchPreview,
    PlanResult,
    RunSummary,
)


def _request(model: str, method: str, options: dict[str, Any]):
    """The EstimateRequest the CLI would build for the same flags (one code path: its own helper)."""
    from ftplan.planner.commands.estimate import _DEFAULTS
    from ftplan.planner.commands.estimate import _request as cli_request
    from ftplan.planner.errors import UserError

    known = {**_DEFAULTS, "dataset": None, "dataset_tokens": None, "from_config": None}
    unknown = set(options) - set(known)
    if unknown:
        raise UserError(f"unknown estimate option(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    opts = {**known, **options, "method": method}
    for name in ("dataset", "from_config"):
        if opts[name] is not None:
            opts[name] = str(opts[name])
    for name in ("seq_len", "batch_size", "grad_accum", "lora_r", "dataset_tokens", "epochs"):
        if opts.get(name) is not None and not opts[name] > 0:
            raise UserError(f"{name} must be a positive number, got {opts[name]}")
    return cli_request(model, opts)


def estimate(model: str, method: str, *, gpu: str | None = None, gpus: int = 1, corrected: bool = True,
             nodes: int = 1, node_gbps: float | None = None, **options: Any) -> EstimateResult:
    """Peak memory per GPU, fits or not, tokens/s and hours: `ftplan estimate` as a function.

    `model` is a catalog name/alias, a Hugging Face id or a local config.json; `method` one of full,
    freeze, lora, qlora, prompt, prefix. `options` are the flags of `ftplan estimate --help` with underscores
    (seq_len, batch_size, grad_accum, lora_r, lora_targets, optimizer, precision, offload, attention, zero,
    packing, peak_seq_len, loss, lora_dropout, fused_optimizer, compile, modules_to_save, dora,
    transformers_version, num_virtual_tokens, train_layers, activation_offload, dataset (a file),
    dataset_tokens, epochs, from_config, ...; `loss` defaults to `standard`, the HF Trainer's). Without `gpu`
    every GPU type is estimated; with it, `would_fit` says what would fit when it does not. `corrected`
    applies what finished runs measured (the default run store), as the CLI does for a single GPU.
    `nodes` machines of `gpus` GPUs each (`node_gbps` between them) is `ftplan estimate --nodes`.
    """
    from ftplan.planner.errors import UserError
    from ftplan.planner.estimate.estimator import estimate as run_estimate
    from ftplan.planner.estimate.estimator import smallest_fit
    from ftplan.planner.estimate.gpus import resolve_gpu, table_gpus

    if gpus <= 0:
        raise UserError(f"gpus must be a positive number, got {gpus}")
    if nodes <= 0 or (node_gbps is not None and not node_gbps > 0):
        raise UserError(f"nodes and node_gbps must be positive numbers, got {nodes} and {node_gbps}")
    from ftplan.planner.commands.estimate import _settings

    req, how = _request(model, method, options)
    settings = _settings(req)
    if nodes > 1 or node_gbps is not None:
        return _estimate_nodes(req, how, settings, gpu, gpus, nodes, node_gbps)
    if gpu is not None:
        card = resolve_gpu(gpu)
        est = run_estimate(req, card, gpus)
        if corrected:
            from ftplan.planner.commands.estimate import _corrected

            est = _corrected(est, req)
        hints = [] if est.fits else [FitHint(s.kind, s.text) for s in smallest_fit(req, card, gpus)]
        return EstimateResult(model=req.model.name, method=req.method, gpu_count=gpus, rows=[est],
                              single_gpu=True, would_fit=hints, dataset=how, settings=settings)
    rows = [run_estimate(req, g, gpus) for g in table_gpus()]
    return EstimateResult(model=req.model.name, method=req.method, gpu_count=gpus, rows=rows, dataset=how,
                          settings=settings)


def _estimate_nodes(req, how, settings, gpu, gpus: int, nodes: int, node_gbps: float | None) -> EstimateResult:
    """`ftplan estimate --nodes N [--node-gbps G]`: memory sharded over every GPU, the network between nodes."""
    from ftplan.planner.commands.estimate_multinode import _fewest_nodes, _network, _network_fields
    from ftplan.planner.estimate.gpus import resolve_gpu, table_gpus
    from ftplan.planner.estimate.internode import estimate_nodes

    network = _network(node_gbps)
    fields = _network_fields(nodes, gpus, network)
    if gpu is not None:
        card = resolve_gpu(gpu)
        mn = estimate_nodes(req, card, gpus, nodes, network)
        more = None if mn.estimate.fits else _fewest_nodes(req, card, gpus, nodes, network)
        return EstimateResult(model=req.model.name, method=req.method, gpu_count=gpus, rows=[mn.estimate],
                              single_gpu=True, would_fit=[FitHint("nodes", f"--nodes {more}")] if more else [],
                              dataset=how, settings=settings, network=fields, bounding_links=[mn.bounding_link])
    rows = [estimate_nodes(req, g, gpus, nodes, network) for g in table_gpus()]
    return EstimateResult(model=req.model.name, method=req.method, gpu_count=gpus, rows=[r.estimate for r in rows],
                          dataset=how, settings=settings, network=fields,
                          bounding_links=[r.bounding_link for r in rows])


def _csv(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def plan(model: str, method: str, *, budget: float | None = None, max_hourly: float | None = None,
         headroom: float = 0.10, providers: str | Iterable[str] | None = None,
         regions: str | Iterable[str] | None = None, gpu: str | Iterable[str] | None = None, market: str = "any",
         min_vcpus: float | None = None, min_ram: float | None = None, preemption_rate: float = 0.1,
         checkpoint_minutes: float = 30.0, top: int = 10, all_regions: bool = False, secure_only: bool = False,
         group_hosts: bool | None = None, nodes: int | None = None, **options: Any) -> PlanResult:
    """The cheapest instances that hold the job, across providers, with the run's total: `ftplan plan`.

    Takes every `estimate` option plus the plan's filters (`providers`, `regions`, `gpu` as a name, a
    comma-separated string or a list; `market` any|spot|on-demand; `nodes` 1-4 machines per offer, default
    one and several where that is needed or pays). `loss` defaults to what `ftplan launch`'s job runs. `top` offers are listed, as in the
    CLI table, offers that differ only in host size folded into their cheapest (`group_hosts`, default: unless
    `all_regions`, `min_vcpus` or `min_ram` asks for the host); `secure_only` keeps RunPod's secure cloud.
    Raises `UserError` when nothing fits (the message names the cheapest way out).
    """
    from ftplan.planner.commands.plan import nothing_fits, resolve_filters
    from ftplan.planner.errors import UserError
    from ftplan.planner.pricing.freshness import stale_summary
    from ftplan.planner.pricing.offers import stale_warning
    from ftplan.planner.pricing.optimizer import MARKETS, plan_offers
    from ftplan.planner.runs.corrections import stored_corrections

    if market not in MARKETS:
        raise UserError(f"market must be one of {', '.join(MARKETS)}, got '{market}'")
    if budget is not None and not budget > 0:
        raise UserError(f"budget must be a positive number of dollars, got {budget:g}")
    if top <= 0:
        raise UserError(f"top must be a positive number, got {top}")
    if preemption_rate < 0 or checkpoint_minutes <= 0:
        raise UserError("preemption_rate must be >= 0 and checkpoint_minutes > 0")
    if nodes is not None and nodes not in (1, 2, 3, 4):
        raise UserError(f"nodes must be 1, 2, 3 or 4, got {nodes}")
    from ftplan.planner.launch.estimate_bridge import LAUNCH_LOSS

    request, _how = _request(model, method, {"loss": LAUNCH_LOSS, **options})
    filters, table = resolve_filters(_csv(providers), _csv(regions), _csv(gpu), market, min_vcpus, min_ram,
                                     max_hourly, ("secure",) if secure_only else ())
    filters.nodes = nodes
    warning = stale_warning(table)
    corrections = stored_corrections(request.model.name, request.method)
    result = plan_offers(request, filters, budget, headroom=headroom, preemption_rate=preemption_rate,
                         checkpoint_min=checkpoint_minutes, table=table, corrections=corrections)
    if not len(result):
        raise nothing_fits(result, f"{request.model.name} ({request.method})")
    if group_hosts is None:
        group_hosts = not (all_regions or min_vcpus is not None or min_ram is not None)
    lines = result.top(top, collapse=not all_regions, group_hosts=group_hosts)
    return PlanResult.build(request, result, table, lines, budget=budget, headroom=headroom, market=market,
                            secure_only=secure_only, corrections=corrections,
                            warnings=([warning] if warning else []) + stale_summary(lines, table) + result.notes)


def launch(config: str | Path | None = None, *, provider: str | None = None, host: str | list[str] | None = None,
           nodes: int | None = None,
           identity: str | Path | None = None, ssh_port: int | None = None, remote_python: str | None = None,
           model: str | None = None, method: str | None = None, dataset: str | Path | None = None,
           max_steps: int | None = None, budget: float | None = None, on_over_budget: str | None = None,
           spot_recovery: bool | None = None, sync_every: float | None = None, runs_dir: str | Path | None = None,
           store: str | Path | None = None, dry_run: bool = False, display: Any = None):
    """Provision, train, pull artifacts, tear down: `ftplan launch --yes` as a function.

    `config` is an ftplan.toml (default: ./ftplan.toml when present); the keyword arguments are the CLI's
    flags and override it. Calling this is the confirmation: it rents a machine unless `dry_run`.
    `host` may be a list: one run across several machines (`--host a --host b`); `nodes` pins the machine
    count (`--nodes`). Returns a `LaunchPreview` with `dry_run=True`, else the launcher's `LaunchResult` (status, actual
    hours/usd, artifacts_dir, teardown_confirmed). `display` receives phase/progress callbacks
    (default: silent; `ftplan.planner.launch.live_display.LiveDisplay()` prints the CLI's live line).
    """
    from ftplan.planner.errors import UserError
    from ftplan.planner.launch.launch_plan import build_plan, plan_summary
    from ftplan.planner.launch.project_config import load_project, with_overrides

    if provider is not None:
        from ftplan.planner.launch.project_config import check_provider_names

        check_provider_names([provider], "provider")
    cfg = load_project(config, required=config is not None)
    for name, value in (("budget", budget), ("max_steps", max_steps), ("sync_every", sync_every),
                        ("ssh_port", ssh_port), ("nodes", nodes)):
        if value is not None and not value > 0:
            raise UserError(f"{name} must be a positive number, got {value}")
    if host and provider not in (None, "ssh"):
        raise UserError("host is only for provider='ssh' (a machine you already have)")
    cfg = with_overrides(cfg, **{
        "job.model": model, "job.method": method, "job.dataset": None if dataset is None else str(dataset),
        "job.max_steps": max_steps, "launch.budget_usd": budget, "launch.on_over_budget": on_over_budget,
        "launch.spot_recovery": spot_recovery, "launch.sync_every_min": sync_every,
        "launch.runs_dir": None if runs_dir is None else str(runs_dir),
        "launch.providers": ["ssh"] if host else ([provider] if provider else None),
        "launch.remote_python": remote_python, "launch.nodes": nodes,
    })
    if ssh_port is not None:
        if cfg.launch.providers != ["local"]:
            raise UserError("ssh_port is for provider='local'; for 'ssh' put the port in host='user@host:PORT'")
        cfg.providers = {**cfg.providers, "local": {**cfg.providers.get("local", {}), "port": ssh_port}}
    key = Path(identity).expanduser() if identity else None
    if key is not None and not key.is_file():
        raise UserError(f"identity {key}: no such key file")
    if cfg.launch.budget_usd is None:
        raise UserError("no budget: pass budget=USD or set launch.budget_usd in ftplan.toml")
    if not cfg.job.dataset:
        raise UserError("no dataset: pass dataset=FILE or set job.dataset in ftplan.toml")
    data = Path(cfg.job.dataset)
    if not data.exists():
        raise UserError(f"dataset {data} does not exist; pass dataset= an existing .jsonl file")
    launch_plan = build_plan(cfg, data, host=host, identity=key, store_path=None if store is None else str(store))
    if dry_run:
        return LaunchPreview(plan_summary(launch_plan))

    if cfg.launch.providers == ["local"]:  # sshd, key and the job extra: the CLI's first-line checks
        from ftplan.planner.launch.local_preflight import check_local_demo

        local = cfg.providers.get("local", {})
        check_local_demo(int(local.get("port", 22)), key or local.get("identity"), cfg.launch.remote_python,
                         local.get("user"))
    from ftplan.planner.launch.launcher import Launcher
    from ftplan.planner.runs.store import Store

    return Launcher(Store(store), launch_plan, display=display).run()


def _open_store(store: str | Path | None):
    from ftplan.planner.errors import UserError
    from ftplan.planner.runs.store import Store, default_store_path

    path = Path(store) if store else default_store_path()
    if not path.exists():
        raise UserError(f"no run store at {path} yet; launch a run first, or pass store=FILE")
    return Store(path)


def runs(limit: int | None = None, *, store: str | Path | None = None) -> list[RunSummary]:
    """Recorded runs, newest first, with estimated vs actual hours and dollars: `ftplan runs`."""
    from ftplan.planner.errors import UserError
    from ftplan.planner.runs.reports import runs_table

    if limit is not None and limit <= 0:
        raise UserError("limit must be a positive integer")
    return [RunSummary.from_dict(r) for r in runs_table(_open_store(store), limit)]


def report(run_id: str, *, store: str | Path | None = None) -> dict[str, Any]:
    """One run's full report (phases, losses, spend, instances, artifacts): `ftplan report RUN --json`."""
    from ftplan.planner.runs.reports import run_report

    return run_report(_open_store(store), run_id)


__all__ = ["estimate", "plan", "launch", "runs", "report"]
