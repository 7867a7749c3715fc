"""Compute Engine errors -> the ftplan error tree, with the advice each refusal needs (which quota, which
console page, which credential). Documented codes and wordings: see providers/gcp.py's docstring."""

from __future__ import annotations

import re
from typing import Any

from ftplan.providers.errors import (
    AuthError,
    BillingError,
    CapacityError,
    InstanceGone,
    OfferUnavailable,
    ProviderError,
    QuotaError,
    register_secret,
)

NO_ADC = "GCP credentials not found: run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
CAPACITY_CODES = {"ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
                  "RESOURCE_POOL_EXHAUSTED", "STOCKOUT"}
QUOTA_CODES = {"QUOTA_EXCEEDED", "QUOTA_LIMIT"}
# Synchronous capacity wordings (old and new) of the resource-availability doc.
_CAPACITY_TEXT = re.compile(r"enough resources|is currently unavailable in the \S+ zone|resource_pool_exhausted|stockout",
                            re.I)
# Refusals of a purchase model the type is not sold with (exact wording unverified; these are the doc's terms).
_NOT_SOLD_TEXT = re.compile(r"reservation|flex-start|flex start|provisioning model|only (available|supported) (with|as)",
                            re.I)
# Sold only through reservations, Spot or Flex-start (cloud.google.com/compute/docs/gpus).
QUOTAS_PAGE = "https://console.cloud.google.com/iam-admin/quotas"
BILLING_PAGE = "https://console.cloud.google.com/billing"


def mapped(exc: BaseException, doing: str, *, credentials: Any = None, project: str | None = None) -> BaseException:
    """SDK exception -> ftplan.providers.errors class (message scrubbed); anything else passes through."""
    if isinstance(exc, ProviderError) or not isinstance(exc, Exception):
        return exc
    token = getattr(credentials, "token", None)
    if isinstance(token, str):
        register_secret(token)  # an access token must never reach a log line or message
    try:
        from google.api_core import exceptions as gx
        from google.auth import exceptions as ax
    except ImportError:  # pragma: no cover
        return exc
    if isinstance(exc, ax.DefaultCredentialsError):
        return AuthError(NO_ADC, provider="gcp")
    if isinstance(exc, ax.RefreshError):
        return AuthError(f"GCP rejected the credentials while {doing} ({exc}); run "
                         "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS",
                         provider="gcp")
    if isinstance(exc, ax.GoogleAuthError):
        return AuthError(f"GCP authentication failed while {doing} ({exc}); run "
                         "`gcloud auth application-default login`", provider="gcp")
    if isinstance(exc, gx.GoogleAPICallError):
        text = f"GCP {exc.code} while {doing}: {exc.message}"
        reasons = {getattr(e, "get", lambda k, d=None: d)("reason", "") for e in (exc.errors or [])}
        if isinstance(exc, gx.NotFound):
            return InstanceGone(text, provider="gcp")
        if isinstance(exc, gx.Unauthorized):
            return AuthError(f"{text}; run `gcloud auth application-default login` or set "
                             "GOOGLE_APPLICATION_CREDENTIALS", provider="gcp")
        if "billing" in str(exc.message).lower() or "billingNotEnabled" in reasons:
            return BillingError(f"{text}; enable billing for project {project} at {BILLING_PAGE}",
                                provider="gcp")
        if isinstance(exc, gx.Forbidden):
            if "quota" in str(exc.message).lower() or reasons & {"quotaExceeded", "rateLimitExceeded"}:
                return QuotaError(quota_advice(text), provider="gcp")
            return AuthError(f"{text}; grant the identity roles/compute.instanceAdmin.v1 and enable the Compute "
                             "Engine API", provider="gcp")
        if any(code in str(exc.message) for code in CAPACITY_CODES):
            return CapacityError(text, provider="gcp")
        return by_text(text, "gcp")
    try:
        import requests
    except ImportError:  # pragma: no cover
        requests = None
    if requests is not None and isinstance(exc, requests.RequestException):
        return ProviderError(f"GCP request failed while {doing}: {type(exc).__name__}", provider="gcp")
    return exc


def quota_advice(text: str) -> str:
    """Name the quota to raise: GCP says "Quota 'NVIDIA_T4_GPUS' exceeded.  Limit: 0.0 in region us-central1."."""
    m = re.search(r"Quota '([A-Z0-9_]+)' exceeded", text)
    if m:
        region = re.search(r"in region ([a-z0-9-]+)", text)
        where = f" in region {region.group(1)}" if region else ""
        return f"{text}; raise quota {m.group(1)}{where} at {QUOTAS_PAGE}"
    return f"{text}; request more quota (GPUs, or PREEMPTIBLE_* for Spot) at {QUOTAS_PAGE}"


def by_text(text: str, provider: str) -> ProviderError:
    """A refusal without a known code, classified by its documented wording."""
    if _CAPACITY_TEXT.search(text):
        return CapacityError(text, provider=provider)
    if _NOT_SOLD_TEXT.search(text):
        return OfferUnavailable(f"{text}; this type is not sold this way, trying the next offer", provider=provider)
    return ProviderError(text, provider=provider)
