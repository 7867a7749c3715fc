"""A fake Cloud Billing Catalog API (`GET /v1/services/{service}/skus`) on 127.0.0.1, with real-shaped SKUs.

Unit prices are GCP's published list prices for us-central1 / europe-west4, chosen so that host + GPU sums
reproduce the SkyPilot catalog snapshot (e.g. a2-highgpu-1g 0.73948 + A100 2.93391 = 3.67339 $/h). The SKU
list also carries what a real catalog page is full of and a fetcher must ignore: commitments, sole tenancy,
network egress, GPUs the fetcher does not map. Pages hold `page_size` SKUs and chain with `nextPageToken`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from werkzeug.wrappers import Request, Response

from fakes.server import FakeServer

COMPUTE = "6F81-5844-456A"
AMERICAS = ["us-central1", "us-east1"]
EMEA = ["europe-west4"]


def sku(sku_id: str, description: str, group: str, usage: str, regions: list[str], price: float,
        unit: str = "h", family: str = "Compute") -> dict:
    units, nanos = int(price), round((price - int(price)) * 1e9)
    return {
        "name": f"services/{COMPUTE}/skus/{sku_id}", "skuId": sku_id, "description": description,
        "category": {"serviceDisplayName": "Compute Engine", "resourceFamily": family, "resourceGroup": group,
                     "usageType": usage},
        "serviceRegions": regions,
        "pricingInfo": [{
            "summary": "",
            "pricingExpression": {
                "usageUnit": unit, "displayQuantity": 1,
                "usageUnitDescription": "hour" if unit == "h" else "gibibyte hour",
                "baseUnit": "s" if unit == "h" else "By.s", "baseUnitDescription": "second",
                "baseUnitConversionFactor": 3600 if unit == "h" else 3865470566400,
                "tieredRates": [{"startUsageAmount": 0,
                                 "unitPrice": {"currencyCode": "USD", "units": str(units), "nanos": nanos}}],
            },
            "currencyConversionRate": 1, "effectiveTime": "2026-01-01T08:00:00.000Z",
        }],
        "serviceProviderName": "Google",
        "geoTaxonomy": {"type": "MULTI_REGIONAL" if len(regions) > 1 else "REGIONAL", "regions": regions},
    }


def default_skus() -> list[dict]:
    return [
        # N1 host, Americas and EMEA, on-demand and spot
        sku("2E27-4F75-95CD", "N1 Predefined Instance Core running in Americas", "CPU", "OnDemand", AMERICAS, 0.031611),
        sku("6C71-A1BD-1A0C", "N1 Predefined Instance Ram running in Americas", "RAM", "OnDemand", AMERICAS, 0.004237,
            unit="GiBy.h"),
        sku("1DCE-A4CA-8A49", "Spot Preemptible N1 Predefined Instance Core running in Americas", "CPU", "Preemptible",
            AMERICAS, 0.0095325),
        sku("5D31-9B68-4C5B", "Spot Preemptible N1 Predefined Instance Ram running in Americas", "RAM", "Preemptible",
            AMERICAS, 0.00094, unit="GiBy.h"),
        sku("9431-52B1-0A5E", "N1 Predefined Instance Core running in EMEA", "CPU", "OnDemand", EMEA, 0.034773),
        sku("39F4-0112-D82F", "N1 Predefined Instance Ram running in EMEA", "RAM", "OnDemand", EMEA, 0.0046719,
            unit="GiBy.h"),
        # A2 host (a2-highgpu and a2-ultragpu share these SKUs)
        sku("8C8B-B1A6-4E49", "A2 Instance Core running in Americas", "CPU", "OnDemand", ["us-central1"], 0.031611),
        sku("B1CA-2A88-7B38", "A2 Instance Ram running in Americas", "RAM", "OnDemand", ["us-central1"], 0.004237,
            unit="GiBy.h"),
        sku("C5F9-2A3B-9B4D", "Spot Preemptible A2 Instance Core running in Americas", "CPU", "Preemptible",
            ["us-central1"], 0.01581),
        sku("4E9B-0F5F-3C21", "Spot Preemptible A2 Instance Ram running in Americas", "RAM", "Preemptible",
            ["us-central1"], 0.002118, unit="GiBy.h"),
        # GPUs
        sku("0009-6F35-3126", "Nvidia Tesla T4 GPU running in Americas", "GPU", "OnDemand", AMERICAS, 0.35),
        sku("F5B8-C0B6-0E7A", "Nvidia Tesla T4 GPU attached to Spot Preemptible VMs running in Americas", "GPU",
            "Preemptible", AMERICAS, 0.175),
        sku("3B46-1F8E-A2C5", "Nvidia Tesla T4 GPU running in EMEA", "GPU", "OnDemand", EMEA, 0.3675),
        sku("039F-D0DA-4055", "Nvidia Tesla A100 GPU running in Americas", "GPU", "OnDemand", ["us-central1"],
            2.933908),
        sku("6A5D-34B3-8C76", "Nvidia Tesla A100 GPU attached to Spot Preemptible VMs running in Americas", "GPU",
            "Preemptible", ["us-central1"], 1.4341),
        # noise a fetcher must skip
        sku("7E53-9DC1-1F52", "Commitment v1: Nvidia Tesla T4 GPU in Americas for 1 Year", "GPU", "Commit1Yr",
            AMERICAS, 0.22),
        sku("A0E8-1B2C-44D1", "Commitment v1: N1 Predefined Instance Core in Americas for 1 Year", "CPU", "Commit1Yr",
            AMERICAS, 0.019915),
        sku("D973-5D65-BAB2", "N1 Sole Tenancy Instance Core running in Americas", "CPU", "OnDemand", AMERICAS,
            0.034773),
        sku("984A-1F29-3A41", "Nvidia Tesla P4 GPU running in Americas", "GPU", "OnDemand", AMERICAS, 0.6),
        sku("9DE9-9092-B3BC", "Network Internet Egress from Americas to Americas", "PremiumInternetEgress",
            "OnDemand", AMERICAS, 0.12, unit="GiBy", family="Network"),
        # Same GPU, same region, usageType OnDemand, yet not on-demand: flex-start (DWS) at about half the list
        # price and a $0 reservation placeholder (real description shapes; issue 21).
        sku("B7A1-5C2D-DWS1", "Nvidia Tesla A100 GPU attached to DWS Defined Duration VMs running in Americas",
            "GPU", "OnDemand", ["us-central1"], 1.466954),
        sku("B7A1-5C2D-DWS2", "DWS Defined Duration A2 Core running in Americas", "CPU", "OnDemand",
            ["us-central1"], 0.0158),
        sku("B7A1-5C2D-RSV1", "Reserved Nvidia Tesla A100 GPU in Iowa", "GPU", "OnDemand", ["us-central1"], 0.0),
    ]


@dataclass
class FakeBilling(FakeServer):
    api_key: str = "test-billing-key"
    skus: list[dict] = field(default_factory=default_skus)
    page_size: int = 6
    requests: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listen("fake-gcp-billing")
        self.endpoint = self.root_url

    def dispatch(self, request: Request) -> Response:
        key = request.headers.get("X-Goog-Api-Key") or request.args.get("key")
        self.requests.append({"path": request.path, "args": dict(request.args),
                              "key_in_url": "key" in request.args, "key": key})
        return self._route(request, key)

    def _route(self, request: Request, key: str | None) -> Response:
        if request.method != "GET" or request.path != f"/v1/services/{COMPUTE}/skus":
            return _error(404, "NOT_FOUND", f"Method not found: {request.path}")
        if key != self.api_key:
            return _error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
        start = int(request.args.get("pageToken") or 0)
        size = min(self.page_size, int(request.args.get("pageSize") or 5000))
        body = {"skus": self.skus[start:start + size], "nextPageToken": ""}
        if start + size < len(self.skus):
            body["nextPageToken"] = str(start + size)
        return Response(json.dumps(body), content_type="application/json; charset=UTF-8")


def _error(status: int, name: str, message: str) -> Response:
    body = {"error": {"code": status, "message": message, "status": name}}
    return Response(json.dumps(body), status=status, content_type="application/json; charset=UTF-8")
