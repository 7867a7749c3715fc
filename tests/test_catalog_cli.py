"""`ftplan catalog show|refresh` through the CLI entry point.

Refresh goes through the real registry (ftplan.planner.pricing.catalog_refresh) into the real Lambda price fetcher,
which talks HTTP to the fake Lambda API (tests/fakes/lambda_api.py) in Lambda's own response shape.
"""

from __future__ import annotations

import csv
import datetime
import json

import pytest
from cli_helpers import error_line, ftplan
from fakes import lambda_api
from test_plan_cli import BASE, write_cache

from ftplan.planner.pricing import offers as O
from ftplan.planner.pricing.catalog_refresh import REFRESHERS, fetcher

fake_lambda = lambda_api.fake_lambda  # pytest fixture: a running fake with fresh state


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FTPLAN_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_show_gives_source_age_and_origin(capsys):
    rc, out, err = ftplan(capsys, "catalog", "show", "--json")
    assert rc == 0, err
    entries = {e["provider"]: e for e in json.loads(out)}
    assert set(entries) == set(O.PROVIDERS)
    for e in entries.values():
        assert e["origin"] == "shipped" and e["offers"] > 0 and e["age_days"] >= 0
        assert sum(s["rows"] for s in e["sources"]) == e["offers"]
        # Undated rows (the SkyPilot snapshot) say that their date is the import date, not the upstream date.
        assert ("upstream date is unknown" in e["note"]) == (e["undated"] > 0)
    assert entries["aws"]["undated"] == entries["aws"]["offers"] and entries["aws"]["price_dates"] == []
    assert entries["lambda"]["undated"] == 0 and entries["lambda"]["price_dates"] == ["2026-09-20", "2026-09-20"]
    assert "lambda.ai/instances read 2026-09-20" in entries["lambda"]["source"]
    rc, out, _ = ftplan(capsys, "catalog", "show", "--regions")
    assert rc == 0 and "East Coast (NY2)" in out and "d old" in out
    aws = out.split("\ngcp")[0]
    assert "the upstream date is unknown" in aws and "imported 2026-12-01" in aws


def test_old_cache_is_flagged_stale_in_show(capsys, cache_dir):
    path = write_cache(cache_dir, "aws", [[
        "aws", "g5.xlarge", "A10G", "1", "22.35", "4", "16", "1.006", "0.4", "us-east-1", "use1-az1", "1",
        "aws pricing API", "2025-01-01T00:00:00Z", "", "", ""]])
    rc, out, _ = ftplan(capsys, "catalog", "show", "--json")
    aws = next(e for e in json.loads(out) if e["provider"] == "aws")
    assert (aws["origin"], aws["path"], aws["offers"], aws["stale"]) == ("cache", str(path), 1, True)
    rc, out, _ = ftplan(capsys, "catalog", "show")
    assert "STALE" in out.split("gcp")[0]


def test_refresh_lambda_from_its_api_and_plan_uses_it(capsys, cache_dir, fake_lambda, monkeypatch):
    monkeypatch.setenv("LAMBDA_API_KEY", fake_lambda.api_key)
    rc, out, err = ftplan(capsys, "catalog", "refresh", "--provider", "lambda", "--endpoint", fake_lambda.url)
    assert rc == 0, err
    path = cache_dir / "catalogs" / "lambda.csv"
    assert f"lambda: 4 offers written to {path}" in out
    # What changed against the shipped catalog: 4 re-priced offers, the other regions' rows gone, largest moves.
    assert "changed 4 prices, 0 new offers, 387 gone, 0 unchanged" in out
    assert "largest move: gpu_1x_a10 on-demand us-east-1: 1.29 -> 0.75 $/h (-42%)" in out
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == O.COLUMNS
    assert {(r["instance_type"], r["region"], r["price_hour"]) for r in rows} == {
        ("gpu_1x_a10", "us-east-1", "0.75"), ("gpu_1x_a10", "us-west-1", "0.75"),
        ("gpu_1x_a100", "us-east-1", "1.29"), ("gpu_1x_h100_pcie", "us-west-3", "2.49")}
    assert all(r["retrieved_at"][:10] == datetime.date.today().isoformat() for r in rows)
    # the refreshed prices now take precedence over the shipped snapshot
    rc, out, err = ftplan(capsys, *BASE, "--providers", "lambda", "--json", "--all-regions")
    assert rc == 0, err
    data = json.loads(out)
    assert data["catalogs"][0]["origin"] == "cache"
    assert {(o["instance_type"], o["region"], o["price_hour"]) for o in data["offers"]} <= {
        ("gpu_1x_a10", "us-east-1", 0.75), ("gpu_1x_a10", "us-west-1", 0.75),
        ("gpu_1x_a100", "us-east-1", 1.29), ("gpu_1x_h100_pcie", "us-west-3", 2.49)}


def test_refresh_failure_keeps_the_previous_catalog_and_never_prints_the_key(capsys, cache_dir, fake_lambda,
                                                                             monkeypatch):
    monkeypatch.setenv("LAMBDA_API_KEY", "wrong-key-abcdef123456")
    line = error_line(capsys, "catalog", "refresh", "--provider", "lambda", "--endpoint", fake_lambda.url)
    assert line.startswith("error: refreshing lambda failed") and "wrong-key-abcdef123456" not in line
    assert not (cache_dir / "catalogs" / "lambda.csv").exists()
    rc, out, _ = ftplan(capsys, "catalog", "show", "--json")
    assert next(e for e in json.loads(out) if e["provider"] == "lambda")["origin"] == "shipped"


def test_refresh_bad_input(capsys):
    assert "unknown provider 'lamda' (did you mean lambda?)" in error_line(
        capsys, "catalog", "refresh", "--provider", "lamda")
    assert "--endpoint needs exactly one --provider" in error_line(
        capsys, "catalog", "refresh", "--endpoint", "http://127.0.0.1:1")


def test_registry_names_a_fetcher_for_every_provider():
    assert set(REFRESHERS) == set(O.PROVIDERS)
    for provider in ("lambda", "paperspace"):  # the two without an optional SDK import at module level
        assert callable(fetcher(provider))


def test_refresh_runpod_reads_both_clouds_and_spot(capsys, cache_dir, monkeypatch):
    """RunPod's gpuTypes as the runpod SDK sends the query, answered by the fake GraphQL server."""
    from fakes import runpod_graphql

    fake = runpod_graphql.FakeRunPod.fresh()
    monkeypatch.setenv("RUNPOD_API_KEY", fake.api_key)
    rc, out, err = ftplan(capsys, "catalog", "refresh", "--provider", "runpod", "--endpoint", fake.url)
    assert rc == 0, err
    assert "largest move:" in out
    with open(cache_dir / "catalogs" / "runpod.csv", newline="") as fh:
        rows = {r["instance_type"]: r for r in csv.DictReader(fh)}
    sec, com = rows["1x_H100-SXM_SECURE"], rows["1x_H100-SXM_COMMUNITY"]
    assert (sec["cloud"], com["cloud"]) == ("secure", "community")
    assert float(sec["price_hour"]) == pytest.approx(2.99) and float(com["price_hour"]) == pytest.approx(2.39)
    assert float(sec["spot_price_hour"]) == pytest.approx(2.69)
    assert com["spot_price_hour"] == ""  # the fake's community spot (2.69) is no discount on 2.39: no spot offer
    assert float(rows["1x_RTX4090_COMMUNITY"]["spot_price_hour"]) == pytest.approx(0.34)
    assert sec["price_date"] == datetime.date.today().isoformat()  # a live read is dated by the fetch
    data = json.loads(ftplan(capsys, *BASE, "--providers", "runpod", "--json", "--top", "30")[1])
    assert {o["cloud"] for o in data["offers"]} == {"secure", "community"} and data["warnings"] == []
