"""How much to trust a listed price: its age, and spot prices that look unreal.

Two separate questions, both answered from the offer rows alone:
- **age**: a row's `price_date` (the day the provider's page or API was read) where it has one, else only its
  `retrieved_at` (the day the snapshot was imported; the upstream date is then unknown and the price is older
  than that). On-demand lists change a few times a year, so > 60 days is worth a warning; spot prices move
  hourly, so > 7 days is an indication, not a price, and an undated spot price always is.
- **suspect spot**: AWS's spot prices never go below 10 % of on-demand; a snapshot row sitting exactly at that
  floor (the whole eu-south-2 G family in the shipped catalog), or far below the same type's spot price in its
  other zones, is most likely a stale or thin market and should not silently decide the top pick.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections import defaultdict

from ftplan.planner.pricing import offers as O

FLOOR_RATIO = 0.10        # AWS: spot is never priced below 10 % of on-demand
FLOOR_EPS = 0.002         # within 0.2 points of that floor counts as "at the floor"
FAR_BELOW = 0.5           # below half the median of the same type's other zones
MIN_ZONES = 3             # a median needs a few other zones to mean something


def suspect_spot_rows(rows: list[tuple]) -> dict[int, str]:
    """Row index -> a short reason, for spot prices at the provider's floor or far below the type's other zones."""
    by_type: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r[O.SPOT] is not None:
            by_type[(r[O.PROVIDER], r[O.INSTANCE_TYPE], r[O.GPU_COUNT], r[O.CLOUD])].append(i)
    out: dict[int, str] = {}
    for idx in by_type.values():
        spots = [rows[i][O.SPOT] for i in idx]
        for k, i in enumerate(idx):
            r = rows[i]
            ratio = r[O.SPOT] / r[O.PRICE]
            if r[O.PROVIDER] == "aws" and ratio <= FLOOR_RATIO + FLOOR_EPS:
                out[i] = "at AWS's 10 % spot floor"
                continue
            others = spots[:k] + spots[k + 1:]
            if len(others) >= MIN_ZONES:
                med = statistics.median(others)
                if r[O.SPOT] < FAR_BELOW * med:
                    out[i] = f"{1 - r[O.SPOT] / med:.0%} below its other zones' median {med:.3g} $/h"
    return out


def price_age(row: tuple, today: dt.date | None = None) -> tuple[int, bool]:
    """(age in days, dated): the price's own age where the row carries a price_date, else its import age."""
    day, known = O.price_day(row)
    return ((today or dt.date.today()) - day).days, known


def is_stale(row: tuple, spot: bool, today: dt.date | None = None) -> bool:
    age, known = price_age(row, today)
    if spot:
        return not known or age > O.SPOT_STALE_DAYS
    return age > O.ON_DEMAND_STALE_DAYS


def stale_summary(offers, table: O.OfferTable, today: dt.date | None = None) -> list[str]:
    """Warning lines for the listed offers (RankedOffer) whose price is old: one line per provider and market."""
    groups: dict[tuple[str, bool], list[tuple[int, bool]]] = defaultdict(list)
    for o in offers:
        if o.row < 0:
            continue
        r = table.rows[o.row]
        if is_stale(r, o.spot, today):
            groups[(o.provider, o.spot)].append(price_age(r, today))
    lines = []
    for (provider, spot), ages in sorted(groups.items()):
        oldest = max(a for a, _ in ages)
        undated = sum(1 for _, known in ages if not known)
        market = "spot" if spot else "on-demand"
        limit = O.SPOT_STALE_DAYS if spot else O.ON_DEMAND_STALE_DAYS
        if undated == len(ages):
            age = f"of unknown date, imported {oldest} d ago"
        else:
            age = f"up to {oldest} d old"
        lines.append(f"warning: {len(ages)} listed {provider} {market} price(s) {age} (limit {limit} d); "
                     f"run 'ftplan catalog refresh --provider {provider}'")
    return lines
