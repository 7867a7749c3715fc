"""EC2 for tests: moto's real server on 127.0.0.1, with Deep Learning AMIs and a fault switch in front.

`MotoEC2` serves moto's WSGI app behind `FaultMiddleware`, which
- records every EC2 request (Action + form parameters) so tests can assert what the adapter *sent*;
- answers an armed action (e.g. RunInstances) with a real EC2 error document instead of calling moto.
  Faults are sticky (or count-limited) because botocore retries 5xx once and would hide a one-shot fault;
- models EC2's documented eventual consistency (`lag()`): a resource just created is answered with its
  NotFound code for the next N calls of chosen actions that name it, as real EC2 may do
  (https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html);
- serves a chosen serial console text from GetConsoleOutput (moto's is a fixed 2006 kernel log with no
  cloud-init host key block);
- serves EC2 placement groups, which moto lacks (fakes/aws_placement.py), and answers TerminateInstances of
  instances already terminated with success, as EC2 documents (moto fails for an EFA node's interface).
Faults can be armed in-process (`arm()`) or from another process (`POST /_fault?action=...&code=...`).

moto loads its AMI set when `moto` is first imported, so this module must set `MOTO_AMIS_PATH` first;
it also appends the DLAMIs to moto's list in case something imported moto earlier.
"""

from __future__ import annotations

import atexit
import base64
import io
import json
import os
import re
import tempfile
import threading
import urllib.parse
import zlib
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

AMAZON_OWNER_ID = "898082745236"  # the account that publishes the Deep Learning AMIs


def _ami(ami_id: str, name: str, arch: str, created: str) -> dict:
    return {
        "ami_id": ami_id, "state": "available", "public": True, "owner_id": AMAZON_OWNER_ID,
        "image_location": f"amazon/{name}", "sriov": "simple", "root_device_type": "ebs",
        "root_device_name": "/dev/sda1", "description": f"{name} (ftplan test image)", "image_type": "machine",
        "platform": None, "architecture": arch, "name": name, "virtualization_type": "hvm",
        "hypervisor": "xen", "creation_date": created,
    }


DLAMI_OLD = _ami("ami-0d1a0000000000001", "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) 20250601",
                 "x86_64", "2025-06-01T10:00:00.000Z")
DLAMI_NEW = _ami("ami-0d1a0000000000002", "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) 20250801",
                 "x86_64", "2025-08-01T10:00:00.000Z")
DLAMI_ARM = _ami("ami-0d1a0000000000003", "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) 20250901",
                 "arm64", "2025-09-01T10:00:00.000Z")
PLAIN_UBUNTU = _ami("ami-0d1a0000000000004", "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-20251001",
                    "x86_64", "2025-10-01T10:00:00.000Z")  # newer, but not a DLAMI: must not be picked
TEST_AMIS = [DLAMI_OLD, DLAMI_NEW, DLAMI_ARM, PLAIN_UBUNTU]

if "MOTO_AMIS_PATH" not in os.environ:
    _fd, _path = tempfile.mkstemp(prefix="ftplan-moto-amis-", suffix=".json")
    with os.fdopen(_fd, "w") as _f:
        json.dump(TEST_AMIS, _f)
    os.environ["MOTO_AMIS_PATH"] = _path
    atexit.register(os.remove, _path)  # moto has read it by then (at import, below)

from moto.ec2.models import amis as _moto_amis  # noqa: E402  (must follow MOTO_AMIS_PATH)
from moto.moto_server.werkzeug_app import (  # noqa: E402
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.wrappers import Request, Response  # noqa: E402

from fakes.aws_placement import ACTIONS as PLACEMENT_ACTIONS  # noqa: E402
from fakes.aws_placement import PlacementGroups, instance_states, region_of  # noqa: E402
from fakes.server import FakeServer  # noqa: E402

for _record in TEST_AMIS:
    if not any(a["ami_id"] == _record["ami_id"] for a in _moto_amis.AMIS):
        _moto_amis.AMIS.append(dict(_record))


@dataclass
class Fault:
    code: str
    status: int = 400
    message: str = ""
    remaining: int | None = None  # None = sticky
    after: int = 0                # let this many calls through first (the 2nd node of a group fails)


@dataclass
class RecordedRequest:
    action: str
    params: dict[str, str]
    authorization: str


# What a create call returns the new id in, and the NotFound code EC2 answers for it while it propagates.
_LAG_SOURCES = {
    "RunInstances": ("instanceId", "InvalidInstanceID.NotFound", "The instance ID '{id}' does not exist"),
    "CreateSecurityGroup": ("groupId", "InvalidGroup.NotFound", "The security group '{id}' does not exist"),
    "ImportKeyPair": ("keyName", "InvalidKeyPair.NotFound", "The key pair '{id}' does not exist"),
    "CreatePlacementGroup": ("groupName", "InvalidPlacementGroup.Unknown", "The Placement Group '{id}' is unknown."),
}


@dataclass
class Lag:
    created_by: str
    hidden_from: dict[str, int]  # action -> how many more calls naming the new id get NotFound


@dataclass
class FaultMiddleware:
    app: object
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    lags: list[Lag] = field(default_factory=list)          # armed, waiting for the create call
    hidden: dict[str, tuple[str, str, dict[str, int]]] = field(default_factory=dict)  # id -> (code, msg, counts)
    console: dict[str, str] = field(default_factory=dict)  # instance id -> console text
    placement: PlacementGroups = field(default_factory=PlacementGroups)  # moto has none (fakes/aws_placement.py)

    def _error(self, start_response, code: str, message: str, status: int = 400):
        xml = (
            f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>{escape(code)}</Code>"
            f"<Message>{escape(message)}</Message></Error></Errors>"
            "<RequestID>ftplan-fault-0001</RequestID></Response>"
        ).encode()
        start_response(f"{status} Fault", [("Content-Type", "text/xml"), ("Content-Length", str(len(xml)))])
        return [xml]

    def _hidden_answer(self, action: str, params: dict[str, str]) -> tuple[str, str] | None:
        for value in params.values():
            entry = self.hidden.get(value)
            if entry and entry[2].get(action, 0) > 0:
                entry[2][action] -= 1
                return entry[0], entry[1].format(id=value)
        return None

    def _remember_new(self, action: str, body: bytes) -> None:
        lags = [lag for lag in self.lags if lag.created_by == action]
        if not lags:
            return
        tag, code, message = _LAG_SOURCES[action]
        found = re.search(rf"<{tag}>([^<]+)</{tag}>".encode(), body)
        if found:
            lag = lags[0]
            self.lags.remove(lag)
            self.hidden[found.group(1).decode()] = (code, message, dict(lag.hidden_from))

    def _console(self, instance_id: str, start_response):
        doc = (
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><GetConsoleOutputResponse "
            "xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>ftplan-console-0001</requestId>"
            f"<instanceId>{escape(instance_id)}</instanceId><timestamp>2026-12-07T12:00:00.000Z</timestamp>"
            f"<output>{base64.b64encode(self.console[instance_id].encode()).decode()}</output>"
            "</GetConsoleOutputResponse>"
        ).encode()
        start_response("200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(doc)))])
        return [doc]

    def _terminated_again(self, ids: list[str], start_response):
        """EC2: "This operation is idempotent; if you terminate an instance more than once, each call succeeds"
        (TerminateInstances API reference). moto 5 instead fails on an instance whose network interface was
        given at launch (an EFA node): InvalidNetworkInterfaceID.NotFound for the ENI it already deleted."""
        state = "<code>48</code><name>terminated</name>"
        items = "".join(f"<item><instanceId>{escape(i)}</instanceId><currentState>{state}</currentState>"
                        f"<previousState>{state}</previousState></item>" for i in ids)
        doc = (
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><TerminateInstancesResponse "
            "xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>ftplan-terminate-0001</requestId>"
            f"<instancesSet>{items}</instancesSet></TerminateInstancesResponse>"
        ).encode()
        start_response("200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(doc)))])
        return [doc]

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == "/_fault":
            return self._control(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()}
        action = params.get("Action", "")
        with self.lock:
            if action:
                self.requests.append(RecordedRequest(action, params, environ.get("HTTP_AUTHORIZATION", "")))
            fault = self.faults.get(action)
            if fault and fault.after > 0:
                fault.after -= 1
                fault = None
            if fault and fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del self.faults[action]
            hidden = None if fault else self._hidden_answer(action, params)
            console = action == "GetConsoleOutput" and params.get("InstanceId") in self.console
        if fault:
            return self._error(start_response, fault.code, fault.message, fault.status)
        if hidden:
            return self._error(start_response, *hidden)
        if console:
            return self._console(params["InstanceId"], start_response)
        region = region_of(environ.get("HTTP_AUTHORIZATION", ""))
        if action == "TerminateInstances":
            ids = [v for k, v in sorted(params.items()) if re.fullmatch(r"InstanceId\.\d+", k)]
            if ids and set(instance_states(region, ids).values()) == {"terminated"}:
                return self._terminated_again(ids, start_response)
        if action in PLACEMENT_ACTIONS or action == "RunInstances":
            with self.lock:
                answer = (self.placement.handle(action, region, params) if action in PLACEMENT_ACTIONS
                          else self.placement.refuse_launch(region, params))
            if answer and answer[0] != 200:
                return self._error(start_response, answer[1], answer[2], answer[0])
            if answer:
                doc = answer[2].encode()
                if action in _LAG_SOURCES:
                    with self.lock:
                        self._remember_new(action, doc)
                start_response("200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(doc)))])
                return [doc]
        if action not in _LAG_SOURCES:
            return self.app(environ, start_response)
        captured: dict[str, object] = {}

        def keep(status, headers, exc_info=None):
            captured.update(status=status, headers=headers)
            return lambda data: None

        body = b"".join(self.app(environ, keep))
        with self.lock:
            self._remember_new(action, body)
            if action == "RunInstances" and captured["status"].startswith("200"):
                self.placement.launched(region, params, body)
        start_response(captured["status"], captured["headers"])
        return [body]

    def _control(self, environ, start_response):
        query = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
        with self.lock:
            if environ["REQUEST_METHOD"] == "DELETE":
                self.faults.clear()
            else:
                count = query.get("count")
                self.faults[query["action"]] = Fault(
                    code=query["code"], status=int(query.get("status", 400)), message=query.get("message", ""),
                    remaining=int(count) if count else None,
                )
        start_response("204 No Content", [])
        return [b""]


def isolate_aws_env(mp, home, access_key: str = "testing", secret_key: str = "testing") -> None:
    """Planted credentials and no config files or instance metadata for boto3 to stumble on (`mp`: a
    pytest MonkeyPatch; `home`: an empty folder for the config/credentials paths)."""
    mp.setenv("AWS_ACCESS_KEY_ID", access_key)
    mp.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    mp.setenv("AWS_CONFIG_FILE", str(home / "config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
    mp.delenv("AWS_PROFILE", raising=False)
    mp.delenv("AWS_SESSION_TOKEN", raising=False)


class _QuietHandler(MotoRequestHandler):
    def log_request(self, *args, **kwargs) -> None:  # one stderr line per request drowns test output
        pass


class MotoEC2(FakeServer):
    """A moto server (all services, EC2 is what ftplan uses) on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self) -> None:
        self.middleware = FaultMiddleware(DomainDispatcherApplication(create_backend_app))
        self._listen("moto-ec2", app=self.middleware, handler=_QuietHandler)
        self.url = self.root_url

    def reset(self) -> None:
        """Empty every moto backend, drop faults and the request log (cheap: no resource reload)."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST"), timeout=30).read()
        with self.middleware.lock:
            self.middleware.faults.clear()
            self.middleware.requests.clear()
            self.middleware.lags.clear()
            self.middleware.hidden.clear()
            self.middleware.console.clear()
            self.middleware.placement.clear()

    def lag(self, created_by: str, **hidden_from: int) -> None:
        """EC2's eventual consistency: the next resource `created_by` makes (RunInstances, CreateSecurityGroup,
        ImportKeyPair, CreatePlacementGroup) answers NotFound to its next N calls of each action, e.g.
        `lag("RunInstances", DescribeInstances=2, TerminateInstances=1)`."""
        with self.middleware.lock:
            self.middleware.lags.append(Lag(created_by, dict(hidden_from)))

    def hidden_left(self) -> dict[str, dict[str, int]]:
        with self.middleware.lock:
            return {k: dict(v[2]) for k, v in self.middleware.hidden.items()}

    def set_console_output(self, instance_id: str, text: str) -> None:
        with self.middleware.lock:
            self.middleware.console[instance_id] = text

    def arm(self, action: str, code: str, status: int = 400, message: str = "", count: int | None = None,
            after: int = 0) -> None:
        """Make `action` fail with EC2 error `code` (sticky unless `count` is given), once `after` calls of it
        have gone through."""
        with self.middleware.lock:
            self.middleware.faults[action] = Fault(code, status, message or f"{code} (injected by the test)", count,
                                                   after)

    def calls(self, action: str) -> list[dict[str, str]]:
        with self.middleware.lock:
            return [r.params for r in self.middleware.requests if r.action == action]

    @property
    def requests(self) -> list[RecordedRequest]:
        with self.middleware.lock:
            return list(self.middleware.requests)


# ---- AWS Price List API (moto does not implement it) --------------------------------------------------------


def price_list_document(instance_type: str, region: str, location: str, usd: str, *, vcpu: str, memory: str,
                        gpu: str, gpu_memory: str, family: str = "GPU instance", os_name: str = "Linux",
                        capacity: str = "Used", tenancy: str = "Shared", sku: str = "") -> dict:
    """One `PriceList` entry shaped like the real AmazonEC2 product document (attributes + OnDemand term)."""
    sku = sku or f"SKU{zlib.crc32(repr((instance_type, region, os_name, capacity, tenancy)).encode()):010d}"
    term, dim = "JRTCKXETXF", "6YS6EN2CT7"
    return {
        "product": {
            "productFamily": "Compute Instance",
            "attributes": {
                "enhancedNetworkingSupported": "Yes", "memory": memory, "vcpu": vcpu, "capacitystatus": capacity,
                "locationType": "AWS Region", "instanceFamily": family, "operatingSystem": os_name,
                "regionCode": region, "servicename": "Amazon Elastic Compute Cloud", "gpuMemory": gpu_memory,
                "instanceType": instance_type, "tenancy": tenancy, "usagetype": f"BoxUsage:{instance_type}",
                "servicecode": "AmazonEC2", "licenseModel": "No License required", "currentGeneration": "Yes",
                "preInstalledSw": "NA", "location": location, "processorArchitecture": "64-bit",
                "marketoption": "OnDemand", "operation": "RunInstances", "availabilityzone": "NA", "gpu": gpu,
            },
            "sku": sku,
        },
        "serviceCode": "AmazonEC2",
        "terms": {"OnDemand": {f"{sku}.{term}": {
            "priceDimensions": {f"{sku}.{term}.{dim}": {
                "unit": "Hrs", "endRange": "Inf", "beginRange": "0", "appliesTo": [], "rateCode": f"{sku}.{term}.{dim}",
                "description": f"${usd} per On Demand {os_name} {instance_type} Instance Hour",
                "pricePerUnit": {"USD": usd},
            }},
            "sku": sku, "effectiveDate": "2026-01-01T00:00:00Z", "offerTermCode": term, "termAttributes": {},
        }}},
        "version": "20260101000000", "publicationDate": "2026-01-01T00:00:00Z",
    }


@dataclass
class PricingFake(FakeServer):
    """The AWS Price List API's JSON 1.1 protocol (`X-Amz-Target: AWSPriceListService.GetProducts`).

    Applies TERM_MATCH filters to product attributes like the real service and pages with NextToken.
    `fail_with=(status, "__type", message)` makes every call fail."""

    products: list[dict] = field(default_factory=list)
    page_size: int = 2
    fail_with: tuple[int, str, str] | None = None
    requests: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listen("fake-aws-pricing")
        self.url = self.root_url

    def dispatch(self, request: Request) -> Response:
        body = json.loads(request.get_data() or b"{}")
        target = request.headers.get("X-Amz-Target", "")
        self.requests.append({"target": target, "body": body})

        def reply(status: int, doc: dict) -> Response:
            return Response(json.dumps(doc), status, content_type="application/x-amz-json-1.1")

        if self.fail_with:
            status, type_, message = self.fail_with
            return reply(status, {"__type": type_, "message": message})
        if target != "AWSPriceListService.GetProducts":
            return reply(400, {"__type": "UnknownOperationException", "message": f"unknown target {target}"})
        matched = [p for p in self.products if p["serviceCode"] == body.get("ServiceCode") and all(
            p["product"]["attributes"].get(f["Field"]) == f["Value"] for f in body.get("Filters", [])
            if f.get("Type") == "TERM_MATCH")]
        start = int(body.get("NextToken") or 0)
        page = matched[start:start + self.page_size]
        doc = {"FormatVersion": "aws_v1", "PriceList": [json.dumps(p) for p in page]}
        if start + self.page_size < len(matched):
            doc["NextToken"] = str(start + self.page_size)
        return reply(200, doc)
