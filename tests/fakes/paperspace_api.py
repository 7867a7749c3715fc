"""A fake Paperspace v1 API (api.paperspace.com/v1): a real HTTP server on 127.0.0.1 in a thread.

Wire format as in Paperspace's generated OpenAPI client: bearer auth, `{code, message}` errors,
cursor-paged lists `{items, hasMore, nextPage}`, machines with `state` and `publicIp`.

    from fakes.paperspace_api import fake_paperspace   # pytest fixture
    provider = PaperspaceProvider(api_key=fake_paperspace.api_key, base_url=fake_paperspace.url)

State: `.machines`, `.scripts`, `.requests`, `.live_instances()`. Knobs: `.boot_polls`, `.page_size`,
`.stuck_off` (machine types that are accepted but stay `off` = hidden capacity shortage),
`.refuse_delete_running` (DELETE of a machine that is not off answers 400, as the docs imply),
`.unavailable` (machine types the OS templates list as not available).
Faults: `.fail_next(op, kind, times)` with op in create|terminate|get|list|stop|scripts|templates and
kind in capacity|quota|auth|billing|500|429; `.preempt(id)` (the machine disappears). Plumbing: tests/fakes/server.py.

It refuses what the v1 API documents as invalid (Paperspace/cli api/openapi.ts @c7bdd42): a body field the
operation does not declare (`machines-create`, `startupScripts-create`), a template that does not list the
machine type as available (templates are type specific, as on Paperspace), a disk size that is not one of
the fixed sizes, and a region not in the code form the adapter sends (`ny2`, `ca1`, `ams1`; `.region_form`
switches the fake to display names).
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest
from werkzeug import Request, Response

from fakes.server import FakeCloudAPI

API_PREFIX = "/v1"

_ERRORS = {
    "capacity": (400, "BAD_REQUEST", "We are currently out of capacity for the selected VM type. Try again later."),
    "quota": (400, "BAD_REQUEST", "You have reached your limit of running machines for this machine type."),
    "auth": (401, "UNAUTHORIZED", "Invalid API key"),
    "billing": (402, "PAYMENT_REQUIRED", "Please add a payment method to your billing settings to create machines."),
    "500": (500, "INTERNAL_SERVER_ERROR", "Internal server error"),
    "429": (429, "TOO_MANY_REQUESTS", "Rate limit exceeded"),
}

# Templates are machine-type specific; the H100 one is named the way a public note records it.
TEMPLATES = [
    {"id": "tubuntu22", "name": "Ubuntu 22.04", "operatingSystemLabel": "Ubuntu 22.04", "dtCreated": "2023-05-01",
     "types": ["A4000", "A5000", "A6000", "A100-80G", "H100", "H100x8", "A100-80Gx8", "V100"]},
    {"id": "tmlinabox", "name": "ML-in-a-Box Ubuntu 22.04", "operatingSystemLabel": "Ubuntu 22.04",
     "dtCreated": "2024-02-01", "types": ["A4000", "A5000", "A6000", "A100-80G", "A100-80Gx8"]},
    {"id": "t7vp562h", "name": "mliab-u22-241108-h100", "operatingSystemLabel": "ML-in-a-Box 22.04 Template",
     "dtCreated": "2024-11-08", "types": ["H100", "H100x8"]},
]
MACHINE_TYPES = ["A4000", "A5000", "A6000", "A100-80G", "H100", "H100x8", "A100-80Gx8", "V100"]
DISK_SIZES = (100, 250, 500, 1000, 2000)
REGIONS = {"code": ("ny2", "ca1", "ams1"), "label": ("East Coast (NY2)", "West Coast (CA1)", "Europe (AMS1)")}
# Fields each create operation declares (openapi.ts `machines-create`, `startupScripts-create`).
MACHINE_FIELDS = {"accessorIds", "autoShutdownEnabled", "autoShutdownForce", "autoShutdownTimeout",
                  "autoSnapshotEnabled", "autoSnapshotFrequency", "autoSnapshotSaveCount", "diskSize", "emailPassword",
                  "enableNvlink", "machineType", "name", "networkId", "publicIpType", "region", "restorePointEnabled",
                  "restorePointFrequency", "startOnCreate", "startupScriptId", "takeInitialSnapshot", "templateId"}
SCRIPT_FIELDS = {"isRunOnce", "name", "script"}


class FakePaperspace(FakeCloudAPI):
    default_api_key = "paperspace-test-key-0123456789"
    api_prefix = API_PREFIX
    fault_kinds = tuple(_ERRORS)

    def reset(self) -> None:
        with self._lock:
            super().reset()
            self.machines: dict[str, dict[str, Any]] = {}
            self.scripts: dict[str, dict[str, Any]] = {}
            self.requests: list[tuple[str, str, Any, dict[str, str]]] = []
            self.boot_polls = 1
            self.page_size = 20
            self.stuck_off: set[str] = set()
            self.unavailable: set[str] = set()
            self.refuse_delete_running = False
            self.region_form = "code"
            self._ids = itertools.count(1)

    def preempt(self, machine_id: str) -> None:
        self.machines.pop(machine_id, None)

    def live_instances(self) -> list[dict[str, Any]]:
        return list(self.machines.values())

    def calls(self, method: str, path_regex: str) -> list[Any]:
        return [b for m, p, b, _ in self.requests if m == method and re.fullmatch(path_regex, p)]

    # -- server side --------------------------------------------------------------------------
    def dispatch(self, request: Request) -> Response:
        with self._lock:
            path = request.path[len(API_PREFIX):] if request.path.startswith(API_PREFIX) else "?" + request.path
            body = request.get_json(silent=True) if request.data else None
            self.requests.append((request.method, path, body, dict(request.args)))
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return _error(*_ERRORS["auth"])
            for m, regex, op, handler in _ROUTES:
                match = re.fullmatch(regex, path)
                if m == request.method and match:
                    kind = self._take_fault(op)
                    if kind is not None:
                        status, code, msg = _ERRORS[kind]
                        return _error(status, code, msg, {"Retry-After": "0"} if status == 429 else None)
                    return handler(self, body or {}, dict(request.args), *match.groups())
            return _error(404, "NOT_FOUND", f"{request.method} {path} not found")

    def _page(self, items: list[dict[str, Any]], args: dict[str, str]) -> Response:
        limit = min(int(args.get("limit", self.page_size)), self.page_size)
        start = int(args.get("after", "0") or 0)
        chunk = items[start:start + limit]
        more = start + limit < len(items)
        return _json({"items": chunk, "hasMore": more, "nextPage": str(start + limit) if more else None})

    def _templates(self, body, args):
        items = [{**{k: v for k, v in t.items() if k != "types"}, "agentType": "LinuxAgent", "defaultSizeGb": 100,
                  "availableMachineTypes": [{"machineTypeLabel": mt, "isAvailable": mt not in self.unavailable}
                                            for mt in t["types"]]} for t in TEMPLATES]
        return self._page(items, args)

    def _add_script(self, body, args):
        extra = set(body) - SCRIPT_FIELDS
        if extra:
            return _error(400, "BAD_REQUEST", f"Unrecognized key(s) in object: {', '.join(sorted(extra))}")
        sid = f"scr{next(self._ids)}"
        self.scripts[sid] = {"id": sid, "name": body.get("name"), "script": body.get("script"),
                             "isRunOnce": body.get("isRunOnce", False), "isEnabled": True}
        return _json(self.scripts[sid])

    def _list_scripts(self, body, args):
        return self._page(list(self.scripts.values()), args)

    def _delete_script(self, body, args, sid):
        if self.scripts.pop(sid, None) is None:
            return _error(404, "NOT_FOUND", "Startup script not found")
        return _json({"id": sid})

    def _create(self, body, args):
        extra = set(body) - MACHINE_FIELDS
        if extra:
            return _error(400, "BAD_REQUEST", f"Unrecognized key(s) in object: {', '.join(sorted(extra))}")
        if body.get("machineType") not in MACHINE_TYPES or body.get("templateId") not in {t["id"] for t in TEMPLATES}:
            return _error(400, "BAD_REQUEST", "Invalid machineType or templateId")
        template = next(t for t in TEMPLATES if t["id"] == body["templateId"])
        if body["machineType"] not in template["types"]:
            return _error(400, "BAD_REQUEST", f"Template {template['id']} is not available for machine type "
                          f"{body['machineType']}")
        if body.get("diskSize") not in DISK_SIZES:
            return _error(400, "BAD_REQUEST", f"Invalid diskSize {body.get('diskSize')}; one of {list(DISK_SIZES)}")
        if body.get("region") not in REGIONS[self.region_form]:
            return _error(400, "BAD_REQUEST", f"Invalid region {body.get('region')!r}")
        if body.get("startupScriptId") and body["startupScriptId"] not in self.scripts:
            return _error(400, "BAD_REQUEST", "Startup script not found")
        mid = f"ps{next(self._ids):06d}"
        self.machines[mid] = {
            "id": mid, "name": body.get("name"), "machineType": body["machineType"], "region": body.get("region"),
            "state": "off" if body["machineType"] in self.stuck_off else "provisioning",
            "publicIp": None, "privateIp": None, "publicIpType": body.get("publicIpType"),
            "diskSize": body.get("diskSize"), "startupScriptId": body.get("startupScriptId"),
            "autoShutdownEnabled": body.get("autoShutdownEnabled", False),
            "autoShutdownTimeout": body.get("autoShutdownTimeout"), "_polls": 0,
            "dtCreated": _iso_now(), "dtDeleted": None,   # documented Machine fields (Format: date-time)
        }
        return _json({"data": self._public(self.machines[mid]), "event": {"id": f"ev{mid}", "state": "new"}})

    def _list(self, body, args):
        items = [self._public(m) for m in self.machines.values()
                 if not args.get("name") or m["name"] == args["name"]]
        return self._page(items, args)

    def _get(self, body, args, mid):
        m = self.machines.get(mid)
        if m is None:
            return _error(404, "NOT_FOUND", "Machine not found")
        if m["state"] == "provisioning":
            m["_polls"] += 1
            if m["_polls"] > self.boot_polls:
                m["state"], m["publicIp"], m["privateIp"] = "ready", self.ssh_host, "10.1.0.2"
        return _json(self._public(m))

    def _stop(self, body, args, mid):
        m = self.machines.get(mid)
        if m is None:
            return _error(404, "NOT_FOUND", "Machine not found")
        m["state"] = "off"
        return _json({"data": self._public(m), "event": {"state": "done"}})

    def _delete(self, body, args, mid):
        m = self.machines.get(mid)
        if m is None:
            return _error(404, "NOT_FOUND", "Machine not found")
        if self.refuse_delete_running and m["state"] != "off":
            return _error(400, "BAD_REQUEST", "Machine must be off before it can be deleted")
        del self.machines[mid]
        m["dtDeleted"] = _iso_now()
        return _json({"data": self._public(m), "event": {"state": "new"}})


_ROUTES = [
    ("GET", r"/os-templates", "templates", FakePaperspace._templates),
    ("POST", r"/startup-scripts", "scripts", FakePaperspace._add_script),
    ("GET", r"/startup-scripts", "scripts", FakePaperspace._list_scripts),
    ("DELETE", r"/startup-scripts/([^/]+)", "scripts", FakePaperspace._delete_script),
    ("POST", r"/machines", "create", FakePaperspace._create),
    ("GET", r"/machines", "list", FakePaperspace._list),
    ("GET", r"/machines/([^/]+)", "get", FakePaperspace._get),
    ("PATCH", r"/machines/([^/]+)/stop", "stop", FakePaperspace._stop),
    ("DELETE", r"/machines/([^/]+)", "terminate", FakePaperspace._delete),
]


def _json(data: Any) -> Response:
    return Response(json.dumps(data), 200, content_type="application/json")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps({"code": code, "message": message, "status": status}), status,
                    headers=headers or {}, content_type="application/json")


@pytest.fixture
def fake_paperspace() -> FakePaperspace:
    """A running FakePaperspace with fresh state."""
    return FakePaperspace.fresh()


def _iso_now() -> str:
    """A JSON date-time as the API serialises it, e.g. 2026-12-07T17:28:28.123Z."""
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
