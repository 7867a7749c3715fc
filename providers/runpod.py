"""RunPod adapter over the `runpod` SDK (GraphQL), credential `RUNPOD_API_KEY`.

A pod runs the image with `22/tcp` exposed on a public IP; the image's start script writes env
`PUBLIC_KEY` into `authorized_keys` (RunPod's official images do; a custom image must too). The SSH
endpoint is the `runtime.ports` entry with `privatePort == 22` and `isIpPublic` (the RunPod SSH proxy
carries no SFTP, so a public IP is required). GraphQL has no tags: the pod is named `ftplan-<run>`
and carries env `FTPLAN_RUN_ID`, which `get_pods()` returns, for the sweeper.

Spot: the SDK has no interruptible call, so `podRentInterruptable` is sent through the SDK's own
transport (`runpod.api.graphql.run_graphql_query`). `bidPerGpu` is the minimum bid *for the cloud type and
data centre asked for* (`lowestPrice(input: {gpuCount, secureCloud, dataCenterId})`, GraphQL spec
graphql-spec.runpod.io, type LowestPriceInput) plus `bid_margin` (default 10%), capped at the on-demand price:
a bid exactly at the floor is the first one outbid. A refusal for a too-low bid is "next offer".
RunPod has no server-side maximum lifetime for pods: `max_lifetime_s` is enforced by the launcher.

Documented behaviour relied on (https://docs.runpod.io/sdks/graphql/manage-pods, graphql-spec.runpod.io):
`podFindAndDeployOnDemand` / `podRentInterruptable` take `cloudType: SECURE | COMMUNITY | ALL` (the request's
`cloud_type`, else the adapter's); errors are HTTP 200 + `errors[0].message` (no codes: capacity is the text
"There are no longer any instances available with the requested specifications"); a bad key is HTTP 401.
Reads (pod status while polling) are sent with the SDK's own query text but through a transport that retries
429/5xx a bounded number of times honouring Retry-After (the SDK's does not retry and fails on non-JSON);
mutations are never retried (a lost answer could mean a second, billed pod). A pod id RunPod no longer knows
reads as gone whether it answers `pod: null` or a "not found" error. AMD (ROCm) GPUs are refused for launch
(the job is CUDA-only); Blackwell (B200, sm_100) gets a CUDA 12.8 image.

SDK pitfalls handled here: `import runpod` is slow (~1.7 s) and pulls in a lot, so it is imported
lazily; it reads `RUNPOD_API_BASE_URL` on every call (set from `api_base_url` around each call and
restored); `terminate_pod`/`stop_pod` use only the module-global `runpod.api_key`; it pastes strings
into the query text unescaped, so `"` and `\\` are refused in anything passed to it.
"""

from __future__ import annotations

import contextlib
import json
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
    BillingError,
    CapacityError,
    InstanceGone,
    ProviderError,
    QuotaError,
    import_sdk,
    register_secret,
    scrub,
)
from ftplan.providers.gpu_support import needs_cuda_12_8, refuse_non_cuda

log = logging.getLogger(__name__)

CREDENTIAL_ENV = "RUNPOD_API_KEY"
CREDENTIAL_URL = "https://www.runpod.io/console/user/settings"
BILLING_URL = "https://www.runpod.io/console/user/billing"
NAME_PREFIX = "ftplan-"
RUN_ENV = "FTPLAN_RUN_ID"
STORE_ENV = "FTPLAN_STORE_ID"
DEFAULT_IMAGE = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
# CUDA 12.8 is the first toolkit with Blackwell (sm_100) kernels; RunPod's PyTorch 2.8 image is built on it.
BLACKWELL_IMAGE = "runpod/pytorch:2.8.0-py3.11-cuda12.8.1-cudnn-devel-ubuntu22.04"
CLOUD_TYPES = ("SECURE", "COMMUNITY", "ALL")
_RETRY_STATUSES = (429, 500, 502, 503, 504)

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
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,55}\Z")
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
        read_retries: int = 4,
        bid_margin: float = 0.10,
    ):
        if cloud_type not in CLOUD_TYPES:
            raise ProviderError("cloud_type must be SECURE, COMMUNITY or ALL", provider="runpod")
        self._api_key = api_key
        self.api_base_url = api_base_url
        self.image = image
        self.cloud_type = cloud_type
        self.poll_s = poll_s
        self.read_retries = read_retries
        self.bid_margin = bid_margin

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
        if "bid" in text and any(w in text for w in ("low", "minimum", "outbid")):  # wording unverified
            return CapacityError(detail, provider=self.name)
        # Balance/limit texts are not documented; these words cover what RunPod users report.
        if any(w in text for w in ("balance", "funds", "credit")):
            return BillingError(f"{detail}; add funds at {BILLING_URL}", provider=self.name)
        if any(w in text for w in ("quota", "spend limit", "limit reached")):
            return QuotaError(f"{detail}; raise the account's spend/GPU limit at {BILLING_URL}", provider=self.name)
        return ProviderError(detail, provider=self.name)

    # -- create ---------------------------------------------------------------------------------
    def create(self, request: InstanceRequest) -> Instance:
        if not _RUN_ID.match(request.run_id or ""):
            raise ProviderError(f"run id {request.run_id!r} is not usable in a RunPod pod name", provider=self.name)
        refuse_non_cuda(request.gpu, self.name)
        gpu_id = gpu_type_id(request.gpu)
        cloud = (request.cloud_type or self.cloud_type).upper()
        if cloud not in CLOUD_TYPES:
            raise ProviderError(f"RunPod cloud type {request.cloud_type!r}: use SECURE or COMMUNITY", provider=self.name)
        name = NAME_PREFIX + request.run_id
        default = BLACKWELL_IMAGE if needs_cuda_12_8(request.gpu) and self.image == DEFAULT_IMAGE else self.image
        image = safe_literal(request.image or default, "the image name")
        env = {"PUBLIC_KEY": safe_literal(request.ssh_public_key.strip(), "the SSH public key"),
               RUN_ENV: request.run_id}
        if request.store_id:  # owner tag: the run store that launched it (`ftplan gc` touches only its own)
            env[STORE_ENV] = safe_literal(request.store_id, "the store id")
        zone = safe_literal(request.zone, "the data-centre id") if request.zone else None
        with self._sdk("create pod") as runpod:
            if request.spot:
                pod = self._rent_interruptable(request, gpu_id, cloud, name, image, env, zone)
            else:
                pod = runpod.create_pod(
                    name=name, image_name=image, gpu_type_id=gpu_id, cloud_type=cloud,
                    gpu_count=request.gpu_count, container_disk_in_gb=request.disk_gib, volume_in_gb=0,
                    ports="22/tcp", support_public_ip=True, start_ssh=True, data_center_id=zone, env=env,
                )
        if not pod or not pod.get("id"):
            raise ProviderError("runpod create returned no pod id", provider=self.name)
        log.info("runpod: created pod %s (%dx %s, %s) for run %s", pod["id"], request.gpu_count, gpu_id,
                 "spot" if request.spot else "on-demand", request.run_id)
        return Instance(provider=self.name, id=pod["id"], run_id=request.run_id, region=request.region,
                        zone=request.zone, instance_type=request.instance_type, spot=request.spot,
                        extra={"gpu_type_id": gpu_id, "gpu_count": request.gpu_count, "cloud_type": cloud})

    def spot_bid(self, gpu_id: str, gpu_count: int, cloud: str, zone: str | None) -> float:
        """Minimum bid for this cloud type and data centre, plus `bid_margin`, at most the on-demand price."""
        args = [f"gpuCount: {int(gpu_count)}"]
        if cloud != "ALL":
            args.append(f"secureCloud: {'true' if cloud == 'SECURE' else 'false'}")
        if zone:
            args.append(f'dataCenterId: "{zone}"')
        query = (f'query GpuTypes {{ gpuTypes(input: {{id: "{gpu_id}"}}) {{ id lowestPrice(input: {{'
                 + ", ".join(args) + "}) { minimumBidPrice uninterruptablePrice } } }")
        types = self._read(query, "spot price").get("gpuTypes") or []
        low = (types[0].get("lowestPrice") or {}) if types else {}
        floor = low.get("minimumBidPrice")
        if not floor:
            raise CapacityError(f"runpod: no spot market for {gpu_id} in {zone or cloud.lower()} now",
                                provider=self.name)
        bid = float(floor) * (1.0 + self.bid_margin)
        if low.get("uninterruptablePrice"):
            bid = min(bid, float(low["uninterruptablePrice"]))
        return round(max(bid, float(floor)), 3)

    def _rent_interruptable(self, request, gpu_id, cloud, name, image, env, zone) -> dict[str, Any]:
        from runpod.api.graphql import run_graphql_query  # noqa: PLC0415

        bid = self.spot_bid(gpu_id, request.gpu_count, cloud, zone)
        env_items = ", ".join(f'{{ key: "{k}", value: "{v}" }}' for k, v in env.items())
        fields = [
            f"bidPerGpu: {bid}", f"cloudType: {cloud}", f"gpuCount: {int(request.gpu_count)}",
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
    def _read(self, query: str, what: str) -> dict[str, Any]:
        """A read-only GraphQL query, retried on 429/5xx/connection errors (bounded, Retry-After honoured)."""
        import requests  # noqa: PLC0415 - the SDK's transport; present whenever runpod is
        from runpod.user_agent import USER_AGENT  # noqa: PLC0415

        from ftplan.providers.http import parse_retry_after

        key = self._key()
        base = (self.api_base_url or os.environ.get("RUNPOD_API_BASE_URL") or "https://api.runpod.io").rstrip("/")
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "Authorization": f"Bearer {key}"}
        why, wait = "", 0.0
        for attempt in range(self.read_retries + 1):
            if attempt:
                time.sleep(wait)
            try:
                resp = requests.post(f"{base}/graphql", headers=headers, data=json.dumps({"query": query}), timeout=30)
            except requests.RequestException as exc:
                why, wait = f"{type(exc).__name__}: {scrub(exc)}", min(self.poll_s * 2 ** attempt, 30.0)
                continue
            if resp.status_code == 401:
                raise AuthError(f"RunPod rejected the API key ({what}); set {CREDENTIAL_ENV} ({CREDENTIAL_URL})",
                                provider=self.name)
            if resp.status_code in _RETRY_STATUSES:
                after = parse_retry_after(resp.headers.get("Retry-After"))
                why = f"HTTP {resp.status_code}"
                wait = min(after if after is not None else self.poll_s * 2 ** attempt, 30.0)
                continue
            try:
                body = resp.json()
            except ValueError:
                raise ProviderError(f"runpod {what}: HTTP {resp.status_code} with a non-JSON body",
                                    provider=self.name) from None
            if body.get("errors"):
                raise self._map_query_error(str(body["errors"][0].get("message", "")), what)
            if resp.status_code >= 400:
                raise ProviderError(f"runpod {what}: HTTP {resp.status_code}", provider=self.name)
            return body.get("data") or {}
        raise ProviderError(f"runpod {what}: still failing after {self.read_retries + 1} tries ({why})",
                            provider=self.name)

    def _get(self, pod_id: str) -> dict[str, Any] | None:
        """The pod, or None when RunPod no longer knows it (`pod: null` or a "not found" error)."""
        import_runpod()
        from runpod.api.queries.pods import generate_pod_query  # noqa: PLC0415 - the SDK's own query text

        try:
            return self._read(generate_pod_query(safe_literal(pod_id, "the pod id")), "get pod").get("pod")
        except InstanceGone:
            return None

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
        elif status in ("TERMINATED", "DEAD"):
            instance.state = InstanceState.TERMINATED
        elif status == "PAUSED":
            instance.state = InstanceState.STOPPED
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
                            spot=pod.get("podType") == "INTERRUPTABLE", store_id=env.get(STORE_ENV, ""))
            self._apply(inst, pod)
            if inst.state != InstanceState.TERMINATED:
                out.append(inst)
        return out
