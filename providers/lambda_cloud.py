"""Lambda Cloud adapter (REST v1 over `providers.http.JSONClient`, credential `LAMBDA_API_KEY`).

Per run: one SSH key `ftplan-<run>` registered before launch (Lambda takes exactly one key name at
launch and has no other way to deliver a key) and deleted at teardown; the instance is named
`ftplan-<run>` and tagged `ftplan-run-id=<run>`. `GET /instances` cannot filter by tag, so the
sweeper filters client-side on both. No spot market and no stop: terminate is the only teardown.

What Lambda's API documents and this adapter relies on (Lambda Cloud API OpenAPI spec v1.10.0,
https://cloud.lambda.ai/api/v1/docs; mirrored in api-evangelist/lambda-labs openapi/*.yml):
- Branch on `error.code`, never on the message ("avoid relying on the values of message").
  `instance-operations/launch/insufficient-capacity` -> CapacityError; `global/quota-exceeded` -> QuotaError;
  `global/invalid-api-key` (401) / `global/account-inactive` (403) -> AuthError naming LAMBDA_API_KEY;
  `global/invalid-address` (403 on launch: the billing address is invalid) -> BillingError with the billing page;
  `global/object-does-not-exist` on launch (404 ApiErrorLaunchResourceNotFound: an unknown SSH key name,
  image or file system) is a bad launch request, not a vanished instance; elsewhere 404 = gone.
- Rate limits: "generally one request per second ... /instance-operations/launch one request per 12 seconds";
  429s are retried with Retry-After by providers/http.py (GETs also on 5xx); the launch POST is retried only on
  429, so a lost answer never starts a second machine.
- Instance types: `GET /instance-types` lists `regions_with_capacity_available`; a type Lambda does not list
  is not sold (OfferUnavailable, next offer).
"""

from __future__ import annotations

import logging
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

DEFAULT_BASE_URL = "https://cloud.lambda.ai/api/v1"
CREDENTIAL_ENV = "LAMBDA_API_KEY"
CREDENTIAL_URL = "https://cloud.lambda.ai/api-keys"
TAG_KEY = "ftplan-run-id"
STORE_TAG_KEY = "ftplan-store-id"  # the run store that owns it: `ftplan gc` touches only its own
NAME_PREFIX = "ftplan-"
BILLING_PAGE = "https://cloud.lambda.ai/settings/billing"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,55}\Z")  # name `ftplan-<run>` must fit Lambda's 64 chars

_STATES = {
    "booting": InstanceState.PENDING,
    "active": InstanceState.RUNNING,
    "unhealthy": InstanceState.RUNNING,
    "terminating": InstanceState.TERMINATING,
    "terminated": InstanceState.TERMINATED,
    "preempted": InstanceState.PREEMPTED,
}


def map_error(status: int, code: str, message: str) -> type[ProviderError] | None:
    """Lambda says branch on `code` only (message texts may change)."""
    if code == "instance-operations/launch/insufficient-capacity":
        return CapacityError
    if code == "global/quota-exceeded":
        return QuotaError
    if code == "global/invalid-address":
        return BillingError
    if code in ("global/invalid-api-key", "global/account-inactive") or status == 401:
        return AuthError
    if code in ("global/object-does-not-exist", "global/not-found") or status == 404:
        return InstanceGone
    return None


def check_run_id(run_id: str) -> None:
    if not _RUN_ID.match(run_id or ""):
        raise ProviderError(f"run id {run_id!r} is not usable as a Lambda name/tag: use letters, digits, "
                            "'-', '_', '.' (at most 56 characters)", provider="lambda")


class LambdaProvider(RESTProvider):
    """Options: `ssh_port`/`ssh_user` exist for tests that point the instance's address at a local sshd
    (Lambda itself always serves `ubuntu@ip:22`); `poll_s` is the wait_ready poll interval."""

    name = "lambda"
    credential_env = CREDENTIAL_ENV
    credential_url = CREDENTIAL_URL
    error_mapper = staticmethod(map_error)
    billing_url = BILLING_PAGE

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        *,
        image_family: str | None = None,
        ssh_port: int = 22,
        ssh_user: str = "ubuntu",
        poll_s: float = 5.0,
        client_options: dict[str, Any] | None = None,
    ):
        super().__init__(api_key, base_url, ssh_port=ssh_port, ssh_user=ssh_user, poll_s=poll_s,
                         client_options=client_options)
        self.image_family = image_family

    # -- create -------------------------------------------------------------------------------
    def create(self, request: InstanceRequest) -> Instance:
        check_run_id(request.run_id)
        if request.spot:
            raise ProviderError("Lambda Cloud has no spot instances; plan an on-demand offer", provider=self.name)
        refuse_non_cuda(request.gpu, self.name)
        self._check_capacity(request.instance_type, request.region)
        key_name = NAME_PREFIX + request.run_id
        key_id = self._register_key(key_name, request.ssh_public_key)
        body: dict[str, Any] = {
            "region_name": request.region,
            "instance_type_name": request.instance_type,
            "ssh_key_names": [key_name],
            "name": key_name,
            "tags": [{"key": TAG_KEY, "value": request.run_id}]
            + ([{"key": STORE_TAG_KEY, "value": request.store_id}] if request.store_id else []),
        }
        image = request.image or self.image_family
        if image:
            body["image"] = {"family": image}
        try:
            try:
                data = self.client.post("/instance-operations/launch", json=body)
            except InstanceGone as exc:  # launch 404: something the request names does not exist
                raise ProviderError(
                    f"{exc}; Lambda does not know a resource the launch names (image family "
                    f"{image or 'default'!r}, SSH key {key_name!r} or a file system) - check `image_family`",
                    provider=self.name) from None
            ids = (data or {}).get("data", {}).get("instance_ids") or []
            if len(ids) != 1:
                raise ProviderError(f"lambda launch returned {len(ids)} instance ids, expected 1", provider=self.name)
        except BaseException:
            self._delete_key(key_id)
            raise
        log.info("lambda: launched %s (%s in %s) for run %s", ids[0], request.instance_type, request.region,
                 request.run_id)
        return Instance(
            provider=self.name, id=ids[0], run_id=request.run_id, region=request.region,
            instance_type=request.instance_type, spot=False, state=InstanceState.PENDING,
            extra={"ssh_key_id": key_id, "ssh_key_name": key_name},
        )

    def _check_capacity(self, instance_type: str, region: str) -> None:
        """Launches are rate-limited (~1 per 12 s), so ask first (as SkyPilot does); the 400 capacity
        code is still mapped because capacity can vanish between this call and the launch."""
        types = (self.client.get("/instance-types") or {}).get("data", {})
        if instance_type not in types:
            raise OfferUnavailable(f"Lambda has no instance type '{instance_type}'; skipping this offer "
                                   "(refresh the catalog: ftplan catalog refresh)", provider=self.name)
        regions = {r.get("name") for r in types[instance_type].get("regions_with_capacity_available", [])}
        if region not in regions:
            raise CapacityError(f"lambda: no capacity for {instance_type} in {region} "
                                f"(available in: {', '.join(sorted(regions)) or 'none'})", provider=self.name)

    def _register_key(self, name: str, public_key: str) -> str:
        # A key left by an earlier, crashed attempt of the same run is replaced, not reused: its
        # private half may be gone with that attempt.
        for key in (self.client.get("/ssh-keys") or {}).get("data", []):
            if key.get("name") == name:
                self._delete_key(key.get("id"))
        data = self.client.post("/ssh-keys", json={"name": name, "public_key": public_key.strip()})
        return (data or {}).get("data", {}).get("id", "")

    def _delete_key(self, key_id: str | None) -> None:
        self._delete_if_present("/ssh-keys", key_id)

    # -- wait / describe ----------------------------------------------------------------------
    def _get(self, instance_id: str) -> dict[str, Any]:
        return (self.client.get(f"/instances/{instance_id}") or {}).get("data", {})

    def wait_ready(self, instance: Instance, timeout_s: float) -> SSHEndpoint:
        deadline = time.monotonic() + timeout_s
        while True:
            data = self._get(instance.id)  # 404 -> InstanceGone, as the contract asks
            self._apply(instance, data)
            if instance.state.is_gone:
                raise InstanceGone(f"lambda instance {instance.id} is {data.get('status')}", provider=self.name)
            if data.get("status") == "active" and data.get("ip"):
                instance.ssh = SSHEndpoint(host=data["ip"], port=self.ssh_port, user=self.ssh_user)
                return instance.ssh
            if time.monotonic() >= deadline:
                raise ProviderError(f"lambda instance {instance.id} not active after {timeout_s:.0f}s "
                                    f"(status {data.get('status')})", provider=self.name)
            time.sleep(self.poll_s)

    def _apply(self, instance: Instance, data: dict[str, Any]) -> None:
        instance.state = _STATES.get(str(data.get("status")), InstanceState.UNKNOWN)
        instance.public_ip = data.get("ip") or instance.public_ip
        cents = (data.get("instance_type") or {}).get("price_cents_per_hour")
        if isinstance(cents, (int, float)) and not isinstance(cents, bool):
            instance.extra["price_hour"] = cents / 100.0  # what Lambda bills: the launcher budgets with the higher

    def describe(self, instance: Instance) -> Instance:
        try:
            data = self._get(instance.id)
        except InstanceGone:
            instance.state = InstanceState.TERMINATED
            return instance
        self._apply(instance, data)
        return instance

    # -- terminate ----------------------------------------------------------------------------
    def terminate(self, instance: Instance) -> None:
        confirmed = False
        try:
            data = self.client.post("/instance-operations/terminate", json={"instance_ids": [instance.id]},
                                    idempotent=True)
            for d in (data or {}).get("data", {}).get("terminated_instances", []):
                if d.get("id") == instance.id:
                    confirmed = True
                    instance.state = _STATES.get(str(d.get("status")), InstanceState.TERMINATING)
        except InstanceGone:
            confirmed = True
            instance.state = InstanceState.TERMINATED
        except APIError as exc:
            if exc.status != 400:  # 400 may mean "already terminated": describe decides below
                raise
        if not confirmed:
            self.describe(instance)
            if not instance.state.is_gone:
                raise ProviderError(f"lambda did not confirm termination of {instance.id} "
                                    f"(state {instance.state.value}); terminate it in the console",
                                    provider=self.name)
        if not instance.state.is_gone:
            instance.state = InstanceState.TERMINATING
        self._delete_run_keys(instance)
        log.info("lambda: terminated %s (run %s)", instance.id, instance.run_id)

    def _delete_run_keys(self, instance: Instance) -> None:
        key_id = instance.extra.get("ssh_key_id")
        if key_id:
            self._delete_key(key_id)
            return
        # Found by the sweeper: the key id was not recorded, find it by name.
        name = NAME_PREFIX + instance.run_id
        for key in (self.client.get("/ssh-keys") or {}).get("data", []):
            if key.get("name") == name:
                self._delete_key(key.get("id"))

    # -- sweep --------------------------------------------------------------------------------
    def list_instances(self, run_id: str | None = None) -> list[Instance]:
        out = []
        for d in (self.client.get("/instances") or {}).get("data", []):
            tags = {t.get("key"): t.get("value") for t in d.get("tags") or []}
            rid = tags.get(TAG_KEY)
            if not rid or not str(d.get("name", "")).startswith(NAME_PREFIX):
                continue
            if run_id is not None and rid != run_id:
                continue
            inst = Instance(provider=self.name, id=d["id"], run_id=rid,
                            region=(d.get("region") or {}).get("name", ""),
                            instance_type=(d.get("instance_type") or {}).get("name", ""),
                            store_id=tags.get(STORE_TAG_KEY) or "")
            self._apply(inst, d)
            if inst.state != InstanceState.TERMINATED:
                out.append(inst)
        return out
