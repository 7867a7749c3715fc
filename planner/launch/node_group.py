"""Several machines as one run (issue 13): create them together, start one torchrun per node, watch every
node, stop them all.

A mixin of `ftplan.planner.launch.launcher.Launcher`, beside `provision.py`. The rules it keeps:
  * all or nothing: one placement (`Provider.create_placement`, recorded as an event so `attach`/`gc` know
    it), then one `create` per node, each behind its intent row; if any node fails to create or to boot,
    the nodes that came up are terminated, the placement deleted, and the next offer is tried
    (`GroupUnavailable`) or the launch fails;
  * every node gets the same job with its own `node_rank`, `nnodes`, and node 0's address as the c10d
    rendezvous (`rdzv_endpoint`), plus the network's job environment from catalogs/networks.json and the
    run's secrets; node 0 (global rank 0, remote_job/job_distributed.py) writes the heartbeat, checkpoints
    and artifacts, so progress and pulls come from node 0 only;
  * a node whose job dies before the run finished, or that its provider reports gone, stops the run: the
    launcher's teardown salvages node 0's newest checkpoint, stops the job on every node and terminates all;
  * on machines ftplan does not own (`ssh`), teardown kills the job and removes secrets.env on every node.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ftplan.planner.launch.launch_plan import InstanceLost, LaunchFailed
from ftplan.planner.launch.teardown import UNMANAGED_PROVIDERS, Interrupted
from ftplan.planner.launch.teardown import scrubbed as _scrub

DEFAULT_RDZV_PORT = 29400           # torchrun's documented default for --rdzv-endpoint without a port
PLACEMENT_RETRY_S = (2.0, 5.0, 10.0, 20.0)   # AWS refuses to delete a placement group while its instances shut down
PLACEMENT_RETRY_BUDGET_S = 60.0              # no retry starts after this (the adapter's own wait may be longer)


class GroupUnavailable(Exception):
    """No capacity (or quota) for every node of an offer: everything made for it is gone; try the next offer."""


class _NodeFailed(Exception):
    def __init__(self, rank: int, exc: BaseException):
        super().__init__(str(exc))
        self.rank, self.exc = rank, exc


def network_env(provider: str, instance_type: str) -> dict[str, str]:
    """The job environment the instance type's inter-node network needs (`env` in catalogs/networks.json,
    with its sources there); empty where nothing is documented."""
    from ftplan.catalogs import data_path

    raw = json.loads(data_path("networks.json").read_text())
    spec = raw["providers"].get(provider, {}).get("types", {}).get(instance_type, {})
    return {str(k): str(v) for k, v in (spec.get("env") or {}).items()}


def node_remote_root(remote_root: str, rank: int) -> str:
    """Node k > 0 works in its own folder under the run root: machines that share a home directory (NFS on a
    cluster, or two addresses of one host) must not write one run folder twice. Node 0 keeps the usual one."""
    return remote_root if rank == 0 else f"{remote_root.rstrip('/')}/node{rank}"


class NodeGroupSteps:
    """Provision, connect, start, watch and stop the nodes of a multi-node offer."""

    # ---- provisioning ---------------------------------------------------------------------------
    def _create_group(self, provider: Any, offer: Any, request_for: Any) -> tuple[int, Any]:
        """Create and boot `offer.nodes` instances in one placement; returns node 0's (row, instance)."""
        from ftplan.providers.errors import CapacityError, InstanceGone, ProviderError, QuotaError

        n = offer.nodes
        try:
            placement = provider.create_placement(self.run_id, offer.region, offer.zone, n,
                                                  store_id=self.store.store_id)
        except (CapacityError, QuotaError) as exc:
            raise GroupUnavailable(f"no placement for {n} nodes: {_scrub(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - an adapter without the primitive, a refused call
            raise LaunchFailed(f"placing {n} nodes on {offer.provider} failed: {_scrub(exc)}") from None
        self.placements.append((offer.provider, placement))
        self.store.add_event(self.run_id, "placement_created", str(placement.get("name") or placement.get("id")),
                             phase="provisioning", data={"provider": offer.provider, "placement": placement})
        zone = offer.zone or placement.get("zone")
        created: list[tuple[int, Any]] = []
        try:
            for k in range(n):
                req = request_for(zone=zone, placement=placement, node_rank=k, nodes=n)
                row = self.store.add_instance_intent(
                    self.run_id, offer.provider, instance_type=offer.instance_type, gpu=offer.gpu,
                    region=offer.region, zone=zone, spot=offer.spot, price_hour=offer.price_hour)
                try:
                    inst = provider.create(req)
                except Exception as exc:  # noqa: BLE001 - whatever the class, the instance may exist by now
                    # closed by the sweep (`_sweep_tagged`) only once a listing shows nothing of the run
                    state = "create_failed" if offer.provider in UNMANAGED_PROVIDERS else "intent"
                    self.store.set_instance_state(row, state, error=_scrub(exc))
                    raise _NodeFailed(k, exc) from None
                self.store.set_instance_created(row, inst.id, inst.to_dict())
                zone = zone or getattr(inst, "zone", None)   # the provider placed node 0: the others follow it
                self.guard.start_billing(row, offer.price_hour)
                self.live.append((row, inst, offer))
                created.append((row, inst))
                self.store.add_event(self.run_id, "instance_created", inst.id, phase="provisioning",
                                     data={"provider": offer.provider, "instance_type": offer.instance_type,
                                           "node": k, "nodes": n})
            for k, (row, inst) in enumerate(created):
                self._enter("waiting", f"waiting for node {k} ({inst.id}) to boot")
                try:
                    provider.wait_ready(inst, self.plan.wait_ready_timeout_s)
                except Exception as exc:  # noqa: BLE001
                    raise _NodeFailed(k, exc) from None
                self.store.set_instance_state(row, "ready", instance=inst.to_dict())
                self._cross_check_price(row, inst, self._offer_of(row, offer))
        except _NodeFailed as failed:
            self._abandon_group(offer)
            exc = failed.exc
            detail = f"node {failed.rank} of {n} failed: {_scrub(exc)}"
            if isinstance(exc, (CapacityError, QuotaError, InstanceGone)):
                raise GroupUnavailable(detail + "; the other nodes were terminated") from None
            what = "" if isinstance(exc, ProviderError) else f"{type(exc).__name__}: "
            raise LaunchFailed(f"{n} nodes on {offer.provider}: node {failed.rank} failed: {what}{_scrub(exc)}"
                               "; the other nodes were terminated") from None
        self.group = created
        self.store.add_event(self.run_id, "node_group", f"{n} nodes ready", phase="waiting",
                             data={"nodes": n, "instances": [inst.id for _, inst in created],
                                   "placement": placement.get("name") or placement.get("id")})
        return created[0]

    def _offer_of(self, row: int, default: Any) -> Any:
        return next((o for r, _, o in self.live if r == row), default)

    def _abandon_group(self, offer: Any) -> None:
        """All or nothing: terminate every node this offer made, sweep what a failed create left, drop the
        placement. What cannot be confirmed stays recorded for teardown and `ftplan gc`."""
        for row, inst, o in list(self.live):
            if o.provider == offer.provider and o.instance_type == offer.instance_type:
                self._terminate(row, inst, o)
        self._sweep_tagged()
        self._release_placements()

    def _release_placements(self) -> bool:
        """Delete the run's placements once no node is left (retried: AWS refuses while instances still shut
        down). A placement that will not go is left for `ftplan gc` (adapters list it as a side resource)."""
        ok = True
        for provider_name, placement in list(self.placements):
            if provider_name in {o.provider for _, _, o in self.live}:
                ok = False   # a node of that provider is not confirmed terminated: the placement is still in use
                continue
            provider = self._provider(provider_name)
            error: Exception | None = None
            # Adapters wait inside delete_placement while nodes shut down (AWS teardown_wait_s, GCP op_timeout_s):
            # retry only within PLACEMENT_RETRY_BUDGET_S, so a stuck node costs one adapter wait, not five.
            give_up = time.monotonic() + PLACEMENT_RETRY_BUDGET_S
            for attempt, wait in enumerate((0.0, *PLACEMENT_RETRY_S)):
                if attempt and time.monotonic() + wait > give_up:
                    break
                time.sleep(wait)
                try:
                    provider.delete_placement(placement)
                    error = None
                    break
                except Interrupted:
                    raise
                except Exception as exc:  # noqa: BLE001
                    error = exc
            name = str(placement.get("name") or placement.get("id"))
            if error is None:
                self.placements.remove((provider_name, placement))
                self.store.add_event(self.run_id, "placement_deleted", name, phase=self._phase,
                                     data={"provider": provider_name})
                continue
            ok = False
            self.store.add_event(self.run_id, "placement_left", f"{provider_name} {placement.get('kind')} {name} "
                                 f"could not be deleted ({_scrub(error)}); 'ftplan gc --yes' removes it",
                                 phase=self._phase, data={"provider": provider_name, "placement": placement})
            self.display.warn(f"{placement.get('kind')} {name} is left; 'ftplan gc --yes' removes it")
        return ok

    # ---- connect, ship, start -------------------------------------------------------------------
    def _run_group(self, offer: Any, key_path: Path) -> str:
        """Connect to every node, ship each its bundle, start node 0 then the others, train, pull from node 0."""
        p = self.plan
        n = len(self.group)
        if p.detach:
            self.display.warn("--detach is not supported for multi-node runs yet: staying attached")
        self.node_runners = []
        for k, (row, inst) in enumerate(self.group):
            self._node_step(k, lambda r=row, i=inst, k=k: self._connect(r, i, i.ssh, key_path, node=k))
        rdzv = self._rdzv_endpoint()
        self.store.update_run(self.run_id, config_json={**p.job_config, **self._node_settings(0, n, rdzv)})
        self.store.add_event(self.run_id, "node_group", f"{n} nodes, rendezvous at {rdzv}", phase="connecting",
                             data={"nodes": n, "rdzv_endpoint": rdzv,
                                   "hosts": [f"{i.ssh.host}:{i.ssh.port}" for _, i in self.group]})
        env = network_env(offer.provider, offer.instance_type)
        for k, runner in enumerate(self.node_runners):
            self._enter("uploading", f"shipping the job to node {k} ({runner.host})")
            bundle = self._node_bundle(k, n, rdzv)
            self._node_step(k, lambda b=bundle, r=runner, k=k: self._upload(b, False, runner=r, node=k,
                                                                            extra_env=env))
        self._nodes_done: set[int] = set()
        first_row, first = self.group[0]
        outcome = self._node_step(0, lambda: self._train(first_row, first, offer))
        self._enter("pulling", "pulling artifacts back from node 0")
        self._pull_all()
        if outcome == "over_budget":
            from ftplan.planner.launch.launch_plan import OverBudget

            raise OverBudget(self._over_budget_message)
        return outcome

    def _node_step(self, k: int, step: Any) -> Any:
        """A step on node k: a failure or a lost machine names the node (no spot recovery for several nodes)."""
        try:
            return step()
        except InstanceLost as exc:
            self.store.add_event(self.run_id, "instance_lost", f"node {k}: {exc}", phase=self._phase,
                                 data={"node": k})
            raise LaunchFailed(f"node {k} lost during {self._phase}: {_scrub(exc)}; every node is stopped") from None
        except LaunchFailed as exc:
            text = str(exc)
            if text.startswith("node "):
                raise
            raise LaunchFailed(f"node {k} ({self._node_label(k)}): {text}") from None

    def _node_label(self, k: int) -> str:
        inst = self.group[k][1] if k < len(self.group) else None
        ssh = getattr(inst, "ssh", None)
        return f"{ssh.user}@{ssh.host}:{ssh.port}" if ssh else str(getattr(inst, "id", "?"))

    def _rdzv_endpoint(self) -> str:
        """Node 0's address as the other nodes reach it (its private address; for `ssh`, the host as given)."""
        inst = self.group[0][1]
        host = inst.private_ip or (inst.ssh.host if inst.ssh else None) or inst.public_ip
        if not host:
            raise LaunchFailed(f"node 0 ({inst.id}) has no address the other nodes can reach for the rendezvous")
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.plan.rdzv_port or DEFAULT_RDZV_PORT}"

    def _node_settings(self, k: int, n: int, rdzv: str) -> dict[str, Any]:
        cfg = self.plan.job_config
        distributed = cfg.get("distributed") or ("fsdp" if cfg.get("method") == "full" else "ddp")
        return {"nnodes": n, "node_rank": k, "rdzv_endpoint": rdzv, "rdzv_id": self.run_id, "distributed": distributed}

    def _node_bundle(self, k: int, n: int, rdzv: str) -> Path:
        """The run's bundle with node k's place in the group (job config keys of remote_job/job_config.py)."""
        cfg = {key: v for key, v in self.plan.job_config.items() if key != "bucket"}
        cfg.update(self._node_settings(k, n, rdzv), resume=True)
        return self.bundle_builder(cfg, self.plan.dataset, self.plan.run_dir / f"bundle-node{k}.tar.gz",
                                   extra_files=dict(self.plan.extra_files))

    # ---- while training -------------------------------------------------------------------------
    def _watch_nodes(self, describe: bool) -> None:
        """Each poll: every node but 0 must still run its job, or have finished it cleanly. A node whose job
        died (or that its provider reports gone) stops the run; teardown pulls node 0's checkpoint."""
        runners = getattr(self, "node_runners", None) or []
        for k in range(1, len(runners)):
            if k in self._nodes_done:
                continue
            runner, (_, inst) = runners[k], self.group[k]
            try:
                running = runner.is_running(self.run_id)
                code = None if running else runner.exit_code(self.run_id)
            except Interrupted:
                raise
            except Exception as exc:  # noqa: BLE001 - SSH gave up after its reconnect grace
                self._node_step(k, lambda i=inst: self._check_alive(i))
                self._node_lost(k, f"unreachable over SSH ({_scrub(exc)})")
            if running:
                if describe:
                    self._node_step(k, lambda i=inst: self._check_alive(i))
                continue
            if code == 0:
                self._nodes_done.add(k)   # its part is done; node 0 is still saving
                continue
            self._node_lost(k, f"its job exited with code {code}" if code is not None
                            else "its job ended without an exit code")

    def _node_lost(self, k: int, what: str) -> None:
        """Stop node 0's job at once (without node k its collectives fail or hang, and a job left running keeps
        rotating its checkpoints away under the pull); teardown then pulls node 0's out/ whole, checkpoints
        included, and stops and terminates every node."""
        msg = (f"node {k} ({self._node_label(k)}) lost: {what} before the run finished; stopping all "
               f"{len(self.group)} nodes (the newest checkpoint is pulled from node 0)")
        self.store.add_event(self.run_id, "node_lost", msg, phase=self._phase, data={"node": k})
        self.display.warn(msg)
        try:
            self.runner.kill(self.run_id)
            self.job_finished = True   # stopped by us: salvage pulls out/ and the log as they are now
        except Interrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - node 0 unreachable too: salvage tries the newest checkpoint
            self.store.add_event(self.run_id, "teardown_failed", f"node 0: cannot stop its job: {_scrub(exc)}",
                                 phase=self._phase)
        raise LaunchFailed(msg)

    # ---- teardown -------------------------------------------------------------------------------
    def _stop_other_nodes(self, status: str, unmanaged: bool) -> None:
        """Nodes 1.. on every path (node 0 is the launcher's runner): on machines ftplan does not own, stop the
        job and remove secrets.env; everywhere, tell the node's watchdog that the launcher handled it."""
        from ftplan.planner.remote.ssh_options import SALVAGE_S

        runners = getattr(self, "node_runners", None) or []
        for k, runner in enumerate(runners[1:], start=1):
            if runner is None:
                continue
            if getattr(runner, "ever_connected", True):
                bounded = getattr(runner, "bounded", None)
                with bounded(SALVAGE_S) if bounded is not None else nullcontext():
                    self._stop_node(k, runner, unmanaged)
            try:
                runner.close()
            except Exception:  # noqa: BLE001
                pass
        self.node_runners = runners[:1]

    def _stop_node(self, k: int, runner: Any, unmanaged: bool) -> None:
        if unmanaged:
            try:
                if runner.is_running(self.run_id):
                    runner.kill(self.run_id)
            except Exception as exc:  # noqa: BLE001
                self.store.add_event(self.run_id, "teardown_failed", f"node {k}: cannot stop its job: {_scrub(exc)}",
                                     phase="teardown")
        try:
            with runner.sftp.open(f"{runner.run_dir(self.run_id)}/launcher_pulled", "w") as fh:
                fh.write("handled by ftplan (node 0 holds the artifacts)\n")
        except Exception:  # noqa: BLE001 - its watchdog then waits its grace: safe, only slower
            pass
        if not unmanaged:
            return
        try:
            runner.remove_secrets(self.run_id)
            self.store.add_event(self.run_id, "secrets_removed", f"node {k}", phase="teardown", data={"node": k})
        except Exception as exc:  # noqa: BLE001
            self.store.add_event(self.run_id, "secrets_not_removed", f"node {k}: {_scrub(exc)}", phase="teardown",
                                 data={"node": k})
            self.display.warn(f"could not remove secrets.env from node {k}: {_scrub(exc)}")


def recorded_nodes(store: Any, run_id: str, rows: list[Any]) -> list[Any] | None:
    """The open instance rows of a multi-node run in node order (None at a position whose node is already
    closed), from the run's `node_group` event; None for a single-node run. A single-node run can also have two
    open rows (a spot-lost instance whose termination is unconfirmed beside its replacement): only this event
    says several rows are nodes of one job."""
    ids: list[str] = []
    for event in store.events(run_id, "node_group"):   # the newest that names the instances (the group made)
        ids = (event.json("data_json") or {}).get("instances") or ids
    if len(ids) < 2:
        return None
    by_id = {r.provider_instance_id: r for r in rows}
    return [by_id.get(i) for i in ids]
