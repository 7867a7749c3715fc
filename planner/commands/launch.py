"""`ftplan init`, `ftplan launch`, `ftplan attach`, `ftplan gc`.

The command layer turns flags + ftplan.toml into a `LaunchPlan` (job config, priced candidates,
estimate) and hands it to `planner.launcher.Launcher`. Heavy imports (paramiko, provider SDKs) happen
only inside the commands that need them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from planner.errors import UserError
from planner.project_config import ProjectConfig, load_project, with_overrides, write_template

EXIT_CODES = {"succeeded": 0, "failed": 1, "stopped_over_budget": 3, "cancelled": 130}
SECRET_ENV_FOR_JOB = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def _store(path: str | None):
    from planner.store import Store

    return Store(path)


# ---- init --------------------------------------------------------------------------------------
@click.command()
@click.option("--path", "path", default="ftplan.toml", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the project file.")
@click.option("--model", default="tiny-llama", show_default=True)
@click.option("--method", type=click.Choice(["qlora", "lora", "full"]), default="qlora", show_default=True)
@click.option("--dataset", default="data/train.jsonl", show_default=True)
@click.option("--budget", type=float, default=20, show_default=True, help="Budget in USD for one run.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path, model, method, dataset, budget, force):
    """Write a commented ftplan.toml project file."""
    if budget <= 0:
        raise UserError("--budget must be a positive number of USD, e.g. --budget 20")
    out = write_template(Path(path), force=force, model=model, method=method, dataset=dataset, budget=budget)
    load_project(out)  # the template must always validate
    click.echo(f"wrote {out}; edit it, then: ftplan launch --dry-run")


# ---- launch ------------------------------------------------------------------------------------
def _parse_host(host: str):
    from providers.ssh import HostSpecError, parse_host_spec

    try:
        return parse_host_spec(host)
    except HostSpecError as exc:
        raise UserError(str(exc)) from None


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Project file (default ./ftplan.toml).")
@click.option("--provider", help="Only this provider: aws, gcp, runpod, lambda, paperspace, local or ssh.")
@click.option("--host", help="For --provider ssh: user@host[:port] of a machine you already have.")
@click.option("--identity", type=click.Path(dir_okay=False), help="SSH private key already authorized there.")
@click.option("--remote-python", help="Python on the machine to run the job with (skip the venv setup).")
@click.option("--model")
@click.option("--method", type=click.Choice(["qlora", "lora", "full"]))
@click.option("--dataset", type=click.Path(), help="Training data (JSONL: alpaca, sharegpt or messages).")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--budget", type=float, help="Budget in USD for the whole run.")
@click.option("--on-over-budget", type=click.Choice(["stop", "continue"]))
@click.option("--spot-recovery/--no-spot-recovery", default=None)
@click.option("--sync-every", type=float, help="Pull checkpoints back every N minutes during training.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Show the plan and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the outcome.")
@click.option("--runs-dir", type=click.Path(file_okay=False), help="Where artifacts land (default ./runs).")
@click.option("--store", "store_path", type=click.Path(dir_okay=False), help="Run store (default: user data dir).")
@click.pass_context
def launch(ctx, config_path, provider, host, identity, remote_python, model, method, dataset, max_steps, budget,
           on_over_budget, spot_recovery, sync_every, yes, dry_run, as_json, runs_dir, store_path):
    """Provision, train, pull artifacts, tear down."""
    cfg = load_project(config_path, required=config_path is not None)
    if budget is not None and budget <= 0:
        raise UserError("--budget must be a positive number of USD, e.g. --budget 20")
    if max_steps is not None and max_steps <= 0:
        raise UserError("--max-steps must be a positive integer")
    if sync_every is not None and sync_every <= 0:
        raise UserError("--sync-every must be a positive number of minutes")
    cfg = with_overrides(cfg, **{
        "job.model": model, "job.method": method, "job.dataset": dataset, "job.max_steps": max_steps,
        "launch.budget_usd": budget, "launch.on_over_budget": on_over_budget,
        "launch.spot_recovery": spot_recovery, "launch.sync_every_min": sync_every, "launch.runs_dir": runs_dir,
        "launch.providers": [provider] if provider else None, "launch.remote_python": remote_python,
    })
    if host and provider not in (None, "ssh"):
        raise UserError("--host is only for --provider ssh (a machine you already have)")
    if host:
        cfg = with_overrides(cfg, **{"launch.providers": ["ssh"]})
    if identity and not Path(identity).is_file():
        raise UserError(f"--identity {identity}: no such key file")
    if cfg.launch.budget_usd is None:
        raise UserError("no budget: pass --budget USD or set launch.budget_usd in ftplan.toml")
    if not cfg.job.dataset:
        raise UserError("no dataset: pass --dataset FILE or set job.dataset in ftplan.toml")
    dataset_path = Path(cfg.job.dataset)
    if not dataset_path.exists():
        raise UserError(f"dataset {dataset_path} does not exist; pass --dataset with an existing .jsonl file")

    plan = build_plan(cfg, dataset_path, host=host, identity=Path(identity) if identity else None,
                      store_path=store_path)
    summary = _plan_summary(plan)
    if dry_run:
        if as_json:
            click.echo(json.dumps({"dry_run": True, **summary}, indent=2))
        else:
            click.echo(_plan_text(summary))
        return
    if not yes and not sys.stdin.isatty():
        raise UserError("launching rents a machine; confirm with --yes when there is no terminal to ask")
    if not as_json:
        click.echo(_plan_text(summary), err=True)
    if not yes:
        click.confirm("Launch?", abort=True, err=True)

    from planner.launcher import Launcher

    store = _store(store_path)
    display = _make_display(quiet=as_json)
    result = Launcher(store, plan, display=display).run()
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(f"run {result.run_id}: {result.status}"
                   + (f" ({result.error})" if result.error else "")
                   + f"\nartifacts: {result.artifacts_dir}\nactual: {result.actual['hours']:.4f} h, "
                     f"${result.actual['usd']:.4f}\nreport: ftplan report {result.run_id}")
    code = EXIT_CODES.get(result.status, 1)
    if not result.teardown_confirmed:
        code = 4
    ctx.exit(code)


def _plan_summary(plan) -> dict[str, Any]:
    first = plan.candidates[0] if plan.candidates else None
    return {
        "run_id": plan.run_id, "model": plan.model, "method": plan.method, "dataset": str(plan.dataset),
        "budget_usd": plan.budget_usd,
        "estimated": {"hours": plan.estimate.get("hours"), "usd": plan.estimate.get("usd"),
                      "peak_mem_gib": plan.estimate.get("peak_mem_gib"),
                      "tokens_per_s": plan.estimate.get("tokens_per_s")},
        "notes": plan.estimate.get("notes", []),
        "offer": None if first is None else {
            "provider": first.provider, "instance_type": first.instance_type, "gpu": first.gpu,
            "gpu_count": first.gpu_count, "region": first.region, "spot": first.spot,
            "price_hour": first.price_hour},
        "fallbacks": [f"{c.provider}/{c.instance_type}/{c.region} ${c.price_hour:.2f}/h"
                      for c in plan.candidates[1:plan.max_offer_tries]],
    }


def _plan_text(s: dict[str, Any]) -> str:
    est = s["estimated"]
    offer = s["offer"]
    lines = [f"plan for run {s['run_id']}: {s['model']} {s['method']} on {s['dataset']}"]
    if offer:
        lines.append(f"  instance: {offer['provider']} {offer['instance_type']} ({offer['gpu_count']}x {offer['gpu']}) "
                     f"in {offer['region'] or '-'}{' spot' if offer['spot'] else ''} at ${offer['price_hour']:.2f}/h")
    hours = "-" if est["hours"] is None else f"{est['hours']:.2f} h"
    usd = "-" if est["usd"] is None else f"${est['usd']:.2f}"
    lines.append(f"  estimated: {hours}, {usd} total; budget ${s['budget_usd']:.2f}")
    if est.get("peak_mem_gib"):
        lines.append(f"  peak memory: {est['peak_mem_gib']:.1f} GiB")
    for fb in s["fallbacks"]:
        lines.append(f"  if no capacity: {fb}")
    for note in s["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _make_display(quiet: bool):
    return LiveDisplay(quiet=quiet)


# ---- attach ------------------------------------------------------------------------------------
@click.command()
@click.argument("run_id")
@click.option("--store", "store_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def attach(ctx, run_id, store_path, as_json):
    """Re-attach to a live run: follow it, or take it over if its launcher died."""
    from planner.launcher import attach_run

    store = _store(store_path)
    result = attach_run(store, run_id, display=_make_display(quiet=as_json))
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(f"run {result.run_id}: {result.status}" + (f" ({result.error})" if result.error else ""))
    ctx.exit(EXIT_CODES.get(result.status, 1))


# ---- gc ----------------------------------------------------------------------------------------
@click.command()
@click.option("--yes", is_flag=True, help="Terminate the orphans (default: only list them).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
@click.option("--provider", "providers", multiple=True, help="Only sweep these providers (repeatable).")
@click.option("--store", "store_path", type=click.Path(dir_okay=False))
@click.pass_context
def gc(ctx, yes, as_json, config_path, providers, store_path):
    """Find and terminate instances ftplan left behind."""
    from planner.teardown import collect_garbage

    cfg: ProjectConfig = load_project(config_path, required=config_path is not None)
    store = _store(store_path)
    report = collect_garbage(store, cfg, terminate=yes, only=list(providers) or None)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for item in report["instances"]:
            click.echo(f"{item['action']:<12} {item['provider']:<10} {item['id'] or '-':<24} run {item['run_id'] or '-'}"
                       f"  {item['reason']}")
        for err in report["errors"]:
            click.echo(f"error: {err}", err=True)
        if not report["instances"]:
            click.echo("nothing to clean up")
        elif not yes and report["orphans"]:
            click.echo(f"{report['orphans']} orphan(s); run 'ftplan gc --yes' to terminate them")
    ctx.exit(1 if report["errors"] else 0)


def job_secrets_from_env() -> dict[str, str]:
    """Secrets the job needs (gated models): passed to the runner, never written to the store."""
    return {k: os.environ[k] for k in SECRET_ENV_FOR_JOB if os.environ.get(k)}


# ---- plan building -----------------------------------------------------------------------------
def build_job_config(cfg: ProjectConfig, run_id: str) -> dict[str, Any]:
    """The remote job's config (remote_job/job_config.py keys) from the project file."""
    from planner.models import resolve_model

    spec = resolve_model(cfg.job.model)
    j = cfg.job
    random_init = bool(getattr(spec, "random_init", False))
    return {
        "run_id": run_id, "method": j.method,
        "model": {"hf_id": spec.hf_id, "config": spec.to_hf_config() if random_init else None,
                  "random_init": random_init, "tokenizer": None},
        "dataset": j.dataset, "seq_len": j.seq_len, "batch_size": j.batch_size, "grad_accum": j.grad_accum,
        "epochs": j.epochs, "max_steps": j.max_steps or None, "learning_rate": j.learning_rate,
        "lora": {"r": j.lora_r, "alpha": j.lora_alpha, "dropout": j.lora_dropout, "targets": j.lora_targets},
        "optimizer": j.optimizer, "gradient_checkpointing": j.gradient_checkpointing, "seed": j.seed,
        "checkpoint_every_steps": j.checkpoint_every_steps, "heartbeat_every_s": j.heartbeat_every_s,
        "throttle_s_per_step": j.throttle_s_per_step, "resume": True,
    }


def _pinned_candidates(cfg: ProjectConfig, host: str | None, identity: Path | None):
    """Offers that skip the catalog: local, ssh --host, or [[launch.offers]] pinned in the project file."""
    from planner.launcher import Candidate

    providers = cfg.launch.providers
    if providers == ["local"]:
        opts = cfg.providers.get("local", {})
        return [Candidate(provider="local", instance_type="local", gpu=str(opts.get("gpu", "cpu")),
                          region="localhost", price_hour=cfg.price_override("local") or 0.0)]
    if providers == ["ssh"]:
        if not host:
            raise UserError("--provider ssh needs --host user@host[:port]")
        spec = _parse_host(host)
        opts = cfg.providers.get("ssh", {})
        return [Candidate(provider="ssh", instance_type=str(spec), gpu=str(opts.get("gpu", "unknown")),
                          region=spec.host, price_hour=cfg.price_override("ssh") or 0.0)]
    pinned = [o for o in cfg.launch.offers if not providers or o.provider in providers]
    if cfg.launch.offers and not pinned:
        raise UserError(f"none of the offers pinned in {cfg.source} is on {', '.join(providers)}")
    return [Candidate(provider=o.provider, instance_type=o.instance_type, gpu=o.gpu, gpu_count=o.gpu_count,
                      region=o.region, zone=o.zone, spot=o.spot, price_hour=o.price_hour) for o in pinned]


def _provider_options(cfg: ProjectConfig, name: str, host: str | None, identity: Path | None) -> dict[str, Any]:
    opts = cfg.provider_options(name)
    if name == "ssh" and host:
        opts.setdefault("host", host)
    if name in ("local", "ssh") and identity is not None:
        opts.setdefault("identity", str(identity))
    return opts


def _estimate_for(cfg: ProjectConfig, gpu: str, gpu_count: int, dataset: Path, store_path: str | None) -> dict[str, Any]:
    """Estimated hours / peak memory / tokens/s on the first offer's GPU, corrected by measured runs of the
    same GPU, model and method. Empty when the estimator cannot say (e.g. `local` on a CPU)."""
    from planner.gpus import resolve_gpu

    try:
        g = resolve_gpu(gpu)
    except UserError:
        return {}
    try:
        from planner.corrections import apply_corrections
        from planner.estimate import estimate
        from planner.estimate_bridge import request_from_config

        j = cfg.job
        req = request_from_config(cfg, dataset, gpu_count=gpu_count)
        est = estimate(req, g, gpu_count)
        from planner.store import Store, default_store_path

        path = Path(store_path) if store_path else default_store_path()
        if path.exists():
            est, _ = apply_corrections(est, g.name, j.model, j.method, Store(path))
    except Exception as exc:  # noqa: BLE001 - an estimate is advice; the launch itself does not need it
        return {"notes": [f"no estimate: {' '.join(str(exc).split())[:200]}"]}
    return {"hours": est.hours, "peak_mem_gib": est.memory.total, "tokens_per_s": est.tokens_per_s,
            "fits": est.fits, "notes": list(est.notes)}


def build_plan(cfg: ProjectConfig, dataset: Path, *, host: str | None = None, identity: Path | None = None,
               store_path: str | None = None):
    from planner.launcher import LaunchPlan, new_run_id

    run_id = new_run_id()
    candidates = _pinned_candidates(cfg, host, identity)
    if not candidates:
        candidates = _cloud_candidates(cfg, dataset)
    if not candidates:
        raise UserError("no offer fits the job within the budget; see 'ftplan plan' for why offers were rejected")
    first = candidates[0]
    estimate = _estimate_for(cfg, first.gpu, first.gpu_count, dataset, store_path)
    if first.est_hours is not None:
        estimate.setdefault("hours", first.est_hours)
        estimate.setdefault("usd", first.est_usd)
    elif estimate.get("hours") is not None:
        estimate.setdefault("usd", estimate["hours"] * first.price_hour)
    for c in candidates:
        if c.est_hours is None and estimate.get("hours") is not None and c.gpu == first.gpu:
            c.est_hours = estimate["hours"]
            c.est_usd = c.est_hours * c.price_hour
    names = {c.provider for c in candidates}
    remote_root = cfg.providers.get(first.provider, {}).get("remote_root", "~/ftplan-runs")
    launch_cfg = cfg.launch
    return LaunchPlan(
        run_id=run_id, job_config=build_job_config(cfg, run_id), dataset=dataset, candidates=candidates,
        model=cfg.job.model, method=cfg.job.method, runs_dir=Path(launch_cfg.runs_dir),
        budget_usd=launch_cfg.budget_usd, on_over_budget=launch_cfg.on_over_budget,
        spot_recovery=launch_cfg.spot_recovery, max_offer_tries=launch_cfg.max_offer_tries,
        sync_every_s=launch_cfg.sync_every_min * 60, poll_interval_s=launch_cfg.poll_interval_s,
        wait_ready_timeout_s=launch_cfg.wait_ready_timeout_s, ssh_connect_timeout_s=launch_cfg.ssh_connect_timeout_s,
        pull_margin_s=launch_cfg.pull_margin_min * 60, identity=identity, remote_python=launch_cfg.remote_python,
        remote_root=remote_root, estimate=estimate,
        provider_options={n: _provider_options(cfg, n, host, identity) for n in names},
        job_secrets=job_secrets_from_env(),
        extra_files={k: Path(v) for k, v in launch_cfg.bundle_extra_files.items()},
    )


def _cloud_candidates(cfg: ProjectConfig, dataset: Path):
    """Cheapest feasible catalog offers (planner.optimizer), as launcher candidates."""
    from planner.launcher import Candidate

    try:
        from planner.estimate_bridge import launch_offers
    except ImportError:
        raise UserError("the catalog planner is not available in this build; pin an offer with "
                        "[[launch.offers]] in ftplan.toml or use --provider local/ssh") from None
    offers = launch_offers(cfg, dataset)
    return [Candidate(provider=o.provider, instance_type=o.instance_type, gpu=o.gpu, gpu_count=o.gpu_count,
                      region=o.region, zone=o.zone or None, spot=o.spot, price_hour=o.price_hour,
                      est_hours=o.hours, est_usd=o.total_usd, headroom_gib=o.headroom_gib) for o in offers]


# ---- live display ------------------------------------------------------------------------------
class LiveDisplay:
    """Phase, step/total, loss, tokens/s, ETA, spend so far and projected total vs the budget, on stderr.

    A rich status line on a terminal; plain lines (one per phase, one per progress change) otherwise,
    so logs of CI runs stay readable."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.live = None
        self._last = None
        if self.console.is_terminal and not quiet:
            from rich.live import Live

            self.live = Live("", console=self.console, refresh_per_second=4, transient=True)
            self.live.start()
        self.phase_name = ""

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        self.console.print(text, markup=False)

    def phase(self, name: str, message: str = "") -> None:
        self.phase_name = name
        self._line(f"[{name}] {message}".rstrip())

    def progress(self, progress, *, spent: float, projected: float | None, budget: float | None,
                 eta_s: float | None) -> None:
        loss = "-" if progress.loss is None else f"{progress.loss:.4f}"
        tps = "-" if not progress.tokens_per_s else f"{progress.tokens_per_s:,.0f}"
        eta = "-" if eta_s is None else f"{eta_s / 60:.1f} min"
        proj = "-" if projected is None else f"${projected:.4f}"
        bud = "-" if budget is None else f"${budget:.2f}"
        text = (f"[training] step {progress.step}/{progress.total_steps or '?'}  loss {loss}  tok/s {tps}  "
                f"ETA {eta}  spent ${spent:.4f}  projected {proj} / budget {bud}")
        if self.live is not None:
            self.live.update(text)
        elif (progress.step, progress.loss) != self._last:
            self._last = (progress.step, progress.loss)
            self._line(text)

    def warn(self, message: str) -> None:
        if self.live is not None:
            self.live.console.print(f"warning: {message}", markup=False)
        else:
            self.console.print(f"warning: {message}", markup=False)

    def log(self, line: str) -> None:
        pass

    def done(self, status: str, error: str | None) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
