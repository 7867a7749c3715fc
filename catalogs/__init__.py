"""Data shipped with ftplan: model architectures, GPU table, provider offers, calibration.

Files here are data, validated with pydantic when loaded (see `ftplan.planner.estimate.models`, `ftplan.planner.estimate.gpus`,
`ftplan.planner.pricing.offers`). The offer CSVs are the output of `scripts/import_catalogs.py`.
"""

from pathlib import Path

CATALOG_DIR = Path(__file__).resolve().parent


def data_path(name: str) -> Path:
    """Absolute path of a shipped data file, e.g. data_path("models.json")."""
    return CATALOG_DIR / name
