"""The shipped catalogs against a committed table of published on-demand prices (catalogs/offers/published_prices.csv).

Each reference row names its source and the day it was read. A shipped offer of that type (in that region, or
in any region for `*`) must be within 10 % of the published figure, or the row must name the difference and
its reason. Add a row when an offer becomes a frequent pick; the test then keeps the catalog honest about it.
"""

from __future__ import annotations

import csv
import datetime as dt

import pytest

from ftplan.catalogs import data_path
from ftplan.planner.pricing import offers as O

TOLERANCE = 0.10


def reference() -> list[dict]:
    with open(data_path("offers/published_prices.csv"), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def shipped() -> dict[str, list[dict]]:
    out = {}
    for p in O.PROVIDERS:
        with open(O.shipped_path(p), newline="", encoding="utf-8") as fh:
            out[p] = list(csv.DictReader(fh))
    return out


CATALOG = shipped()


def matches(ref: dict) -> list[dict]:
    return [r for r in CATALOG[ref["provider"]]
            if r["instance_type"] == ref["instance_type"] and ref["region"] in ("*", r["region"])
            and (r["cloud"] or "") == ref["cloud"]]


def test_reference_rows_are_sourced_dated_and_cover_every_provider():
    rows = reference()
    assert {r["provider"] for r in rows} == set(O.PROVIDERS)
    for r in rows:
        assert r["source"].strip(), r
        assert dt.date.fromisoformat(r["read_on"]) <= dt.date(2026, 12, 31)
        assert float(r["price_hour"]) > 0


@pytest.mark.parametrize("ref", reference(), ids=lambda r: f"{r['provider']}:{r['instance_type']}@{r['region']}")
def test_shipped_on_demand_price_agrees_with_the_published_one(ref):
    rows = matches(ref)
    assert rows, f"{ref['instance_type']} ({ref['region']}) is not in the shipped {ref['provider']} catalog"
    published = float(ref["price_hour"])
    off = [(r["region"], r["zone"], float(r["price_hour"])) for r in rows
           if abs(float(r["price_hour"]) / published - 1) > TOLERANCE]
    if ref["difference"].strip():
        # A named difference must still be a real one: otherwise the note is stale and should go.
        assert off, f"{ref['instance_type']}: the catalog now agrees; drop the 'difference' note"
    else:
        assert not off, (f"{ref['provider']} {ref['instance_type']}: published {published} $/h "
                         f"({ref['source']}, {ref['read_on']}), shipped {off[:3]}")


def test_every_published_on_demand_price_is_sellable_on_demand():
    """A reference on-demand price must belong to an offer the planner may propose on demand."""
    for ref in reference():
        if ref["difference"].strip():
            continue
        rows = matches(ref)
        sellable = [r for r in rows if "on-demand" in (r["purchase"] or "on-demand").split("+")]
        # GCP a3-highgpu-1g..4g are spot/flex-start only: the reference pins the list price, not a sellable offer.
        if not ref["instance_type"].startswith(("a3-highgpu-1g", "a3-highgpu-2g", "a3-highgpu-4g")):
            assert sellable, ref["instance_type"]
