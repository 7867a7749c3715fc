"""`ftplan catalog refresh`: fetch current prices from each provider's own API into the user cache.

Each provider module exposes `fetch_offers(**options) -> list[dict]` (rows with ftplan.planner.pricing.offers.COLUMNS
keys), imported only when that provider is refreshed, so an SDK that is not installed only matters
for its own provider. Rows are normalised, checked against the GPU table and validated before the
cache file is replaced atomically; from then on the cache takes precedence over the shipped snapshot.
"""

from __future__ import annotations

import datetime as dt
import importlib
from dataclasses import dataclass, field
from pathlib import Path

from ftplan.planner.errors import UserError
from ftplan.planner.pricing.offers import COLUMNS, PROVIDERS, cache_path, check_provider, write_offers

# provider -> ("module:function", name of its keyword for an API endpoint override)
REFRESHERS: dict[str, tuple[str, str]] = {
    "aws": ("ftplan.providers.aws_prices:fetch_offers", "endpoint_url"),
    "gcp": ("ftplan.providers.gcp_prices:fetch_offers", "endpoint"),
    "runpod": ("ftplan.providers.runpod_prices:fetch_offers", "api_base_url"),
    "lambda": ("ftplan.providers.lambda_prices:fetch_offers", "base_url"),
    "paperspace": ("ftplan.providers.paperspace_prices:fetch_offers", "base_url"),
}
assert set(REFRESHERS) == set(PROVIDERS)


@dataclass
class Changes:
    """What a refresh changed against the catalog in use before it (cache or shipped snapshot)."""

    added: int = 0
    removed: int = 0
    changed: int = 0
    unchanged: int = 0
    moves: list[tuple[float, str]] = field(default_factory=list)  # (relative change, description), largest first

    def lines(self, top: int = 3) -> list[str]:
        out = [f"changed {self.changed} prices, {self.added} new offers, {self.removed} gone, "
               f"{self.unchanged} unchanged"]
        out += [f"largest move: {what}" for _, what in self.moves[:top]]
        return out


@dataclass
class RefreshResult:
    provider: str
    path: Path
    rows: int
    dropped: dict[str, int] = field(default_factory=dict)
    changes: Changes = field(default_factory=Changes)


def diff(before: list[tuple], after: list[dict]) -> Changes:
    """Compare on-demand and spot prices per offer (type, GPUs, region, zone, cloud)."""
    from ftplan.planner.pricing import offers as O

    def key(t) -> tuple:
        return (t[O.INSTANCE_TYPE], t[O.GPU], int(t[O.GPU_COUNT]), t[O.REGION], t[O.ZONE] or "", t[O.CLOUD] or "")

    old = {key(r): r for r in before}
    new = {key(tuple(row.get(c) for c in COLUMNS)): row for row in after}
    ch = Changes(added=len(new.keys() - old.keys()), removed=len(old.keys() - new.keys()))
    moves = []
    for k in new.keys() & old.keys():
        o, n = old[k], new[k]
        moved = False
        for label, was, now in (("on-demand", o[O.PRICE], n["price_hour"]), ("spot", o[O.SPOT], n["spot_price_hour"])):
            if was is None or now is None or abs(float(now) - float(was)) < 1e-9:
                continue
            moved = True
            rel = float(now) / float(was) - 1
            place = f"{k[3]}/{k[4]}" if k[4] else k[3]
            moves.append((abs(rel), f"{k[0]} {label} {place}: {float(was):.4g} -> {float(now):.4g} $/h "
                                    f"({rel:+.0%})"))
        ch.changed += moved
        ch.unchanged += not moved
    ch.moves = sorted(moves, reverse=True)
    return ch


def fetcher(provider: str):
    target, _ = REFRESHERS[provider]
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserError(f"refreshing {provider} needs the '{exc.name}' package: "
                        f"pip install 'ftplan[{provider if provider in ('aws', 'gcp', 'runpod') else 'clouds'}]'"
                        ) from None
    return getattr(module, attr)


def normalise(provider: str, rows: list[dict], today: str) -> tuple[list[dict], dict[str, int]]:
    """Fill what a fetcher may leave out, map GPU names onto the GPU table, drop what cannot be planned."""
    from ftplan.planner.estimate.gpus import resolve_gpu

    out, dropped, seen = [], {}, set()

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    for raw in rows:
        row = {k: raw.get(k) for k in COLUMNS}
        # A live API read is dated by the fetch itself; a fetcher that passes prices through (Paperspace) says so.
        row["price_date"] = raw["price_date"] if "price_date" in raw else today[:10]
        row["cloud"] = row["cloud"] or ""
        row["purchase"] = row["purchase"] or ""
        row["provider"] = row["provider"] or provider
        if row["provider"] != provider:
            drop(f"row of provider {row['provider']!r}")
            continue
        try:
            row["gpu"] = resolve_gpu(str(row["gpu"] or "")).name
        except UserError:
            drop(f"GPU {raw.get('gpu')!r} not in the GPU table")
            continue
        row["zone"] = row["zone"] or ""
        for key in ("vcpus", "ram_gib", "spot_price_hour"):
            if row[key] is not None and not float(row[key]) > 0:
                row[key] = None
        spot = row["spot_price_hour"]
        if spot is not None and row["price_hour"] is not None and float(spot) >= float(row["price_hour"]):
            row["spot_price_hour"] = None  # not a discount: no spot market worth planning for
        if not row["price_hour"] or not float(row["price_hour"]) > 0:
            drop("no on-demand price")
            continue
        row["retrieved_at"] = row["retrieved_at"] or today
        row["source"] = row["source"] or f"{provider} API"
        key = (row["instance_type"], row["gpu"], row["gpu_count"], row["region"], row["zone"], row["cloud"])
        if key in seen:
            drop("duplicate offer")
            continue
        seen.add(key)
        out.append(row)
    return out, dropped


def refresh(provider: str, endpoint: str | None = None, **options) -> RefreshResult:
    """Fetch `provider`'s prices and replace its cache file. Raises UserError with a scrubbed message."""
    from ftplan.providers.errors import ProviderError, scrub

    provider = check_provider(provider)
    fetch = fetcher(provider)
    if endpoint:
        options[REFRESHERS[provider][1]] = endpoint
    try:
        rows = fetch(**options)
    except ProviderError as exc:
        raise UserError(f"refreshing {provider} failed: {exc}") from None
    except Exception as exc:  # an SDK's own error type; never let its text carry a secret
        raise UserError(f"refreshing {provider} failed: {type(exc).__name__}: {scrub(exc)}") from None
    rows, dropped = normalise(provider, rows, dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    if not rows:
        raise UserError(f"refreshing {provider} returned no usable offers; the previous catalog is kept")
    path = cache_path(provider)
    changes = _changes_against_current(provider, rows)
    try:
        n = write_offers(path, rows)
    except ValueError as exc:
        raise UserError(f"refreshing {provider} returned an invalid offer ({exc}); the previous catalog is kept"
                        ) from None
    return RefreshResult(provider, path, n, dropped, changes)


def _changes_against_current(provider: str, rows: list[dict]) -> Changes:
    """Diff against the catalog the planner used until now; an unreadable one counts as empty."""
    from ftplan.planner.pricing.offers import active_path, read_catalog

    path, origin = active_path(provider)
    try:
        before = read_catalog(provider, path, origin).rows if path.is_file() else []
    except UserError:
        before = []
    return diff(before, rows)
