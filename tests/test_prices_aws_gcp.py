"""Price fetchers against fakes speaking the real wire formats.

AWS: boto3's `pricing` client -> a local Price List API server (JSON 1.1, real-shaped PriceList documents,
decoys that only the right filters exclude); spot prices from moto's EC2. GCP: httpx -> a fake Cloud Billing
Catalog whose unit prices are GCP's list prices; the expected totals are the SkyPilot snapshot's host + GPU sums
(/work/shared/catalog-snapshots), computed independently of this code.
"""

from __future__ import annotations

import boto3
import pytest
from fakes.aws_moto import MotoEC2, PricingFake, isolate_aws_env, price_list_document
from fakes.gcp_billing import FakeBilling

from ftplan.providers import aws_prices, gcp_prices
from ftplan.providers.errors import AuthError, ProviderError

ROW_KEYS = {"provider", "instance_type", "gpu", "gpu_count", "gpu_memory_gib", "vcpus", "ram_gib", "price_hour",
            "spot_price_hour", "region", "zone", "billing_granularity_s", "source", "retrieved_at"}
VA, IE = "US East (N. Virginia)", "EU (Ireland)"


def aws_documents() -> list[dict]:
    def doc(itype, region, loc, usd, vcpu, mem, gpu, gmem, **kw):
        return price_list_document(itype, region, loc, usd, vcpu=vcpu, memory=mem, gpu=gpu, gpu_memory=gmem, **kw)

    return [
        doc("g5.xlarge", "us-east-1", VA, "1.0060000000", "4", "16 GiB", "1", "24 GB"),
        doc("g5.xlarge", "us-east-1", VA, "1.6240000000", "4", "16 GiB", "1", "24 GB", os_name="Windows"),
        doc("g5.xlarge", "us-east-1", VA, "0.0000000000", "4", "16 GiB", "1", "24 GB",
            capacity="UnusedCapacityReservation"),
        doc("g5.xlarge", "us-east-1", VA, "1.1066000000", "4", "16 GiB", "1", "24 GB", tenancy="Dedicated"),
        doc("g5.12xlarge", "us-east-1", VA, "5.6720000000", "48", "192 GiB", "4", "96 GB"),
        doc("p4d.24xlarge", "us-east-1", VA, "21.9576420000", "96", "1,152 GiB", "8", "320 GB"),
        doc("g4dn.xlarge", "us-east-1", VA, "0.5260000000", "4", "16 GiB", "1", "16 GB"),
        doc("g4ad.xlarge", "us-east-1", VA, "0.3785300000", "4", "16 GiB", "1", "8 GB"),  # AMD: not mapped
        doc("m5.xlarge", "us-east-1", VA, "0.1920000000", "4", "16 GiB", "0", "NA", family="General purpose"),
        doc("g5.xlarge", "eu-west-1", IE, "1.1230000000", "4", "16 GiB", "1", "24 GB"),
        doc("g4dn.xlarge", "eu-west-1", IE, "0.5870000000", "4", "16 GiB", "1", "16 GB"),
    ]


@pytest.fixture
def pricing():
    server = PricingFake(products=aws_documents()).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch, tmp_path):
    isolate_aws_env(monkeypatch, tmp_path, "AKIAPRICETEST0000001", "price-test-secret-key-000000000000000000")


def by_key(rows):
    return {(r["instance_type"], r["region"]): r for r in rows}


def test_aws_on_demand_offers_from_the_price_list(pricing):
    rows = aws_prices.fetch_offers(regions=["us-east-1", "eu-west-1"], endpoint_url=pricing.url, spot=False)
    assert all(set(r) == ROW_KEYS for r in rows)
    got = by_key(rows)
    assert set(got) == {("g5.xlarge", "us-east-1"), ("g5.12xlarge", "us-east-1"), ("p4d.24xlarge", "us-east-1"),
                        ("g4dn.xlarge", "us-east-1"), ("g5.xlarge", "eu-west-1"), ("g4dn.xlarge", "eu-west-1")}
    # Prices as in the SkyPilot snapshot: the Linux / shared / plain on-demand SKU, not the decoys.
    assert got[("g5.xlarge", "us-east-1")]["price_hour"] == pytest.approx(1.006)
    assert got[("g5.xlarge", "eu-west-1")]["price_hour"] == pytest.approx(1.123)
    p4d = got[("p4d.24xlarge", "us-east-1")]
    assert (p4d["gpu"], p4d["gpu_count"], p4d["gpu_memory_gib"], p4d["vcpus"], p4d["ram_gib"]) == ("A100", 8, 40, 96,
                                                                                                    1152)
    assert p4d["price_hour"] == pytest.approx(21.957642)
    g5 = got[("g5.12xlarge", "us-east-1")]
    assert (g5["gpu"], g5["gpu_count"], g5["gpu_memory_gib"]) == ("A10G", 4, pytest.approx(22.35, abs=0.01))
    assert got[("g4dn.xlarge", "us-east-1")]["gpu"] == "T4"
    assert all(r["spot_price_hour"] is None and r["zone"] is None and r["provider"] == "aws" for r in rows)
    sent = pricing.requests[0]
    assert sent["target"] == "AWSPriceListService.GetProducts" and sent["body"]["ServiceCode"] == "AmazonEC2"
    assert len(pricing.requests) > 2  # it followed NextToken (page size 2)


def test_aws_spot_prices_come_from_ec2(pricing):
    moto = MotoEC2().start()
    try:
        rows = aws_prices.fetch_offers(regions=["us-east-1"], endpoint_url=pricing.url, ec2_endpoint_url=moto.url)
        ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto.url)
        history = ec2.describe_spot_price_history(InstanceTypes=["g5.xlarge"],
                                                  ProductDescriptions=["Linux/UNIX"])["SpotPriceHistory"]
    finally:
        moto.stop()
    assert history, "moto offers g5.xlarge spot in us-east-1"
    g5 = by_key(rows)[("g5.xlarge", "us-east-1")]
    assert g5["spot_price_hour"] == pytest.approx(min(float(h["SpotPrice"]) for h in history))


def test_aws_denied_pricing_is_an_auth_error(pricing):
    pricing.fail_with = (400, "AccessDeniedException", "User is not authorized to perform: pricing:GetProducts")
    with pytest.raises(AuthError, match="pricing:GetProducts"):
        aws_prices.fetch_offers(regions=["us-east-1"], endpoint_url=pricing.url, spot=False)


@pytest.fixture
def billing():
    server = FakeBilling().start()
    yield server
    server.stop()


def test_gcp_offers_compose_host_and_gpu_skus(billing):
    rows = gcp_prices.fetch_offers(api_key=billing.api_key, endpoint=billing.endpoint)
    assert all(set(r) == ROW_KEYS | {"purchase"} for r in rows)
    got = by_key(rows)
    # SkyPilot snapshot, us-central1-a: n1-standard-8 host 0.38 + T4 0.35; spot 0.10446 + 0.175.
    t4 = got[("n1-standard-8", "us-central1")]
    assert (t4["gpu"], t4["gpu_count"], t4["vcpus"], t4["ram_gib"]) == ("T4", 1, 8, 30)
    assert t4["price_hour"] == pytest.approx(0.38 + 0.35, abs=1e-4)
    assert t4["spot_price_hour"] == pytest.approx(0.10446 + 0.175, abs=1e-4)
    # a2-highgpu-1g host 0.73948 + A100 2.93391 = 3.67339 (the snapshot README's worked example); spot 0.36975 + 1.4341.
    a2 = got[("a2-highgpu-1g", "us-central1")]
    assert (a2["gpu"], a2["gpu_count"], a2["gpu_memory_gib"]) == ("A100", 1, 40)
    assert a2["price_hour"] == pytest.approx(3.67339, abs=1e-4)
    assert a2["spot_price_hour"] == pytest.approx(0.36975 + 1.4341, abs=1e-4)
    assert got[("a2-highgpu-8g", "us-central1")]["price_hour"] == pytest.approx(
        96 * 0.031611 + 680 * 0.004237 + 8 * 2.933908, abs=1e-4)
    # europe-west4: host 0.41834 + T4 0.3675, and no spot SKUs there -> no spot offer.
    eu = got[("n1-standard-8", "europe-west4")]
    assert eu["price_hour"] == pytest.approx(0.41834 + 0.3675, abs=1e-4)
    assert eu["spot_price_hour"] is None
    assert ("a2-highgpu-1g", "us-east1") not in got  # A2/A100 SKUs only list us-central1
    assert {r["gpu"] for r in rows} == {"T4", "A100"}  # no P4 (not mapped), no V100/L4 (no SKUs in the fake)
    assert all(r["zone"] is None and r["billing_granularity_s"] == 1 for r in rows)


def test_gcp_pages_and_keeps_the_key_out_of_urls(billing):
    gcp_prices.fetch_offers(api_key=billing.api_key, endpoint=billing.endpoint, regions=["us-central1"])
    tokens = [r["args"].get("pageToken") for r in billing.requests]
    assert len(tokens) == -(-len(billing.skus) // billing.page_size)  # every page, once
    assert tokens[0] is None and all(tokens[1:])
    assert not any(r["key_in_url"] for r in billing.requests)


def test_gcp_bad_or_missing_api_key(billing, monkeypatch):
    with pytest.raises(AuthError) as caught:
        gcp_prices.fetch_offers(api_key="AIzaWrongKey-planted-0123456789", endpoint=billing.endpoint)
    assert "API key not valid" in str(caught.value) and "AIzaWrongKey-planted-0123456789" not in str(caught.value)
    monkeypatch.delenv(gcp_prices.API_KEY_ENV, raising=False)
    with pytest.raises(AuthError, match=gcp_prices.API_KEY_ENV):
        gcp_prices.fetch_offers(endpoint=billing.endpoint)


def test_gcp_unreachable_catalog_is_a_provider_error():
    with pytest.raises(ProviderError, match="unreachable"):
        gcp_prices.fetch_offers(api_key="k" * 10, endpoint="http://127.0.0.1:9", timeout_s=2)


# Real Compute Engine SKU descriptions of each kind (as the Cloud Billing Catalog spells them; the flex-start and
# reservation ones carry usageType "OnDemand" like the real on-demand SKU).
SKU_KINDS = [
    ("Nvidia H100 80GB GPU running in Americas", "OnDemand", "on-demand"),
    ("Nvidia Tesla A100 80GB GPU running in EMEA", "OnDemand", "on-demand"),
    ("Nvidia L4 GPU running in APAC", "OnDemand", "on-demand"),
    ("Nvidia Tesla A100 GPU attached to Spot Preemptible VMs running in Americas", "Preemptible", "spot"),
    ("Spot Preemptible A2 Instance Core running in Americas", "Preemptible", "spot"),
    ("Nvidia Tesla A100 80GB GPU attached to DWS Defined Duration VMs running in Americas", "OnDemand", "flex-start"),
    ("DWS Defined Duration A2 Core running in Americas", "OnDemand", "flex-start"),
    ("DWS Defined Duration V6e running in Columbus", "OnDemand", "flex-start"),
    ("Reserved Nvidia Tesla A100 80GB GPU in Virginia", "OnDemand", "reservation"),
    ("Reserved V6e TPU in Columbus in Calendar Mode", "OnDemand", "reservation"),
    ("Commitment v1: Nvidia H100 80GB GPU running in Americas for 1 Year", "Commit1Yr", "commitment"),
    ("Commitment v1: Nvidia L4 GPU in Iowa for 3 Years", "Commit3Yr", "commitment"),
    ("Capacity Optimized TpuV6e running in Columbus", "OnDemand", None),
]


@pytest.mark.parametrize(("description", "usage", "kind"), SKU_KINDS)
def test_gcp_sku_kind_from_real_descriptions(description, usage, kind):
    assert gcp_prices.sku_kind(description, usage) == kind


def test_gcp_flex_start_and_reserved_skus_never_price_an_on_demand_offer(billing):
    """The fake lists a DWS (flex-start) A100 SKU at half price and a $0 reservation after the on-demand one."""
    a2 = by_key(gcp_prices.fetch_offers(api_key=billing.api_key, endpoint=billing.endpoint))[
        ("a2-highgpu-1g", "us-central1")]
    assert a2["price_hour"] == pytest.approx(3.67339, abs=1e-4)
    assert a2["purchase"] == "on-demand+spot"


def test_gcp_shapes_sold_only_by_spot_or_flex_start_carry_no_on_demand_purchase():
    assert gcp_prices._purchase("a3-highgpu-1g", 3.2) == "spot+flex-start"
    assert gcp_prices._purchase("a3-highgpu-8g", None) == "on-demand"
