"""RunPod adapter over the `runpod` SDK (GraphQL), credential `RUNPOD_API_KEY`.

A pod runs the image with `22/tcp` exposed on a public IP; the image's start script writes env
`PUBLIC_KEY` into `authorized_keys` (RunPod's official images do; a custom image must too). The SSH
endpoint is the `runtime.ports` entry with `privatePort == 22` and `isIpPublic` (the RunPod SSH proxy
carries no SFTP, so a public IP is required). GraphQL has no tags: the pod is named `ftplan-<run>`
and carries env `FTPLAN_RUN_ID`, which `get_pods()` returns, for the sweeper.

Spot: the SDK has no interruptible call, so `podRentInterruptable` is sent through the SDK's own
transport (`runpod.api.graphql.run_graphql_query`) with `bidPerGpu` = the current minimum bid.
RunPod has no server-side maximum lifetime for pods: `max_lifetime_s` is enforced by the launcher.

SDK pitfalls handled here: `import runpod` is slow (~1.7 s) and pulls in a lot, so it is imported
lazily; it reads `RUNPOD_API_BASE_URL` on every call (set from `api_base_url` around each call and
restored); `terminate_pod`/`stop_pod` use only the module-global `runpod.api_key`; it pastes strings
into the query text unescaped, so `"` and `\\` are refused in anything passed to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
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

log = logging.getLogger(__name__)

CREDENTIAL_ENV = "RUNPOD_API_KEY"
CREDENTIAL_URL = "https://www.runpod.io/console/user/settings"
NAME_PREFIX = "ftplan-"
RUN_ENV = "FTPLAN_RUN_ID"
DEFAULT_IMAGE = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"

# Catalog GPU name (SkyPilot spelling, as in the RunPod catalog) -> RunPod gpuTypeId.
GPU_TYPE_IDS: dict[str, str] = {
    "A100-80GB": "NVIDIA A100 80GB PCIe",
    "A100-80GB-SXM": "NVIDIA A100-SXM4-80GB",
    "A40": "NVIDIA A40",
    "B200": "NVIDIA B200",
    "H100": "NVIDIA H100 PCIe",
    "H100-NVL": "NVIDIA H100 NVL",
    "H100-SXM": "NVIDIA H100 80GB HBM3",
    "H200-SXM": "NVIDIA H200",
    "L4": "NVIDIA L4",
    "L40": "NVIDIA L40",
    "L40S": "NVIDIA L40S",
    "MI300X": "AMD Instinct MI300X OAM",
    "RTX3090": "NVIDIA GeForce RTX 3090",
    "RTX4000-Ada": "NVIDIA RTX 4000 Ada Generation",
    "RTX4090": "NVIDIA GeForce RTX 4090",
    "RTX6000-Ada": "NVIDIA RTX 6000 Ada Generation",
    "RTXA4000": "NVIDIA RTX A4000",
    "RTXA4500": "NVIDIA RTX A4500",
    "RTXA5000": "NVIDIA RTX A5000",
    "RTXA6000": "NVIDIA RTX A6000",
}
GPU_NAMES = {v: k for k, v in GPU_TYPE_IDS.items()}

_UNSAFE = re.compile(r'["\\\n\r]')
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,55}$")
_SDK_LOCK = threading.RLock()  # RUNPOD_API_BASE_URL and runpod.api_key are process-global


def gpu_type_id(gpu: str) -> str:
    if gpu in GPU_TYPE_IDS:
        return GPU_TYPE_IDS[gpu]
    if gpu in GPU_NAMES:  # already a RunPod id
        return gpu
    raise ProviderError(f"RunPod has no GPU type for '{gpu}'; known: {', '.join(sorted(GPU_TYPE_IDS))}",
                        provider="runpod")


def safe_literal(value: str, what: str) -> str:
    """The SDK inlines values into GraphQL text: a quote or backslash would change the query."""
    if _UNSAFE.search(value):
        raise ProviderError(f"{what} must not contain quotes, backslashes or newlines", provider="runpod")
    return value


def import_runpod():
    """Lazy: a slow import (~1.7 s) of an optional extra. The adapter maps `runpod.error` classes."""
    import_sdk("runpod.error", "runpod", "runpod")
    return import_sdk("runpod", "runpod", "runpod")


class RunPodProvider(Provider):
    """Options: `api_base_url` (GraphQL base, for tests), `image`, `cloud_type` SECURE|COMMUNITY|ALL,
    `poll_s` (wait_ready poll interval)."""

    name = "runpod"

    def __init__(
        self,
        api_key: str | None = None,
        api_base_url: str | None = None,
        image: str = DEFAULT_IMAGE,
        cloud_type: str = "SECURE",
        *,
        poll_s: float = 5.0,
    ):
        if cloud_type not in ("SECURE", "COMMUNITY", "ALL"):
            raise ProviderError("cloud_type must be SECURE, COMMUNITY or ALL", provider="runpod")
        self._api_key = api_key
        self.api_base_url = api_base_url
        self.image = image
        self.cloud_type = cloud_type
        self.poll_s = poll_s

    # -- SDK plumbing ---------------------------------------------------------------------------
    def _key(self) -> str:
        key = self._api_key or os.environ.get(CREDENTIAL_ENV, "")
        if not key:
            raise AuthError(f"no RunPod API key: set {CREDENTIAL_ENV} ({CREDENTIAL_URL})", provider=self.name)
        register_secret(key)
        return key

    @contextlib.contextmanager
    def _sdk(self, what: str) -> Iterator[Any]:
        """The runpod module configured for this adapter; SDK errors come out as providers.errors."""
        key = self._key()
        runpod = import_runpod()
        import requests  # noqa: PLC0415 - the SDK's transport; present whenever runpod is

        with _SDK_LOCK:
            old_url, old_key = os.environ.get("RUNPOD_API_BASE_URL"), runpod.api_key
            if self.api_base_url:
                os.environ["RUNPOD_API_BASE_URL"] = self.api_base_url.rstrip("/")
            runpod.api_key = key
            try:
                yield runpod
            except runpod.error.AuthenticationError:
                raise AuthError(f"RunPod rejected the API key ({what}); set {CREDENTIAL_ENV} ({CREDENTIAL_URL})",
                                provider=self.name) from None
            except runpod.error.QueryError as exc:
                raise self._map_query_error(str(exc), what) from None
            except requests.RequestException as exc:
                raise ProviderError(f"runpod {what}: {type(exc).__name__}: {scrub(exc)}", provider=self.name) from None
            except ValueError as exc:  # the SDK's "No GPU found", or a non-JSON (5xx HTML) answer
                raise ProviderError(f"runpod {what}: {scrub(exc)}", provider=self.name) from None
            finally:
                runpod.api_key = old_key
                if old_url is None:
                    os.environ.pop("RUNPOD_API_BASE_URL", None)
                else:
                    os.environ["RUNPOD_API_BASE_URL"] = old_url

    def _map_query_error(self, message: str, what: str) -> ProviderError:
        text = message.lower()
        detail = f"runpod {what}: {message}"
        if "no longer any instances available" in text or "no instances available" in text:
            return CapacityError(detail, provider=self.name)
        if "not found" in text:
            return InstanceGone(detail, provider=self.name)
        # Balance/limit texts are not documented; these words cover what RunPod users report.
        if any(w in text for w in ("balance", "funds", "quota", "spend limit", "limit reached")):
            return QuotaError(detail, provider=self.name)
        return ProviderError(detail, provider=self.name)

    # -- create ---------------------------------------------------------------------------------
    def create(self, request: InstanceRequest) -> Instance:
        if not _RUN_ID.match(request.run_id or ""):
            raise ProviderError(f"run id {request.run_id!r} is not usable in a RunPod pod name", provider=self.name)
        gpu_id = gpu_type_id(request.gpu)
        name = NAME_PREFIX + request.run_id
        image = safe_literal(request.image or self.image, "the image name")
        env = {"PUBLIC_KEY": safe_literal(request.ssh_public_key.strip(), "the SSH public key"),
               RUN_ENV: request.run_id}
        zone = safe_literal(request.zone, "the data-centre id") if request.zone else None
        with self._sdk("create pod") as runpod:
            if request.spot:
                pod = self._rent_interruptable(runpod, request, gpu_id, name, image, env, zone)
            else:
                pod = runpod.create_pod(
                    name=name, image_name=image, gpu_type_id=gpu_id, cloud_type=self.cloud_type,
                    gpu_count=request.gpu_count, container_disk_in_gb=request.disk_gib, volume_in_gb=0,
                    ports="22/tcp", support_public_ip=True, start_ssh=True, data_center_id=zone, env=env,
                )
        if not pod or not pod.get("id"):
            raise ProviderError("runpod create returned no pod id", provider=self.name)
        log.info("runpod: created pod %s (%dx %s, %s) for run %s", pod["id"], request.gpu_count, gpu_id,
                 "spot" if request.spot else "on-demand", request.run_id)
        return Instance(provider=self.name, id=pod["id"], run_id=request.run_id, region=request.region,
                        zone=request.zone, instance_type=request.instance_type, spot=request.spot,
                        extra={"gpu_type_id": gpu_id, "gpu_count": request.gpu_count})

    def _rent_interruptable(self, runpod, request, gpu_id, name, image, env, zone) -> dict[str, Any]:
        from runpod.api.graphql import run_graphql_query  # noqa: PLC0415

        gpu = runpod.get_gpu(gpu_id, request.gpu_count)
        bid = (gpu.get("lowestPrice") or {}).get("minimumBidPrice") or gpu.get("secureSpotPrice")
        if not bid:
            raise CapacityError(f"runpod: no spot market for {gpu_id} now", provider=self.name)
        env_items = ", ".join(f'{{ key: "{k}", value: "{v}" }}' for k, v in env.items())
        fields = [
            f"bidPerGpu: {float(bid)}", f"cloudType: {self.cloud_type}", f"gpuCount: {int(request.gpu_count)}",
            f'gpuTypeId: "{gpu_id}"', f'name: "{name}"', f'imageName: "{image}"', "volumeInGb: 0",
            f"containerDiskInGb: {int(request.disk_gib)}", "minVcpuCount: 1", "minMemoryInGb: 1",
            'ports: "22/tcp"', "startSsh: true", "supportPublicIp: true", f"env: [{env_items}]",
        ]
        if zone:
            fields.append(f'dataCenterId: "{zone}"')
        query = ("mutation { podRentInterruptable(input: { " + ", ".join(fields)
                 + " }) { id imageName env machineId machine { podHostId } } }")
        return run_graphql_query(query)["data"]["podRentInterruptable"]

    # -- wait / describe ------------------------------------------------------------------------
    def _get(self, pod_id: str) -> dict[str, Any] | None:
        with self._sdk("get pod") as runpod:
            return runpod.get_pod(safe_literal(pod_id, "the pod id"))

    @staticmethod
    def _ssh_port(pod: dict[str, Any]) -> tuple[str, int] | None:
        for p in ((pod.get("runtime") or {}).get("ports")) or []:
            if p.get("privatePort") == 22 and p.get("isIpPublic") and p.get("ip"):
                return p["ip"], int(p["publicPort"])
        return None

    def _apply(self, instance: Instance, pod: dict[str, Any] | None) -> None:
        if pod is None:
            instance.state = InstanceState.TERMINATED
            return
        status = pod.get("desiredStatus")
        if status == "RUNNING":
            instance.state = InstanceState.RUNNING if pod.get("runtime") else InstanceState.PENDING
        elif status == "EXITED":  # an interruptible pod that RunPod reclaimed is stopped, not deleted
            instance.state = InstanceState.PREEMPTED if instance.spot else InstanceState.STOPPED
        elif status == "TERMINATED":
            instance.state = InstanceState.TERMINATED
        else:
            instance.state = InstanceState.PENDING if status in ("CREATED", "RESTARTING") else InstanceState.UNKNOWN
        found = self._ssh_port(pod)
        if found:
            instance.public_ip = found[0]

    def wait_ready(self, instance: Instance, timeout_s: float) -> SSHEndpoint:
        deadline = time.monotonic() + timeout_s
        while True:
            pod = self._get(instance.id)
            if pod is None:
                raise InstanceGone(f"runpod pod {instance.id} no longer exists", provider=self.name)
            self._apply(instance, pod)
            if instance.state.is_gone or instance.state == InstanceState.STOPPED:
                raise InstanceGone(f"runpod pod {instance.id} is {pod.get('desiredStatus')}", provider=self.name)
            found = self._ssh_port(pod)
            if found:
                instance.ssh = SSHEndpoint(host=found[0], port=found[1], user="root")
                return instance.ssh
            if time.monotonic() >= deadline:
                raise ProviderError(f"runpod pod {instance.id} has no public 22/tcp after {timeout_s:.0f}s "
                                    "(image still pulling, or no public IP)", provider=self.name)
            time.sleep(self.poll_s)

    def describe(self, instance: Instance) -> Instance:
        self._apply(instance, self._get(instance.id))
        return instance

    # -- terminate ------------------------------------------------------------------------------
    def terminate(self, instance: Instance) -> None:
        pod_id = safe_literal(instance.id, "the pod id")
        try:
            with self._sdk("terminate pod") as runpod:
                runpod.terminate_pod(pod_id)
        except InstanceGone:
            pass  # "pod not found to terminate": already gone is success
        pod = self._get(pod_id)
        if pod is not None and pod.get("desiredStatus") not in ("TERMINATED", None):
            raise ProviderError(f"runpod did not confirm termination of pod {pod_id} "
                                f"(status {pod.get('desiredStatus')}); terminate it in the console",
                                provider=self.name)
        instance.state = InstanceState.TERMINATED
        log.info("runpod: terminated pod %s (run %s)", pod_id, instance.run_id)

    # -- sweep ----------------------------------------------------------------------------------
    def list_instances(self, run_id: str | None = None) -> list[Instance]:
        with self._sdk("list pods") as runpod:
            pods = runpod.get_pods() or []
        out = []
        for pod in pods:
            env = dict(e.split("=", 1) for e in pod.get("env") or [] if "=" in e)
            rid = env.get(RUN_ENV)
            if not rid or not str(pod.get("name", "")).startswith(NAME_PREFIX):
                continue
            if run_id is not None and rid != run_id:
                continue
            inst = Instance(provider=self.name, id=pod["id"], run_id=rid, region="",
                            spot=pod.get("podType") == "INTERRUPTABLE")
            self._apply(inst, pod)
            if inst.state != InstanceState.TERMINATED:
                out.append(inst)
        return out
