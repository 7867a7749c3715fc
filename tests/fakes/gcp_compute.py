"""A stateful fake of the Compute Engine v1 REST API (the subset ftplan uses), served by werkzeug on 127.0.0.1.

The real `google-cloud-compute` client talks to it through `ClientOptions(api_endpoint="http://127.0.0.1:PORT")`.
It behaves like Compute where ftplan depends on it:
- insert answers with a RUNNING zone operation; only `operations/{op}/wait` finishes it (DONE), and errors
  (capacity, quota) arrive *inside* that operation, as on GCP;
- an instance goes PROVISIONING -> STAGING -> RUNNING over `boot_polls` GETs; its external IP is `nat_ip`
  (default 127.0.0.1, so an end-to-end test can put a local sshd behind it);
- delete is an operation too; the instance is gone (404) once it is DONE;
- aggregated list honours the label filters ftplan sends; images resolve by family.
- insert refuses what Compute documents it refuses: an on-demand (non-SPOT) A4 / A3 Ultra / A3 High 1-4g
  (sold only through reservations, Spot or Flex-start: cloud.google.com/compute/docs/gpus; the exact refusal
  text is not published, the one here uses the doc's words) and a Persistent Disk boot disk on the
  Hyperdisk-only families; bodies are parsed as compute_v1 types, so an unknown field is a 400 as on GCP;
- guest attributes (`getGuestAttributes?queryPath=hostkeys/`) are 404 until `publish_guest_attribute`;
- a firewall rule can be PATCHed (source ranges replaced), listed (`name eq "regex"`), and a second insert of
  a name is a 409 alreadyExists;
- resource policies (compact placement, issue 13): regional insert/get/delete/list/aggregatedList with region
  operations; an instance insert naming a policy that does not exist (or lies in another region) is refused,
  and deleting a policy an instance still uses is a 400 `resourceInUseByAnotherResource`, as on Compute;
- each VM gets its own internal address (`networkInterfaces[0].networkIP`) and a `creationTimestamp` of its
  insert in RFC 3339 with Google's -07:00 offset.
Switches: `insert_op_error` (async error in the operation; `insert_op_errors_at[n]` for the nth insert only), `sync_errors[(method, kind)]` (an HTTP error
answered at once), `valid_tokens` (401 for any other bearer token), `throttle_gets` (429s before the next GETs
of an instance). Every request is recorded in `requests`.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import zlib
from dataclasses import dataclass, field

from werkzeug.wrappers import Request, Response

from fakes.server import FakeServer

DLVM_PROJECT = "deeplearning-platform-release"
RESERVATION_ONLY = {"a4-highgpu-8g", "a3-ultragpu-8g", "a3-ultragpu-8g-nolssd", "a3-highgpu-1g", "a3-highgpu-2g",
                    "a3-highgpu-4g"}
HYPERDISK_ONLY = ("a3-ultragpu", "a4-highgpu", "a4x-")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    body: dict | None
    authorization: str | None


@dataclass
class FakeCompute(FakeServer):
    nat_ip: str = "127.0.0.1"
    boot_polls: int = 2
    valid_tokens: set[str] | None = None
    insert_op_error: tuple[str, str, int] | None = None          # (code, message, httpErrorStatusCode)
    insert_op_errors_at: dict[int, tuple[str, str, int]] = field(default_factory=dict)  # the Nth insert (1-based)
    sync_errors: dict[tuple[str, str], tuple[int, str, str]] = field(default_factory=dict)  # -> (http, reason, msg)
    requests: list[Recorded] = field(default_factory=list)
    instances: dict[tuple[str, str, str], dict] = field(default_factory=dict)   # (project, zone, name)
    firewalls: dict[tuple[str, str], dict] = field(default_factory=dict)
    policies: dict[tuple[str, str, str], dict] = field(default_factory=dict)    # (project, region, name)
    operations: dict[str, dict] = field(default_factory=dict)
    images: list[dict] = field(default_factory=list)
    guest: dict[tuple[str, str, str], list[dict]] = field(default_factory=dict)  # instance -> attribute entries
    throttle_gets: int = 0
    _inserts: int = 0
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1000))
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        if not self.images:
            self.images = [
                _image("common-cu124-v20250325-ubuntu-2204-py310", "common-cu124-ubuntu-2204-py310", "2025-03-25"),
                _image("common-cu128-ubuntu-2204-nvidia-570-v20250812", "common-cu128-ubuntu-2204-nvidia-570",
                       "2025-08-12"),
                _image("tf-2-17-cu123-v20250301-debian-11", "tf-2-17-cu123-debian-11", "2025-03-01"),
            ]
        self._listen("fake-gcp-compute")
        self.endpoint = self.root_url

    # ---- test helpers --------------------------------------------------------------------------------

    def calls(self, method: str, path_suffix: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path.endswith(path_suffix)]

    def publish_guest_attribute(self, project: str, zone: str, name: str, namespace: str, key: str,
                                value: str) -> None:
        with self._lock:
            self.guest.setdefault((project, zone, name), []).append(
                {"namespace": namespace, "key": key, "value": value})

    def set_status(self, project: str, zone: str, name: str, status: str) -> None:
        with self._lock:
            self.instances[(project, zone, name)]["status"] = status

    def vanish(self, project: str, zone: str, name: str) -> None:
        """The instance disappears behind ftplan's back (preempted with DELETE action, deleted by a human)."""
        with self._lock:
            self.instances.pop((project, zone, name), None)

    # ---- HTTP ----------------------------------------------------------------------------------------

    def dispatch(self, request: Request) -> Response:
        body = request.get_json(silent=True) if request.data else None
        with self._lock:
            self.requests.append(Recorded(request.method, request.path, dict(request.args), body,
                                          request.headers.get("Authorization")))
            return self._route(request, body)

    def _route(self, request: Request, body: dict | None) -> Response:
        if self.valid_tokens is not None:
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or auth[7:] not in self.valid_tokens:
                return _error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2 "
                              "access token, login cookie or other valid authentication credential.", "authError")
        path, method = request.path, request.method
        m = re.fullmatch(r"/compute/v1/projects/([^/]+)/(.*)", path)
        if not m:
            return _error(404, "NOT_FOUND", f"The requested URL {path} was not found on this server.", "notFound")
        project, rest = m.groups()
        routes = [
            ("POST", r"zones/([^/]+)/instances", "insert", self._insert),
            ("GET", r"zones/([^/]+)/instances/([^/]+)/getGuestAttributes", "guest", self._guest_attributes),
            ("GET", r"zones/([^/]+)/instances/([^/]+)", "get", self._get),
            ("DELETE", r"zones/([^/]+)/instances/([^/]+)", "delete", self._delete),
            ("POST", r"zones/([^/]+)/operations/([^/]+)/wait", "wait", self._wait_op),
            ("GET", r"zones/([^/]+)/operations/([^/]+)", "op", self._get_op),
            ("GET", r"aggregated/instances", "aggregated", self._aggregated),
            ("POST", r"regions/([^/]+)/resourcePolicies", "policy-insert", self._policy_insert),
            ("GET", r"regions/([^/]+)/resourcePolicies", "policy-list", self._policy_list),
            ("GET", r"regions/([^/]+)/resourcePolicies/([^/]+)", "policy-get", self._policy_get),
            ("DELETE", r"regions/([^/]+)/resourcePolicies/([^/]+)", "policy-delete", self._policy_delete),
            ("GET", r"aggregated/resourcePolicies", "policy-aggregated", self._policy_aggregated),
            ("POST", r"regions/([^/]+)/operations/([^/]+)/wait", "region-wait", self._wait_region_op),
            ("POST", r"global/firewalls", "firewall-insert", self._fw_insert),
            ("GET", r"global/firewalls", "firewall-list", self._fw_list),
            ("GET", r"global/firewalls/([^/]+)", "firewall-get", self._fw_get),
            ("DELETE", r"global/firewalls/([^/]+)", "firewall-delete", self._fw_delete),
            ("PATCH", r"global/firewalls/([^/]+)", "firewall-patch", self._fw_patch),
            ("POST", r"global/operations/([^/]+)/wait", "global-wait", self._wait_global_op),
            ("GET", r"global/images/family/([^/]+)", "image-family", self._image_family),
            ("GET", r"global/images", "images", self._list_images),
        ]
        for verb, pattern, kind, handler in routes:
            hit = re.fullmatch(pattern, rest)
            if verb == method and hit:
                if (method, kind) in self.sync_errors:
                    status, reason, message = self.sync_errors[(method, kind)]
                    return _error(status, _STATUS_NAMES.get(status, "ERROR"), message, reason)
                return handler(request, project, *hit.groups(), body=body)
        return _error(404, "NOT_FOUND", f"The requested URL {path} was not found on this server.", "notFound")

    # ---- instances -----------------------------------------------------------------------------------

    def _insert(self, request, project, zone, body):
        from google.cloud import compute_v1

        try:  # what GCP does with a field it does not know: 400
            compute_v1.Instance.from_json(json.dumps(body), ignore_unknown_fields=False)
        except Exception as exc:  # noqa: BLE001
            return _error(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}", "invalid")
        name = body["name"]
        machine = body.get("machineType", "").rsplit("/", 1)[-1]
        spot = (body.get("scheduling") or {}).get("provisioningModel") in ("SPOT", "FLEX_START")
        if machine in RESERVATION_ONLY and not spot:
            return _error(400, "INVALID_ARGUMENT", f"Invalid value for field 'resource.machineType': "
                          f"'{body.get('machineType')}'. Machine type {machine} can only be provisioned with a "
                          "reservation, Spot VMs or Flex-start VMs.", "invalid")
        for disk in body.get("disks", []):
            disk_type = (disk.get("initializeParams") or {}).get("diskType", "").rsplit("/", 1)[-1]
            if machine.startswith(HYPERDISK_ONLY) and not disk_type.startswith("hyperdisk"):
                return _error(400, "INVALID_ARGUMENT", f"[{disk_type}] disk type cannot be used by [{machine}] "
                              "machine type.", "invalid")
        for link in body.get("resourcePolicies", []):
            m = re.search(r"projects/([^/]+)/regions/([^/]+)/resourcePolicies/([^/]+)$", link)
            if not m or (m.group(1), m.group(2), m.group(3)) not in self.policies:
                return _error(404, "NOT_FOUND", f"The resource '{link}' was not found", "notFound")
            if m.group(2) != zone.rsplit("-", 1)[0]:
                return _error(400, "INVALID_ARGUMENT", f"Invalid value for field 'resource.resourcePolicies[0]': "
                              f"'{link}'. Resource policy must be in the same region as the instance.", "invalid")
        if (project, zone, name) in self.instances:
            return _error(409, "ALREADY_EXISTS", f"The resource 'projects/{project}/zones/{zone}/instances/{name}' "
                          "already exists", "alreadyExists")
        link = f"{self.endpoint}/compute/v1/projects/{project}/zones/{zone}/instances/{name}"
        inst = json.loads(json.dumps(body))
        inst.update({
            "kind": "compute#instance", "id": str(next(self._ids)), "status": "PROVISIONING", "selfLink": link,
            "zone": f"{self.endpoint}/compute/v1/projects/{project}/zones/{zone}",
            "creationTimestamp": _rfc3339_now(), "_polls": 0,
        })
        host = len(self.instances) + 2
        for i, nic in enumerate(inst.get("networkInterfaces", [])):
            nic["networkIP"] = f"10.128.{i}.{host}"
            for ac in nic.get("accessConfigs", []):
                ac["natIP"] = self.nat_ip
        self.instances[(project, zone, name)] = inst
        op = self._new_op(project, zone, "insert", link, target=(project, zone, name))
        self._inserts += 1
        error = self.insert_op_errors_at.get(self._inserts) or self.insert_op_error
        if error:
            self.operations[op["name"]]["_error"] = error
        return _json(op)

    def _get(self, request, project, zone, name, body):
        if self.throttle_gets > 0:
            self.throttle_gets -= 1
            return _error(429, "RESOURCE_EXHAUSTED", "Rate Limit Exceeded", "rateLimitExceeded")
        inst = self.instances.get((project, zone, name))
        if inst is None:
            return _not_found(project, zone, name)
        inst["_polls"] += 1
        if inst["status"] in ("PROVISIONING", "STAGING"):
            inst["status"] = "RUNNING" if inst["_polls"] >= self.boot_polls else "STAGING"
        return _json({k: v for k, v in inst.items() if not k.startswith("_")})

    def _delete(self, request, project, zone, name, body):
        inst = self.instances.get((project, zone, name))
        if inst is None:
            return _not_found(project, zone, name)
        inst["status"] = "STOPPING"
        return _json(self._new_op(project, zone, "delete", inst["selfLink"], target=(project, zone, name)))

    def _guest_attributes(self, request, project, zone, name, body):
        path = request.args.get("queryPath", "")
        namespace = path.rstrip("/").split("/", 1)[0]
        items = [e for e in self.guest.get((project, zone, name), []) if e["namespace"] == namespace]
        if (project, zone, name) not in self.instances or not items:
            return _error(404, "NOT_FOUND", f"The resource 'projects/{project}/zones/{zone}/instances/{name}/"
                          f"guestAttributes/{path}' was not found", "notFound")
        return _json({"kind": "compute#guestAttributes", "queryPath": path, "queryValue": {"items": items},
                      "selfLink": f"{self.endpoint}{request.path}"})

    def _aggregated(self, request, project, body):
        match = _label_matcher(request.args.get("filter", ""))
        items: dict[str, dict] = {}
        for (p, zone, _), inst in sorted(self.instances.items()):
            if p == project and match(inst.get("labels", {})):
                items.setdefault(f"zones/{zone}", {"instances": []})["instances"].append(
                    {k: v for k, v in inst.items() if not k.startswith("_")})
        return _json({"kind": "compute#instanceAggregatedList", "id": f"projects/{project}/aggregated/instances",
                      "items": items, "selfLink": f"{self.endpoint}{request.path}"})

    # ---- operations ----------------------------------------------------------------------------------

    def _new_op(self, project, zone, kind, target_link, target, region=None):
        name = f"operation-{next(self._ids)}-{kind}"
        scope = f"zones/{zone}" if zone else f"regions/{region}" if region else "global"
        op = {
            "kind": "compute#operation", "id": str(next(self._ids)), "name": name, "operationType": kind,
            "targetLink": target_link, "status": "RUNNING", "progress": 0,
            "selfLink": f"{self.endpoint}/compute/v1/projects/{project}/{scope}/operations/{name}",
            "_target": target, "_zone": zone, "_region": region,
        }
        if region:
            op["region"] = f"{self.endpoint}/compute/v1/projects/{project}/regions/{region}"
        if zone:
            op["zone"] = f"{self.endpoint}/compute/v1/projects/{project}/zones/{zone}"
        self.operations[name] = op
        return {k: v for k, v in op.items() if not k.startswith("_")}

    def _finish(self, op: dict) -> dict:
        if op["status"] != "DONE":
            op.update(status="DONE", progress=100)
            kind, target = op["operationType"], op["_target"]
            if op.get("_error"):
                code, message, http = op["_error"]
                op["error"] = {"errors": [{"code": code, "message": message}]}
                op["httpErrorStatusCode"] = http
                op["httpErrorMessage"] = _STATUS_NAMES.get(http, "ERROR").replace("_", " ")
                if kind == "insert":
                    self.instances.pop(target, None)
            elif kind == "delete":
                self.instances.pop(target, None)
            elif kind == "firewall-delete":
                self.firewalls.pop(target, None)
            elif kind == "policy-delete":
                self.policies.pop(target, None)
        return {k: v for k, v in op.items() if not k.startswith("_")}

    def _wait_op(self, request, project, zone, name, body):
        op = self.operations.get(name)
        if op is None or op["_zone"] != zone:
            return _error(404, "NOT_FOUND", f"The resource 'projects/{project}/zones/{zone}/operations/{name}' "
                          "was not found", "notFound")
        return _json(self._finish(op))

    def _get_op(self, request, project, zone, name, body):
        op = self.operations.get(name)
        if op is None:
            return _error(404, "NOT_FOUND", f"operation {name} not found", "notFound")
        return _json({k: v for k, v in op.items() if not k.startswith("_")})

    def _wait_region_op(self, request, project, region, name, body):
        op = self.operations.get(name)
        if op is None or op.get("_region") != region:
            return _error(404, "NOT_FOUND", f"The resource 'projects/{project}/regions/{region}/operations/{name}' "
                          "was not found", "notFound")
        return _json(self._finish(op))

    def _wait_global_op(self, request, project, name, body):
        op = self.operations.get(name)
        if op is None or op["_zone"] is not None or op.get("_region"):
            return _error(404, "NOT_FOUND", f"The resource 'projects/{project}/global/operations/{name}' was not "
                          "found", "notFound")
        return _json(self._finish(op))

    # ---- firewalls and images ------------------------------------------------------------------------

    def _fw_insert(self, request, project, body):
        name = body["name"]
        if (project, name) in self.firewalls:
            return _error(409, "ALREADY_EXISTS", f"The resource 'projects/{project}/global/firewalls/{name}' already "
                          "exists", "alreadyExists")
        link = f"{self.endpoint}/compute/v1/projects/{project}/global/firewalls/{name}"
        self.firewalls[(project, name)] = {**body, "kind": "compute#firewall", "id": str(next(self._ids)),
                                           "selfLink": link}
        return _json(self._new_op(project, None, "firewall-insert", link, target=(project, name)))

    def _fw_list(self, request, project, body):
        flt = re.fullmatch(r'\s*name\s+eq\s+"?([^"]*)"?\s*', request.args.get("filter", ""))
        items = [fw for (p, name), fw in sorted(self.firewalls.items())
                 if p == project and (not flt or re.fullmatch(flt.group(1), name))]
        return _json({"kind": "compute#firewallList", "items": items})

    def _fw_get(self, request, project, name, body):
        fw = self.firewalls.get((project, name))
        if fw is None:
            return _error(404, "NOT_FOUND", f"The resource 'projects/{project}/global/firewalls/{name}' was not "
                          "found", "notFound")
        return _json(fw)

    def _fw_delete(self, request, project, name, body):
        fw = self.firewalls.get((project, name))
        if fw is None:
            return _error(404, "NOT_FOUND", f"The resource 'projects/{project}/global/firewalls/{name}' was not "
                          "found", "notFound")
        return _json(self._new_op(project, None, "firewall-delete", fw["selfLink"], target=(project, name)))

    def _fw_patch(self, request, project, name, body):
        fw = self.firewalls.get((project, name))
        if fw is None:
            return _error(404, "NOT_FOUND", f"The resource 'projects/{project}/global/firewalls/{name}' was not "
                          "found", "notFound")
        fw.update({k: v for k, v in body.items() if k != "name"})
        return _json(self._new_op(project, None, "firewall-patch", fw["selfLink"], target=(project, name)))

    # ---- resource policies (compact placement) ---------------------------------------------------------

    def _policy_insert(self, request, project, region, body):
        from google.cloud import compute_v1

        try:
            compute_v1.ResourcePolicy.from_json(json.dumps(body), ignore_unknown_fields=False)
        except Exception as exc:  # noqa: BLE001
            return _error(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}", "invalid")
        name = body["name"]
        if (project, region, name) in self.policies:
            return _error(409, "ALREADY_EXISTS", f"The resource 'projects/{project}/regions/{region}/resourcePolicies/"
                          f"{name}' already exists", "alreadyExists")
        link = f"{self.endpoint}/compute/v1/projects/{project}/regions/{region}/resourcePolicies/{name}"
        self.policies[(project, region, name)] = {
            **body, "kind": "compute#resourcePolicy", "id": str(next(self._ids)), "selfLink": link, "status": "READY",
            "region": f"{self.endpoint}/compute/v1/projects/{project}/regions/{region}",
            "creationTimestamp": _rfc3339_now()}
        return _json(self._new_op(project, None, "policy-insert", link, target=(project, region, name), region=region))

    def _policy_get(self, request, project, region, name, body):
        policy = self.policies.get((project, region, name))
        if policy is None:
            return _error(404, "NOT_FOUND", f"The resource 'projects/{project}/regions/{region}/resourcePolicies/"
                          f"{name}' was not found", "notFound")
        return _json(policy)

    def _policy_users(self, project, region, name) -> list[str]:
        suffix = f"projects/{project}/regions/{region}/resourcePolicies/{name}"
        return [inst["selfLink"] for inst in self.instances.values()
                if any(link.endswith(suffix) for link in inst.get("resourcePolicies", []))]

    def _policy_delete(self, request, project, region, name, body):
        policy = self.policies.get((project, region, name))
        if policy is None:
            return self._policy_get(request, project, region, name, body)
        users = self._policy_users(project, region, name)
        if users:
            return _error(400, "BAD_REQUEST", f"The resource_policy resource '{policy['selfLink']}' is already being "
                          f"used by '{users[0]}'", "resourceInUseByAnotherResource")
        return _json(self._new_op(project, None, "policy-delete", policy["selfLink"], target=(project, region, name),
                                  region=region))

    def _policy_list(self, request, project, region, body):
        items = [p for (pr, r, _), p in sorted(self.policies.items()) if pr == project and r == region]
        return _json({"kind": "compute#resourcePolicyList", "items": items})

    def _policy_aggregated(self, request, project, body):
        flt = re.fullmatch(r'\s*name\s+eq\s+"?([^"]*)"?\s*', request.args.get("filter", ""))
        items: dict[str, dict] = {}
        for (pr, region, name), policy in sorted(self.policies.items()):
            if pr == project and (not flt or re.fullmatch(flt.group(1), name)):
                items.setdefault(f"regions/{region}", {"resourcePolicies": []})["resourcePolicies"].append(policy)
        return _json({"kind": "compute#resourcePolicyAggregatedList", "items": items})

    def _image_family(self, request, project, family, body):
        found = [i for i in self.images if i["family"] == family and project == DLVM_PROJECT]
        if not found:
            return _error(404, "NOT_FOUND", f"The resource 'projects/{project}/global/images/family/{family}' was "
                          "not found", "notFound")
        return _json(max(found, key=lambda i: i["creationTimestamp"]))

    def _list_images(self, request, project, body):
        flt = request.args.get("filter", "")
        m = re.fullmatch(r'\s*family\s+eq\s+"?([^"]*)"?\s*', flt)
        images = [i for i in self.images if project == DLVM_PROJECT and (not m or re.fullmatch(m.group(1), i["family"]))]
        return _json({"kind": "compute#imageList", "items": images})


_STATUS_NAMES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "FORBIDDEN", 404: "NOT_FOUND",
                 409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "SERVICE_UNAVAILABLE"}


def _image(name: str, family: str, date: str) -> dict:
    return {
        "kind": "compute#image", "id": str(zlib.crc32(name.encode())), "name": name, "family": family,
        "status": "READY", "creationTimestamp": f"{date}T10:00:00.000-07:00", "diskSizeGb": "50",
        "selfLink": f"https://www.googleapis.com/compute/v1/projects/{DLVM_PROJECT}/global/images/{name}",
    }


def _rfc3339_now() -> str:
    """Compute's timestamps: RFC 3339 with milliseconds and a Pacific offset."""
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone(timedelta(hours=-7)))
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}-07:00"


def _json(data: dict, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json; charset=UTF-8")


def _error(status: int, status_name: str, message: str, reason: str) -> Response:
    return _json({"error": {"code": status, "message": message, "status": status_name,
                            "errors": [{"message": message, "domain": "global", "reason": reason}]}}, status)


def _not_found(project: str, zone: str, name: str) -> Response:
    return _error(404, "NOT_FOUND", f"The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found",
                  "notFound")


def _label_matcher(flt: str):
    """The two label filters ftplan sends: `labels.K:*` (has key) and `labels.K = "V"`."""
    if not flt:
        return lambda labels: True
    m = re.fullmatch(r'\s*labels\.([a-z0-9_-]+)\s*:\s*\*\s*', flt)
    if m:
        return lambda labels: m.group(1) in labels
    m = re.fullmatch(r'\s*labels\.([a-z0-9_-]+)\s*=\s*"([^"]*)"\s*', flt)
    if m:
        return lambda labels: labels.get(m.group(1)) == m.group(2)
    raise ValueError(f"fake Compute does not understand filter {flt!r}")
