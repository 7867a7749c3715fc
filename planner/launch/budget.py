"""Spend so far, projected total, and the two budget caps.

* The soft cap (launcher side): once the job reports measured progress, project the run's total
  (spent + price x remaining time + a margin for pulling artifacts) and stop at a checkpoint when it
  would exceed the budget (`--on-over-budget stop`).
* The hard cap (instance side): the job is started with a deadline = what is left of the budget /
  hourly price, minus the same margin; the instance kills the job at the deadline even if the laptop
  that launched it is asleep or dead.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """What the job's heartbeat says, reduced to what the guard needs."""

    step: int = 0
    total_steps: int = 0
    elapsed_s: float = 0.0       # training time measured by the job
    loss: float | None = None
    tokens_per_s: float | None = None
    status: str = ""
    tokens_seen: int = 0

    @classmethod
    def from_heartbeat(cls, hb: Any) -> Progress:
        """Whatever the machine wrote (it is not trusted): numbers that are not finite numbers become
        0/None, so an odd heartbeat (`"loss": "nan"`, a list, a token) never stops a healthy run."""
        hb = hb if isinstance(hb, dict) else {}
        return cls(
            step=_count(hb.get("step")),
            total_steps=_count(hb.get("total_steps")),
            elapsed_s=finite_number(hb.get("elapsed_s")) or 0.0,
            loss=finite_number(hb.get("loss")),
            tokens_per_s=finite_number(hb.get("tokens_per_s")),
            status=_status(hb.get("status")),
            tokens_seen=_count(hb.get("tokens_seen")),
        )

    def remaining_s(self) -> float | None:
        """Seconds to the last step at the measured throughput; None until a step has been measured.

        Tokens/s is measured over training only, so model loading does not inflate the projection;
        without it, the job's elapsed time per step is the (pessimistic) fallback."""
        if self.step <= 0 or self.total_steps <= 0:
            return None
        left = max(0, self.total_steps - self.step)
        if self.tokens_per_s and self.tokens_seen:
            return left * (self.tokens_seen / self.step) / self.tokens_per_s
        if self.elapsed_s <= 0:
            return None
        return left * (self.elapsed_s / self.step)


def finite_number(value: Any) -> float | None:
    """A finite float, or None (text, NaN, inf, booleans, containers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        x = float(value)
    except (ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None


def _count(value: Any) -> int:
    x = finite_number(value)
    return int(x) if x is not None and 0 <= x < 1e15 else 0


def _status(value: Any) -> str:
    from ftplan.providers.errors import scrub

    return scrub(value)[:40] if isinstance(value, str) else ""


@dataclass
class BudgetGuard:
    budget_usd: float | None
    pull_margin_s: float = 600.0
    spent_before_usd: float = 0.0         # instances already gone (spot losses) in this run
    _billing: dict[int, tuple[float, float]] = field(default_factory=dict)  # row -> (since, $/h)

    def start_billing(self, instance_row: int, price_hour: float, since: float | None = None) -> None:
        self._billing[instance_row] = (since if since is not None else time.time(), price_hour)

    def stop_billing(self, instance_row: int, until: float | None = None) -> float:
        """Move an instance's spend into `spent_before_usd`; returns that instance's dollars."""
        if instance_row not in self._billing:
            return 0.0
        since, price = self._billing.pop(instance_row)
        usd = max(0.0, (time.time() if until is None else until) - since) / 3600.0 * price
        self.spent_before_usd += usd
        return usd

    def price_hour(self) -> float:
        return sum(price for _, price in self._billing.values())

    def spent_usd(self, now: float | None = None) -> float:
        now = time.time() if now is None else now
        live = sum(max(0.0, now - since) / 3600.0 * price for since, price in self._billing.values())
        return self.spent_before_usd + live

    def left_usd(self, now: float | None = None) -> float | None:
        return None if self.budget_usd is None else self.budget_usd - self.spent_usd(now)

    def projected_total_usd(self, progress: Progress, now: float | None = None) -> float | None:
        """Spent + remaining training + the pull margin, at today's hourly price. None = not measurable yet."""
        remaining = progress.remaining_s()
        if remaining is None:
            return None
        return self.spent_usd(now) + (remaining + self.pull_margin_s) / 3600.0 * self.price_hour()

    def over_budget(self, progress: Progress, now: float | None = None) -> bool:
        if self.budget_usd is None:
            return False
        projected = self.projected_total_usd(progress, now)
        return projected is not None and projected > self.budget_usd

    def eta_s(self, progress: Progress) -> float | None:
        return progress.remaining_s()

    def deadline_s(self, price_hour: float, now: float | None = None) -> float | None:
        """On-instance hard cap for a job about to start on an instance billed at `price_hour`.

        None when there is no budget or the machine is free (then nothing needs capping)."""
        left = self.left_usd(now)
        if left is None or price_hour <= 0:
            return None
        return max(60.0, left / price_hour * 3600.0 - self.pull_margin_s)

    def affordable(self, price_hour: float, est_hours: float | None, now: float | None = None) -> bool:
        """Can an offer still finish (estimated hours + margin) with what is left of the budget?"""
        left = self.left_usd(now)
        if left is None:
            return True
        hours = (est_hours or 0.0) + self.pull_margin_s / 3600.0
        return hours * price_hour <= left


def format_usd(x: float | None) -> str:
    if x is None:
        return "-"
    return f"${x:,.4f}" if abs(x) < 0.1 else f"${x:,.2f}"
