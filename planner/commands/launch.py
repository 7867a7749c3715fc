"""`ftplan init`, `ftplan launch`, `ftplan attach`, `ftplan gc`: flags in, exit codes out.

The command layer turns flags + ftplan.toml into a `LaunchPlan` (`ftplan.planner.launch.launch_plan`) and hands it to
`ftplan.planner.launch.launcher.Launcher`, `ftplan.planner.launch.attach` or `ftplan.planner.launch.teardown`. Heavy imports (paramiko, provider
SDKs) happen only inside the commands that need them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ftplan.planner.errors import UserError
from ftplan.planner.launch.launch_plan import (  # noqa: F401  (build_plan, build_job_config: the public names here before)
    SECRET_ENV_FOR_JOB,
    build_job_config,
    build_plan,
    job_secrets_from_env,
    plan_summary,
    plan_text,
)
from ftplan.planner.launch.project_config import ProjectConfig, load_project, with_overrides, write_template

EXIT_CODES = {"succeeded": 0, "detached": 0, "failed": 1, "stopped_over_budget": 3, "cancelled": 130}


def _store(path: str | None):
    from ftplan.planner.runs.store import Store

    return Store(path)


# ---- init --------------------------------------------------------------------------------------
@click.command()
@click.option("--path", "path", default="ftplan.toml", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the project file.")
@click.option("--model", default="tiny-llama", show_default=True)
@click.option("--method", type=click.Choice(["qlora", "lora", "full"]), default="qlora", show_default=True)
@click.option("--dataset", default=None, help="Training data. Default: a copy of the shipped 70-record example, "
              "data/alpaca_small.json, so the project launches as written.")
@click.option("--budget", type=float, default=20, show_default=True, help="Budget in USD for one run.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path, model, method, dataset, budget, force):
    """Write a commented ftplan.toml project file."""
    if budget <= 0:
        raise UserError("--budget must be a positive number of USD, e.g. --budget 20")
    example = None
    if dataset is None:  # the first project must dry-run as written: give it real (tiny) data
        example = Path(path).parent / "data" / "alpaca_small.json"
        dataset = example.relative_to(Path(path).parent).as_posix()
    out = write_template(Path(path), force=force, model=model, method=method, dataset=dataset, budget=budget)
    load_project(out)  # the template must always validate
    if example is not None and not example.exists():
        from importlib.resources import files

        example.parent.mkdir(parents=True, exist_ok=True)
        example.write_bytes(files("ftplan.remote_job").joinpath("examples/alpaca_small.json").read_bytes())
        click.echo(f"wrote {example} (the shipped example dataset; point job.dataset at yours)")
    click.echo(f"wrote {out}; edit it, then: ftplan launch --dry-run")



@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Project file (default ./ftplan.toml).")
@click.option("--provider", help="Only this provider: aws, gcp, runpod, lambda, paperspace, local or ssh.")
@click.option("--host", multiple=True, help="For --provider ssh: user@host[:port] of a machine you already have; "
              "repeat it to run one job across several machines (one node each; node 0 first).")
@click.option("--nodes", type=int, help="Machines in the run (default: the plan decides; with several --host, "
              "their number).")
@click.option("--gpus", type=int, help="For --provider local/ssh: GPUs per machine (one process per GPU).")
@click.option("--identity", type=click.Path(dir_okay=False), help="SSH private key already authorized there.")
@click.option("--ssh-port", type=int, help="For --provider local: the port of the sshd on 127.0.0.1 (default 22).")
@click.option("--remote-python", help="Python on the machine to run the job with (skip the venv setup).")
@click.option("--ssh-cidr", help="AWS/GCP: open SSH to this source range (e.g. your VPN's 203.0.113.0/24) "
                                 "instead of this machine's public /32.")
@click.option("--model")
@click.option("--method", type=click.Choice(["qlora", "lora", "full"]))
@click.option("--dataset", type=click.Path(), help="Training data (JSONL: alpaca, sharegpt or messages).")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--budget", type=float, help="Budget in USD for the whole run.")
@click.option("--on-over-budget", type=click.Choice(["stop", "continue"]))
@click.option("--spot-recovery/--no-spot-recovery", default=None)
@click.option("--sync-every", type=float, help="Pull checkpoints back every N minutes during training.")
@click.option("--detach", is_flag=True, help="Return once training started; the machine guards itself "
              "(watchdog + deadline). Then: ftplan attach RUN, ftplan pull RUN.")
@click.option("--bucket", help="s3://BUCKET/PREFIX or gs://BUCKET/PREFIX: the machine uploads its artifacts there "
              "when nobody pulled them within the grace period.")
@click.option("--grace-minutes", type=float, help="After training, the machine waits this long for a pull, then "
              "uploads (with --bucket) and powers off (default 15).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Show the plan and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the outcome.")
@click.option("--runs-dir", type=click.Path(file_okay=False), help="Where artifacts land (default ./runs).")
@click.option("--store", "store_path", type=click.Path(dir_okay=False), help="Run store (default: user data dir).")
@click.pass_context
def launch(ctx, config_path, provider, host, nodes, gpus, identity, ssh_port, remote_python, ssh_cidr, model, method, dataset, max_steps, budget,
           on_over_budget, spot_recovery, sync_every, detach, bucket, grace_minutes, yes, dry_run, as_json, runs_dir,
           store_path):
    """Provision, train, pull artifacts, tear down."""
    from ftplan.planner.launch.project_config import check_provider_names

    if provider is not None:
        check_provider_names([provider], "--provider")
    cfg = load_project(config_path, required=config_path is not None)
    if budget is not None and budget <= 0:
        raise UserError("--budget must be a positive number of USD, e.g. --budget 20")
    if max_steps is not None and max_steps <= 0:
        raise UserError("--max-steps must be a positive integer")
    if sync_every is not None and sync_every <= 0:
        raise UserError("--sync-every must be a positive number of minutes")
    if nodes is not None and nodes < 1:
        raise UserError("--nodes must be a whole number of machines, 1 or more")
    if gpus is not None and gpus < 1:
        raise UserError("--gpus must be a whole number of GPUs per machine, 1 or more")
    host = list(host)
    if detach and len(host) > 1:
        raise UserError("--detach is for one machine; a run on several --host stays attached (drop --detach)")
    cfg = with_overrides(cfg, **{
        "job.model": model, "job.method": method, "job.dataset": dataset, "job.max_steps": max_steps,
        "launch.budget_usd": budget, "launch.on_over_budget": on_over_budget,
        "launch.spot_recovery": spot_recovery, "launch.sync_every_min": sync_every, "launch.runs_dir": runs_dir,
        "launch.providers": [provider] if provider else None, "launch.remote_python": remote_python,
        "launch.ssh_cidr": ssh_cidr, "launch.bucket": bucket, "launch.grace_minutes": grace_minutes,
        "launch.nodes": nodes,
    })
    if host and provider not in (None, "ssh"):
        raise UserError("--host is only for --provider ssh (a machine you already have)")
    if host:
        cfg = with_overrides(cfg, **{"launch.providers": ["ssh"]})
    if identity and not Path(identity).is_file():
        raise UserError(f"--identity {identity}: no such key file")
    if ssh_port is not None:
        if cfg.launch.providers != ["local"] or not 1 <= ssh_port <= 65535:
            raise UserError("--ssh-port PORT (1-65535) is for --provider local; for ssh use --host user@host:PORT")
        cfg.providers = {**cfg.providers, "local": {**cfg.providers.get("local", {}), "port": ssh_port}}
    if gpus is not None:
        if cfg.launch.providers not in (["local"], ["ssh"]):
            raise UserError("--gpus is for --provider local/ssh (machines ftplan does not know); a cloud offer "
                            "brings its own GPU count")
        name = cfg.launch.providers[0]
        cfg.providers = {**cfg.providers, name: {**cfg.providers.get(name, {}), "gpus": gpus}}
    if cfg.launch.budget_usd is None:
        raise UserError("no budget: pass --budget USD or set launch.budget_usd in ftplan.toml")
    if not cfg.job.dataset:
        raise UserError("no dataset: pass --dataset FILE or set job.dataset in ftplan.toml")
    dataset_path = Path(cfg.job.dataset)
    if not dataset_path.exists():
        raise UserError(f"dataset {dataset_path} does not exist; pass --dataset with an existing .jsonl file")

    plan = build_plan(cfg, dataset_path, host=host or None, identity=Path(identity) if identity else None,
                      store_path=store_path)
    plan.detach = detach
    summary = plan_summary(plan)
    if dry_run:
        if as_json:
            click.echo(json.dumps({"dry_run": True, **summary}, indent=2))
        else:
            click.echo(plan_text(summary))
        return
    from ftplan.planner.launch.preflight import usable_candidates

    plan.candidates = usable_candidates(plan.candidates, plan.provider_options)  # keys and SDKs, before asking
    summary = plan_summary(plan)
    if not yes and not sys.stdin.isatty():
        raise UserError("launching rents a machine; confirm with --yes when there is no terminal to ask")
    if cfg.launch.providers == ["local"]:  # the demo's own needs, before anything is recorded
        from ftplan.planner.launch.local_preflight import check_local_demo

        local = cfg.providers.get("local", {})
        check_local_demo(int(local.get("port", 22)), identity or local.get("identity"),
                         cfg.launch.remote_python, local.get("user"))
    if not as_json:
        click.echo(plan_text(summary), err=True)
    if not yes:
        click.confirm("Launch?", abort=True, err=True)

    from ftplan.planner.launch.launcher import Launcher

    store = _store(store_path)
    display = _make_display(quiet=as_json)
    result = Launcher(store, plan, display=display).run()
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    elif result.status == "detached":
        pull_hint = f"ftplan pull {result.run_id}" if plan.bucket else f"ftplan attach {result.run_id} (pulls over SSH)"
        click.echo(f"run {result.run_id}: training, detached\nwhile you are away: {result.guards}\n"
                   f"follow or take over: ftplan attach {result.run_id}\nartifacts: {pull_hint}\n"
                   f"state: ftplan runs")
    else:
        click.echo(f"run {result.run_id}: {result.status}"
                   + (f" ({result.error})" if result.error else "")
                   + f"\nartifacts: {result.artifacts_dir}\nactual: {result.actual['hours']:.4f} h, "
                     f"${result.actual['usd']:.4f}\nreport: ftplan report {result.run_id}")
    code = EXIT_CODES.get(result.status, 1)
    if not result.teardown_confirmed:
        code = 4
    ctx.exit(code)




def _make_display(quiet: bool):
    from ftplan.planner.launch.live_display import LiveDisplay

    return LiveDisplay(quiet=quiet)


# ---- attach ------------------------------------------------------------------------------------
@click.command()
@click.argument("run_id")
@click.option("--store", "store_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@click.option("--update-firewall/--no-update-firewall", default=None,
              help="AWS/GCP: if this machine's address changed, move the run's SSH rule to it (default: ask).")
@click.pass_context
def attach(ctx, run_id, store_path, as_json, update_firewall):
    """Re-attach to a live run: follow it, or take it over if its launcher died."""
    import sys

    from ftplan.planner.launch.attach import attach_run

    store = _store(store_path)
    ask = (lambda q: click.confirm(q, default=False, err=True)) if sys.stdin.isatty() else None
    result = attach_run(store, run_id, display=_make_display(quiet=as_json), update_firewall=update_firewall,
                        confirm=ask)
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
@click.option("--include-foreign", is_flag=True,
              help="Also terminate instances of OTHER run stores (colleagues, CI) on this account; asks first.")
@click.pass_context
def gc(ctx, yes, as_json, config_path, providers, store_path, include_foreign):
    """Find and terminate instances ftplan left behind (only this run store's, unless --include-foreign)."""
    from ftplan.planner.launch.project_config import check_provider_names
    from ftplan.planner.launch.teardown import collect_garbage

    check_provider_names(providers, "--provider")
    cfg: ProjectConfig = load_project(config_path, required=config_path is not None)
    store = _store(store_path)
    if include_foreign and yes:
        # Foreign instances may be someone's live training run: list them, then ask (a prompt answered on
        # stdin; no answer is no).
        preview = collect_garbage(store, cfg, terminate=False, only=list(providers) or None)
        foreign = [i for i in preview["instances"] if i.get("foreign")]
        for item in foreign:
            click.echo(f"foreign      {item['provider']:<10} {item['id']:<24} run {item['run_id'] or '-'}  "
                       f"{item['reason']}", err=True)
        if foreign and not click.confirm(f"Terminate {len(foreign)} instance(s) that this run store does not own? "
                                         "They may be someone else's running job", default=False, err=True):
            raise UserError("not confirmed: nothing terminated; run without --include-foreign to clean only this "
                            "store's instances")
    report = collect_garbage(store, cfg, terminate=yes, only=list(providers) or None,
                             include_foreign=include_foreign)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for item in report["instances"]:
            click.echo(f"{item['action']:<12} {item['provider']:<10} {item['id'] or '-':<24} run {item['run_id'] or '-'}"
                       f"  {item['reason']}")
        for res in report["side_resources"]:
            click.echo(f"{res['action']:<12} {res['provider']:<10} {res['kind'] + ' ' + res['name']:<24} "
                       f"run {res['run_id'] or '-'}  {res['reason']}")
        for err in report["errors"]:
            click.echo(f"error: {err}", err=True)
        if not report["instances"] and not report["side_resources"]:
            click.echo("nothing to clean up")
        if report["foreign"] and not include_foreign:
            click.echo(f"{report['foreign']} instance(s) belong to another run store (not touched); "
                       "'ftplan gc --yes --include-foreign' terminates them after asking", err=True)
        if not yes and (report["orphans"] or report["side_orphans"]):
            click.echo(f"{report['orphans']} orphan instance(s), {report['side_orphans']} orphan key pair(s)/"
                       "security group(s)/firewall rule(s); run 'ftplan gc --yes' to remove them")
    ctx.exit(1 if report["errors"] else 0)
