"""Live Lambda Cloud offers for `ftplan catalog refresh`: `GET /instance-types` gives the price and the
regions that have capacity right now in one call.

Rows exist only for regions with capacity at the time of the call (Lambda publishes no per-region
list otherwise); the price is the same in every region; Lambda has no spot market. GPU names follow
SkyPilot's Lambda catalog (`A6000`, `H100` for both PCIe and SXM5, `A100-80GB` for the 80 GB SXM4).
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from typing import Any

from ftplan.providers.lambda_cloud import LambdaProvider

log = logging.getLogger(__name__)

SOURCE = "lambda:GET /instance-types"
BILLING_GRANULARITY_S = 60  # Lambda bills in one-minute increments

# Lambda's model token in `gpu_<n>x_<model>` -> SkyPilot GPU name.
GPU_NAMES = {
    "a10": "A10", "a100": "A100", "a100_sxm4": "A100", "a100_80gb_sxm4": "A100-80GB", "a100_80gb": "A100-80GB",
    "a6000": "A6000", "rtx6000": "RTX6000", "h100_pcie": "H100", "h100_sxm5": "H100", "gh200": "GH200",
    "b200_sxm6": "B200", "v100": "V100", "v100_n": "V100",
}
GPU_MEMORY_GIB = {"A10": 24, "A100": 40, "A100-80GB": 80, "A6000": 48, "RTX6000": 24, "H100": 80, "GH200": 96,
                  "B200": 180, "V100": 16}
_TYPE = re.compile(r"^gpu_(\d+)x_(.+)$")
_MEM = re.compile(r"(\d+)\s*GB", re.I)


def _gpu(name: str, description: str) -> tuple[str, int, float] | None:
    m = _TYPE.match(name)
    if not m:
        return None
    count, token = int(m.group(1)), m.group(2)
    gpu = GPU_NAMES.get(token) or token.split("_")[0].upper()
    mem = _MEM.search(description or "")
    return gpu, count, float(mem.group(1)) if mem else float(GPU_MEMORY_GIB.get(gpu, 0))


def fetch_offers(base_url: str | None = None, api_key: str | None = None) -> list[dict[str, Any]]:
    adapter = LambdaProvider(api_key=api_key, **({"base_url": base_url} if base_url else {}))
    data = (adapter.client.get("/instance-types") or {}).get("data", {})
    today = _dt.date.today().isoformat()
    rows = []
    for name, entry in sorted(data.items()):
        it = entry.get("instance_type", {})
        specs = it.get("specs", {})
        parsed = _gpu(name, it.get("gpu_description", ""))
        if parsed is None or not specs.get("gpus"):
            continue  # CPU-only types
        gpu, count, mem = parsed
        for region in entry.get("regions_with_capacity_available", []):
            rows.append({
                "provider": "lambda",
                "instance_type": name,
                "gpu": gpu,
                "gpu_count": int(specs.get("gpus") or count),
                "gpu_memory_gib": mem,
                "vcpus": float(specs.get("vcpus") or 0),
                "ram_gib": float(specs.get("memory_gib") or 0),
                "price_hour": round(int(it.get("price_cents_per_hour", 0)) / 100, 4),
                "spot_price_hour": None,
                "region": region.get("name"),
                "zone": None,
                "billing_granularity_s": BILLING_GRANULARITY_S,
                "source": SOURCE,
                "retrieved_at": today,
            })
    return rows
