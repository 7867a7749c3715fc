"""Live RunPod offers for `ftplan catalog refresh`, through the runpod SDK's own GraphQL transport.

One query: every GPU type with its Secure-cloud on-demand and spot (interruptible) price per GPU-hour,
plus, per GPU count, the host size and stock (`lowestPrice` aliased per count). RunPod prices are the
same in every data centre, so rows carry region "ANY" and no zone (the launcher then lets RunPod
place the pod). GPU types missing from ftplan's name table are skipped (logged at DEBUG).
"""

from __future__ import annotations

import datetime as _dt
import logging
from typing import Any

from ftplan.providers.runpod import GPU_NAMES, RunPodProvider

log = logging.getLogger(__name__)

SOURCE = "runpod:graphql gpuTypes"
BILLING_GRANULARITY_S = 1  # per-second billing, as in the shipped RunPod catalog (not verifiable offline)


def _query(counts: tuple[int, ...], secure: bool) -> str:
    per_count = " ".join(
        f"c{n}: lowestPrice(input: {{gpuCount: {n}, secureCloud: {str(secure).lower()}}}) "
        "{ minVcpu minMemory stockStatus uninterruptablePrice minimumBidPrice }"
        for n in counts
    )
    return ("query GpuTypes { gpuTypes { id displayName memoryInGb maxGpuCount securePrice secureSpotPrice "
            f"communityPrice communitySpotPrice {per_count} }} }}")


def fetch_offers(api_key: str | None = None, api_base_url: str | None = None, *,
                 gpu_counts: tuple[int, ...] = (1, 2, 4, 8), cloud_type: str = "SECURE",
                 only_in_stock: bool = False) -> list[dict[str, Any]]:
    """Rows (dicts with the catalog's keys) for every known GPU type and count up to `maxGpuCount`.
    `only_in_stock` drops counts RunPod reports no stock for right now."""
    secure = cloud_type != "COMMUNITY"
    adapter = RunPodProvider(api_key=api_key, api_base_url=api_base_url, cloud_type=cloud_type)
    with adapter._sdk("fetch prices"):
        from runpod.api.graphql import run_graphql_query  # noqa: PLC0415 - lazy optional SDK

        types = run_graphql_query(_query(tuple(gpu_counts), secure))["data"]["gpuTypes"] or []
    today = _dt.date.today().isoformat()
    rows = []
    for t in types:
        gpu = GPU_NAMES.get(t.get("id", ""))
        if gpu is None:
            log.debug("runpod prices: skipping unknown GPU type %r", t.get("id"))
            continue
        price = t.get("securePrice") if secure else t.get("communityPrice")
        spot = t.get("secureSpotPrice") if secure else t.get("communitySpotPrice")
        if not price:
            continue
        for n in gpu_counts:
            if n > (t.get("maxGpuCount") or 0):
                continue
            lp = t.get(f"c{n}") or {}
            if only_in_stock and not lp.get("stockStatus"):
                continue
            rows.append({
                "provider": "runpod",
                "instance_type": f"{n}x_{gpu}_{'SECURE' if secure else 'COMMUNITY'}",
                "gpu": gpu,
                "gpu_count": n,
                "gpu_memory_gib": float(t.get("memoryInGb") or 0),
                "vcpus": float(lp.get("minVcpu") or 0),
                "ram_gib": float(lp.get("minMemory") or 0),
                "price_hour": round(float(price) * n, 4),
                "spot_price_hour": round(float(spot) * n, 4) if spot else None,
                "region": "ANY",
                "zone": None,
                "billing_granularity_s": BILLING_GRANULARITY_S,
                "source": SOURCE,
                "retrieved_at": today,
            })
    return rows
