"""How long an instance billed: the provider's own launch and end times where its API reports them.

Issue 14: the launcher's clock is wrong for a run whose launcher slept or died (a detached run powers itself
off hours later). Adapters put what the provider reports in `Instance.launched_at` / `Instance.ended_at`.
"""

from __future__ import annotations

from typing import Any


def billed_span(provider: Any, inst: Any, created: float, now: float) -> tuple[float, float]:
    """(started, ended) epoch seconds to bill `inst` for. Default: the launcher's intent row to now."""
    return created, now
