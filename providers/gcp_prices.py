"""Live GCP GPU offers for `ftplan catalog refresh`, from the Cloud Billing Catalog API (httpx).

`GET /v1/services/6F81-5844-456A/skus` (Compute Engine), paged with `nextPageToken`. A GPU VM's hourly price
is composed as GCP bills it: vCPUs x core SKU + RAM GiB x RAM SKU (the machine series' "Instance Core/Ram"
SKUs) + GPUs x GPU SKU, per region listed in each SKU's `serviceRegions`. Spot uses the "Spot Preemptible"
(usageType Preemptible) SKUs of the same three parts; a missing part means no spot offer (None).

Machine shapes mapped (machine type -> series, vCPUs, RAM GiB, GPU, count), documented in `SHAPES`:
n1-standard-{4,8,16,32} with T4, n1-standard-{8,16,32,64} with V100 (GPUs attached to N1);
g2-standard-* (L4), a2-highgpu-* (A100 40GB), a2-ultragpu-* (A100-80GB), a3-highgpu-* (H100) carry their GPUs.
The API key travels in the `X-Goog-Api-Key` header, never in the URL, so it cannot leak through an error text.

Which SKU is which (`sku_kind`): the catalog lists several prices for the same GPU in the same region, and
some of them carry usageType "OnDemand" although they are not what an on-demand VM pays: flex-start
("... attached to DWS Defined Duration VMs ...", "DWS Defined Duration A2 Core ...", "DWS Flex Start ..."),
about half the list price; reservation placeholders ("Reserved Nvidia Tesla A100 80GB GPU in Virginia", often
0.0) and Calendar Mode; commitments ("Commitment v1: ... for 1 Year", usageType Commit1Yr). Only the plain
"Nvidia ... GPU running in <geo>" SKU is on-demand, and only "... attached to Spot Preemptible VMs ..." /
"Spot Preemptible ..." is spot (issue 21: importing a flex-start SKU made GCP's H100 look 2x cheaper).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from typing import Any

from ftplan.providers.errors import AuthError, ProviderError, register_secret

log = logging.getLogger("ftplan.providers.gcp_prices")

COMPUTE_SERVICE = "6F81-5844-456A"
DEFAULT_ENDPOINT = "https://cloudbilling.googleapis.com"
API_KEY_ENV = "FTPLAN_GCP_API_KEY"
BILLING_GRANULARITY_S = 1  # per second after the first minute

# machine type -> (SKU series, vCPUs, RAM GiB, GPU, GPU count)
SHAPES: dict[str, tuple[str, int, float, str, int]] = {
    "n1-standard-4": ("N1", 4, 15, "T4", 1), "n1-standard-8": ("N1", 8, 30, "T4", 1),
    "n1-standard-16": ("N1", 16, 60, "T4", 2), "n1-standard-32": ("N1", 32, 120, "T4", 4),
    "g2-standard-4": ("G2", 4, 16, "L4", 1), "g2-standard-8": ("G2", 8, 32, "L4", 1),
    "g2-standard-12": ("G2", 12, 48, "L4", 1), "g2-standard-16": ("G2", 16, 64, "L4", 1),
    "g2-standard-24": ("G2", 24, 96, "L4", 2), "g2-standard-32": ("G2", 32, 128, "L4", 1),
    "g2-standard-48": ("G2", 48, 192, "L4", 4), "g2-standard-96": ("G2", 96, 384, "L4", 8),
    "a2-highgpu-1g": ("A2", 12, 85, "A100", 1), "a2-highgpu-2g": ("A2", 24, 170, "A100", 2),
    "a2-highgpu-4g": ("A2", 48, 340, "A100", 4), "a2-highgpu-8g": ("A2", 96, 680, "A100", 8),
    "a2-ultragpu-1g": ("A2", 12, 170, "A100-80GB", 1), "a2-ultragpu-2g": ("A2", 24, 340, "A100-80GB", 2),
    "a2-ultragpu-4g": ("A2", 48, 680, "A100-80GB", 4), "a2-ultragpu-8g": ("A2", 96, 1360, "A100-80GB", 8),
    "a3-highgpu-1g": ("A3", 26, 234, "H100", 1), "a3-highgpu-2g": ("A3", 52, 468, "H100", 2),
    "a3-highgpu-4g": ("A3", 104, 936, "H100", 4), "a3-highgpu-8g": ("A3", 208, 1872, "H100", 8),
}
# V100 on N1 hosts, listed apart because the same machine type also carries T4 above.
V100_SHAPES: list[tuple[str, int, float, int]] = [
    ("n1-standard-8", 8, 30, 1), ("n1-standard-16", 16, 60, 2), ("n1-standard-32", 32, 120, 4),
    ("n1-standard-64", 64, 240, 8),
]
GPU_MEMORY_GIB = {"T4": 16, "V100": 16, "L4": 24, "A100": 40, "A100-80GB": 80, "H100": 80}
# SKU description text after "Nvidia " -> GPU name
_GPU_SKU = re.compile(r"^Nvidia (?:Tesla )?(?P<model>T4|V100|L4|A100 80GB|A100|H100 80GB|H100) GPU "
                      r"(?:attached to Spot Preemptible VMs )?running in ")
_GPU_NAMES = {"T4": "T4", "V100": "V100", "L4": "L4", "A100": "A100", "A100 80GB": "A100-80GB", "H100 80GB": "H100",
              "H100": "H100"}
_HOST_SKU = re.compile(r"^(?:Spot Preemptible )?(?P<series>N1 Predefined|A2|A3|G2) Instance (?P<part>Core|Ram) "
                       r"running in ")
# Machine types Google sells only through reservations, Spot or Flex-start (cloud.google.com/compute/docs/gpus,
# 2026-04-06): their on-demand composition is kept out of the purchase modes.
SPOT_OR_FLEX_ONLY = ("a3-highgpu-1g", "a3-highgpu-2g", "a3-highgpu-4g")


def sku_kind(description: str, usage_type: str) -> str | None:
    """'on-demand', 'spot', 'flex-start', 'reservation' or 'commitment' for a Compute Engine SKU; None if unknown.

    Decided by the description first: flex-start and reservation SKUs share usageType OnDemand with the real
    on-demand SKU."""
    d = description.lower()
    if usage_type.startswith("Commit") or d.startswith("commitment"):
        return "commitment"
    if "dws" in d or "flex start" in d or "flex-start" in d:
        return "flex-start"
    if d.startswith("reserved") or "calendar mode" in d:
        return "reservation"
    if usage_type == "Preemptible" or "spot preemptible" in d:
        return "spot" if usage_type == "Preemptible" else None
    if usage_type == "OnDemand" and not d.startswith(("capacity optimized",)):
        return "on-demand"
    return None


def fetch_offers(
    api_key: str | None = None,
    endpoint: str | None = None,
    regions: list[str] | None = None,
    *,
    timeout_s: float = 60.0,
    max_pages: int = 200,
    today: dt.date | None = None,
) -> list[dict[str, Any]]:
    """One row per (machine type + GPUs, region), on-demand and spot $/hour composed from the SKUs."""
    import httpx

    api_key = api_key or os.environ.get(API_KEY_ENV)
    if not api_key:
        raise AuthError(f"the GCP price catalog needs an API key: create one in APIs & Services > Credentials "
                        f"(Cloud Billing API enabled) and set {API_KEY_ENV}", provider="gcp")
    register_secret(api_key)
    base = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
    url = f"{base}/v1/services/{COMPUTE_SERVICE}/skus"
    prices: dict[tuple[str, str, str], float] = {}  # (component, "od"|"spot", region) -> $/unit/hour
    token = ""
    with httpx.Client(timeout=timeout_s, headers={"X-Goog-Api-Key": api_key}) as client:
        for _ in range(max_pages):
            params = {"currencyCode": "USD", "pageSize": "5000"}
            if token:
                params["pageToken"] = token
            try:
                resp = client.get(url, params=params)
            except httpx.HTTPError as exc:
                raise ProviderError(f"GCP price catalog unreachable at {url}: {type(exc).__name__}",
                                    provider="gcp") from None
            if resp.status_code != 200:
                raise _http_error(resp)
            page = resp.json()
            for sku in page.get("skus", []):
                _collect(sku, prices)
            token = page.get("nextPageToken") or ""
            if not token:
                break
        else:
            raise ProviderError(f"GCP price catalog still paging after {max_pages} pages", provider="gcp")
    return _compose(prices, regions, (today or dt.date.today()).isoformat(), url)


def _collect(sku: dict[str, Any], prices: dict[tuple[str, str, str], float]) -> None:
    category = sku.get("category", {})
    desc = sku.get("description", "")
    usage = {"on-demand": "od", "spot": "spot"}.get(sku_kind(desc, category.get("usageType", "")) or "")
    if usage is None or category.get("resourceFamily") != "Compute":
        return
    if category.get("resourceGroup") == "GPU":
        m = _GPU_SKU.match(desc)
        if not m:
            return
        component = f"gpu:{_GPU_NAMES[m.group('model')]}"
    else:
        m = _HOST_SKU.match(desc)
        if not m:
            return
        component = f"{m.group('series').split()[0]}:{m.group('part').lower()}"
    unit_price = _unit_price(sku)
    if unit_price is None:
        return
    for region in sku.get("serviceRegions", []):
        prices[(component, usage, region)] = unit_price


def _unit_price(sku: dict[str, Any]) -> float | None:
    """Hourly price of one unit (vCPU, GiB, GPU): the last tier of the current pricing expression."""
    for info in sku.get("pricingInfo", [])[:1]:
        expr = info.get("pricingExpression", {})
        rates = expr.get("tieredRates", [])
        if not rates or expr.get("usageUnit") not in ("h", "GiBy.h"):
            return None
        money = rates[-1].get("unitPrice", {})
        return int(money.get("units", 0) or 0) + int(money.get("nanos", 0) or 0) / 1e9
    return None


def _compose(prices, regions: list[str] | None, retrieved: str, source: str) -> list[dict[str, Any]]:
    shapes = [(mt, s, v, r, g, n) for mt, (s, v, r, g, n) in SHAPES.items()]
    shapes += [(mt, "N1", v, r, "V100", n) for mt, v, r, n in V100_SHAPES]
    all_regions = sorted({region for (_, _, region) in prices})
    rows = []
    for region in all_regions:
        if regions and region not in regions:
            continue
        for machine_type, series, vcpus, ram, gpu, count in shapes:
            shape = (series, vcpus, ram, gpu, count)
            on_demand = _total(prices, region, "od", *shape)
            if on_demand is None:
                continue
            spot = _total(prices, region, "spot", *shape)
            rows.append({
                "provider": "gcp", "instance_type": machine_type, "gpu": gpu, "gpu_count": count,
                "gpu_memory_gib": GPU_MEMORY_GIB[gpu], "vcpus": float(vcpus), "ram_gib": float(ram),
                "price_hour": on_demand, "spot_price_hour": spot, "region": region, "zone": None,
                "billing_granularity_s": BILLING_GRANULARITY_S, "source": source, "retrieved_at": retrieved,
                "purchase": _purchase(machine_type, spot),
            })
    log.info("gcp prices: %d GPU offers in %d regions", len(rows), len({r["region"] for r in rows}))
    return rows


def _purchase(machine_type: str, spot: float | None) -> str:
    if machine_type in SPOT_OR_FLEX_ONLY:
        return "spot+flex-start"
    return "on-demand+spot" if spot is not None else "on-demand"


def _total(prices, region: str, usage: str, series: str, vcpus: int, ram: float, gpu: str, count: int) -> float | None:
    """vCPUs x core price + GiB x RAM price + GPUs x GPU price; None when any part has no SKU in `region`."""
    core, mem, card = (prices.get((f"{series}:core", usage, region)), prices.get((f"{series}:ram", usage, region)),
                       prices.get((f"gpu:{gpu}", usage, region)))
    if core is None or mem is None or card is None:
        return None
    return round(vcpus * core + ram * mem + count * card, 6)


def _http_error(resp) -> ProviderError:
    try:
        err = resp.json().get("error", {})
        message = err.get("message", "")
    except ValueError:
        message = resp.text[:200]
    text = f"GCP price catalog answered HTTP {resp.status_code}: {message}"
    if resp.status_code in (401, 403) or "API key" in message:
        return AuthError(f"{text}; check {API_KEY_ENV} (the key needs the Cloud Billing API enabled)", provider="gcp")
    return ProviderError(text, provider="gcp")
