"""Provider offers: the shipped pricing snapshot, the user's refreshed cache, and their validation.

One explicit column list for every provider (`COLUMNS`), so a new field can never silently change
the file format. Files are validated with pydantic where they are *written* (the importer script and
`ftplan catalog refresh`); the planner's loader only checks cheap per-row invariants and names
`file:line` on a corrupt row, because ranking 100k offers must not pay for a model object per row.

Where data comes from, per provider: `<cache>/catalogs/<provider>.csv` if it exists (written by
`ftplan catalog refresh`), else the shipped `catalogs/offers/<provider>.csv` (written by
`scripts/import_catalogs.py`). `<cache>` is `$FTPLAN_CACHE_DIR` or platformdirs' user cache dir.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

from ftplan.catalogs import data_path
from ftplan.planner.errors import UserError

PROVIDERS: tuple[str, ...] = ("aws", "gcp", "runpod", "lambda", "paperspace")

# The first 14 columns are the original format (a cache written by an older ftplan still loads: the three
# later columns then take their defaults). `cloud`: RunPod "secure"/"community", empty elsewhere.
# `purchase`: how the offer can be bought, "+"-joined from PURCHASE_MODES; empty = on-demand, plus spot where a
# spot price is given. `price_date`: the date of the price itself (provider page read, API fetch) where known;
# empty = unknown (then only `retrieved_at`, the import date, is known).
LEGACY_COLUMNS: tuple[str, ...] = (
    "provider", "instance_type", "gpu", "gpu_count", "gpu_memory_gib", "vcpus", "ram_gib",
    "price_hour", "spot_price_hour", "region", "zone", "billing_granularity_s", "source", "retrieved_at",
)
COLUMNS: tuple[str, ...] = LEGACY_COLUMNS + ("cloud", "purchase", "price_date")
# Row tuple indices (the loader keeps rows as plain tuples; see OfferTable).
PROVIDER, INSTANCE_TYPE, GPU, GPU_COUNT, GPU_MEM, VCPUS, RAM, PRICE, SPOT, REGION, ZONE, GRANULARITY, SOURCE, \
    RETRIEVED, CLOUD, PURCHASE, PRICE_DATE = range(len(COLUMNS))
_DEFAULTS = ("", "", "")  # cloud, purchase, price_date of a legacy row

PURCHASE_MODES = ("on-demand", "spot", "flex-start", "reservation")
CLOUDS = ("secure", "community")

STALE_AFTER_DAYS = 30          # any catalog: the general "refresh me" warning
ON_DEMAND_STALE_DAYS = 60      # an on-demand price older than this is flagged in plans
SPOT_STALE_DAYS = 7            # spot prices move hourly: older than a week is an indication only


def on_demand_ok(row: tuple) -> bool:
    """May this offer be bought on demand? (A4 / A3 Ultra / A3 High 1-4g on GCP: no, reservation/spot/flex only.)"""
    p = row[PURCHASE] if len(row) > PURCHASE else ""
    return not p or "on-demand" in p.split("+")


def spot_ok(row: tuple) -> bool:
    if row[SPOT] is None:
        return False
    p = row[PURCHASE] if len(row) > PURCHASE else ""
    return not p or "spot" in p.split("+")


def price_day(row: tuple) -> tuple[dt.date, bool]:
    """(date, known): the price's own date where the row has one, else its import date (known=False)."""
    pd = row[PRICE_DATE] if len(row) > PRICE_DATE else ""
    if pd:
        return parse_date(pd), True
    return parse_date(row[RETRIEVED]), False


def cache_root() -> Path:
    """The user cache directory (`$FTPLAN_CACHE_DIR` overrides it; tests point it at a tmp dir)."""
    env = os.environ.get("FTPLAN_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("ftplan"))


def cache_path(provider: str) -> Path:
    return cache_root() / "catalogs" / f"{provider}.csv"


def shipped_path(provider: str) -> Path:
    return data_path(f"offers/{provider}.csv")


def active_path(provider: str) -> tuple[Path, str]:
    """(file, origin) the planner reads for `provider`: the refreshed cache wins over the snapshot."""
    cached = cache_path(provider)
    if cached.is_file():
        return cached, "cache"
    return shipped_path(provider), "shipped"


def check_provider(name: str) -> str:
    """Validate a provider name, suggesting the closest one."""
    key = name.strip().lower()
    if key in PROVIDERS:
        return key
    raise UserError(f"unknown provider '{name}'{suggest(key, PROVIDERS)}; choose from: {', '.join(PROVIDERS)}")


def split_csv(values) -> list[str]:
    """Repeated and comma-separated CLI values: `--x a,b --x c` -> [a, b, c]."""
    return [v.strip() for item in values or () for v in str(item).split(",") if v.strip()]


def suggest(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# --------------------------------------------------------------------------- validation (write side)

def offer_model():
    """The pydantic model of one row. Built on first use: only writers (importer, refresh) need it."""
    global _OFFER_MODEL
    if _OFFER_MODEL is None:
        _OFFER_MODEL = _build_offer_model()
    return _OFFER_MODEL


_OFFER_MODEL = None


def _build_offer_model():
    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

    class Offer(BaseModel):
        """One rentable configuration at one place and price. Prices are USD per hour for the whole instance."""

        model_config = ConfigDict(extra="forbid", frozen=True)

        provider: str
        instance_type: str = Field(min_length=1)
        gpu: str = Field(min_length=1)
        gpu_count: int = Field(ge=1, le=64)
        gpu_memory_gib: float = Field(gt=0, le=1024)
        vcpus: float | None = Field(default=None, gt=0)
        ram_gib: float | None = Field(default=None, gt=0)
        price_hour: float = Field(gt=0, lt=10_000)
        spot_price_hour: float | None = Field(default=None, gt=0)
        region: str = Field(min_length=1)
        zone: str = ""
        billing_granularity_s: int = Field(ge=1, le=86_400)
        source: str = Field(min_length=1)
        retrieved_at: str
        cloud: str = ""
        purchase: str = ""
        price_date: str = ""

        @field_validator("cloud", "purchase", "price_date", mode="before")
        @classmethod
        def _none_is_empty(cls, v):
            return "" if v is None else v

        @field_validator("cloud")
        @classmethod
        def _known_cloud(cls, v: str) -> str:
            if v and v not in CLOUDS:
                raise ValueError(f"cloud must be empty or one of {CLOUDS}, got {v!r}")
            return v

        @field_validator("purchase")
        @classmethod
        def _known_purchase(cls, v: str) -> str:
            bad = [m for m in v.split("+") if v and m not in PURCHASE_MODES]
            if bad:
                raise ValueError(f"purchase modes must come from {PURCHASE_MODES}, got {bad}")
            return v

        @field_validator("vcpus", "ram_gib", "spot_price_hour", mode="before")
        @classmethod
        def _empty_is_none(cls, v):
            return None if v == "" else v  # CSV cells: empty = not published

        @field_validator("zone", mode="before")
        @classmethod
        def _no_zone(cls, v):
            return "" if v is None else v

        @field_validator("provider")
        @classmethod
        def _known_provider(cls, v: str) -> str:
            if v not in PROVIDERS:
                raise ValueError(f"unknown provider {v!r}")
            return v

        @field_validator("retrieved_at")
        @classmethod
        def _iso_date(cls, v: str) -> str:
            parse_date(v)
            return v

        @field_validator("price_date")
        @classmethod
        def _iso_date_or_empty(cls, v: str) -> str:
            if v:
                parse_date(v)
            return v

        @model_validator(mode="after")
        def _spot_below_on_demand(self):
            if self.spot_price_hour is not None and self.spot_price_hour > self.price_hour:
                raise ValueError(f"spot {self.spot_price_hour} above on-demand {self.price_hour}")
            for text in (self.instance_type, self.gpu, self.region, self.zone, self.source):
                if "\n" in text or "\r" in text:
                    raise ValueError("line breaks are not allowed in catalog fields")
            return self

    return Offer


def validate_rows(rows: list[dict]) -> list[dict]:
    """Validate dict rows (importer / refresh output); returns them normalised in COLUMNS order.

    Raises ValueError naming the first bad row and why, and on duplicate offers."""
    from pydantic import ValidationError

    model = offer_model()
    out, seen = [], set()
    for n, row in enumerate(rows, 1):
        try:
            offer = model.model_validate(row)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "row"
            raise ValueError(f"offer #{n} ({row.get('instance_type')!r}): {where}: {first['msg']}") from None
        key = offer_key(offer.model_dump())
        if key in seen:
            raise ValueError(f"offer #{n} duplicates an earlier offer: {key}")
        seen.add(key)
        out.append(offer.model_dump())
    return out


def offer_key(row: dict) -> tuple:
    """What makes an offer unique: the same type at the same place for the same GPUs (and RunPod cloud)."""
    return (row["provider"], row["instance_type"], row["gpu"], int(row["gpu_count"]), row["region"], row["zone"],
            row.get("cloud") or "")


def write_offers(path: Path, rows: list[dict]) -> int:
    """Validate and write rows atomically (a crash never leaves a half-written catalog)."""
    rows = validate_rows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_fmt(row.get(c)) for c in COLUMNS])
    os.replace(tmp, path)
    return len(rows)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    return str(value)


def parse_date(text: str) -> dt.date:
    """retrieved_at is an ISO date or an ISO UTC timestamp."""
    try:
        return dt.date.fromisoformat(text[:10])
    except ValueError:
        raise ValueError(f"retrieved_at {text!r} is not an ISO date") from None


# --------------------------------------------------------------------------- loading (read side)

@dataclass
class CatalogFile:
    provider: str
    path: Path
    origin: str                     # "cache" | "shipped"
    rows: list[tuple] = field(default_factory=list)
    sources: tuple[str, ...] = ()
    oldest: dt.date | None = None   # oldest retrieved_at in the file (the import or fetch date)
    price_dates: tuple[str, str] | None = None  # (oldest, newest) price_date where rows carry one
    undated: int = 0                # rows without a price_date (their upstream date is unknown)

    def age_days(self, today: dt.date | None = None) -> int | None:
        if self.oldest is None:
            return None
        return ((today or dt.date.today()) - self.oldest).days

    def price_age_days(self, today: dt.date | None = None) -> int | None:
        """Age of the oldest dated price; None when no row carries a price date."""
        if not self.price_dates:
            return None
        return ((today or dt.date.today()) - parse_date(self.price_dates[0])).days


def _num(text: str, what: str, where: str, *, positive: bool = True, optional: bool = False) -> float | None:
    if text == "":
        if optional:
            return None
        raise UserError(f"corrupt catalog row {where}: {what} is empty; {_FIX}")
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"corrupt catalog row {where}: {what} {text!r} is not a number; {_FIX}") from None
    if positive and not value > 0:  # also rejects NaN
        raise UserError(f"corrupt catalog row {where}: {what} must be > 0, got {text}; {_FIX}")
    return value


_FIX = "fix or delete that file (a refreshed cache file can be rebuilt with 'ftplan catalog refresh')"


def read_catalog(provider: str, path: Path, origin: str = "file") -> CatalogFile:
    """Parse one offers CSV with cheap per-row checks. A bad row -> UserError naming file:line."""
    cat = CatalogFile(provider, path, origin)
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read catalog {path}: {exc.strerror}; reinstall ftplan or delete the file") from None
    rows = cat.rows
    sources: set[str] = set()
    dates: set[str] = set()
    with fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) not in (COLUMNS, LEGACY_COLUMNS):
            raise UserError(f"corrupt catalog {path}:1: the header must be {','.join(COLUMNS)}; {_FIX}")
        ncol = len(header)
        legacy = ncol == len(LEGACY_COLUMNS)
        price_dates: set[str] = set()
        undated = 0
        for line, rec in enumerate(reader, 2):
            where = f"{path}:{line}"
            if len(rec) != ncol:
                raise UserError(f"corrupt catalog row {where}: {len(rec)} fields, expected {ncol}; {_FIX}")
            if rec[0] != provider:
                raise UserError(f"corrupt catalog row {where}: provider {rec[0]!r} in the {provider} catalog; {_FIX}")
            if not rec[1] or not rec[2] or not rec[9]:
                raise UserError(f"corrupt catalog row {where}: instance_type, gpu and region must be set; {_FIX}")
            count = _num(rec[3], "gpu_count", where)
            if count != int(count):
                raise UserError(f"corrupt catalog row {where}: gpu_count {rec[3]!r} is not a whole number; {_FIX}")
            price = _num(rec[7], "price_hour", where)
            spot = _num(rec[8], "spot_price_hour", where, optional=True)
            if spot is not None and spot > price:
                raise UserError(f"corrupt catalog row {where}: spot price {rec[8]} above on-demand {rec[7]}; {_FIX}")
            gran = _num(rec[11], "billing_granularity_s", where)
            extra = _DEFAULTS if legacy else (rec[14], rec[15], rec[16])
            if extra[2]:
                price_dates.add(extra[2])
            else:
                undated += 1
            rows.append((
                rec[0], rec[1], rec[2], int(count), _num(rec[4], "gpu_memory_gib", where),
                _num(rec[5], "vcpus", where, optional=True), _num(rec[6], "ram_gib", where, optional=True),
                price, spot, rec[9], rec[10], int(gran), rec[12], rec[13], *extra,
            ))
            sources.add(rec[12])
            dates.add(rec[13])
    cat.sources = tuple(sorted(sources))
    cat.undated = undated
    if price_dates:
        try:
            ordered = sorted(parse_date(d).isoformat() for d in price_dates)
        except ValueError as exc:
            raise UserError(f"corrupt catalog {path}: price_date: {exc}; {_FIX}") from None
        cat.price_dates = (ordered[0], ordered[-1])
    if dates:
        try:
            cat.oldest = min(parse_date(d) for d in dates)
        except ValueError as exc:
            raise UserError(f"corrupt catalog {path}: {exc}; {_FIX}") from None
    return cat


def load_catalogs(providers: tuple[str, ...] | list[str] | None = None) -> list[CatalogFile]:
    """The active catalog of each provider (cache if refreshed, else shipped)."""
    out = []
    for p in providers or PROVIDERS:
        path, origin = active_path(p)
        if not path.is_file():
            continue  # a provider without any catalog simply has no offers
        out.append(read_catalog_cached(p, path, origin))
    return out


_PARSED_VERSION = 2


def read_catalog_cached(provider: str, path: Path, origin: str) -> CatalogFile:
    """read_catalog, memoised in a marshal file next to the cache, keyed by the CSV's path, size and mtime.

    Parsing and checking ~6k CSV rows costs tens of milliseconds on every `ftplan plan`; loading the
    parsed tuples back costs a few. Any change of the CSV invalidates the memo; a memo that cannot be
    read or written is simply ignored."""
    import marshal

    st = path.stat()
    stamp = (_PARSED_VERSION, str(path.resolve()), st.st_size, st.st_mtime_ns)
    memo = cache_root() / "catalogs" / "parsed" / f"{provider}-{origin}.marshal"
    try:
        data = marshal.loads(memo.read_bytes())
        if data[0] == stamp:
            _, rows, sources, oldest, price_dates, undated = data
            return CatalogFile(provider, path, origin, rows, tuple(sources),
                               dt.date.fromisoformat(oldest) if oldest else None,
                               tuple(price_dates) if price_dates else None, undated)
    except (OSError, ValueError, EOFError, TypeError, IndexError):
        pass
    cat = read_catalog(provider, path, origin)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_bytes(marshal.dumps((stamp, cat.rows, list(cat.sources), str(cat.oldest or ""),
                                       list(cat.price_dates or ()), cat.undated)))
        os.replace(tmp, memo)
    except OSError:
        pass
    return cat


class OfferTable:
    """All offers as plain tuples (COLUMNS order), plus the files they came from."""

    def __init__(self, rows: list[tuple], files: list[CatalogFile] | None = None):
        n = len(COLUMNS)
        # Rows built by hand (tests, benchmarks) may stop at the legacy 14 fields: pad with the defaults.
        self.rows = rows if all(len(r) == n for r in rows) else [
            r if len(r) == n else (*r, *_DEFAULTS[len(r) - len(LEGACY_COLUMNS):]) for r in rows]
        self.files = files or []

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def load(cls, providers: tuple[str, ...] | list[str] | None = None) -> OfferTable:
        files = load_catalogs(providers)
        rows: list[tuple] = []
        for f in files:
            rows.extend(f.rows)
        return cls(rows, files)

    def stale_files(self, today: dt.date | None = None) -> list[CatalogFile]:
        return [f for f in self.files if (f.age_days(today) or 0) > STALE_AFTER_DAYS]


def stale_warning(table: OfferTable, today: dt.date | None = None) -> str | None:
    """One line for stderr when any catalog in use is older than 30 days, else None."""
    stale = table.stale_files(today)
    if not stale:
        return None
    oldest = max(stale, key=lambda f: f.age_days(today) or 0)
    names = ", ".join(f"{f.provider} {f.age_days(today)} d" for f in stale)
    return (
        f"warning: prices are older than {STALE_AFTER_DAYS} days ({names}; oldest retrieved {oldest.oldest}); "
        "they are a snapshot, not current prices - run 'ftplan catalog refresh'"
    )
