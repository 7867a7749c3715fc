"""A fake Lambda Cloud REST v1 API: a real HTTP server on 127.0.0.1 in a thread (pytest-httpserver's
werkzeug server) that speaks Lambda's wire format (paths, bodies, `{"error": {code, message}}`).

Reusable by other tests (launcher end-to-end, fault matrix):

    from fakes.lambda_api import fake_lambda          # pytest fixture (import it into the test module)
    def test_x(fake_lambda):
        fake_lambda.ssh_host, fake_lambda.boot_polls = "127.0.0.1", 0
        fake_lambda.fail_next("create", kind="capacity")
        provider = LambdaProvider(api_key=fake_lambda.api_key, base_url=fake_lambda.url, ssh_port=sshd_port)

State: `.instances` (id -> dict as the API returns it), `.ssh_keys`, `.requests` (method, path, json body),
`.live_instances()`. Server and fault plumbing: tests/fakes/server.py. Faults: `.fail_next(op, kind, times)` with op in create|terminate|get|list|
instance_types|ssh_keys and kind in capacity|quota|auth|500|429; `.preempt(id)`; `.set_capacity(type, regions)`.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest
from werkzeug import Request, Response

from fakes.server import FakeCloudAPI

API_PREFIX = "/api/v1"

DEFAULT_TYPES: dict[str, dict[str, Any]] = {
    "gpu_1x_a10": {"description": "1x A10 (24 GB PCIe)", "gpu_description": "A10 (24 GB PCIe)",
                   "price_cents_per_hour": 75, "vcpus": 30, "memory_gib": 200, "storage_gib": 1400, "gpus": 1,
                   "regions": ["us-east-1", "us-west-1"]},
    "gpu_1x_a100": {"description": "1x A100 (40 GB PCIe)", "gpu_description": "A100 (40 GB PCIe)",
                    "price_cents_per_hour": 129, "vcpus": 30, "memory_gib": 200, "storage_gib": 512, "gpus": 1,
                    "regions": ["us-east-1"]},
    "gpu_1x_h100_pcie": {"description": "1x H100 (80 GB PCIe)", "gpu_description": "H100 (80 GB PCIe)",
                         "price_cents_per_hour": 249, "vcpus": 26, "memory_gib": 200, "storage_gib": 1024,
                         "gpus": 1, "regions": ["us-west-3"]},
    "gpu_8x_a100_80gb_sxm4": {"description": "8x A100 (80 GB SXM4)", "gpu_description": "A100 (80 GB SXM4)",
                              "price_cents_per_hour": 1432, "vcpus": 240, "memory_gib": 1800,
                              "storage_gib": 20480, "gpus": 8, "regions": []},
    "cpu_4x_general": {"description": "4x CPU", "gpu_description": "", "price_cents_per_hour": 20,
                       "vcpus": 4, "memory_gib": 16, "storage_gib": 100, "gpus": 0, "regions": ["us-east-1"]},
}

_ERRORS = {
    "capacity": (400, "instance-operations/launch/insufficient-capacity",
                 "Not enough capacity to fulfill launch request."),
    "quota": (400, "global/quota-exceeded", "Quota exceeded for this instance type."),
    "auth": (401, "global/invalid-api-key", "API key was invalid, expired, or deleted."),
    "500": (500, "provider/internal-unavailable", "Internal error."),
    "429": (429, "global/too-many-requests", "Too many requests."),
    "billing": (403, "global/invalid-address", "Your billing address is invalid."),
}
IMAGE_FAMILIES = {"lambda-stack-22-04", "lambda-stack-24-04"}  # an unknown one is the spec's launch 404


class FakeLambda(FakeCloudAPI):
    default_api_key = "lambda-test-key-0123456789"
    api_prefix = API_PREFIX
    fault_kinds = tuple(_ERRORS)

    # -- test-facing API ----------------------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            super().reset()
            self.types = json.loads(json.dumps(DEFAULT_TYPES))
            self.instances: dict[str, dict[str, Any]] = {}
            self.ssh_keys: dict[str, dict[str, Any]] = {}
            self.requests: list[tuple[str, str, Any]] = []
            self.boot_polls = 1            # GETs of an instance that still answer "booting"
            self.retry_after = "0"         # Retry-After header on 429 answers
            self.echo_auth_in_errors = False  # like some APIs: echo the presented credential in a 401
            self._ids = itertools.count(1)

    def preempt(self, instance_id: str) -> None:
        self.instances[instance_id]["status"] = "preempted"

    def set_capacity(self, instance_type: str, regions: list[str]) -> None:
        self.types[instance_type]["regions"] = list(regions)

    def live_instances(self) -> list[dict[str, Any]]:
        return [i for i in self.instances.values() if i["status"] not in ("terminated", "preempted")]

    def calls(self, method: str, path_regex: str) -> list[Any]:
        """Bodies of the requests matching METHOD and a path regex (relative to /api/v1)."""
        return [b for m, p, b in self.requests if m == method and re.fullmatch(path_regex, p)]

    # -- server side --------------------------------------------------------------------------
    def _fault(self, op: str) -> Response | None:
        kind = self._take_fault(op)
        if kind is None:
            return None
        status, code, msg = _ERRORS[kind]
        return _error(status, code, msg, {"Retry-After": self.retry_after} if status == 429 else {})

    def dispatch(self, request: Request) -> Response:
        with self._lock:
            path = request.path[len(API_PREFIX):] if request.path.startswith(API_PREFIX) else "?" + request.path
            body = request.get_json(silent=True) if request.data else None
            self.requests.append((request.method, path, body))
            presented = request.headers.get("Authorization", "")
            if presented != f"Bearer {self.api_key}":
                status, code, msg = _ERRORS["auth"]
                return _error(status, code, msg + (f" (got {presented})" if self.echo_auth_in_errors else ""))
            route = _route(request.method, path)
            if route is None:
                return _error(404, "global/not-found", f"{request.method} {path} not found")
            op, handler, args = route
            return self._fault(op) or handler(self, body or {}, *args)

    def _instance_types(self, body):
        data = {}
        for name, t in self.types.items():
            data[name] = {
                "instance_type": {
                    "name": name, "description": t["description"], "gpu_description": t["gpu_description"],
                    "price_cents_per_hour": t["price_cents_per_hour"],
                    "specs": {"vcpus": t["vcpus"], "memory_gib": t["memory_gib"],
                              "storage_gib": t["storage_gib"], "gpus": t["gpus"]},
                },
                "regions_with_capacity_available": [{"name": r, "description": r} for r in t["regions"]],
            }
        return _ok(data)

    def _list_keys(self, body):
        return _ok(list(self.ssh_keys.values()))

    def _add_key(self, body):
        name = body.get("name", "")
        if any(k["name"] == name for k in self.ssh_keys.values()):
            return _error(400, "global/invalid-parameters", "SSH key name already in use")
        kid = f"key{next(self._ids)}"
        self.ssh_keys[kid] = {"id": kid, "name": name, "public_key": body.get("public_key", "")}
        return _ok(self.ssh_keys[kid])

    def _delete_key(self, body, kid):
        if self.ssh_keys.pop(kid, None) is None:
            return _error(404, "global/object-does-not-exist", "Specified SSH key does not exist.")
        return _ok({})

    def _launch(self, body):
        t = self.types.get(body.get("instance_type_name"))
        if t is None or body.get("region_name") not in _all_regions():
            return _error(400, "global/invalid-parameters", "Invalid instance type or region.")
        if body.get("region_name") not in t["regions"]:
            return _error(*_ERRORS["capacity"])
        family = (body.get("image") or {}).get("family")
        if family is not None and family not in IMAGE_FAMILIES:
            return _error(404, "global/object-does-not-exist", f"Specified image family '{family}' does not exist.")
        names = body.get("ssh_key_names") or []
        if len(names) != 1 or not any(k["name"] == names[0] for k in self.ssh_keys.values()):
            return _error(400, "global/invalid-parameters", "Exactly one existing SSH key name is required.")
        iid = f"{next(self._ids):08x}deadbeef"
        self.instances[iid] = {
            "id": iid, "name": body.get("name"), "ip": None, "private_ip": None, "status": "booting",
            "ssh_key_names": names, "region": {"name": body["region_name"], "description": body["region_name"]},
            "instance_type": {"name": body["instance_type_name"], "description": t["description"],
                              "price_cents_per_hour": t["price_cents_per_hour"]},
            "hostname": None, "tags": body.get("tags") or [], "_polls": 0,
        }
        return _ok({"instance_ids": [iid]})

    def _list(self, body):
        return _ok([self._public(i) for i in self.instances.values() if i["status"] != "terminated"])

    def _get(self, body, iid):
        inst = self.instances.get(iid)
        if inst is None or inst["status"] == "terminated":
            return _error(404, "global/object-does-not-exist", "Specified instance does not exist.")
        if inst["status"] == "booting":
            inst["_polls"] += 1
            if inst["_polls"] > self.boot_polls:
                inst["status"], inst["ip"], inst["private_ip"] = "active", self.ssh_host, "10.0.0.2"
        return _ok(self._public(inst))

    def _terminate(self, body):
        ids = body.get("instance_ids") or []
        missing = [i for i in ids if i not in self.instances or self.instances[i]["status"] == "terminated"]
        if missing:
            return _error(404, "global/object-does-not-exist", f"Instance {missing[0]} does not exist.")
        done = []
        for iid in ids:
            self.instances[iid]["status"] = "terminated"
            done.append({**self._public(self.instances[iid]), "status": "terminating"})
        return _ok({"terminated_instances": done})


def _all_regions() -> set[str]:
    return {"us-east-1", "us-west-1", "us-west-2", "us-west-3", "us-south-1", "europe-central-1", "asia-south-1"}


_ROUTES = [
    ("GET", r"/instance-types", "instance_types", FakeLambda._instance_types),
    ("GET", r"/ssh-keys", "ssh_keys", FakeLambda._list_keys),
    ("POST", r"/ssh-keys", "ssh_keys", FakeLambda._add_key),
    ("DELETE", r"/ssh-keys/([^/]+)", "ssh_keys", FakeLambda._delete_key),
    ("POST", r"/instance-operations/launch", "create", FakeLambda._launch),
    ("GET", r"/instances", "list", FakeLambda._list),
    ("GET", r"/instances/([^/]+)", "get", FakeLambda._get),
    ("POST", r"/instance-operations/terminate", "terminate", FakeLambda._terminate),
]


def _route(method: str, path: str):
    for m, regex, op, handler in _ROUTES:
        match = re.fullmatch(regex, path)
        if m == method and match:
            return op, handler, match.groups()
    return None


def _ok(data: Any) -> Response:
    return Response(json.dumps({"data": data}), 200, content_type="application/json")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps({"error": {"code": code, "message": message}}), status,
                    headers=headers or {}, content_type="application/json")


def shared_fake_lambda() -> FakeLambda:
    return FakeLambda.shared()


@pytest.fixture
def fake_lambda() -> FakeLambda:
    """A running FakeLambda with fresh state."""
    return FakeLambda.fresh()
