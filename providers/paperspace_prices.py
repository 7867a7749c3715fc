"""Paperspace offers for `ftplan catalog refresh` — availability is live, prices are NOT.

Paperspace's v1 API has no price endpoint (and no `/machine-types` endpoint is documented in what
could be checked). What it does have is `GET /os-templates`, whose templates list
`availableMachineTypes[{machineTypeLabel, isAvailable}]`. So this fetcher returns the shipped price
rows (a CSV: ftplan's offer columns or SkyPilot's `vms.csv` columns) for the machine types the API
currently reports as available, with `source` saying exactly that. Prices only change when the
shipped catalog is updated.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
from pathlib import Path
from typing import Any

from ftplan.providers.errors import ProviderError
from ftplan.providers.paperspace import PaperspaceProvider

SOURCE = "paperspace:GET /os-templates availability + shipped prices"
BILLING_GRANULARITY_S = 1  # compute is metered per second (ftplan issue 21; catalogs/offers/SOURCES.md)
GPU_MEMORY_GIB = {"A100-80GB": 80, "A100": 40, "H100": 80, "V100-32GB": 32, "V100": 16, "A6000": 48,
                  "A5000": 24, "A4000": 16, "P4000": 8, "P5000": 16, "P6000": 24, "M4000": 8, "RTX4000": 8}


def default_price_table() -> Path:
    from ftplan.catalogs import data_path  # noqa: PLC0415

    return data_path("offers/paperspace.csv")


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def load_price_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Price rows from a CSV in ftplan's offer format or SkyPilot's Paperspace `vms.csv` format."""
    path = Path(path)
    if not path.is_file():
        raise ProviderError(f"paperspace: no price table at {path}; Paperspace has no price API, "
                            "so prices come from the shipped catalog", provider="paperspace")
    rows = []
    with path.open(newline="") as fh:
        for r in csv.DictReader(fh):
            if "instance_type" in r:  # ftplan format
                gpu, count = r.get("gpu") or "", int(_num(r.get("gpu_count")))
                row = {"instance_type": r["instance_type"], "gpu": gpu, "gpu_count": count,
                       "gpu_memory_gib": _num(r.get("gpu_memory_gib")) or float(GPU_MEMORY_GIB.get(gpu, 0)),
                       "vcpus": _num(r.get("vcpus")), "ram_gib": _num(r.get("ram_gib")),
                       "price_hour": _num(r.get("price_hour")), "region": r.get("region") or "",
                       "price_date": r.get("price_date") or ""}
            else:  # SkyPilot vms.csv
                gpu, count = r.get("AcceleratorName") or "", int(_num(r.get("AcceleratorCount")))
                row = {"instance_type": r.get("InstanceType", ""), "gpu": gpu, "gpu_count": count,
                       "gpu_memory_gib": float(GPU_MEMORY_GIB.get(gpu, 0)), "vcpus": _num(r.get("vCPUs")),
                       "ram_gib": _num(r.get("MemoryGiB")), "price_hour": _num(r.get("Price")),
                       "region": r.get("Region") or "", "price_date": ""}
            if row["gpu"] and row["gpu_count"] > 0 and row["price_hour"] > 0:
                rows.append(row)
    return rows


def fetch_offers(base_url: str | None = None, api_key: str | None = None,
                 price_table: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Shipped price rows for the GPU machine types Paperspace reports available now."""
    prices = load_price_table(price_table or default_price_table())
    adapter = PaperspaceProvider(api_key=api_key, **({"base_url": base_url} if base_url else {}))
    available: set[str] = set()
    for template in adapter._items("/os-templates"):
        for mt in template.get("availableMachineTypes") or []:
            if mt.get("isAvailable", True) and mt.get("machineTypeLabel"):
                available.add(mt["machineTypeLabel"])
    today = _dt.date.today().isoformat()
    return [{
        "provider": "paperspace", **{k: p[k] for k in ("instance_type", "gpu", "gpu_count", "gpu_memory_gib",
                                                        "vcpus", "ram_gib", "price_hour")},
        "spot_price_hour": None, "region": p["region"], "zone": None,
        "billing_granularity_s": BILLING_GRANULARITY_S, "source": SOURCE, "retrieved_at": today,
        "price_date": p["price_date"],  # the shipped list's date: only availability is live
    } for p in prices if p["instance_type"] in available]
