"""A fake RunPod GraphQL API: a real HTTP server on 127.0.0.1 in a thread that executes the queries
the `runpod` SDK sends against a GraphQL schema (graphql-core), so a query the real API would reject
for an unknown field or argument fails here too.

The SDK reads `RUNPOD_API_BASE_URL` on every call and posts to `{base}/graphql`; errors come back as
HTTP 200 + `errors` (QueryError), a bad key as HTTP 401.

    from fakes.runpod_graphql import fake_runpod      # pytest fixture
    provider = RunPodProvider(api_key=fake_runpod.api_key, api_base_url=fake_runpod.url)
    fake_runpod.ssh_port = sshd_port                  # new pods map 22/tcp to this public port

State: `.pods` (id -> dict), `.mutations` (name, input) log, `.live_instances()`. Knobs: `.boot_polls`
(pod queries with `runtime: null` before the ports appear), `.ssh_host`/`.ssh_port`, `.gpu_types`.
Faults: `.fail_next(op, kind, times)` with op in create|terminate|get|list|gpus and kind in
capacity|quota|auth|500|429 (429 carries `Retry-After: 0`); `.preempt(id)` (an interruptible pod is stopped:
desiredStatus EXITED, no runtime). `.spot_floor[(secure, dataCenterId)]` sets the minimum bid per cloud/DC
(`lowestPrice` answers the floor for the cloud and data centre asked for, the cheapest one when none is given),
and `podRentInterruptable` refuses a bid under that floor. `.missing_pod_error` makes `pod(...)` of an unknown id
answer a "pod not found" error instead of `pod: null` (which of the two RunPod does is unverified).
Server and fault plumbing: tests/fakes/server.py.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import graphql
import pytest
from werkzeug import Request, Response

from fakes.server import FakeCloudAPI

SCHEMA_SDL = """
enum CloudTypeEnum { ALL SECURE COMMUNITY }

input GpuTypeFilter { id: String }
input PodFilter { podId: String! }
input GpuLowestPriceInput {
  gpuCount: Int, secureCloud: Boolean, dataCenterId: String, countryCode: String, minCudaVersion: String
}
input EnvironmentVariableInput { key: String!, value: String }
input PodFindAndDeployOnDemandInput {
  name: String, imageName: String, cloudType: CloudTypeEnum, startSsh: Boolean, gpuTypeId: String,
  supportPublicIp: Boolean, gpuCount: Int, volumeInGb: Int, minVcpuCount: Int, minMemoryInGb: Int,
  allowedCudaVersions: [String], dataCenterId: String, dockerArgs: String, countryCode: String,
  containerDiskInGb: Int, ports: String, volumeMountPath: String, env: [EnvironmentVariableInput],
  templateId: String, networkVolumeId: String, minDownload: Int, minUpload: Int, instanceId: String
}
input PodRentInterruptableInput {
  bidPerGpu: Float!, name: String, imageName: String, cloudType: CloudTypeEnum, startSsh: Boolean,
  gpuTypeId: String, supportPublicIp: Boolean, gpuCount: Int, volumeInGb: Int, minVcpuCount: Int,
  minMemoryInGb: Int, dataCenterId: String, dockerArgs: String, countryCode: String, containerDiskInGb: Int,
  ports: String, volumeMountPath: String, env: [EnvironmentVariableInput], templateId: String
}
input PodTerminateInput { podId: String! }
input PodStopInput { podId: String! }

type LowestPrice {
  minimumBidPrice: Float, uninterruptablePrice: Float, minVcpu: Float, minMemory: Float,
  stockStatus: String, maxUnreservedGpuCount: Int
}
type GpuType {
  id: String, displayName: String, manufacturer: String, memoryInGb: Int, cudaCores: Int, maxGpuCount: Int,
  secureCloud: Boolean, communityCloud: Boolean, securePrice: Float, communityPrice: Float,
  oneMonthPrice: Float, threeMonthPrice: Float, oneWeekPrice: Float, communitySpotPrice: Float,
  secureSpotPrice: Float, lowestPrice(input: GpuLowestPriceInput): LowestPrice
}
type PodRuntimePort { ip: String, isIpPublic: Boolean, privatePort: Int, publicPort: Int, type: String }
type PodRuntime { uptimeInSeconds: Int, ports: [PodRuntimePort] }
type PodMachine { podHostId: String, gpuDisplayName: String, location: String }
type Pod {
  id: String!, containerDiskInGb: Int, costPerHr: Float, desiredStatus: String, dockerArgs: String,
  dockerId: String, env: [String], gpuCount: Int, imageName: String, lastStatusChange: String,
  machineId: String, memoryInGb: Float, name: String, podType: String, port: Int, ports: String,
  uptimeSeconds: Int, vcpuCount: Float, volumeInGb: Float, volumeMountPath: String,
  runtime: PodRuntime, machine: PodMachine
}
type User { id: String, pods: [Pod] }
type Query {
  gpuTypes(input: GpuTypeFilter): [GpuType]
  pod(input: PodFilter): Pod
  myself: User
}
type Mutation {
  podFindAndDeployOnDemand(input: PodFindAndDeployOnDemandInput): Pod
  podRentInterruptable(input: PodRentInterruptableInput!): Pod
  podTerminate(input: PodTerminateInput): Boolean
  podStop(input: PodStopInput): Pod
}
"""
SCHEMA = graphql.build_schema(SCHEMA_SDL)

# id -> (displayName, memoryInGb, securePrice, secureSpotPrice, maxGpuCount, stock)
DEFAULT_GPU_TYPES: dict[str, tuple[str, int, float, float | None, int, bool]] = {
    "NVIDIA GeForce RTX 4090": ("RTX 4090", 24, 0.69, 0.34, 8, True),
    "NVIDIA A100 80GB PCIe": ("A100 PCIe", 80, 1.64, 1.19, 8, True),
    "NVIDIA H100 80GB HBM3": ("H100 SXM", 80, 2.99, 2.69, 8, True),
    "NVIDIA RTX A6000": ("RTX A6000", 48, 0.49, None, 8, False),
    "NVIDIA Made Up 9000": ("Made Up", 12, 0.10, None, 1, True),  # unknown to ftplan's table
}

CAPACITY_MSG = "There are no longer any instances available with the requested specifications. Please refresh and try again."
QUOTA_MSG = "Your account balance is too low to deploy this pod. Please add funds."


class _GraphQLFault(Exception):
    pass


class FakeRunPod(FakeCloudAPI):
    """`.url` is the value for RUNPOD_API_BASE_URL (the SDK appends /graphql)."""

    default_api_key = "runpod-test-key-0123456789"
    fault_kinds = ("capacity", "quota", "auth", "500", "429")

    def __init__(self, api_key: str | None = None, *, ssh_host: str = "127.0.0.1", ssh_port: int = 22):
        self.ssh_port = ssh_port
        super().__init__(api_key, ssh_host=ssh_host)

    def reset(self) -> None:
        with self._lock:
            super().reset()
            self.gpu_types = dict(DEFAULT_GPU_TYPES)
            self.pods: dict[str, dict[str, Any]] = {}
            self.mutations: list[tuple[str, dict[str, Any]]] = []
            self.queries: list[str] = []
            self.boot_polls = 1
            self.spot_floor: dict[tuple[bool, str | None], float] = {}
            self.missing_pod_error = False
            self.market_moves = 0.0  # added to the floor between the price query and the bid (outbid)
            self._ids = itertools.count(1)

    def preempt(self, pod_id: str) -> None:
        pod = self.pods[pod_id]
        pod["desiredStatus"], pod["runtime"] = "EXITED", None

    def live_instances(self) -> list[dict[str, Any]]:
        return [p for p in self.pods.values() if p["desiredStatus"] == "RUNNING"]

    def created(self) -> list[dict[str, Any]]:
        """Inputs of the deploy mutations received (on-demand and interruptible)."""
        return [i for n, i in self.mutations if n in ("podFindAndDeployOnDemand", "podRentInterruptable")]

    # -- HTTP -----------------------------------------------------------------------------------
    def dispatch(self, request: Request) -> Response:
        with self._lock:
            if request.path != "/graphql" or request.method != "POST":
                return Response("not found", 404)
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return Response(json.dumps({"error": "Unauthorized"}), 401, content_type="application/json")
            query = (request.get_json(silent=True) or {}).get("query", "")
            self.queries.append(query)
            op = _op_of(query)
            kind = self._take_fault(op)
            if kind == "auth":
                return Response(json.dumps({"error": "Unauthorized"}), 401, content_type="application/json")
            if kind == "500":
                return Response("<html><body>502 Bad Gateway</body></html>", 502, content_type="text/html")
            if kind == "429":
                return Response("Too Many Requests", 429, headers={"Retry-After": "0"}, content_type="text/plain")
            if kind is not None:
                msg = CAPACITY_MSG if kind == "capacity" else QUOTA_MSG
                return _gql({"data": None, "errors": [{"message": msg, "path": [op]}]})
            result = graphql.graphql_sync(SCHEMA, query, root_value=_Root(self))
            out: dict[str, Any] = {"data": result.data}
            if result.errors:
                out["errors"] = [{"message": e.message, "path": e.path} for e in result.errors]
            return _gql(out)

    # -- resolvers ------------------------------------------------------------------------------
    def _gpu(self, gid: str) -> dict[str, Any]:
        name, mem, price, spot, max_count, stock = self.gpu_types[gid]
        return {
            "id": gid, "displayName": name, "manufacturer": "Nvidia", "memoryInGb": mem, "cudaCores": 0,
            "maxGpuCount": max_count, "secureCloud": True, "communityCloud": True, "securePrice": price,
            "communityPrice": round(price * 0.8, 2), "secureSpotPrice": spot, "communitySpotPrice": spot,
            "oneWeekPrice": price, "oneMonthPrice": price, "threeMonthPrice": price,
            "lowestPrice": lambda info, input=None: {  # noqa: A002  (GraphQL argument name)
                "minimumBidPrice": self._floor(gid, input or {}), "uninterruptablePrice": price,
                "minVcpu": 8 * (input or {}).get("gpuCount", 1), "minMemory": 62 * (input or {}).get("gpuCount", 1),
                "stockStatus": "High" if stock else None, "maxUnreservedGpuCount": max_count if stock else 0,
            },
        }

    def _floor(self, gid: str, inp: dict[str, Any]) -> float | None:
        """The minimum bid for the cloud/DC asked for; without them, the cheapest of all (as a bare query)."""
        spot = self.gpu_types[gid][3]
        if spot is None or not self.spot_floor:
            return spot
        secure, dc = inp.get("secureCloud"), inp.get("dataCenterId")
        hits = [v for (s, d), v in self.spot_floor.items() if (secure is None or s == secure) and (dc is None or d == dc)]
        return min(hits) if hits else spot

    def _deploy(self, mutation: str, inp: dict[str, Any]) -> dict[str, Any]:
        self.mutations.append((mutation, inp))
        gid = inp.get("gpuTypeId")
        if gid not in self.gpu_types:
            raise _GraphQLFault("Invalid GPU type")
        if mutation == "podRentInterruptable":
            secure = None if inp.get("cloudType") in (None, "ALL") else inp.get("cloudType") == "SECURE"
            floor = self._floor(gid, {"secureCloud": secure, "dataCenterId": inp.get("dataCenterId")})
            if floor is not None and inp["bidPerGpu"] < floor + self.market_moves:
                raise _GraphQLFault(f"Your bid price is lower than the minimum bid price ({floor}) for this GPU.")
        if not self.gpu_types[gid][5] or inp.get("gpuCount", 1) > self.gpu_types[gid][4]:
            raise _GraphQLFault(CAPACITY_MSG)
        pid = f"pod{next(self._ids):04d}abc"
        env = [f"{e['key']}={e.get('value', '')}" for e in inp.get("env") or []]
        self.pods[pid] = {
            "id": pid, "name": inp.get("name"), "imageName": inp.get("imageName"), "env": env,
            "gpuCount": inp.get("gpuCount", 1), "desiredStatus": "RUNNING", "machineId": f"m{pid}",
            "podType": "INTERRUPTABLE" if mutation == "podRentInterruptable" else "RESERVED",
            "costPerHr": self.gpu_types[gid][2] * inp.get("gpuCount", 1), "ports": inp.get("ports"),
            "containerDiskInGb": inp.get("containerDiskInGb"), "volumeInGb": inp.get("volumeInGb"),
            "runtime": None, "machine": {"podHostId": f"{pid}-host", "gpuDisplayName": self.gpu_types[gid][0],
                                         "location": inp.get("dataCenterId")},
            "_polls": 0,
        }
        return self._public(self.pods[pid])

    def _pod(self, pid: str) -> dict[str, Any] | None:
        pod = self.pods.get(pid)
        if pod is None:
            if self.missing_pod_error:
                raise _GraphQLFault("pod not found")
            return None
        if pod["desiredStatus"] == "RUNNING" and pod["runtime"] is None:
            pod["_polls"] += 1
            if pod["_polls"] > self.boot_polls and "22/tcp" in (pod.get("ports") or ""):
                pod["runtime"] = {"uptimeInSeconds": 1, "ports": [
                    {"ip": "100.65.0.2", "isIpPublic": False, "privatePort": 22, "publicPort": 22, "type": "tcp"},
                    {"ip": self.ssh_host, "isIpPublic": True, "privatePort": 22, "publicPort": self.ssh_port,
                     "type": "tcp"},
                ]}
        return self._public(pod)


class _Root:
    """Root value for graphql-core: the default resolver calls these with (info, **args)."""

    def __init__(self, fake: FakeRunPod):
        self.fake = fake

    def gpuTypes(self, info, input=None):  # noqa: N802,A002
        ids = [input["id"]] if input and input.get("id") else list(self.fake.gpu_types)
        return [self.fake._gpu(i) for i in ids if i in self.fake.gpu_types]

    def pod(self, info, input=None):  # noqa: A002
        return self.fake._pod(input["podId"])

    def myself(self, info):
        return {"id": "user1", "pods": [self.fake._public(p) for p in self.fake.pods.values()]}

    def podFindAndDeployOnDemand(self, info, input=None):  # noqa: N802,A002
        return self.fake._deploy("podFindAndDeployOnDemand", input or {})

    def podRentInterruptable(self, info, input):  # noqa: N802,A002
        return self.fake._deploy("podRentInterruptable", input)

    def podTerminate(self, info, input=None):  # noqa: N802,A002
        self.fake.mutations.append(("podTerminate", input))
        if self.fake.pods.pop(input["podId"], None) is None:
            raise _GraphQLFault("pod not found to terminate")
        return None

    def podStop(self, info, input=None):  # noqa: N802,A002
        self.fake.mutations.append(("podStop", input))
        pod = self.fake.pods.get(input["podId"])
        if pod is None:
            raise _GraphQLFault("pod not found to stop")
        pod["desiredStatus"], pod["runtime"] = "EXITED", None
        return self.fake._public(pod)


def _op_of(query: str) -> str:
    try:
        field = graphql.parse(query).definitions[0].selection_set.selections[0].name.value
    except Exception:  # noqa: BLE001 - a broken query is answered by graphql_sync with errors
        return ""
    return {"podFindAndDeployOnDemand": "create", "podRentInterruptable": "create", "podTerminate": "terminate",
            "pod": "get", "myself": "list", "gpuTypes": "gpus"}.get(field, field)


def _gql(body: dict[str, Any]) -> Response:
    return Response(json.dumps(body), 200, content_type="application/json")


@pytest.fixture
def fake_runpod() -> FakeRunPod:
    """A running FakeRunPod with fresh state; new pods map 22/tcp to 127.0.0.1:22 unless told otherwise."""
    fake = FakeRunPod.fresh()
    fake.ssh_port = 22
    return fake
