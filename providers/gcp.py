"""GCP Compute Engine adapter (google-cloud-compute, Application Default Credentials).

Per create: a firewall rule `ftplan-<run>-<suffix>-ssh` (tcp/22 from the caller's /32 to the instance's network
tag) and the instance: Deep Learning VM image, `ssh-keys` metadata, label `ftplan-run-id`,
`on_host_maintenance=TERMINATE` (GPU VMs cannot live-migrate), SPOT when asked, and `max_run_duration` with
termination action DELETE, so Google itself deletes the VM at the deadline even if the launcher is gone.
Multi-node runs (issue 13): `create_placement` makes a compact placement policy; each node joins it, carries
its name as network tag and label, and a `<policy>-nodes` rule lets the nodes reach each other (gcp_cluster.py).

Machine types: a2/a3/a4/g2 carry their GPUs; T4/V100/P100/P4 are attached to n1 hosts as `guest_accelerators`.
The request's `instance_type` (from the catalog) is always the host machine type.

Operations are polled with our own `ZoneOperationsClient` built with the same client options: the SDK's
`op.result()` polls compute.googleapis.com whatever endpoint the client was given.
Reads pass `retry=None`, because the SDK's default retry keeps a 503 going for 10 minutes; polling reads
retry 429/500/503 a bounded number of times instead (Compute API: "retry with exponential backoff" on
rateLimitExceeded / 5xx, https://cloud.google.com/compute/docs/api/how-tos/api-rate-limits).

Documented Compute Engine behaviour this adapter relies on:
- Not sold on demand: "When provisioning A4 machine types, you must reserve capacity ..., use Spot VMs, use
  Flex-start VMs" (same for A3 Ultra), and "a3-highgpu-1g, a3-highgpu-2g, or a3-highgpu-4g ... you must create
  instances by using Spot VMs or Flex-start VMs" (https://cloud.google.com/compute/docs/gpus, 2026-04). Such an
  on-demand request is refused here with OfferUnavailable (next offer) before any call; a refusal that names
  reservations/Flex-start maps the same way.
- Capacity: ZONE_RESOURCE_POOL_EXHAUSTED[_WITH_DETAILS] inside the operation, or synchronously the newer
  wording "A ... VM instance ... is currently unavailable in the ZONE zone" / "does not have enough resources"
  (https://cloud.google.com/compute/docs/troubleshooting/troubleshooting-resource-availability) -> CapacityError.
  QUOTA_EXCEEDED names the quota ("Quota 'NVIDIA_T4_GPUS' exceeded") -> QuotaError naming it.
- Boot disks: A3 Ultra and A4 take only Hyperdisk ("for A3U machines, the default value is hyperdisk-balanced",
  Vertex AI DiskSpec; the A4X/A4 pages list Hyperdisk only), so those families boot from hyperdisk-balanced.
- Instance.Status (compute_v1): PENDING (flex-start queue), PENDING_STOP and DEPROVISIONING (on the way out),
  STOPPED; GCP's TERMINATED means stopped, not deleted.
- Host keys: with metadata `enable-guest-attributes=TRUE` the guest agent publishes them as guest attributes
  `hostkeys/<type>` (https://cloud.google.com/compute/docs/instances/connecting-advanced#guest-attributes).
- Blackwell (B200, sm_100) needs a DLVM family built on CUDA >= 12.8 (providers/gpu_support.py).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ftplan.providers.base import Instance, InstanceRequest, InstanceState, Provider, SSHEndpoint
from ftplan.providers.errors import (
    AuthError,
    CapacityError,
    InstanceGone,
    OfferUnavailable,
    ProviderError,
    QuotaError,
    import_sdk,
    scrub,
)
from ftplan.providers.gcp_cluster import PLACEMENT_LABEL, GCPCluster
from ftplan.providers.gcp_errors import CAPACITY_CODES, NO_ADC, QUOTA_CODES, by_text, quota_advice
from ftplan.providers.gcp_errors import mapped as _mapped_error
from ftplan.providers.gcp_side import GCPSideResources
from ftplan.providers.gpu_support import needs_cuda_12_8, refuse_non_cuda
from ftplan.providers.host_keys import openssh_key
from ftplan.providers.net import public_ip, ssh_cidr_for, validate_cidr

log = logging.getLogger("ftplan.providers.gcp")

RUN_LABEL = "ftplan-run-id"
STORE_LABEL = "ftplan-store-id"  # the run store that owns it: `ftplan gc` touches only its own
DLVM_PROJECT = "deeplearning-platform-release"
# Deep Learning VM families with CUDA 12 on Ubuntu 22.04; those named `-nvidia-<ver>` ship the driver installed
# (the others install it at first boot because of the `install-nvidia-driver` metadata). Names change over time,
# so the newest matching image is resolved at create time.
DLVM_FAMILY_PATTERN = r"common-cu12\d+-ubuntu-2204.*"
SSH_USER = "ftplan"

# GPUs attached to n1 hosts -> accelerator type.
ATTACHABLE_GPUS = {"T4": "nvidia-tesla-t4", "V100": "nvidia-tesla-v100", "P100": "nvidia-tesla-p100",
                   "P4": "nvidia-tesla-p4"}
# Machine families whose GPUs come with the machine type -> GPU name (catalog spelling).
BUILT_IN_GPUS = {"a2-highgpu": "A100", "a2-megagpu": "A100", "a2-ultragpu": "A100-80GB", "a3-highgpu": "H100",
                 "a3-edgegpu": "H100", "a3-megagpu": "H100-MEGA", "a3-ultragpu": "H200", "a4-highgpu": "B200",
                 "g2-standard": "L4"}
RESERVATION_ONLY = {"a4-highgpu-8g", "a3-ultragpu-8g", "a3-ultragpu-8g-nolssd", "a3-highgpu-1g", "a3-highgpu-2g",
                    "a3-highgpu-4g"}
HYPERDISK_ONLY_FAMILIES = ("a3-ultragpu", "a4-highgpu", "a4x-highgpu", "a4x-maxgpu")
_STATES = {"PROVISIONING": InstanceState.PENDING, "STAGING": InstanceState.PENDING, "REPAIRING": InstanceState.PENDING,
           "PENDING": InstanceState.PENDING,  # flex-start: queued for capacity
           "RUNNING": InstanceState.RUNNING, "STOPPING": InstanceState.STOPPING, "SUSPENDING": InstanceState.STOPPING,
           "PENDING_STOP": InstanceState.STOPPING, "DEPROVISIONING": InstanceState.TERMINATING,
           "STOPPED": InstanceState.STOPPED,
           "SUSPENDED": InstanceState.STOPPED, "TERMINATED": InstanceState.STOPPED}  # GCP TERMINATED = stopped
_PUBKEY = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,3}( [^\n]*)?\Z")
_READ_TIMEOUT_S = 60.0


class GCPProvider(GCPCluster, GCPSideResources, Provider):
    """Compute Engine in one project; zones come from the request (catalog offer) or `zone`."""

    name = "gcp"

    def __init__(
        self,
        project: str | None = None,
        zone: str | None = None,
        api_endpoint: str | None = None,
        credentials: Any = None,
        ssh_cidr: str | None = None,
        public_ip_lookup: Callable[[], str] | None = None,
        op_timeout_s: float = 600.0,
        poll_interval_s: float = 5.0,
        read_retries: int = 4,
        image: str | None = None,
    ):
        self.project = project
        self.zone = zone
        self.api_endpoint = api_endpoint
        self._credentials = credentials
        self.ssh_cidr = validate_cidr(ssh_cidr) if ssh_cidr else None
        self.public_ip_lookup = public_ip_lookup or public_ip
        self.op_timeout_s = op_timeout_s
        self.poll_interval_s = poll_interval_s
        self.read_retries = read_retries
        self.image = image  # [providers.gcp] image = an image link or DLVM family; default: the newest DLVM
        self._c: dict[str, Any] | None = None

    # ---- the five calls -------------------------------------------------------------------------------

    def create(self, request: InstanceRequest) -> Instance:
        c = self._clients()
        cv = c["compute_v1"]
        placement = request.placement  # a node of a multi-node run (create_placement)
        zone = request.zone or (placement or {}).get("zone") or self.zone
        if not zone:
            raise ProviderError("GCP needs a zone: the offer has none and GCPProvider(zone=...) is unset",
                                provider=self.name)
        refuse_non_cuda(request.gpu, self.name)
        if not request.spot and request.instance_type in RESERVATION_ONLY:
            raise OfferUnavailable(
                f"Google sells {request.instance_type} only through reservations, Spot or Flex-start, not on demand "
                "(cloud.google.com/compute/docs/gpus); skipping this offer - use --spot for it", provider=self.name)
        accelerators = self._accelerators(request, zone)
        public_key = _validated_public_key(request.ssh_public_key)
        label = label_value(request.run_id)
        name = f"ftplan-{label[:40].strip('-_').replace('_', '-')}-{secrets.token_hex(3)}"
        firewall = f"{name}-ssh"
        side: dict[str, Any] = {"project": self.project, "firewall": None, "instance_sent": False}
        if placement and zone.rsplit("-", 1)[0] != placement["region"]:
            raise ProviderError(f"zone {zone} is not in the placement policy's region {placement['region']}",
                                provider=self.name)
        nodes_firewall = None
        try:
            cidr = self._ssh_cidr(request)
            image = self._image(request.image or self.image, blackwell=needs_cuda_12_8(request.gpu))
            rule = cv.Firewall(
                name=firewall, network="global/networks/default", direction="INGRESS", priority=1000,
                source_ranges=[cidr], target_tags=[name], allowed=[cv.Allowed(I_p_protocol="tcp", ports=["22"])],
                description=f"ftplan run {request.run_id}: ssh from {cidr}",
            )
            op = c["firewalls"].insert(project=self.project, firewall_resource=rule, timeout=_READ_TIMEOUT_S)
            side["firewall"] = firewall
            self._wait_op(op.name, zone=None)
            if placement:  # stays when this create fails: the other nodes use it (delete_placement removes it)
                nodes_firewall = self._nodes_firewall(placement, request.run_id)

            scheduling = cv.Scheduling(
                on_host_maintenance="TERMINATE", automatic_restart=False, instance_termination_action="DELETE",
                max_run_duration=cv.Duration(seconds=int(request.max_lifetime_s)),
            )
            if request.spot:
                scheduling.provisioning_model = "SPOT"
            body = cv.Instance(
                name=name,
                machine_type=f"zones/{zone}/machineTypes/{request.instance_type}",
                guest_accelerators=accelerators,
                scheduling=scheduling,
                disks=[cv.AttachedDisk(boot=True, auto_delete=True, initialize_params=cv.AttachedDiskInitializeParams(
                    source_image=image, disk_size_gb=int(request.disk_gib),
                    disk_type=f"zones/{zone}/diskTypes/{boot_disk_type(request.instance_type)}"))],
                network_interfaces=[cv.NetworkInterface(network="global/networks/default", access_configs=[
                    cv.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")])],
                metadata=cv.Metadata(items=[
                    cv.Items(key="ssh-keys", value=f"{SSH_USER}:{public_key}"),
                    cv.Items(key="install-nvidia-driver", value="True"),
                    cv.Items(key="enable-oslogin", value="FALSE"),  # OS Login would ignore ssh-keys
                    cv.Items(key="enable-guest-attributes", value="TRUE"),  # host keys under hostkeys/
                    cv.Items(key=RUN_LABEL, value=request.run_id),
                    cv.Items(key="ftplan-firewall", value=firewall),
                    *([cv.Items(key="ftplan-nodes-firewall", value=nodes_firewall)] if nodes_firewall else []),
                ]),
                labels={RUN_LABEL: label, **({STORE_LABEL: label_value(request.store_id)} if request.store_id else {}),
                        **({PLACEMENT_LABEL: placement["name"]} if placement else {})},
                tags=cv.Tags(items=[name, *([placement["name"]] if placement else [])]),
                resource_policies=[placement["link"]] if placement else [],
            )
            side["instance_sent"] = True
            op = c["instances"].insert(project=self.project, zone=zone, instance_resource=body, timeout=_READ_TIMEOUT_S)
            self._wait_op(op.name, zone=zone)
        except BaseException as exc:
            self._undo_create(zone, name, side)
            raise self._mapped(exc, f"creating {request.instance_type} in {zone}") from None
        instance = Instance(
            provider=self.name, id=name, run_id=request.run_id, region=request.region or zone.rsplit("-", 1)[0],
            zone=zone, instance_type=request.instance_type, spot=request.spot,
            extra={"project": self.project, "firewall": firewall, "ssh_cidr": cidr, "image": image,
                   **({"placement": placement["name"], "nodes_firewall": nodes_firewall} if placement else {})},
        )
        log.info("created %s (%s) in %s for run %s", name, request.instance_type, zone, scrub(request.run_id))
        return instance

    def wait_ready(self, instance: Instance, timeout_s: float) -> SSHEndpoint:
        deadline = time.monotonic() + timeout_s
        seen_running = instance.state is InstanceState.RUNNING  # from an earlier describe/wait
        while True:
            raw = self._get(instance)
            if raw is None:
                instance.state = InstanceState.TERMINATED
                if not seen_running:  # GCP sometimes accepts the insert and drops the VM when the zone runs dry
                    raise CapacityError(f"instance {instance.id} vanished before it started; the zone is probably "
                                        "out of capacity", provider=self.name)
                raise InstanceGone(f"instance {instance.id} no longer exists", provider=self.name)
            self._apply(instance, raw)
            seen_running |= instance.state is InstanceState.RUNNING
            if instance.state is InstanceState.RUNNING and instance.public_ip:
                instance.ssh = SSHEndpoint(host=instance.public_ip, port=22, user=SSH_USER)
                return instance.ssh
            if instance.state in (InstanceState.STOPPED, InstanceState.STOPPING) or instance.state.is_gone:
                raise InstanceGone(f"instance {instance.id} is {_status_name(raw.status)} (preempted or stopped)",
                                   provider=self.name)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProviderError(f"instance {instance.id} is still {_status_name(raw.status)} after {timeout_s:.0f}s",
                                    provider=self.name)
            time.sleep(min(self.poll_interval_s, left))

    def describe(self, instance: Instance) -> Instance:
        raw = self._get(instance)
        if raw is None:
            instance.state = InstanceState.TERMINATED
            instance.ssh = None
        else:
            self._apply(instance, raw)
        return instance

    def terminate(self, instance: Instance) -> None:
        c = self._clients()
        project = instance.extra.get("project") or self.project
        try:
            op = c["instances"].delete(project=project, zone=instance.zone, instance=instance.id,
                                       timeout=_READ_TIMEOUT_S)
            self._wait_op(op.name, zone=instance.zone, project=project)
        except Exception as exc:
            mapped = self._mapped(exc, f"deleting {instance.id}")
            if not isinstance(mapped, InstanceGone):
                raise mapped from None
        raw = self._get(instance)  # read back: only the provider's word counts
        if raw is None:
            instance.state = InstanceState.TERMINATED
        elif _status_name(raw.status) in ("STOPPING", "PENDING_STOP", "DEPROVISIONING", "TERMINATED", "STOPPED"):
            instance.state = InstanceState.TERMINATING  # the delete operation is DONE: these are on the way out
        else:
            raise ProviderError(f"instance {instance.id} is still {_status_name(raw.status)} after delete; "
                                "check the Cloud console and run `ftplan gc`", provider=self.name)
        instance.ssh = None
        log.info("terminated %s (%s)", instance.id, instance.state.value)
        self._delete_firewall(project, instance.extra.get("firewall"))
        group = instance.extra.get("placement")
        if instance.extra.get("nodes_firewall") and group and not self._placement_busy(group, exclude=instance.id):
            self._delete_firewall(project, instance.extra["nodes_firewall"])  # the last node of its run

    def list_instances(self, run_id: str | None = None) -> list[Instance]:
        c = self._clients()
        flt = f'labels.{RUN_LABEL} = "{label_value(run_id)}"' if run_id else f"labels.{RUN_LABEL}:*"
        req = c["compute_v1"].AggregatedListInstancesRequest(project=self.project, filter=flt)
        found: list[Instance] = []
        try:
            for scope, scoped in c["instances"].aggregated_list(request=req, retry=None, timeout=_READ_TIMEOUT_S):
                for raw in scoped.instances:
                    meta = {item.key: item.value for item in raw.metadata.items}
                    zone = raw.zone.rsplit("/", 1)[-1] or scope.rsplit("/", 1)[-1]
                    inst = Instance(
                        provider=self.name, id=raw.name, run_id=meta.get(RUN_LABEL) or raw.labels.get(RUN_LABEL, ""),
                        region=zone.rsplit("-", 1)[0], zone=zone, instance_type=raw.machine_type.rsplit("/", 1)[-1],
                        spot=raw.scheduling.provisioning_model == "SPOT",
                        extra={"project": self.project, "firewall": meta.get("ftplan-firewall"),
                               **({"placement": raw.labels[PLACEMENT_LABEL],
                                   "nodes_firewall": meta.get("ftplan-nodes-firewall")}
                                  if PLACEMENT_LABEL in raw.labels else {})},
                        store_id=raw.labels.get(STORE_LABEL, ""),
                    )
                    self._apply(inst, raw)
                    found.append(inst)
        except Exception as exc:
            raise self._mapped(exc, "listing instances") from None
        return found

    # ---- helpers --------------------------------------------------------------------------------------

    def _clients(self) -> dict[str, Any]:
        if self._c is not None:
            return self._c
        client_options = import_sdk("google.api_core.client_options", "GCP", "gcp", "google-cloud-compute")
        compute_v1 = import_sdk("google.cloud.compute_v1", "GCP", "gcp", "google-cloud-compute")
        if self._credentials is None:
            import google.auth
            from google.auth.exceptions import DefaultCredentialsError

            try:
                self._credentials, adc_project = google.auth.default(
                    scopes=["https://www.googleapis.com/auth/cloud-platform"])
            except DefaultCredentialsError:
                raise AuthError(NO_ADC, provider=self.name) from None
            self.project = self.project or adc_project
        if not self.project:
            raise ProviderError("GCP project not set: pass project=... or set GOOGLE_CLOUD_PROJECT", provider=self.name)
        opts = client_options.ClientOptions(api_endpoint=self.api_endpoint) if self.api_endpoint else None
        kw = {"credentials": self._credentials, "client_options": opts}
        self._c = {
            "compute_v1": compute_v1,
            "instances": compute_v1.InstancesClient(**kw),
            "zone_ops": compute_v1.ZoneOperationsClient(**kw),
            "global_ops": compute_v1.GlobalOperationsClient(**kw),
            "firewalls": compute_v1.FirewallsClient(**kw),
            "resource_policies": compute_v1.ResourcePoliciesClient(**kw),
            "region_ops": compute_v1.RegionOperationsClient(**kw),
            "images": compute_v1.ImagesClient(**kw),
        }
        return self._c

    def _accelerators(self, request: InstanceRequest, zone: str) -> list[Any]:
        cv = self._clients()["compute_v1"]
        family = "-".join(request.instance_type.split("-")[:2])
        if family in BUILT_IN_GPUS:
            if request.gpu and request.gpu != BUILT_IN_GPUS[family]:
                raise ProviderError(f"{request.instance_type} carries {BUILT_IN_GPUS[family]} GPUs, not {request.gpu}",
                                    provider=self.name)
            return []
        if request.instance_type.startswith("n1-") and request.gpu in ATTACHABLE_GPUS:
            return [cv.AcceleratorConfig(
                accelerator_type=f"zones/{zone}/acceleratorTypes/{ATTACHABLE_GPUS[request.gpu]}",
                accelerator_count=int(request.gpu_count))]
        raise ProviderError(
            f"cannot put {request.gpu} GPUs on GCP machine type {request.instance_type}: use an a2/a3/g2 type, "
            f"or n1 with one of {', '.join(ATTACHABLE_GPUS)}", provider=self.name,
        )

    def _ssh_cidr(self, request: InstanceRequest) -> str:
        if request.ssh_cidr:
            return validate_cidr(request.ssh_cidr)
        return self.ssh_cidr or ssh_cidr_for(self.public_ip_lookup())

    def _image(self, image: str | None, blackwell: bool = False) -> str:
        """An explicit image (link or family in the DLVM project), else the newest matching DLVM family;
        for Blackwell GPUs only families built on CUDA >= 12.8 (older ones have no sm_100 kernels)."""
        c = self._clients()
        if image and "/" in image:
            return image
        if image:
            return c["images"].get_from_family(project=DLVM_PROJECT, family=image, retry=None,
                                               timeout=_READ_TIMEOUT_S).self_link
        req = c["compute_v1"].ListImagesRequest(project=DLVM_PROJECT, filter=f'family eq "{DLVM_FAMILY_PATTERN}"')
        images = [i for i in c["images"].list(request=req, retry=None, timeout=_READ_TIMEOUT_S)
                  if not (i.deprecated and i.deprecated.state)]
        if blackwell:
            images = [i for i in images if _cuda_of_family(i.family) >= 128]
            if not images:
                raise OfferUnavailable(
                    f"no Deep Learning VM image with CUDA >= 12.8 (needed for Blackwell, sm_100) in {DLVM_PROJECT}; "
                    "skipping this offer - set image = \"...\" under [providers.gcp] to launch it", provider=self.name)
        if not images:
            raise ProviderError(f"no Deep Learning VM image family matching {DLVM_FAMILY_PATTERN} in {DLVM_PROJECT}; "
                                "pass an explicit image", provider=self.name)
        best = max(images, key=lambda i: ("-nvidia-" in i.family, i.creation_timestamp))
        return best.self_link

    def _wait_op(self, op_name: str, zone: str | None, project: str | None = None, region: str | None = None) -> None:
        """Wait for a zone, region or global operation; raise the mapped error it ended with."""
        c = self._clients()
        cv = c["compute_v1"]
        project = project or self.project
        deadline = time.monotonic() + self.op_timeout_s
        while True:
            if zone:
                op = c["zone_ops"].wait(project=project, zone=zone, operation=op_name, retry=None, timeout=150)
            elif region:
                op = c["region_ops"].wait(project=project, region=region, operation=op_name, retry=None, timeout=150)
            else:
                op = c["global_ops"].wait(project=project, operation=op_name, retry=None, timeout=150)
            if op.status == cv.Operation.Status.DONE:
                break
            if time.monotonic() > deadline:
                raise ProviderError(f"operation {op_name} not done after {self.op_timeout_s:.0f}s", provider=self.name)
        if op.error and op.error.errors:
            first = op.error.errors[0]
            text = f"GCP {first.code}: {first.message}"
            if first.code in CAPACITY_CODES:
                raise CapacityError(text, provider=self.name)
            if first.code in QUOTA_CODES:
                raise QuotaError(quota_advice(text), provider=self.name)
            raise by_text(text, self.name)

    def _get(self, instance: Instance) -> Any | None:
        c = self._clients()
        for attempt in range(self.read_retries + 1):
            try:
                return c["instances"].get(project=instance.extra.get("project") or self.project, zone=instance.zone,
                                          instance=instance.id, retry=None, timeout=_READ_TIMEOUT_S)
            except Exception as exc:
                mapped = self._mapped(exc, f"reading {instance.id}")
                if isinstance(mapped, InstanceGone):
                    return None
                if attempt < self.read_retries and getattr(exc, "code", None) in (429, 500, 502, 503, 504):
                    time.sleep(min(self.poll_interval_s * 2 ** attempt, 30.0))  # bounded backoff
                    continue
                raise mapped from None
        return None  # pragma: no cover - the loop always returns or raises

    # ---- host keys and the ssh rule (issue 22) --------------------------------------------------------

    def published_host_keys(self, instance: Instance) -> list[str] | None:
        """The guest agent's `hostkeys/` guest attributes; None until it has written them."""
        c = self._clients()
        req = c["compute_v1"].GetGuestAttributesInstanceRequest(
            project=instance.extra.get("project") or self.project, zone=instance.zone, instance=instance.id,
            query_path="hostkeys/")
        try:
            attrs = c["instances"].get_guest_attributes(request=req, retry=None, timeout=_READ_TIMEOUT_S)
        except Exception as exc:
            mapped = self._mapped(exc, f"reading the host keys of {instance.id}")
            if isinstance(mapped, InstanceGone):
                return None  # 404: nothing published (yet)
            raise mapped from None
        keys = []
        for entry in attrs.query_value.items:
            # The agent writes "keytype base64" under key <keytype>; accept a bare base64 value too.
            key = openssh_key(f"{entry.key} {entry.value}") if entry.namespace == "hostkeys" else None
            if key and key not in keys:
                keys.append(key)
        return keys or None

    def allow_ssh_from(self, instance: Instance, cidr: str) -> None:
        """Point the run's firewall rule at `cidr` (PATCH replaces source_ranges in one step)."""
        cidr = validate_cidr(cidr)
        firewall = instance.extra.get("firewall")
        if not firewall:
            raise ProviderError(f"instance {instance.id} has no ftplan firewall rule to update", provider=self.name)
        project = instance.extra.get("project") or self.project
        c = self._clients()
        try:
            op = c["firewalls"].patch(project=project, firewall=firewall,
                                      firewall_resource=c["compute_v1"].Firewall(source_ranges=[cidr]),
                                      timeout=_READ_TIMEOUT_S)
            self._wait_op(op.name, zone=None, project=project)
        except Exception as exc:
            raise self._mapped(exc, f"updating firewall rule {firewall}") from None
        instance.extra["ssh_cidr"] = cidr
        log.info("ssh to %s now allowed from %s", instance.id, cidr)

    @staticmethod
    def _apply(instance: Instance, raw: Any) -> None:
        instance.state = _STATES.get(_status_name(raw.status), InstanceState.UNKNOWN)
        nat = None
        for nic in raw.network_interfaces:
            for ac in nic.access_configs:
                nat = nat or ac.nat_i_p or None
        instance.public_ip = nat
        if nat is None:
            instance.ssh = None
        if raw.network_interfaces:
            instance.private_ip = raw.network_interfaces[0].network_i_p or instance.private_ip
        if raw.creation_timestamp:  # RFC 3339 with offset, e.g. "2026-01-01T09:30:00.123-07:00"
            try:
                instance.launched_at = datetime.fromisoformat(raw.creation_timestamp).timestamp()
            except ValueError:
                pass
        # GCP forgets a deleted VM: there is no end time to read, `ended_at` stays None.

    def _undo_create(self, zone: str, name: str, side: dict[str, Any]) -> None:
        """Best effort after a failed create: the VM (if the insert got through) and the firewall rule."""
        if side.get("instance_sent"):
            try:
                probe = Instance(provider=self.name, id=name, run_id="", region="", zone=zone,
                                 extra={"project": self.project})
                if self._get(probe) is not None:
                    op = self._clients()["instances"].delete(project=self.project, zone=zone, instance=name,
                                                             timeout=_READ_TIMEOUT_S)
                    self._wait_op(op.name, zone=zone)
            except Exception as exc:
                log.warning("instance %s may be left behind after a failed create (`ftplan gc` finds it): %s",
                            name, scrub(exc))
        self._delete_firewall(self.project, side.get("firewall"))

    def _delete_firewall(self, project: str | None, firewall: str | None) -> None:
        if not firewall:
            return
        try:
            op = self._clients()["firewalls"].delete(project=project, firewall=firewall, timeout=_READ_TIMEOUT_S)
            self._wait_op(op.name, zone=None, project=project)
        except Exception as exc:
            if not isinstance(self._mapped(exc, "deleting firewall"), InstanceGone):
                log.warning("firewall rule %s left behind: %s", firewall, scrub(exc))

    def _mapped(self, exc: BaseException, doing: str) -> BaseException:
        """SDK exception -> ftplan.providers.errors class (message scrubbed); anything else passes through."""
        return _mapped_error(exc, doing, credentials=self._credentials, project=self.project)

def label_value(run_id: str) -> str:
    """GCP label values allow lowercase letters, digits, '_' and '-', at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", run_id.lower())[:63]


def boot_disk_type(machine_type: str) -> str:
    """Hyperdisk for the families that take no Persistent Disk (A3 Ultra, A4, A4X); pd-balanced elsewhere."""
    return "hyperdisk-balanced" if machine_type.startswith(HYPERDISK_ONLY_FAMILIES) else "pd-balanced"


def _cuda_of_family(family: str) -> int:
    m = re.match(r"common-cu(\d+)", family or "")
    return int(m.group(1)) if m else 0


def _status_name(status: Any) -> str:
    if isinstance(status, str):
        return status
    from google.cloud import compute_v1

    return compute_v1.Instance.Status(status).name


def _validated_public_key(key: str) -> str:
    key = key.strip()
    if not _PUBKEY.match(key):
        raise ProviderError("the SSH public key is not in OpenSSH format ('ssh-ed25519 AAAA...')", provider="gcp")
    return key
