"""Live AWS GPU offers for `ftplan catalog refresh`: on-demand prices from the Price List API, spot from EC2.

On-demand: `pricing.get_products(ServiceCode="AmazonEC2")` filtered to Linux, shared tenancy, no
pre-installed software, capacity status "Used" (the plain on-demand SKU), instance family "GPU instance",
one region at a time; each `PriceList` entry is a JSON *string* holding `product.attributes` and
`terms.OnDemand.*.priceDimensions.*.pricePerUnit.USD`.
Spot: EC2 `describe_spot_price_history` (Linux/UNIX, latest price per zone); the row gets the cheapest zone.

Instance families mapped (GPU name in SkyPilot spelling, per-GPU memory as EC2's GpuInfo reports it):
g4dn T4 · g5 A10G · g6 L4 · g6e L40S · p3 V100 · p3dn V100-32GB · p4d A100 · p4de A100-80GB · p5 H100 ·
p5e/p5en H200. Other GPU families (g4ad Radeon, g5g T4g on ARM, inf/trn, ...) are skipped.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from ftplan.providers.errors import AuthError, ProviderError, import_sdk, scrub

log = logging.getLogger("ftplan.providers.aws_prices")

SOURCE = "aws-pricing-api:GetProducts(AmazonEC2)"
PRICING_REGION = "us-east-1"  # the Price List API lives in us-east-1 (also ap-south-1, eu-central-1)
DEFAULT_REGIONS = ("us-east-1", "us-east-2", "us-west-2", "eu-west-1", "eu-central-1", "ap-northeast-1")
BILLING_GRANULARITY_S = 1  # Linux on-demand and spot: per second (60 s minimum)

# family -> (GPU name, per-GPU memory in MiB as EC2 GpuInfo reports it)
FAMILY_GPUS: dict[str, tuple[str, int]] = {
    "g4dn": ("T4", 16384), "g5": ("A10G", 22888), "g6": ("L4", 22888), "g6e": ("L40S", 45776),
    "p3": ("V100", 16384), "p3dn": ("V100-32GB", 32768), "p4d": ("A100", 40960), "p4de": ("A100-80GB", 81920),
    "p5": ("H100", 81920), "p5e": ("H200", 144384), "p5en": ("H200", 144384),
}
_FILTERS = {
    "operatingSystem": "Linux", "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used",
    "licenseModel": "No License required", "instanceFamily": "GPU instance",
}


def fetch_offers(
    regions: list[str] | None = None,
    endpoint_url: str | None = None,
    *,
    ec2_endpoint_url: str | None = None,
    spot: bool = True,
    session: Any = None,
    today: dt.date | None = None,
) -> list[dict[str, Any]]:
    """One row per (GPU instance type, region) with on-demand and (if `spot`) cheapest-zone spot $/hour."""
    boto3 = import_sdk("boto3", "AWS", "aws")
    config_cls = import_sdk("botocore.config", "AWS", "aws", "boto3").Config
    session = session or boto3.session.Session()
    config = config_cls(retries={"mode": "standard", "total_max_attempts": 3}, connect_timeout=10, read_timeout=60)
    retrieved = (today or dt.date.today()).isoformat()
    try:
        pricing = session.client("pricing", region_name=PRICING_REGION, endpoint_url=endpoint_url, config=config)
        rows: list[dict[str, Any]] = []
        for region in regions or DEFAULT_REGIONS:
            region_rows = [_row(doc, region, retrieved) for doc in _products(pricing, region)]
            region_rows = sorted((r for r in region_rows if r), key=lambda r: r["instance_type"])
            if spot and region_rows:
                ec2 = session.client("ec2", region_name=region, endpoint_url=ec2_endpoint_url, config=config)
                prices = _spot_prices(ec2, [r["instance_type"] for r in region_rows])
                for r in region_rows:
                    r["spot_price_hour"] = prices.get(r["instance_type"])
            rows.extend(region_rows)
            log.info("aws prices: %d GPU offers in %s", len(region_rows), region)
    except Exception as exc:
        raise _mapped(exc) from None
    return rows


def _products(pricing, region: str):
    filters = [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in {**_FILTERS, "regionCode": region}.items()]
    for page in pricing.get_paginator("get_products").paginate(ServiceCode="AmazonEC2", Filters=filters):
        for item in page.get("PriceList", []):
            yield json.loads(item) if isinstance(item, str) else item


def _row(doc: dict[str, Any], region: str, retrieved: str) -> dict[str, Any] | None:
    attrs = doc.get("product", {}).get("attributes", {})
    instance_type = attrs.get("instanceType", "")
    family = instance_type.split(".")[0]
    if family not in FAMILY_GPUS or attrs.get("regionCode", region) != region:
        return None
    price = _on_demand_usd(doc)
    if not price:
        return None
    gpu, mib = FAMILY_GPUS[family]
    try:
        gpu_count = int(float(attrs.get("gpu", "0")))
        vcpus = float(attrs["vcpu"])
        ram_gib = float(attrs["memory"].split()[0].replace(",", ""))
    except (KeyError, ValueError, IndexError):
        log.warning("aws prices: skipping %s in %s: unreadable attributes", instance_type, region)
        return None
    if gpu_count < 1:
        return None
    return {
        "provider": "aws", "instance_type": instance_type, "gpu": gpu, "gpu_count": gpu_count,
        "gpu_memory_gib": round(mib / 1024, 2), "vcpus": vcpus, "ram_gib": ram_gib, "price_hour": price,
        "spot_price_hour": None, "region": region, "zone": None, "billing_granularity_s": BILLING_GRANULARITY_S,
        "source": SOURCE, "retrieved_at": retrieved,
    }


def _on_demand_usd(doc: dict[str, Any]) -> float | None:
    for term in doc.get("terms", {}).get("OnDemand", {}).values():
        for dim in term.get("priceDimensions", {}).values():
            if dim.get("unit") == "Hrs" and "USD" in dim.get("pricePerUnit", {}):
                value = float(dim["pricePerUnit"]["USD"])
                if value > 0:
                    return value
    return None


def _spot_prices(ec2, instance_types: list[str]) -> dict[str, float]:
    """Latest spot price per zone, cheapest zone per type (StartTime=now returns just the current prices)."""
    now = dt.datetime.now(dt.timezone.utc)
    latest: dict[tuple[str, str], tuple[Any, float]] = {}
    pages = ec2.get_paginator("describe_spot_price_history").paginate(
        InstanceTypes=instance_types, ProductDescriptions=["Linux/UNIX"], StartTime=now)
    for page in pages:
        for p in page.get("SpotPriceHistory", []):
            key = (p["InstanceType"], p.get("AvailabilityZone", ""))
            if key not in latest or p["Timestamp"] > latest[key][0]:
                latest[key] = (p["Timestamp"], float(p["SpotPrice"]))
    cheapest: dict[str, float] = {}
    for (itype, _), (_, price) in latest.items():
        if price > 0:
            cheapest[itype] = min(price, cheapest.get(itype, price))
    return cheapest


def _mapped(exc: Exception) -> Exception:
    if isinstance(exc, ProviderError):
        return exc
    from botocore import exceptions as bx

    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return AuthError("AWS credentials not found: run `aws configure` or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
                         provider="aws")
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code", "Unknown")
        text = f"AWS price list: {code}: {err.get('Message', '')}"
        if code in ("AccessDeniedException", "UnrecognizedClientException", "InvalidClientTokenId",
                    "AuthFailure", "UnauthorizedOperation", "ExpiredTokenException", "SignatureDoesNotMatch"):
            return AuthError(f"{text}; the identity needs pricing:GetProducts and ec2:DescribeSpotPriceHistory",
                             provider="aws")
        return ProviderError(text, provider="aws")
    if isinstance(exc, (bx.BotoCoreError, json.JSONDecodeError)):
        return ProviderError(f"AWS price list request failed: {scrub(exc)}", provider="aws")
    return exc
