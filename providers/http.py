"""A thin JSON-over-HTTPS client for the REST providers (Lambda Cloud, Paperspace).

Why not each adapter calling httpx directly: the same four concerns apply to every REST API
and are easy to get subtly wrong —
  * bearer auth from one credential, which must never reach a log line or an exception;
  * bounded retries with backoff on 429/5xx that honour `Retry-After` (Lambda allows ~1 req/s);
  * never retrying a non-idempotent POST (a launch) after the server may have acted on it:
    a retried launch after a lost response would start a second, billed machine;
  * one place that turns an HTTP error into the `providers.errors` tree.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any, ClassVar

import httpx

from ftplan.providers.base import Provider
from ftplan.providers.errors import (
    AuthError,
    BillingError,
    InstanceGone,
    ProviderError,
    register_secret,
    scrub,
)

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
SAFE_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


class APIError(ProviderError):
    """An HTTP error answer. `status` and `code` (the provider's machine-readable code) let the
    adapter map it; the message is scrubbed."""

    def __init__(self, message: str, *, provider: str = "", status: int = 0, code: str = ""):
        super().__init__(message, provider=provider)
        self.status = status
        self.code = code


# (status, code, message) -> an exception class to raise instead of APIError, or None.
ErrorMapper = Callable[[int, str, str], "type[ProviderError] | None"]


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent/garbage."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class JSONClient:
    """`request()` returns the decoded JSON body (or None for an empty body) or raises a ProviderError.

    `credential_env`/`credential_url` build the AuthError hint ("set LAMBDA_API_KEY (https://...)").
    `sleep` is injectable so tests can observe the backoff without waiting for it.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        provider: str,
        credential_env: str,
        credential_url: str,
        error_mapper: ErrorMapper | None = None,
        billing_url: str = "",
        timeout_s: float = 30.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not api_key:
            raise AuthError(f"no {provider} API key: set {credential_env} ({credential_url})", provider=provider)
        register_secret(api_key)
        self.base_url = base_url.rstrip("/")
        self.provider = provider
        self.credential_env = credential_env
        self.credential_url = credential_url
        self.error_mapper = error_mapper
        self.billing_url = billing_url
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
        )

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=json, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)

    def patch(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("PATCH", path, json=json, **kw)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        base = min(self.backoff_s * (2**attempt), self.max_backoff_s)
        return base * (0.5 + random.random() / 2)  # jitter: several launchers must not retry in lockstep

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        idempotent: bool | None = None,
    ) -> Any:
        """One API call. `idempotent=None` means: PUT/GET/DELETE yes, POST/PATCH no. A non-idempotent call
        is retried only when the server cannot have acted on it (429, or no connection made)."""
        method = method.upper()
        safe = (method in SAFE_METHODS) if idempotent is None else idempotent
        attempt = 0
        while True:
            try:
                resp = self._http.request(method, path, json=json, params=params)
            except httpx.ConnectError as exc:  # nothing was sent: always safe to retry
                if attempt < self.max_retries:
                    self._wait(attempt, None, method, path, f"connect error: {exc}")
                    attempt += 1
                    continue
                raise ProviderError(f"{self.provider}: cannot reach {self.base_url}: {scrub(exc)}",
                                    provider=self.provider) from None
            except httpx.TransportError as exc:  # sent, answer lost: retry only if idempotent
                if safe and attempt < self.max_retries:
                    self._wait(attempt, None, method, path, f"transport error: {type(exc).__name__}")
                    attempt += 1
                    continue
                raise ProviderError(
                    f"{self.provider}: {method} {path} failed ({type(exc).__name__}: {scrub(exc)})"
                    + ("" if safe else "; the request may have been applied, check the provider's console"),
                    provider=self.provider,
                ) from None
            log.debug("%s %s %s -> %s", self.provider, method, path, resp.status_code)
            if resp.status_code < 400:
                if not resp.content:
                    return None
                try:
                    return resp.json()
                except ValueError:
                    raise ProviderError(
                        f"{self.provider}: {method} {path} returned non-JSON ({resp.status_code})",
                        provider=self.provider,
                    ) from None
            retryable = resp.status_code == 429 or (safe and resp.status_code in RETRY_STATUSES)
            if retryable and attempt < self.max_retries:
                self._wait(attempt, parse_retry_after(resp.headers.get("Retry-After")), method, path,
                           f"HTTP {resp.status_code}")
                attempt += 1
                continue
            raise self._error(resp, method, path)

    def _wait(self, attempt: int, retry_after: float | None, method: str, path: str, why: str) -> None:
        delay = self._delay(attempt, retry_after)
        log.debug("%s %s %s: %s; retry %d/%d in %.2fs", self.provider, method, path, why,
                  attempt + 1, self.max_retries, delay)
        self.sleep(delay)

    def _error(self, resp: httpx.Response, method: str, path: str) -> ProviderError:
        code, message = "", ""
        try:
            body = resp.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            err = body.get("error", body)  # Lambda: {"error": {code, message}}; Paperspace: {code, message}
            if isinstance(err, dict):
                code = str(err.get("code") or "")
                message = str(err.get("message") or err.get("title") or "")
            elif isinstance(err, str):
                message = err
        if not message:
            message = resp.text[:200].strip() or resp.reason_phrase
        status = resp.status_code
        cls = self.error_mapper(status, code, message) if self.error_mapper else None
        detail = f"{self.provider}: {method} {path} -> HTTP {status}" + (f" {code}" if code else "") + f": {message}"
        if cls is None and status in (401, 403):
            cls = AuthError
        if cls is AuthError:
            detail += f"; check {self.credential_env} ({self.credential_url})"
        if cls is BillingError:
            detail += f"; the account cannot launch until billing is fixed: {self.billing_url or 'the console'}"
        if cls is None:
            return APIError(detail, provider=self.provider, status=status, code=code)
        err_obj = cls(detail, provider=self.provider)
        err_obj.status = status  # type: ignore[attr-defined]
        err_obj.code = code  # type: ignore[attr-defined]
        return err_obj


class RESTProvider(Provider):
    """What the REST adapters (Lambda, Paperspace) share: the API key (argument, else `credential_env`),
    the base URL, `ssh_port`/`ssh_user` for tests that point the machine's address at a local sshd,
    the `poll_s` interval, and one `JSONClient` mapping errors with `error_mapper`.

    The client is built on first use so that constructing the adapter (e.g. for `ftplan gc` over all
    providers) does not fail when only some credentials are set."""

    credential_env: ClassVar[str]
    credential_url: ClassVar[str]
    error_mapper: ClassVar[ErrorMapper | None] = None
    billing_url: ClassVar[str] = ""

    def __init__(
        self,
        api_key: str | None,
        base_url: str,
        *,
        ssh_port: int,
        ssh_user: str,
        poll_s: float,
        client_options: dict[str, Any] | None,
    ):
        self._api_key = api_key
        self.base_url = base_url
        self.ssh_port = ssh_port
        self.ssh_user = ssh_user
        self.poll_s = poll_s
        self._client_options = client_options or {}
        self._client: JSONClient | None = None

    @property
    def client(self) -> JSONClient:
        if self._client is None:
            self._client = JSONClient(
                self.base_url, self._api_key or os.environ.get(self.credential_env, ""), provider=self.name,
                credential_env=self.credential_env, credential_url=self.credential_url,
                error_mapper=type(self).error_mapper, billing_url=self.billing_url, **self._client_options,
            )
        return self._client

    def _delete_if_present(self, path: str, resource_id: str | None) -> None:
        """DELETE a per-run side resource (SSH key, startup script); one already gone is fine."""
        if not resource_id:
            return
        try:
            self.client.delete(f"{path}/{resource_id}")
        except InstanceGone:
            pass
