"""`ftplan catalog refresh`: fetch current prices from each provider's own API into the user cache.

Each provider module exposes `fetch_offers(**options) -> list[dict]` (rows with ftplan.planner.pricing.offers.COLUMNS
keys), imported only when that provider is refreshed, so an SDK that is not installed only matters
for its own provider. Rows are normalised, checked against the GPU table and validated before the
cache file is replaced atomically; from then on the cache takes precedence over the shipped snapshot.
"""

from __future__ import annotations

import datetime as dt
import importlib
from dataclasses import dataclass, field
from pathlib import Path

from ftplan.planner.errors import UserError
from ftplan.planner.pricing.offers import PROVIDERS, cache_path, check_provider, write_offers

# provider -> ("module:function", name of its keyword for an API endpoint override)
REFRESHERS: dict[str, tuple[str, str]] = {
    "aws": ("providers.aws_prices:fetch_offers", "endpoint_url"),
    "gcp": ("providers.gcp_prices:fetch_offers", "endpoint"),
    "runpod": ("providers.runpod_prices:fetch_offers", "api_base_url"),
    "lambda": ("providers.lambda_prices:fetch_offers", "base_url"),
    "paperspace": ("providers.paperspace_prices:fetch_offers", "base_url"),
}
assert set(REFRESHERS) == set(PROVIDERS)


@dataclass
class RefreshResult:
    provider: str
    path: Path
    rows: int
    dropped: dict[str, int] = field(default_factory=dict)


def fetcher(provider: str):
    target, _ = REFRESHERS[provider]
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserError(f"refreshing {provider} needs the '{exc.name}' package: "
                        f"pip install 'ftplan[{provider if provider in ('aws', 'gcp', 'runpod') else 'clouds'}]'"
                        ) from None
    return getattr(module, attr)


def normalise(provider: str, rows: list[dict], today: str) -> tuple[list[dict], dict[str, int]]:
    """Fill what a fetcher may leave out, map GPU names onto the GPU table, drop what cannot be planned."""
    from ftplan.planner.estimate.gpus import resolve_gpu

    out, dropped, seen = [], {}, set()

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    for raw in rows:
        row = {k: raw.get(k) for k in (
            "provider", "instance_type", "gpu", "gpu_count", "gpu_memory_gib", "vcpus", "ram_gib", "price_hour",
            "spot_price_hour", "region", "zone", "billing_granularity_s", "source", "retrieved_at")}
        row["provider"] = row["provider"] or provider
        if row["provider"] != provider:
            drop(f"row of provider {row['provider']!r}")
            continue
        try:
            row["gpu"] = resolve_gpu(str(row["gpu"] or "")).name
        except UserError:
            drop(f"GPU {raw.get('gpu')!r} not in the GPU table")
            continue
        row["zone"] = row["zone"] or ""
        for key in ("vcpus", "ram_gib", "spot_price_hour"):
            if row[key] is not None and not float(row[key]) > 0:
                row[key] = None
        spot = row["spot_price_hour"]
        if spot is not None and row["price_hour"] is not None and float(spot) >= float(row["price_hour"]):
            row["spot_price_hour"] = None  # not a discount: no spot market worth planning for
        if not row["price_hour"] or not float(row["price_hour"]) > 0:
            drop("no on-demand price")
            continue
        row["retrieved_at"] = row["retrieved_at"] or today
        row["source"] = row["source"] or f"{provider} API"
        key = (row["instance_type"], row["gpu"], row["gpu_count"], row["region"], row["zone"])
        if key in seen:
            drop("duplicate offer")
            continue
        seen.add(key)
        out.append(row)
    return out, dropped


def refresh(provider: str, endpoint: str | None = None, **options) -> RefreshResult:
    """Fetch `provider`'s prices and replace its cache file. Raises UserError with a scrubbed message."""
    from ftplan.providers.errors import ProviderError, scrub

    provider = check_provider(provider)
    fetch = fetcher(provider)
    if endpoint:
        options[REFRESHERS[provider][1]] = endpoint
    try:
        rows = fetch(**options)
    except ProviderError as exc:
        raise UserError(f"refreshing {provider} failed: {exc}") from None
    except Exception as exc:  # an SDK's own error type; never let its text carry a secret
        raise UserError(f"refreshing {provider} failed: {type(exc).__name__}: {scrub(exc)}") from None
    rows, dropped = normalise(provider, rows, dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    if not rows:
        raise UserError(f"refreshing {provider} returned no usable offers; the previous catalog is kept")
    path = cache_path(provider)
    try:
        n = write_offers(path, rows)
    except ValueError as exc:
        raise UserError(f"refreshing {provider} returned an invalid offer ({exc}); the previous catalog is kept"
                        ) from None
    return RefreshResult(provider, path, n, dropped)
