"""Paperspace adapter (api.paperspace.com/v1 over `providers.http.JSONClient`, `PAPERSPACE_API_KEY`).

Paperspace has no tags and no per-machine SSH key field, so per run:
  * the machine is named `ftplan-<run>` (the sweeper lists by that prefix);
  * a startup script `ftplan-<run>` appends the run's public key to `authorized_keys` (SkyPilot's
    way); it is created before the machine and deleted at teardown.
Capacity is not always an error at create time: a machine can be accepted and then sit `off`;
`wait_ready` reports that as CapacityError after `off_timeout_s`. Teardown is DELETE; if Paperspace
refuses to delete a running machine, stop it, wait for `off`, then DELETE (a stopped machine still
bills storage and a static IP, so stop alone is never teardown).

What the v1 API documents and this adapter follows (reference: Paperspace's own CLI, whose types are
generated from the v1 OpenAPI spec: github.com/Paperspace/cli api/openapi.ts @c7bdd42, operations
`machines-create`, `osTemplates-list`, `startupScripts-create`):
- OS templates are machine-type specific: each lists `availableMachineTypes[{machineTypeLabel, isAvailable}]`.
  A template is used only if it lists the machine type as available; templates are matched on the documented
  `name` and `operatingSystemLabel` (an ML-in-a-Box template may be named like `mliab-u22-241108-h100` with the
  label "ML-in-a-Box 22.04 Template"), newest `dtCreated` first. None listing the type -> OfferUnavailable
  (next offer); listed but not available now -> CapacityError.
- `region` is typed as a plain string ("The region to create the machine in"). Catalogs carry the console's
  display names ("East Coast (NY2)"); current clients send the short codes `ny2`, `ca1`, `ams1`, which is
  what is sent by default (`region_form="code"`; `"label"` sends the display name, as older clients such as
  SkyPilot do). Which form the live API enforces is unverified without an account.
- `diskSize` ("The disk size in gigabytes") takes fixed sizes only: 100, 250, 500, 1000, 2000 (SkyPilot
  sky/provision/paperspace/constants.py DISK_SIZES); the request is rounded up to the next one.
- Only documented request fields are sent (`startupScripts-create`: name, script, isRunOnce).
- No documented error codes for capacity/quota: recognised by wording (below); 429 is retried with
  Retry-After by providers/http.py.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any

from ftplan.providers.base import Instance, InstanceRequest, InstanceState, SSHEndpoint
from ftplan.providers.errors import (
    AuthError,
    BillingError,
    CapacityError,
    InstanceGone,
    OfferUnavailable,
    ProviderError,
    QuotaError,
)
from ftplan.providers.gpu_support import refuse_non_cuda
from ftplan.providers.http import APIError, RESTProvider

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.paperspace.com/v1"
CREDENTIAL_ENV = "PAPERSPACE_API_KEY"
CREDENTIAL_URL = "https://console.paperspace.com/settings/apikeys"
NAME_PREFIX = "ftplan-"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,55}\Z")
DISK_SIZES_GB = (100, 250, 500, 1000, 2000)
# Console display name -> region code (the two forms a v1 client may send; see the module docstring).
REGION_CODES = {"East Coast (NY2)": "ny2", "West Coast (CA1)": "ca1", "Europe (AMS1)": "ams1"}
BILLING_PAGE = "https://console.paperspace.com/settings/billing"

_STATES = {
    "ready": InstanceState.RUNNING,
    "serviceready": InstanceState.RUNNING,
    "provisioning": InstanceState.PENDING,
    "starting": InstanceState.PENDING,
    "restarting": InstanceState.PENDING,
    "upgrading": InstanceState.PENDING,
    "stopping": InstanceState.STOPPING,
    "off": InstanceState.STOPPED,
}

# The capacity/quota texts are not documented; these substrings cover the known wordings
# ("We are currently out of capacity for the selected VM type ...").
_CAPACITY_WORDS = ("capacity", "no machines available", "not available in this region", "sold out")
_QUOTA_WORDS = ("quota", "limit")
_BILLING_WORDS = ("billing", "payment method", "insufficient funds", "credit card")


def map_error(status: int, code: str, message: str) -> type[ProviderError] | None:
    text = message.lower()
    if status in (400, 402, 403, 409, 422) and any(w in text for w in _BILLING_WORDS):
        return BillingError
    if status in (401, 403):
        return AuthError
    if status == 404:
        return InstanceGone
    if status in (400, 409, 422, 503) and any(w in text for w in _CAPACITY_WORDS):
        return CapacityError
    if status in (400, 402, 409, 422) and any(w in text for w in _QUOTA_WORDS):
        return QuotaError
    return None


def key_script(public_key: str) -> str:
    """Startup script that installs the run's key for the `paperspace` user (runs once, as root)."""
    key = public_key.strip()
    if "'" in key or "\n" in key:
        raise ProviderError("the SSH public key must be one line without quotes", provider="paperspace")
    return (
        "#!/bin/bash\nset -e\n"
        "install -d -m 700 -o paperspace -g paperspace /home/paperspace/.ssh\n"
        f"echo '{key}' >> /home/paperspace/.ssh/authorized_keys\n"
        "chown paperspace:paperspace /home/paperspace/.ssh/authorized_keys\n"
        "chmod 600 /home/paperspace/.ssh/authorized_keys\n"
    )


class PaperspaceProvider(RESTProvider):
    """Options: `template_id` (OS template; default: the first template whose name contains
    `template_name`), `off_timeout_s` (how long a machine may sit `off` before it counts as no
    capacity), `ssh_port`/`ssh_user` for tests against a local sshd, `poll_s`."""

    name = "paperspace"
    credential_env = CREDENTIAL_ENV
    credential_url = CREDENTIAL_URL
    error_mapper = staticmethod(map_error)
    billing_url = BILLING_PAGE

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        *,
        template_id: str | None = None,
        template_name: str = "ML-in-a-Box",
        region_form: str = "code",
        off_timeout_s: float = 600.0,
        ssh_port: int = 22,
        ssh_user: str = "paperspace",
        poll_s: float = 5.0,
        client_options: dict[str, Any] | None = None,
    ):
        super().__init__(api_key, base_url, ssh_port=ssh_port, ssh_user=ssh_user, poll_s=poll_s,
                         client_options=client_options)
        self.template_id = template_id
        self.template_name = template_name
        if region_form not in ("code", "label"):
            raise ProviderError("paperspace region_form must be 'code' (ny2) or 'label' (East Coast (NY2))",
                                provider=self.name)
        self.region_form = region_form
        self.off_timeout_s = off_timeout_s

    def _items(self, path: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """All items of a cursor-paged list (`{items, hasMore, nextPage}`)."""
        out: list[dict[str, Any]] = []
        params = dict(params or {})
        for _ in range(1000):
            page = self.client.get(path, params=params) or {}
            if isinstance(page, list):
                return out + page
            out.extend(page.get("items", []))
            if not page.get("hasMore") or not page.get("nextPage"):
                return out
            params["after"] = page["nextPage"]
        raise ProviderError(f"paperspace: {path} paging did not end", provider=self.name)

    # -- create -------------------------------------------------------------------------------
    def create(self, request: InstanceRequest) -> Instance:
        if not _RUN_ID.match(request.run_id or ""):
            raise ProviderError(f"run id {request.run_id!r} is not usable as a Paperspace name", provider=self.name)
        if request.spot:
            raise ProviderError("Paperspace has no spot machines; plan an on-demand offer", provider=self.name)
        refuse_non_cuda(request.gpu, self.name)
        name = NAME_PREFIX + request.run_id
        region = self.api_region(request.region)
        disk = disk_size(request.disk_gib)
        template_id = request.image or self.template_id or self._pick_template(request.instance_type)
        script = self.client.post("/startup-scripts", json={
            "name": name, "script": key_script(request.ssh_public_key), "isRunOnce": True,
        }) or {}
        script_id = _data(script).get("id", "")
        try:
            body = {
                "name": name,
                "machineType": request.instance_type,
                "templateId": template_id,
                "region": region,
                "diskSize": disk,
                "publicIpType": "dynamic",
                "startOnCreate": True,
                "startupScriptId": script_id,
                # A safety net only (Paperspace *stops* the machine, which still bills storage):
                # the launcher's terminate and `ftplan gc` are the real teardown.
                "autoShutdownEnabled": True,
                "autoShutdownTimeout": max(1, math.ceil(request.max_lifetime_s / 3600)),
                "emailPassword": False,  # documented default true: one password e-mail per run otherwise
            }
            if request.instance_type.endswith("x8"):
                body["enableNvlink"] = True  # documented field; SkyPilot sets it for the x8 types too
            machine = _data(self.client.post("/machines", json=body) or {})
            if not machine.get("id"):
                raise ProviderError("paperspace create returned no machine id", provider=self.name)
        except BaseException:
            self._delete_script(script_id)
            raise
        log.info("paperspace: created %s (%s in %s) for run %s", machine["id"], request.instance_type,
                 request.region, request.run_id)
        inst = Instance(provider=self.name, id=machine["id"], run_id=request.run_id, region=request.region,
                        instance_type=request.instance_type, extra={"startup_script_id": script_id})
        self._apply(inst, machine)
        return inst

    def api_region(self, region: str) -> str:
        """The region as sent: a catalog display name or a code, turned into the configured form."""
        codes = {v: k for k, v in REGION_CODES.items()}
        if region in REGION_CODES:
            return REGION_CODES[region] if self.region_form == "code" else region
        if region.lower() in codes:
            return region.lower() if self.region_form == "code" else codes[region.lower()]
        raise OfferUnavailable(f"paperspace: unknown region {region!r}; known: {', '.join(REGION_CODES)}",
                               provider=self.name)

    def _pick_template(self, machine_type: str) -> str:
        """The newest template matching `template_name` (name or OS label) that lists `machine_type`."""
        want = self.template_name.lower()
        aliases = (want, "mliab") if "ml-in-a-box" in want else (want,)
        matching = [t for t in self._items("/os-templates")
                    if any(a in f"{t.get('name', '')} {t.get('operatingSystemLabel', '')}".lower() for a in aliases)]
        if not matching:
            raise ProviderError(f"paperspace: no OS template named like '{self.template_name}'; pass template_id",
                                provider=self.name)
        listing = [(t, m) for t in matching for m in t.get("availableMachineTypes") or []
                   if m.get("machineTypeLabel") == machine_type]
        usable = [t for t, m in listing if m.get("isAvailable") is True]
        if usable:
            return max(usable, key=lambda t: str(t.get("dtCreated") or ""))["id"]
        if listing:
            raise CapacityError(f"paperspace: {machine_type} is not available now for the "
                                f"'{self.template_name}' templates", provider=self.name)
        raise OfferUnavailable(f"paperspace: no '{self.template_name}' OS template supports machine type "
                               f"{machine_type}; skipping this offer (or pass template_id)", provider=self.name)

    def _delete_script(self, script_id: str | None) -> None:
        self._delete_if_present("/startup-scripts", script_id)

    # -- wait / describe ----------------------------------------------------------------------
    def _get(self, machine_id: str) -> dict[str, Any]:
        return _data(self.client.get(f"/machines/{machine_id}") or {})

    def _apply(self, instance: Instance, m: dict[str, Any]) -> None:
        instance.state = _STATES.get(str(m.get("state")), InstanceState.UNKNOWN)
        instance.public_ip = m.get("publicIp") or instance.public_ip
        # Machine.dtCreated / dtDeleted (date-time): the provider's clock for the billed span (issue 14)
        instance.launched_at = _epoch(m.get("dtCreated")) or instance.launched_at
        instance.ended_at = _epoch(m.get("dtDeleted")) or instance.ended_at

    def wait_ready(self, instance: Instance, timeout_s: float) -> SSHEndpoint:
        deadline = time.monotonic() + timeout_s
        off_since: float | None = None
        while True:
            m = self._get(instance.id)  # 404 -> InstanceGone
            self._apply(instance, m)
            if m.get("state") == "ready" and m.get("publicIp"):
                instance.ssh = SSHEndpoint(host=m["publicIp"], port=self.ssh_port, user=self.ssh_user)
                return instance.ssh
            now = time.monotonic()
            if m.get("state") == "off":
                off_since = off_since if off_since is not None else now
                if now - off_since >= self.off_timeout_s:
                    raise CapacityError(f"paperspace machine {instance.id} stayed off for {self.off_timeout_s:.0f}s "
                                        "(no capacity for this type); it must be terminated", provider=self.name)
            else:
                off_since = None
            if now >= deadline:
                raise ProviderError(f"paperspace machine {instance.id} not ready after {timeout_s:.0f}s "
                                    f"(state {m.get('state')})", provider=self.name)
            time.sleep(self.poll_s)

    def describe(self, instance: Instance) -> Instance:
        try:
            self._apply(instance, self._get(instance.id))
        except InstanceGone:
            instance.state = InstanceState.TERMINATED
        return instance

    # -- terminate ----------------------------------------------------------------------------
    def terminate(self, instance: Instance) -> None:
        try:
            self._delete_machine(instance)
        except InstanceGone:
            pass
        instance.state = InstanceState.TERMINATED
        self._delete_run_scripts(instance)
        log.info("paperspace: deleted %s (run %s)", instance.id, instance.run_id)

    def _delete_machine(self, instance: Instance) -> None:
        try:
            gone = self.client.delete(f"/machines/{instance.id}")
            if isinstance(gone, dict) and isinstance(gone.get("data"), dict):   # {data: Machine with dtDeleted}
                self._apply(instance, gone["data"])
            return
        except APIError as exc:
            if exc.status not in (400, 409, 422):
                raise
            log.info("paperspace: delete of %s refused (%s); stopping it first", instance.id, exc.status)
        self.client.patch(f"/machines/{instance.id}/stop", idempotent=True)
        deadline = time.monotonic() + max(self.off_timeout_s, 60.0)
        while self._get(instance.id).get("state") != "off":
            if time.monotonic() >= deadline:
                raise ProviderError(f"paperspace machine {instance.id} did not stop; delete it in the console",
                                    provider=self.name)
            time.sleep(self.poll_s)
        self.client.delete(f"/machines/{instance.id}")

    def _delete_run_scripts(self, instance: Instance) -> None:
        script_id = instance.extra.get("startup_script_id")
        if script_id:
            self._delete_script(script_id)
            return
        name = NAME_PREFIX + instance.run_id  # sweeper path: find the script by name
        for s in self._items("/startup-scripts"):
            if s.get("name") == name:
                self._delete_script(s.get("id"))

    # -- sweep --------------------------------------------------------------------------------
    def list_instances(self, run_id: str | None = None) -> list[Instance]:
        params = {"name": NAME_PREFIX + run_id} if run_id else {}
        out = []
        for m in self._items("/machines", params):
            name = str(m.get("name", ""))
            if not name.startswith(NAME_PREFIX) or (run_id and name != NAME_PREFIX + run_id):
                continue
            inst = Instance(provider=self.name, id=m["id"], run_id=name[len(NAME_PREFIX):],
                            region=str(m.get("region", "")), instance_type=str(m.get("machineType", "")))
            self._apply(inst, m)
            out.append(inst)
        return out


def disk_size(gib: int) -> int:
    """The smallest allowed Paperspace disk size that holds `gib`."""
    for size in DISK_SIZES_GB:
        if size >= gib:
            return size
    raise ProviderError(f"paperspace disks go up to {DISK_SIZES_GB[-1]} GB; {gib} GB was asked for",
                        provider="paperspace")


def _data(body: dict[str, Any]) -> dict[str, Any]:
    """Paperspace wraps some answers as `{data: ..., event: ...}` and returns others bare."""
    return body.get("data", body) if isinstance(body, dict) else {}


def _epoch(value: Any) -> float | None:
    """An API date-time ("2026-12-07T17:28:28.123Z") as epoch seconds; None when absent or unreadable."""
    import datetime as dt

    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)).timestamp()
