"""What a launch is about to do: the priced offers, the job config and the estimate (`LaunchPlan`),
built from ftplan.toml + flags, and what it ended with (`LaunchResult`).

Kept apart from the launcher so that `ftplan launch --dry-run` and the plan summary never import the
SSH runner or a provider SDK: everything heavy is imported inside the functions that need it.
"""

from __future__ import annotations

import os
import secrets as _secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftplan.planner.errors import UserError
from ftplan.planner.launch.project_config import ProjectConfig

SECRET_ENV_FOR_JOB = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@dataclass
class Candidate:
    """One priced offer the launcher may provision, cheapest first."""

    provider: str
    instance_type: str
    gpu: str
    gpu_count: int = 1
    region: str = ""
    zone: str | None = None
    spot: bool = False
    price_hour: float = 0.0
    est_hours: float | None = None
    est_usd: float | None = None
    headroom_gib: float | None = None
    cloud: str = ""                    # RunPod "secure"/"community" (sent as cloudType), "" elsewhere
    nodes: int = 1                     # machines of this offer in one run (price_hour is one machine's)
    network: str = ""                  # between the nodes (catalogs/networks.json), when nodes > 1
    bounding_link: str = ""            # what bounds the step's collectives, when nodes > 1

    @property
    def price_all_nodes(self) -> float:
        """What the whole run bills per hour: every node at the offer's price."""
        return self.price_hour * self.nodes


@dataclass
class LaunchPlan:
    run_id: str
    job_config: dict[str, Any]              # what remote_job/train.py reads (no secrets)
    dataset: Path
    candidates: list[Candidate]
    model: str
    method: str
    runs_dir: Path
    budget_usd: float | None = None
    on_over_budget: str = "stop"
    spot_recovery: bool = True
    max_offer_tries: int = 3
    sync_every_s: float = 600.0
    poll_interval_s: float = 2.0
    wait_ready_timeout_s: float = 1200.0
    ssh_connect_timeout_s: float | None = None  # None: the provider's first_boot_s (catalogs/provider_overheads.json)
    ssh_reconnect_s: float = 300.0          # a connection lost mid-run is retried this long
    ssh_cidr: str | None = None             # AWS/GCP port-22 source range; None = the adapter's /32 lookup
    pull_margin_s: float = 600.0
    identity: Path | None = None            # an already-authorized key (local/ssh); else a per-run key
    remote_python: str | None = None
    remote_root: str = "~/ftplan-runs"
    estimate: dict[str, Any] = field(default_factory=dict)  # hours, usd, peak_mem_gib, tokens_per_s
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    job_secrets: dict[str, str] = field(default_factory=dict)  # e.g. HF_TOKEN; never stored
    extra_files: dict[str, Path] = field(default_factory=dict)  # bundle extras (local model folder, job/ overrides)
    detach: bool = False                    # return once training started; the watchdog guards the machine
    bucket: str | None = None               # s3://... | gs://...: the watchdog uploads to <bucket>/<run id>/
    grace_minutes: float = 15.0             # the watchdog waits this long after training for a launcher to pull
    poweroff_cmd: str | None = None         # None: by provider (shutdown on VMs, runpodctl on RunPod, none on own)
    bucket_env: dict[str, str] = field(default_factory=dict)  # scoped bucket credentials for the machine; never stored
    rdzv_port: int = 29400                  # several nodes: torchrun's c10d rendezvous port on node 0

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.run_id


@dataclass
class LaunchResult:
    run_id: str
    status: str                      # succeeded | failed | stopped_over_budget | cancelled | detached
    artifacts_dir: str
    estimated: dict[str, float | None]
    actual: dict[str, float | None]
    error: str | None = None
    teardown_confirmed: bool = True
    instances: list[dict[str, Any]] = field(default_factory=list)
    guards: str | None = None        # detached: what guards the machine now that no launcher watches it

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["guards"] is None:
            del out["guards"]
        for key in ("estimated", "actual"):  # 4 decimals: 0.36 s, 0.01 cent; not float noise
            out[key] = {k: round(v, 4) if isinstance(v, float) else v for k, v in (out[key] or {}).items()}
        return out


class LaunchFailed(Exception):
    """A phase failed for a reason the run record should state (already scrubbed)."""


class NoCapacity(LaunchFailed):
    pass


class InstanceLost(Exception):
    """The instance vanished under a running job (spot preemption, deleted in the console)."""


class OverBudget(Exception):
    pass


def new_run_id() -> str:
    """Lowercase, <= 63 chars, no quotes: valid as a GCP label, AWS tag, RunPod/Lambda name."""
    return f"ft-{time.strftime('%Y%m%d-%H%M%S')}-{_secrets.token_hex(2)}"


def job_secrets_from_env() -> dict[str, str]:
    """Secrets the job needs (gated models): passed to the runner, never written to the store."""
    return {k: os.environ[k] for k in SECRET_ENV_FOR_JOB if os.environ.get(k)}


# ---- plan building -----------------------------------------------------------------------------
def build_job_config(cfg: ProjectConfig, run_id: str, gpu_count: int = 1, gpu: str | None = None) -> dict[str, Any]:
    """The remote job's config (remote_job/job_config.py keys) from the project file; the offer's GPU count
    runs one process per GPU, and a GPU offer makes the job refuse to fall back to the CPU."""
    from ftplan.planner.estimate.models import resolve_model
    from ftplan.planner.launch.estimate_bridge import job_config_settings

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
        "seed": j.seed,
        "checkpoint_every_steps": j.checkpoint_every_steps, "heartbeat_every_s": j.heartbeat_every_s,
        "throttle_s_per_step": j.throttle_s_per_step, "resume": True,
        "num_gpus": max(1, int(gpu_count)), "expect_gpu": bool(gpu) and str(gpu).lower() != "cpu",
        # loss, precision, optimizer, packing, checkpointing: the values the launch's estimate assumed
        **job_config_settings(cfg, gpu, gpu_count),
    }


def _parse_host(host: str):
    from ftplan.providers.ssh import HostSpecError, parse_host_spec

    try:
        return parse_host_spec(host)
    except HostSpecError as exc:
        raise UserError(str(exc)) from None


def _host_list(host: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if host is None:
        return []
    return [host] if isinstance(host, str) else [h for h in host if h]


def _pinned_candidates(cfg: ProjectConfig, host: str | list[str] | None, identity: Path | None):
    """Offers that skip the catalog: local, ssh --host (several: one multi-node run), or [[launch.offers]]
    pinned in the project file."""
    providers = cfg.launch.providers
    if providers == ["local"]:
        if cfg.launch.nodes not in (None, 1):
            raise UserError(f"--nodes {cfg.launch.nodes}: --provider local is this one machine; for several use "
                            "--provider ssh with one --host per machine")
        opts = cfg.providers.get("local", {})
        return [Candidate(provider="local", instance_type="local", gpu=str(opts.get("gpu", "cpu")),
                          gpu_count=_gpus_option(opts, "local"), region="localhost",
                          price_hour=cfg.price_override("local") or 0.0)]
    if providers == ["ssh"]:
        opts = cfg.providers.get("ssh", {})
        hosts = _host_list(host) or _host_list(opts.get("hosts")) or _host_list(opts.get("host"))
        if not hosts:
            raise UserError("--provider ssh needs --host user@host[:port] (once per machine), or hosts = [...] "
                            "under [providers.ssh]")
        specs = [_parse_host(h) for h in hosts]
        twice = next((s for i, s in enumerate(specs) if (s.host, s.port) in {(t.host, t.port) for t in specs[:i]}), None)
        if twice is not None:
            raise UserError(f"--host {twice} is given twice; each node of a run is its own machine")
        nodes = cfg.launch.nodes
        if nodes is not None and nodes != len(specs):
            raise UserError(f"--nodes {nodes} but {len(specs)} --host given: pass one --host per node")
        return [Candidate(provider="ssh", instance_type=",".join(map(str, specs)), gpu=str(opts.get("gpu", "unknown")),
                          gpu_count=_gpus_option(opts, "ssh"), region=specs[0].host, nodes=len(specs),
                          network="Ethernet (your own machines)" if len(specs) > 1 else "",
                          price_hour=cfg.price_override("ssh") or 0.0)]
    pinned = [o for o in cfg.launch.offers if not providers or o.provider in providers]
    if cfg.launch.offers and not pinned:
        raise UserError(f"none of the offers pinned in {cfg.source} is on {', '.join(providers)}")
    if cfg.launch.nodes is not None and pinned:
        pinned = [o for o in pinned if o.nodes == cfg.launch.nodes]
        if not pinned:
            raise UserError(f"--nodes {cfg.launch.nodes}: none of the offers pinned in {cfg.source} has "
                            f"nodes = {cfg.launch.nodes}")
    return [Candidate(provider=o.provider, instance_type=o.instance_type, gpu=o.gpu, gpu_count=o.gpu_count,
                      region=o.region, zone=o.zone, spot=o.spot, price_hour=o.price_hour, nodes=o.nodes)
            for o in pinned]


def _gpus_option(opts: dict[str, Any], name: str) -> int:
    """GPUs per machine of your own (`gpus` under [providers.local|ssh], or --gpus): one process per GPU."""
    value = opts.get("gpus", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"[providers.{name}] gpus = {value!r}: must be a whole number of GPUs per machine, 1 or more")
    return value


def _provider_options(cfg: ProjectConfig, name: str, host: str | list[str] | None,
                      identity: Path | None) -> dict[str, Any]:
    opts = cfg.provider_options(name)
    hosts = _host_list(host)
    if name == "ssh" and len(hosts) > 1:   # the command line's hosts replace the project file's
        opts.pop("host", None)
        opts["hosts"] = hosts
    elif name == "ssh" and hosts:
        opts.pop("hosts", None)
        opts.setdefault("host", hosts[0])
    if name in ("local", "ssh") and identity is not None:
        opts.setdefault("identity", str(identity))
    return opts


def _estimate_for(cfg: ProjectConfig, gpu: str, gpu_count: int, dataset: Path, store_path: str | None,
                  offer: Candidate | None = None) -> dict[str, Any]:
    """Estimated hours / peak memory / tokens/s on the first offer's GPU, corrected by measured runs of the
    same GPU, model and method; over all its nodes (memory per GPU sharded over nodes x GPUs, collectives at
    the slower link) when it has several. Empty when the estimator cannot say (e.g. `local` on a CPU)."""
    from ftplan.planner.estimate.gpus import resolve_gpu

    try:
        g = resolve_gpu(gpu)
    except UserError:
        return {}
    try:
        from ftplan.planner.estimate.estimator import estimate
        from ftplan.planner.launch.estimate_bridge import request_from_config
        from ftplan.planner.runs.corrections import apply_corrections

        j = cfg.job
        req = request_from_config(cfg, dataset, gpu_count=gpu_count, gpu=g.name)
        nodes = offer.nodes if offer is not None else 1
        network = None
        if nodes > 1:
            from ftplan.planner.estimate.internode import node_network

            network = node_network(offer.provider, offer.instance_type)
        if network is not None:
            from ftplan.planner.estimate.internode import estimate_nodes

            est = estimate_nodes(req, g, gpu_count, nodes, network).estimate
        else:
            est = estimate(req, g, gpu_count)
        from ftplan.planner.runs.store import Store, default_store_path

        path = Path(store_path) if store_path else default_store_path()
        if path.exists():
            est, _ = apply_corrections(est, g.name, req.model.name, j.method, Store(path))
    except Exception as exc:  # noqa: BLE001 - an estimate is advice; the launch itself does not need it
        return {"notes": [f"no estimate: {' '.join(str(exc).split())[:200]}"]}
    return {"hours": est.hours, "peak_mem_gib": est.memory.total, "tokens_per_s": est.tokens_per_s,
            "fits": est.fits, "notes": list(est.notes)}


def _canonical_model(name: str) -> str:
    """The catalog name runs are recorded under, so measured-run corrections find them whatever alias was typed."""
    from ftplan.planner.estimate.models import resolve_model

    try:
        return resolve_model(name).name
    except UserError:
        return name


def build_plan(cfg: ProjectConfig, dataset: Path, *, host: str | list[str] | None = None, identity: Path | None = None,
               store_path: str | None = None):
    run_id = new_run_id()
    candidates = _pinned_candidates(cfg, host, identity)
    if not candidates:
        candidates = _cloud_candidates(cfg, dataset)
    if not candidates:
        raise UserError("no offer fits the job within the budget; see 'ftplan plan' for why offers were rejected")
    first = candidates[0]
    estimate = _estimate_for(cfg, first.gpu, first.gpu_count, dataset, store_path, first)
    if first.est_hours is not None:
        # A catalog offer's hours cover provisioning, setup, training and the pull: what is billed, and what
        # the run's actual hours are compared with. The estimator's training-only figure stays beside it.
        if estimate.get("hours") is not None:
            estimate["train_hours"] = estimate["hours"]
        estimate["hours"] = first.est_hours
        estimate["usd"] = first.est_usd
    elif estimate.get("hours") is not None:
        estimate.setdefault("usd", estimate["hours"] * first.price_hour)
    for c in candidates:
        if c.est_hours is None and estimate.get("hours") is not None and c.gpu == first.gpu:
            c.est_hours = estimate["hours"]
            c.est_usd = c.est_hours * c.price_hour
    names = {c.provider for c in candidates}
    options = {n: _provider_options(cfg, n, host, identity) for n in names}
    from ftplan.planner.launch.preflight import options_problem

    for n in sorted(names):  # the same answer for --dry-run and launch
        problem = options_problem(n, options[n])
        if problem:
            raise UserError(problem)
    remote_root = cfg.providers.get(first.provider, {}).get("remote_root", "~/ftplan-runs")
    launch_cfg = cfg.launch
    return LaunchPlan(
        run_id=run_id, job_config=build_job_config(cfg, run_id, first.gpu_count, first.gpu), dataset=dataset, candidates=candidates,
        model=_canonical_model(cfg.job.model), method=cfg.job.method, runs_dir=Path(launch_cfg.runs_dir),
        budget_usd=launch_cfg.budget_usd, on_over_budget=launch_cfg.on_over_budget,
        spot_recovery=launch_cfg.spot_recovery, max_offer_tries=launch_cfg.max_offer_tries,
        sync_every_s=launch_cfg.sync_every_min * 60, poll_interval_s=launch_cfg.poll_interval_s,
        wait_ready_timeout_s=launch_cfg.wait_ready_timeout_s, ssh_connect_timeout_s=launch_cfg.ssh_connect_timeout_s,
        ssh_reconnect_s=launch_cfg.ssh_reconnect_s, ssh_cidr=launch_cfg.ssh_cidr,
        pull_margin_s=launch_cfg.pull_margin_min * 60, identity=identity, remote_python=launch_cfg.remote_python,
        remote_root=remote_root, estimate=estimate,
        provider_options=options,
        job_secrets=job_secrets_from_env(),
        extra_files={k: Path(v) for k, v in launch_cfg.bundle_extra_files.items()},
        bucket=launch_cfg.bucket, grace_minutes=launch_cfg.grace_minutes, poweroff_cmd=launch_cfg.poweroff_cmd,
        bucket_env=bucket_env_from(launch_cfg.bucket_env), rdzv_port=launch_cfg.rdzv_port,
    )


def bucket_env_from(names: dict[str, str]) -> dict[str, str]:
    """The scoped bucket key the user named (ftplan.toml [launch] bucket_env: machine variable -> the local
    variable holding it), shipped in the machine's 0600 secrets.env. Nothing is shipped implicitly: with no
    names the machine uses its own instance role / service account, never the user's default long-lived keys."""
    missing = sorted({local for local in names.values() if not os.environ.get(local)})
    if missing:
        raise UserError(f"launch.bucket_env names {', '.join(missing)}, which is not set here; export the scoped "
                        "bucket key, or drop bucket_env to use the machine's instance role")
    return {remote: os.environ[local] for remote, local in names.items()}


def _cloud_candidates(cfg: ProjectConfig, dataset: Path):
    """Cheapest feasible catalog offers (ftplan.planner.pricing.optimizer), as launcher candidates."""
    try:
        from ftplan.planner.launch.estimate_bridge import launch_offers
    except ImportError:
        raise UserError("the catalog planner is not available in this build; pin an offer with "
                        "[[launch.offers]] in ftplan.toml or use --provider local/ssh") from None
    offers = launch_offers(cfg, dataset)
    return [Candidate(provider=o.provider, instance_type=o.instance_type, gpu=o.gpu, gpu_count=o.gpu_count,
                      region=o.region, zone=o.zone or None, spot=o.spot, price_hour=o.price_hour,
                      est_hours=o.hours, est_usd=o.total_usd, headroom_gib=o.headroom_gib,
                      cloud=getattr(o, "cloud", "") or "", nodes=getattr(o, "nodes", 1) or 1,
                      network=getattr(o, "network", "") or "", bounding_link=getattr(o, "bounding_link", "") or "")
            for o in offers]


# ---- the plan as shown before launching -------------------------------------------------------
def plan_summary(plan: LaunchPlan) -> dict[str, Any]:
    first = plan.candidates[0] if plan.candidates else None
    return {
        "run_id": plan.run_id, "model": plan.model, "method": plan.method, "dataset": str(plan.dataset),
        "budget_usd": plan.budget_usd,
        "estimated": {"hours": _round(plan.estimate.get("hours"), 4), "usd": _round(plan.estimate.get("usd"), 4),
                      "peak_mem_gib": _round(plan.estimate.get("peak_mem_gib"), 2),
                      "tokens_per_s": _round(plan.estimate.get("tokens_per_s"), 1)},
        "notes": plan.estimate.get("notes", []),
        "offer": None if first is None else {
            "provider": first.provider, "instance_type": first.instance_type, "gpu": first.gpu,
            "gpu_count": first.gpu_count, "region": first.region, "spot": first.spot,
            "price_hour": first.price_hour, "nodes": first.nodes, "price_hour_all_nodes": first.price_all_nodes,
            "network": first.network or None, "bounding_link": first.bounding_link or None},
        "fallbacks": [f"{c.provider}/{_nodes_prefix(c.nodes)}{c.instance_type}/{c.zone or c.region} "
                      f"${c.price_all_nodes:.2f}/h" for c in plan.candidates[1:plan.max_offer_tries]],
    }


def _nodes_prefix(nodes: int) -> str:
    return f"{nodes} x " if nodes > 1 else ""


def _round(x: float | None, digits: int) -> float | None:
    """JSON shows what the number means (0.01 cent, 0.01 GiB), not float noise."""
    return None if x is None else round(float(x), digits)


def plan_text(s: dict[str, Any]) -> str:
    est = s["estimated"]
    offer = s["offer"]
    lines = [f"plan for run {s['run_id']}: {s['model']} {s['method']} on {s['dataset']}"]
    if offer and offer.get("nodes", 1) > 1:
        lines.append(f"  instances: {offer['nodes']} x {offer['provider']} {offer['instance_type']} "
                     f"({offer['gpu_count']}x {offer['gpu']} each) in {offer['region'] or '-'}"
                     f"{' spot' if offer['spot'] else ''} at ${offer['price_hour']:.2f}/h each, "
                     f"${offer['price_hour_all_nodes']:.2f}/h for all {offer['nodes']} nodes")
        if offer.get("network") or offer.get("bounding_link"):
            lines.append(f"  between nodes: {offer.get('network') or '-'}; bounding link: "
                         f"{offer.get('bounding_link') or 'not estimated'}")
    elif offer:
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
