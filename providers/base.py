"""The provider interface (modelled on dstack's `Compute`): five calls, contracts in the docstrings.

An adapter is stateless apart from its client objects; everything needed to find an instance
again (after a crash of the launcher) is in `Instance`, which the launcher stores in SQLite
*before* it does anything else with it.
"""

from __future__ import annotations

import enum
import importlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

RUN_TAG = "ftplan:run-id"  # AWS tag key; GCP label key is "ftplan-run-id" (labels allow no ':')
STORE_TAG = "ftplan:store-id"  # the run store that owns the instance (`ftplan gc` touches only its own)


class InstanceState(str, enum.Enum):
    PENDING = "pending"          # being created / booting
    RUNNING = "running"          # up; SSH may or may not answer yet
    STOPPING = "stopping"
    STOPPED = "stopped"          # not running but still billing for disk
    TERMINATING = "terminating"  # teardown accepted
    TERMINATED = "terminated"    # gone, billing ended
    PREEMPTED = "preempted"      # spot reclaimed by the provider (billing ended)
    UNKNOWN = "unknown"

    @property
    def is_gone(self) -> bool:
        return self in (InstanceState.TERMINATING, InstanceState.TERMINATED, InstanceState.PREEMPTED)


@dataclass
class InstanceRequest:
    """What to create. `instance_type`/`gpu` come from a catalog offer."""

    run_id: str
    instance_type: str
    gpu: str
    gpu_count: int
    region: str
    ssh_public_key: str               # OpenSSH format, e.g. "ssh-ed25519 AAAA... ftplan"
    zone: str | None = None
    spot: bool = False
    disk_gib: int = 100
    max_lifetime_s: int = 24 * 3600   # providers that support it enforce it themselves (GCP max_run_duration)
    ssh_cidr: str | None = None       # firewall source (e.g. "203.0.113.0/24"); None = the caller's public address /32
    image: str | None = None          # override the provider's default deep-learning image
    store_id: str = ""                # owner tag: the run store that launched it (see STORE_TAG)
    cloud_type: str | None = None     # RunPod "SECURE" / "COMMUNITY" (sent as cloudType); None = SECURE
    # Multi-node runs (issue 13): the placement from `Provider.create_placement` every node is created into,
    # this node's rank (0 = the rendezvous host) and the node count. `ssh` picks hosts[node_rank].
    placement: dict[str, Any] | None = None
    node_rank: int = 0
    nodes: int = 1


@dataclass
class SSHEndpoint:
    host: str
    port: int
    user: str


@dataclass
class Instance:
    """A created instance. `id` is the provider's id; `extra` holds what teardown needs (SG id, key name...)."""

    provider: str
    id: str
    run_id: str
    region: str
    zone: str | None = None
    instance_type: str = ""
    spot: bool = False
    state: InstanceState = InstanceState.PENDING
    public_ip: str | None = None
    ssh: SSHEndpoint | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    store_id: str = ""                # the owner tag as listed ("" = untagged, e.g. made by an older ftplan)
    private_ip: str | None = None     # the address the other nodes of a multi-node run reach it on
    launched_at: float | None = None  # provider-reported launch time (epoch s): when billing started
    ended_at: float | None = None     # provider-reported end (epoch s); None: running, or the provider does not say

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Instance:
        d = dict(d)
        d["state"] = InstanceState(d.get("state", "unknown"))
        if d.get("ssh"):
            d["ssh"] = SSHEndpoint(**d["ssh"])
        return cls(**d)


class Provider(ABC):
    """One cloud (or machine) behind five calls.

    Errors: every method raises only `providers.errors` classes (CapacityError, QuotaError,
    AuthError, InstanceGone, ProviderError); their messages never contain credentials.
    """

    name: str = ""

    @abstractmethod
    def create(self, request: InstanceRequest) -> Instance:
        """Start creating one instance tagged with `request.run_id` and return as soon as the provider
        has assigned an id (do not wait for boot). CapacityError means: try the next offer.
        Any per-run side resources (key pair, firewall rule) are recorded in `Instance.extra`
        and are removed by `terminate`. If create fails after side resources were made, it removes them."""

    @abstractmethod
    def wait_ready(self, instance: Instance, timeout_s: float) -> SSHEndpoint:
        """Block until the instance runs and has an SSH endpoint (host, port, user); update `instance`.
        Does not check that sshd answers (the SSH runner retries). Raises InstanceGone if it vanished,
        CapacityError if the provider gave up for lack of capacity, ProviderError on timeout."""

    @abstractmethod
    def describe(self, instance: Instance) -> Instance:
        """Refresh state and public address. An instance the provider no longer knows comes back
        with state TERMINATED (or PREEMPTED when the provider says so); never raises InstanceGone."""

    @abstractmethod
    def terminate(self, instance: Instance) -> None:
        """Terminate the instance and delete its per-run side resources. Idempotent: an instance
        that is already gone is success. Returns only once the provider confirms the instance is
        terminating or terminated; raises ProviderError if that cannot be confirmed."""

    @abstractmethod
    def list_instances(self, run_id: str | None = None) -> list[Instance]:
        """Instances tagged by ftplan (any run, or only `run_id`) that are not terminated:
        what `ftplan gc` sweeps."""

    # Optional: per-run side resources (key pairs, security groups, firewall rules) that a launcher killed
    # in the middle of `create` leaves behind. `list_instances` never sees them, so `ftplan gc` asks here.
    def list_side_resources(self) -> list[dict[str, Any]]:
        """Side resources made by ftplan, each a JSON-able dict with at least `provider`, `kind`, `id`,
        `name` and `run_id` (plus what `delete_side_resource` needs, e.g. `region`). Default: none."""
        return []

    def delete_side_resource(self, res: dict[str, Any]) -> None:
        """Delete one resource from `list_side_resources`. Idempotent: already gone is success.
        Raises ProviderError when the provider refuses (e.g. still in use by an instance)."""
        from ftplan.providers.errors import ProviderError

        raise ProviderError(f"{self.name or type(self).__name__} makes no side resources", provider=self.name)

    # Optional: host keys the provider publishes out of band (issue 22), so the first SSH login can be
    # verified instead of trusted on first use.
    def published_host_keys(self, instance: Instance) -> list[str] | None:
        """The instance's SSH host public keys as OpenSSH "keytype base64" lines, read from a channel the
        provider controls (AWS console output, GCP guest attributes); None when the provider publishes
        none or has not published them yet (the caller then pins after the first successful login)."""
        return None

    # Optional: multi-node runs (issue 13). Providers without a placement primitive keep `multinode = ""`
    # and the planner offers no multi-node candidates on them.
    multinode: str = ""   # the primitive, e.g. "cluster placement group" (AWS), "compact placement policy" (GCP)

    def create_placement(self, run_id: str, region: str, zone: str | None, nodes: int, *,
                         store_id: str = "") -> dict[str, Any]:
        """One placement for `nodes` instances of `run_id` close together in one zone (AWS: a cluster placement
        group; GCP: a compact resource policy), tagged like the run's instances. Returns it as a side-resource
        dict (`provider`, `kind`, `id`, `name`, `run_id`, `region`, `zone`) that `list_side_resources` lists too,
        so `ftplan gc` finds it after a crash. Pass it as `InstanceRequest.placement` of every node: instances
        created into the same placement reach each other on every port (the run's firewall admits its own
        instances). Raises ProviderError when the provider has no such primitive."""
        from ftplan.providers.errors import ProviderError

        raise ProviderError(f"{self.name or type(self).__name__} cannot place several nodes together; "
                            "multi-node runs need aws or gcp (or --provider ssh with several --host)",
                            provider=self.name)

    def delete_placement(self, placement: dict[str, Any]) -> None:
        """Delete a placement from `create_placement` once its instances are terminated. Idempotent."""
        self.delete_side_resource(placement)

    # Optional: widen or move the SSH ingress rule after a network change (`ftplan attach`).
    def allow_ssh_from(self, instance: Instance, cidr: str) -> None:
        """Let `cidr` (IPv4 or IPv6 CIDR) reach port 22 of `instance`, replacing the run's earlier source
        range. Providers without a per-run firewall (RunPod, Lambda, Paperspace, ssh) have nothing to do."""
        return None


# provider name -> "module:Class". Imported lazily so that unused SDKs never load.
ADAPTERS: dict[str, str] = {
    "aws": "ftplan.providers.aws:AWSProvider",
    "gcp": "ftplan.providers.gcp:GCPProvider",
    "runpod": "ftplan.providers.runpod:RunPodProvider",
    "lambda": "ftplan.providers.lambda_cloud:LambdaProvider",
    "paperspace": "ftplan.providers.paperspace:PaperspaceProvider",
    "ssh": "ftplan.providers.ssh:SSHHostProvider",
    "local": "ftplan.providers.ssh:LocalProvider",
}


def get_provider(name: str, **options: Any) -> Provider:
    """Build the adapter for `name` with adapter-specific options (endpoint overrides for tests, ...)."""
    from ftplan.providers.errors import ProviderError

    if name not in ADAPTERS:
        raise ProviderError(f"unknown provider '{name}'; choose one of: {', '.join(ADAPTERS)}")
    module_name, cls_name = ADAPTERS[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**options)
