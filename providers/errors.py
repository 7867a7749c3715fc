"""The provider error tree. Every adapter maps its SDK's errors onto exactly these classes.

    ProviderError            anything else that went wrong at the provider (message already scrubbed)
    ├── CapacityError        no capacity for this type in this zone/region: try the next offer
    │   └── OfferUnavailable the provider does not sell/launch this offer as asked (reservation-only type,
    │                        type not offered in the region, no image supports the GPU): next offer too
    ├── QuotaError           the account's quota/limit forbids it: raise the quota or pick another type
    ├── AuthError            credentials missing or rejected: the message names the credential and how to set it
    ├── BillingError         the account may not buy (billing address, payment method, credit): the console page
    ├── InstanceGone         the instance no longer exists (preempted, deleted); terminate() treats it as success
    └── MissingExtraError    the provider's SDK is not installed: the message is the pip command

Messages never contain secrets: adapters pass any text from the SDK through `scrub()` first.
"""

from __future__ import annotations

import importlib
import os
import re
from types import ModuleType


class ProviderError(Exception):
    """A provider call failed. `provider` names the adapter; the message is safe to log."""

    def __init__(self, message: str, *, provider: str = ""):
        self.provider = provider
        super().__init__(scrub(message))


class CapacityError(ProviderError):
    """No capacity for the requested type in the requested zone/region; the launcher moves on."""


class OfferUnavailable(CapacityError):
    """The provider refuses this offer by policy, not for lack of capacity right now (sold only by
    reservation, not offered in the region, no image for the GPU). A CapacityError, so the launcher
    moves to the next offer; never retried on the same offer."""


class BillingError(ProviderError):
    """The account cannot buy anything until its billing is fixed; the message names the console page."""


class QuotaError(ProviderError):
    """An account quota or limit forbids the request."""


class AuthError(ProviderError):
    """Credentials are missing or were rejected. The message says which credential and how to set it."""


class InstanceGone(ProviderError):
    """The instance does not exist any more (preempted, deleted, never created)."""


class MissingExtraError(ProviderError):
    """The provider's SDK is not installed; the message is the one-line install hint."""


# Environment variables whose values must never appear in logs, errors or records.
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "RUNPOD_API_KEY", "LAMBDA_API_KEY",
    "PAPERSPACE_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GOOGLE_OAUTH_ACCESS_TOKEN",
)
_extra_secrets: set[str] = set()
_BEARER = re.compile(r"(?i)(authorization|bearer|api[_-]?key|token|secret)([\"']?\s*[:=]\s*[\"']?|\s+)([A-Za-z0-9._~+/=-]{6,})")


def register_secret(value: str | None) -> None:
    """Remember a secret value (e.g. a key read from a config file) so `scrub` removes it everywhere."""
    if value and len(value) >= 4:
        _extra_secrets.add(value)


def scrub(text: object) -> str:
    """Remove known secret values and anything that looks like a bearer token/API key from `text`."""
    out = str(text)
    secrets = {os.environ.get(name, "") for name in SECRET_ENV_VARS} | _extra_secrets
    for value in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        out = out.replace(value, "***")
    return _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}***", out)


def missing_extra(provider: str, extra: str, module: str) -> MissingExtraError:
    return MissingExtraError(
        f"the {provider} adapter needs the '{module}' package: pip install 'ftplan[{extra}]'", provider=provider
    )


def import_sdk(module: str, provider: str, extra: str, package: str | None = None) -> ModuleType:
    """Import an optional provider SDK inside the function that needs it (the planner path stays light);
    if it is not installed, raise the one-line `pip install 'ftplan[extra]'` hint instead of ImportError."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_extra(provider, extra, package or module) from None
