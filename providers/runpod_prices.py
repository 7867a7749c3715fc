"""Live RunPod offers for `ftplan catalog refresh`, through the runpod SDK's own GraphQL transport.

One query: every GPU type with its per-GPU-hour prices in both clouds as RunPod's `GpuType` documents them
(`securePrice`, `secureSpotPrice`: Secure Cloud, RunPod's own data centres; `communityPrice`,
`communitySpotPrice`: Community Cloud, third-party hosts, no SLA), plus, per GPU count and cloud, the host
size and stock (`lowestPrice(input: {gpuCount, secureCloud})`, aliased `s<n>` / `c<n>`). Each cloud's
offers are rows of their own (`cloud` secure/community, instance type `<n>x_<GPU>_SECURE|COMMUNITY`), so a
plan can label them and the launcher can send the matching `cloudType`. RunPod prices do not depend on the
data centre, so rows carry region "ANY" and no zone (the launcher lets RunPod place the pod). GPU types
missing from ftplan's name table are skipped (logged at DEBUG).
"""

from __future__ import annotations

import datetime as _dt
import logging
from typing import Any

from ftplan.providers.runpod import GPU_NAMES, RunPodProvider

log = logging.getLogger(__name__)

SOURCE = "runpod:graphql gpuTypes"
BILLING_GRANULARITY_S = 1  # "All Pods are billed by the second" (docs.runpod.io/pods/pricing)
CLOUDS = {"SECURE": ("secure", "s", "securePrice", "secureSpotPrice"),
          "COMMUNITY": ("community", "c", "communityPrice", "communitySpotPrice")}


def _query(counts: tuple[int, ...], clouds: tuple[str, ...]) -> str:
    per_count = " ".join(
        f"{CLOUDS[cloud][1]}{n}: lowestPrice(input: {{gpuCount: {n}, secureCloud: {str(cloud == 'SECURE').lower()}}}) "
        "{ minVcpu minMemory stockStatus uninterruptablePrice minimumBidPrice }"
        for cloud in clouds for n in counts
    )
    return ("query GpuTypes { gpuTypes { id displayName memoryInGb maxGpuCount securePrice secureSpotPrice "
            f"communityPrice communitySpotPrice {per_count} }} }}")


def fetch_offers(api_key: str | None = None, api_base_url: str | None = None, *,
                 gpu_counts: tuple[int, ...] = (1, 2, 4, 8), cloud_type: str = "ALL",
                 only_in_stock: bool = False) -> list[dict[str, Any]]:
    """Rows (dicts with the catalog's keys) for every known GPU type, count up to `maxGpuCount`, and cloud
    (`cloud_type` SECURE, COMMUNITY or ALL). `only_in_stock` drops counts RunPod reports no stock for now."""
    clouds = ("SECURE", "COMMUNITY") if cloud_type == "ALL" else (cloud_type,)
    adapter = RunPodProvider(api_key=api_key, api_base_url=api_base_url,
                             cloud_type=clouds[0] if len(clouds) == 1 else "SECURE")
    with adapter._sdk("fetch prices"):
        from runpod.api.graphql import run_graphql_query  # noqa: PLC0415 - lazy optional SDK

        types = run_graphql_query(_query(tuple(gpu_counts), clouds))["data"]["gpuTypes"] or []
    today = _dt.date.today().isoformat()
    rows = []
    for t in types:
        gpu = GPU_NAMES.get(t.get("id", ""))
        if gpu is None:
            log.debug("runpod prices: skipping unknown GPU type %r", t.get("id"))
            continue
        for cloud in clouds:
            label, alias, price_key, spot_key = CLOUDS[cloud]
            price, spot = t.get(price_key), t.get(spot_key)
            if not price:
                continue
            for n in gpu_counts:
                if n > (t.get("maxGpuCount") or 0):
                    continue
                lp = t.get(f"{alias}{n}") or {}
                if only_in_stock and not lp.get("stockStatus"):
                    continue
                rows.append({
                    "provider": "runpod",
                    "instance_type": f"{n}x_{gpu}_{cloud}",
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
                    "cloud": label,
                    "purchase": "on-demand+spot" if spot else "on-demand",
                })
    return rows
