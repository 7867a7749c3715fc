"""Integrity of the shipped offer catalogs (catalogs/offers/*.csv), the output of scripts/import_catalogs.py."""

from __future__ import annotations

import csv
import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

from ftplan.planner.estimate.gpus import load_gpus
from ftplan.planner.pricing import offers as O

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = ROOT.parent / "shared" / "catalog-snapshots"


def shipped(provider: str) -> list[dict]:
    with open(O.shipped_path(provider), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def all_rows() -> dict[str, list[dict]]:
    return {p: shipped(p) for p in O.PROVIDERS}


def test_every_provider_ships_a_catalog_with_the_one_column_list(all_rows):
    for p, rows in all_rows.items():
        with open(O.shipped_path(p), newline="", encoding="utf-8") as fh:
            assert tuple(next(csv.reader(fh))) == O.COLUMNS
        assert rows, f"{p}: empty catalog"
        assert {r["provider"] for r in rows} == {p}


def test_rows_validate_prices_positive_and_spot_not_above_on_demand(all_rows):
    for p, rows in all_rows.items():
        valid = O.validate_rows(rows)  # pydantic: types, price > 0, spot <= on-demand, no duplicates
        assert len(valid) == len(rows)
        for r in valid:
            assert r["price_hour"] > 0
            if r["spot_price_hour"] is not None:
                assert 0 < r["spot_price_hour"] < r["price_hour"], (p, r)


def test_every_gpu_is_in_the_gpu_table_with_consistent_memory(all_rows):
    gpus = load_gpus()
    for p, rows in all_rows.items():
        for r in rows:
            assert r["gpu"] in gpus, (p, r["gpu"])
            g, mem = gpus[r["gpu"]], float(r["gpu_memory_gib"])
            # a provider lists either the marketed size or what the driver reports
            assert 0.95 * g.usable_gib <= mem <= 1.05 * g.memory_gib, (p, r["instance_type"], mem, g.name)


def test_no_duplicate_offers(all_rows):
    for p, rows in all_rows.items():
        keys = [O.offer_key({**r, "gpu_count": int(r["gpu_count"])}) for r in rows]
        assert len(keys) == len(set(keys)), p


def test_loader_reads_every_shipped_file_without_complaint(tmp_path, monkeypatch):
    monkeypatch.setenv("FTPLAN_CACHE_DIR", str(tmp_path))
    table = O.OfferTable.load()
    assert {f.provider for f in table.files} == set(O.PROVIDERS)
    assert {f.origin for f in table.files} == {"shipped"}
    assert len(table) == sum(len(shipped(p)) for p in O.PROVIDERS)


def test_upstream_quirks_are_handled(all_rows):
    aws, gcp, runpod = all_rows["aws"], all_rows["gcp"], all_rows["runpod"]
    # AWS p5e.48xlarge has no on-demand price upstream; fractional (g6f) and arm64 (g5g) types are dropped.
    assert not [r for r in aws if r["instance_type"] in ("p5e.48xlarge",) or r["instance_type"].startswith(
        ("g6f.", "gr6f.", "g5g."))]
    # GCP offers are host VM + GPU of the same zone: README example us-central1-a a2-highgpu-1g + A100 x1.
    a2 = next(r for r in gcp if (r["instance_type"], r["zone"]) == ("a2-highgpu-1g", "us-central1-a"))
    assert float(a2["price_hour"]) == pytest.approx(0.73948 + 2.93391)
    assert float(a2["spot_price_hour"]) == pytest.approx(0.36975 + 1.4341)
    # a4 (B200) hosts are priced 0.0 upstream: the offer still carries the GPU row's price.
    b200 = [r for r in gcp if r["instance_type"] == "a4-highgpu-8g"]
    assert b200 and all(float(r["price_hour"]) > 10 for r in b200)
    # RunPod: L40S columns were swapped upstream; now re-priced from the published list (1.09 $/GPU-h secure).
    l40s = [r for r in runpod if r["gpu"] == "L40S" and r["cloud"] == "secure"]
    assert l40s and all(float(r["price_hour"]) == pytest.approx(1.09 * int(r["gpu_count"])) for r in l40s)
    # RunPod 2x_B200_SECURE's US rows appear twice upstream: once here.
    b2 = [(r["region"], r["zone"]) for r in runpod if r["instance_type"] == "2x_B200_SECURE"]
    assert len(b2) == len(set(b2)) == 25
    # Lambda and Paperspace have no spot market; Paperspace has one region.
    assert all(r["spot_price_hour"] == "" for r in all_rows["lambda"] + all_rows["paperspace"])
    assert {r["region"] for r in all_rows["paperspace"]} == {"East Coast (NY2)"}


def test_billing_granularity_per_provider(all_rows):
    expected = {"aws": "1", "gcp": "1", "runpod": "1", "lambda": "60", "paperspace": "1"}
    for p, rows in all_rows.items():
        assert {r["billing_granularity_s"] for r in rows} == {expected[p]}


def test_every_row_says_where_its_price_comes_from_and_when(all_rows):
    for p, rows in all_rows.items():
        for r in rows:
            assert r["source"] and O.parse_date(r["retrieved_at"])
            # A price read from a provider's page carries that day; the SkyPilot snapshot's own date is unknown.
            if not r["source"].startswith("skypilot-catalog"):
                assert r["price_date"], (p, r["instance_type"], r["source"])
                assert O.parse_date(r["price_date"]) <= O.parse_date(r["retrieved_at"])


def test_gcp_on_demand_gpu_prices_are_list_prices_not_flex_start(all_rows):
    """Issue 21: 59 zone rows carried a flex-start/commitment SKU (~half list). H100 on demand is ~9.8-14 $/GPU-h
    plus the host wherever it is sold; A100 80GB us-central1 is 3.928 (GPU SKU) + 1.0996 (host)."""
    gcp = all_rows["gcp"]
    h100 = [r for r in gcp if r["gpu"] == "H100" and "on-demand" in r["purchase"].split("+")]
    assert h100 and min(float(r["price_hour"]) / int(r["gpu_count"]) for r in h100) > 10.0
    a2u = next(r for r in gcp if (r["instance_type"], r["zone"]) == ("a2-ultragpu-1g", "us-central1-a"))
    assert float(a2u["price_hour"]) == pytest.approx(3.92808 + 1.09962)
    assert a2u["price_date"] and "Cloud Billing Catalog" in a2u["source"]


def test_gcp_types_sold_only_by_reservation_spot_or_flex_start_have_no_on_demand_offer(all_rows):
    for r in all_rows["gcp"]:
        modes = r["purchase"].split("+")
        if r["instance_type"].startswith(("a4-highgpu-", "a3-ultragpu-", "a3-highgpu-1g", "a3-highgpu-2g",
                                          "a3-highgpu-4g")):
            assert "on-demand" not in modes and "flex-start" in modes, r
        else:  # A3 Mega zones priced only with the flex-start SKU upstream: spot only (SOURCES.md)
            assert "on-demand" in modes or (r["instance_type"] == "a3-megagpu-8g" and modes == ["spot"]), r
    assert any(r["instance_type"] == "a3-highgpu-1g" and "spot" in r["purchase"] for r in all_rows["gcp"])


def test_runpod_community_cloud_offers_of_their_own(all_rows):
    rows = all_rows["runpod"]
    assert {r["cloud"] for r in rows} == {"secure", "community"}
    comm = {r["instance_type"]: r for r in rows if r["cloud"] == "community"}
    h100 = comm["1x_H100-SXM_COMMUNITY"]
    assert float(h100["price_hour"]) == pytest.approx(2.69) and h100["region"] == "ANY"
    secure = {(r["gpu"], r["gpu_count"]): float(r["price_hour"]) for r in rows if r["cloud"] == "secure"}
    for r in comm.values():  # community is the cheaper cloud for every type both list
        if (r["gpu"], r["gpu_count"]) in secure:
            assert float(r["price_hour"]) < secure[(r["gpu"], r["gpu_count"])], r["instance_type"]


@pytest.mark.skipif(not SNAPSHOTS.is_dir(), reason="the shared catalog snapshots are not on this machine")
def test_importer_reproduces_the_shipped_files(tmp_path):
    date = shipped("aws")[0]["retrieved_at"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_catalogs.py"), "--src", str(SNAPSHOTS),
                           "--out", str(tmp_path), "--date", date], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "p5e.48xlarge: no on-demand price upstream" in proc.stdout  # the summary names what it dropped
    for p in O.PROVIDERS:
        assert filecmp.cmp(tmp_path / f"{p}.csv", O.shipped_path(p), shallow=False), p
