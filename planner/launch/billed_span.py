"""How long an instance billed: the provider's own launch and end times where its API reports them.

Issue 14: the launcher's clock is wrong for a run whose launcher slept or died (a detached run powers itself
off hours later). Adapters put what the provider reports in `Instance.launched_at` / `Instance.ended_at`;
`billed_span` asks once more after terminate (bounded, never raising) and takes those where they are sane.
The span then carries which clock it came from and the hours the provider charges for it (rounded up to
the provider's billing granularity and minimum, from providers/<name>_prices.py and
catalogs/provider_overheads.json), which `Store.add_cost` records.

Clocks, best first: "provider" (both ends reported), "provider start" (launch time reported, end = now or
the watchdog's power-off), "watchdog" (the provider says it is gone without a time; the machine's watchdog
recorded when it powered off), "launcher" (the launcher's intent row to now).
"""

from __future__ import annotations

import threading
import time
from typing import Any

DESCRIBE_TIMEOUT_S = 5.0   # a healthy describe answers in well under a second; teardown never waits longer
_CLOCK_SKEW_S = 120.0           # a provider time this far in the future is no time
_MAX_EARLIER_S = 7 * 24 * 3600  # a launch time a week before the intent row is someone else's instance


class Span(tuple):
    """(started, ended) epoch seconds, plus `clock` and the `billed_hours` the provider charges."""

    clock: str
    billed_hours: float | None

    def __new__(cls, started: float, ended: float, clock: str, billed_hours: float | None = None) -> Span:
        span = super().__new__(cls, (started, ended))
        span.clock, span.billed_hours = clock, billed_hours
        return span

    def cost_fields(self) -> dict[str, Any]:
        """Keyword arguments of `Store.add_cost` beyond the span itself."""
        return {"clock": self.clock, "billed_hours": self.billed_hours}


def billing_rule(provider_name: str) -> tuple[int, int]:
    """(granularity_s, minimum_s) of a provider's compute billing; (1, 0) where ftplan knows none."""
    import importlib
    import json

    gran = 1
    try:
        gran = int(getattr(importlib.import_module(f"ftplan.providers.{provider_name}_prices"),
                           "BILLING_GRANULARITY_S", 1))
    except Exception:  # noqa: BLE001 - no price module (ssh/local): per second, no minimum
        pass
    minimum = 0
    try:
        from ftplan.catalogs import data_path

        raw = json.loads(data_path("provider_overheads.json").read_text())
        minimum = int(raw["providers"].get(provider_name, {}).get("min_billed_s", 0))
    except Exception:  # noqa: BLE001
        pass
    return max(1, gran), max(0, minimum)


def charged_hours(provider_name: str, seconds: float) -> float:
    """Hours charged for `seconds` of running: rounded up to the granularity, at least the minimum."""
    import math

    gran, minimum = billing_rule(provider_name)
    seconds = max(float(seconds), float(minimum))
    return math.ceil(seconds / gran - 1e-9) * gran / 3600.0


def describe_bounded(provider: Any, inst: Any, timeout_s: float = DESCRIBE_TIMEOUT_S) -> Any | None:
    """`provider.describe` of a copy of `inst` within `timeout_s`; None when it failed or took too long
    (a hung API call is left to its daemon thread: teardown never waits on it)."""
    try:
        from ftplan.providers.base import Instance

        copy = Instance.from_dict(inst.to_dict())
    except Exception:  # noqa: BLE001 - not an Instance (a test double): describe that object itself
        copy = inst
    box: dict[str, Any] = {}

    def ask() -> None:
        try:
            box["inst"] = provider.describe(copy)
        except BaseException:  # noqa: BLE001 - never raising: the launcher's clock is the fallback
            pass

    worker = threading.Thread(target=ask, name="ftplan-describe", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return box.get("inst")


def billed_span(provider: Any, inst: Any, created: float, now: float, *, powered_off_at: float | None = None,
                describe: bool = True, timeout_s: float = DESCRIBE_TIMEOUT_S) -> Span:
    """(started, ended) epoch seconds to bill `inst` for, from the provider's clock where it reports one.

    `created` is the launcher's intent row, `now` the launcher's end; `powered_off_at` the watchdog's
    power-off time, used as the end when the provider says the machine is gone but not when."""
    seen = describe_bounded(provider, inst, timeout_s) if describe else inst   # not asking: `inst` is fresh
    got = seen if seen is not None else inst
    launched = _sane(getattr(got, "launched_at", None) or getattr(inst, "launched_at", None), now)
    ended = _sane(getattr(got, "ended_at", None) or getattr(inst, "ended_at", None), now)
    if launched is not None and launched < created - _MAX_EARLIER_S:
        launched = None
    started = launched if launched is not None else created
    if ended is not None and ended >= started:
        clock = "provider" if launched is not None else "provider end"
    else:
        ended = None
        gone = seen is not None and getattr(getattr(seen, "state", None), "is_gone", False)
        stopped = seen is not None and getattr(getattr(seen, "state", None), "value", "") == "stopped"
        if powered_off_at is not None and (gone or stopped) and started <= powered_off_at <= now:
            ended, clock = powered_off_at, "watchdog"
        else:
            clock = "provider start" if launched is not None else "launcher"
    end = ended if ended is not None else now
    name = getattr(provider, "name", "") or getattr(inst, "provider", "")
    return Span(started, end, clock, charged_hours(name, max(0.0, end - started)))


def _sane(ts: Any, now: float) -> float | None:
    """A provider time as epoch seconds, or None when missing or in the future."""
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts != ts:
        return None
    ts = float(ts)
    return None if ts <= 0 or ts > max(now, time.time()) + _CLOCK_SKEW_S else ts
