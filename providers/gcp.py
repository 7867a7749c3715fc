"""GCP Compute Engine adapter (google-cloud-compute, Application Default Credentials).

Per create: a firewall rule `ftplan-<run>-<suffix>-ssh` (tcp/22 from the caller's /32 to the instance's network
tag) and the instance: Deep Learning VM image, `ssh-keys` metadata, label `ftplan-run-id`,
`on_host_maintenance=TERMINATE` (GPU VMs cannot live-migrate), SPOT when asked, and `max_run_duration` with
termination action DELETE, so Google itself deletes the VM at the deadline even if the launcher is gone.

Machine types: a2/a3/a4/g2 carry their GPUs; T4/V100/P100/P4 are attached to n1 hosts as `guest_accelerators`.
The request's `instance_type` (from the catalog) is always the host machine type.

Operations are polled with our own `ZoneOperationsClient` built with the same client options: the SDK's
`op.result()` polls compute.googleapis.com whatever endpoint the client was given.
Reads pass `retry=None`, because the SDK's default retry keeps a 503 going for 10 minutes.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from ftplan.providers.base import Instance, InstanceRequest, InstanceState, Provider, SSHEndpoint
from ftplan.providers.errors import (
    AuthError,
    CapacityError,
    InstanceGone,
    ProviderError,
    QuotaError,
    import_sdk,
    register_secret,
    scrub,
)
from ftplan.providers.net import public_ip, ssh_cidr_for, validate_cidr

log = logging.getLogger("ftplan.providers.gcp")

RUN_LABEL = "ftplan-run-id"
DLVM_PROJECT = "deeplearning-platform-release"
# Deep Learning VM families with CUDA 12 on Ubuntu 22.04; those named `-nvidia-<ver>` ship the driver installed
# (the others install it at first boot because of the `install-nvidia-driver` metadata). Names change over time,
# so the newest matching image is resolved at create time.
DLVM_FAMILY_PATTERN = r"common-cu12\d+-ubuntu-2204.*"
SSH_USER = "ftplan"
NO_ADC = "GCP credentials not found: run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"

# GPUs attached to n1 hosts -> accelerator type.
ATTACHABLE_GPUS = {"T4": "nvidia-tesla-t4", "V100": "nvidia-tesla-v100", "P100": "nvidia-tesla-p100",
                   "P4": "nvidia-tesla-p4"}
# Machine families whose GPUs come with the machine type -> GPU name (catalog spelling).
BUILT_IN_GPUS = {"a2-highgpu": "A100", "a2-megagpu": "A100", "a2-ultragpu": "A100-80GB", "a3-highgpu": "H100",
                 "a3-edgegpu": "H100", "a3-megagpu": "H100-MEGA", "a3-ultragpu": "H200", "a4-highgpu": "B200",
                 "g2-standard": "L4"}
CAPACITY_CODES = {"ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
                  "RESOURCE_POOL_EXHAUSTED", "STOCKOUT"}
QUOTA_CODES = {"QUOTA_EXCEEDED", "QUOTA_LIMIT"}
_STATES = {"PROVISIONING": InstanceState.PENDING, "STAGING": InstanceState.PENDING, "REPAIRING": InstanceState.PENDING,
           "RUNNING": InstanceState.RUNNING, "STOPPING": InstanceState.STOPPING, "SUSPENDING": InstanceState.STOPPING,
           "SUSPENDED": InstanceState.STOPPED, "TERMINATED": InstanceState.STOPPED}  # GCP TERMINATED = stopped
_PUBKEY = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,3}( .*)?$")
_READ_TIMEOUT_S = 60.0


class GCPProvider(Provider):
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
    ):
        self.project = project
        self.zone = zone
        self.api_endpoint = api_endpoint
        self._credentials = credentials
        self.ssh_cidr = validate_cidr(ssh_cidr) if ssh_cidr else None
        self.public_ip_lookup = public_ip_lookup or public_ip
        self.op_timeout_s = op_timeout_s
        self.poll_interval_s = poll_interval_s
        self._c: dict[str, Any] | None = None

    # ---- the five calls -------------------------------------------------------------------------------

    def create(self, request: InstanceRequest) -> Instance:
        c = self._clients()
        cv = c["compute_v1"]
        zone = request.zone or self.zone
        if not zone:
            raise ProviderError("GCP needs a zone: the offer has none and GCPProvider(zone=...) is unset",
                                provider=self.name)
        accelerators = self._accelerators(request, zone)
        public_key = _validated_public_key(request.ssh_public_key)
        label = label_value(request.run_id)
        name = f"ftplan-{label[:40].strip('-_').replace('_', '-')}-{secrets.token_hex(3)}"
        firewall = f"{name}-ssh"
        side: dict[str, Any] = {"project": self.project, "firewall": None, "instance_sent": False}
        try:
            cidr = self._ssh_cidr(request)
            image = self._image(request.image)
            rule = cv.Firewall(
                name=firewall, network="global/networks/default", direction="INGRESS", priority=1000,
                source_ranges=[cidr], target_tags=[name], allowed=[cv.Allowed(I_p_protocol="tcp", ports=["22"])],
                description=f"ftplan run {request.run_id}: ssh from {cidr}",
            )
            op = c["firewalls"].insert(project=self.project, firewall_resource=rule, timeout=_READ_TIMEOUT_S)
            side["firewall"] = firewall
            self._wait_op(op.name, zone=None)

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
                    source_image=image, disk_size_gb=int(request.disk_gib), disk_type=f"zones/{zone}/diskTypes/pd-balanced"))],
                network_interfaces=[cv.NetworkInterface(network="global/networks/default", access_configs=[
                    cv.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")])],
                metadata=cv.Metadata(items=[
                    cv.Items(key="ssh-keys", value=f"{SSH_USER}:{public_key}"),
                    cv.Items(key="install-nvidia-driver", value="True"),
                    cv.Items(key="enable-oslogin", value="FALSE"),  # OS Login would ignore ssh-keys
                    cv.Items(key=RUN_LABEL, value=request.run_id),
                    cv.Items(key="ftplan-firewall", value=firewall),
                ]),
                labels={RUN_LABEL: label},
                tags=cv.Tags(items=[name]),
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
            extra={"project": self.project, "firewall": firewall, "ssh_cidr": cidr, "image": image},
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
            if instance.state in (InstanceState.STOPPED, InstanceState.STOPPING):
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
        elif _status_name(raw.status) in ("STOPPING", "TERMINATED"):
            instance.state = InstanceState.TERMINATING
        else:
            raise ProviderError(f"instance {instance.id} is still {_status_name(raw.status)} after delete; "
                                "check the Cloud console and run `ftplan gc`", provider=self.name)
        instance.ssh = None
        log.info("terminated %s (%s)", instance.id, instance.state.value)
        self._delete_firewall(project, instance.extra.get("firewall"))

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
                        extra={"project": self.project, "firewall": meta.get("ftplan-firewall")},
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

    def _image(self, image: str | None) -> str:
        """An explicit image (link or family in the DLVM project), else the newest matching DLVM family."""
        c = self._clients()
        if image and "/" in image:
            return image
        if image:
            return c["images"].get_from_family(project=DLVM_PROJECT, family=image, retry=None,
                                               timeout=_READ_TIMEOUT_S).self_link
        req = c["compute_v1"].ListImagesRequest(project=DLVM_PROJECT, filter=f'family eq "{DLVM_FAMILY_PATTERN}"')
        images = [i for i in c["images"].list(request=req, retry=None, timeout=_READ_TIMEOUT_S)
                  if not (i.deprecated and i.deprecated.state)]
        if not images:
            raise ProviderError(f"no Deep Learning VM image family matching {DLVM_FAMILY_PATTERN} in {DLVM_PROJECT}; "
                                "pass an explicit image", provider=self.name)
        best = max(images, key=lambda i: ("-nvidia-" in i.family, i.creation_timestamp))
        return best.self_link

    def _wait_op(self, op_name: str, zone: str | None, project: str | None = None) -> None:
        """Wait for a zone (or global) operation; raise the mapped error it ended with."""
        c = self._clients()
        cv = c["compute_v1"]
        project = project or self.project
        deadline = time.monotonic() + self.op_timeout_s
        while True:
            if zone:
                op = c["zone_ops"].wait(project=project, zone=zone, operation=op_name, retry=None, timeout=150)
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
                raise QuotaError(f"{text}; request more quota under IAM & Admin > Quotas", provider=self.name)
            raise ProviderError(text, provider=self.name)

    def _get(self, instance: Instance) -> Any | None:
        c = self._clients()
        try:
            return c["instances"].get(project=instance.extra.get("project") or self.project, zone=instance.zone,
                                      instance=instance.id, retry=None, timeout=_READ_TIMEOUT_S)
        except Exception as exc:
            mapped = self._mapped(exc, f"reading {instance.id}")
            if isinstance(mapped, InstanceGone):
                return None
            raise mapped from None

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
        if isinstance(exc, ProviderError) or not isinstance(exc, Exception):
            return exc
        token = getattr(self._credentials, "token", None)
        if isinstance(token, str):
            register_secret(token)  # an access token must never reach a log line or message
        try:
            from google.api_core import exceptions as gx
            from google.auth import exceptions as ax
        except ImportError:  # pragma: no cover
            return exc
        if isinstance(exc, ax.DefaultCredentialsError):
            return AuthError(NO_ADC, provider=self.name)
        if isinstance(exc, ax.RefreshError):
            return AuthError(f"GCP rejected the credentials while {doing} ({exc}); run "
                             "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS",
                             provider=self.name)
        if isinstance(exc, ax.GoogleAuthError):
            return AuthError(f"GCP authentication failed while {doing} ({exc}); run "
                             "`gcloud auth application-default login`", provider=self.name)
        if isinstance(exc, gx.GoogleAPICallError):
            text = f"GCP {exc.code} while {doing}: {exc.message}"
            reasons = {getattr(e, "get", lambda k, d=None: d)("reason", "") for e in (exc.errors or [])}
            if isinstance(exc, gx.NotFound):
                return InstanceGone(text, provider=self.name)
            if isinstance(exc, gx.Unauthorized):
                return AuthError(f"{text}; run `gcloud auth application-default login` or set "
                                 "GOOGLE_APPLICATION_CREDENTIALS", provider=self.name)
            if isinstance(exc, gx.Forbidden):
                if "quota" in str(exc.message).lower() or reasons & {"quotaExceeded", "rateLimitExceeded"}:
                    return QuotaError(f"{text}; request more quota under IAM & Admin > Quotas", provider=self.name)
                return AuthError(f"{text}; grant the identity roles/compute.instanceAdmin.v1 and enable the Compute "
                                 "Engine API", provider=self.name)
            if any(code in str(exc.message) for code in CAPACITY_CODES) or "enough resources" in str(exc.message):
                return CapacityError(text, provider=self.name)
            return ProviderError(text, provider=self.name)
        try:
            import requests
        except ImportError:  # pragma: no cover
            requests = None
        if requests is not None and isinstance(exc, requests.RequestException):
            return ProviderError(f"GCP request failed while {doing}: {type(exc).__name__}", provider=self.name)
        return exc

    # ---- side resources of an interrupted create (`ftplan gc`) ----------------------------------------

    def list_side_resources(self) -> list[dict[str, Any]]:
        """Firewall rules `ftplan-...-ssh` made by `create`. The rule is inserted before the VM, so a launcher
        killed in between leaves it with no instance whose `terminate` would delete it. Firewall rules take no
        labels: the run id is read from the description `create` writes ("ftplan run <id>: ssh from ...")."""
        c = self._clients()
        req = c["compute_v1"].ListFirewallsRequest(project=self.project, filter='name eq "ftplan-.*-ssh"')
        try:
            rules = list(c["firewalls"].list(request=req, retry=None, timeout=_READ_TIMEOUT_S))
        except Exception as exc:
            raise self._mapped(exc, "listing firewall rules") from None
        found: list[dict[str, Any]] = []
        for rule in rules:
            m = re.match(r"ftplan run (\S+): ssh from ", rule.description or "")
            if rule.name.startswith("ftplan-") and m:  # a rule someone else named ftplan-* is not ours
                found.append({"provider": self.name, "kind": "firewall", "id": rule.name, "name": rule.name,
                              "run_id": m.group(1), "project": self.project})
        return found

    def delete_side_resource(self, res: dict[str, Any]) -> None:
        if res.get("kind") != "firewall":
            raise ProviderError(f"unknown GCP side resource {res.get('kind')} {res.get('name')}", provider=self.name)
        project = res.get("project") or self.project
        try:
            op = self._clients()["firewalls"].delete(project=project, firewall=res["name"], timeout=_READ_TIMEOUT_S)
            self._wait_op(op.name, zone=None, project=project)
        except Exception as exc:
            mapped = self._mapped(exc, f"deleting firewall rule {res['name']}")
            if not isinstance(mapped, InstanceGone):  # 404: already gone
                raise mapped from None


def label_value(run_id: str) -> str:
    """GCP label values allow lowercase letters, digits, '_' and '-', at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", run_id.lower())[:63]


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
