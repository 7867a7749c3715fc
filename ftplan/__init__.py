"""ftplan: which GPU, for how long, at what price, and run it for me.

The Python API (each returns the typed result the CLI prints; `.to_dict()` is its `--json`)::

    import ftplan
    est = ftplan.estimate(model="mistral-7b", method="qlora", gpu="L4")
    est.memory.total, est.fits, est.tokens_per_s
    best = ftplan.plan(model="mistral-7b", method="qlora", dataset_tokens=5_000_000, budget=20).best
    ftplan.launch("ftplan.toml", budget=20, dry_run=True)
    [r.actual.usd for r in ftplan.runs()]

The repository keeps four top-level folders that install under this one import name:
`ftplan.planner` (estimate -> price -> launch -> record, and the CLI), `ftplan.providers` (one adapter per
cloud), `ftplan.remote_job` (the training job shipped to the machine) and `ftplan.catalogs` (data).
Nothing is imported until first use, so `import ftplan` stays as light as `ftplan --help`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["estimate", "plan", "launch", "runs", "report", "UserError", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from ftplan.api import estimate, launch, plan, report, runs
    from ftplan.planner.errors import UserError

_LAZY = {"estimate": "ftplan.api", "plan": "ftplan.api", "launch": "ftplan.api", "runs": "ftplan.api",
         "report": "ftplan.api", "UserError": "ftplan.planner.errors"}


def __getattr__(name: str) -> Any:
    """PEP 562: load the API on first use, not on `import ftplan` (which every CLI call pays for)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ftplan' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
