"""Leave-one-source-out in benchmarks/estimate_accuracy.py: every fitted constant is refitted without the
source being scored (never on its rows), and the shipped constants are left as they were."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT.parent / "shared" / "calibration" / "published-measurements.csv"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not CSV.is_file(), reason="needs ../shared/calibration (the published measurements)")
def test_each_source_is_scored_with_constants_fitted_without_it(monkeypatch):
    bench = _load("estimate_accuracy", ROOT / "benchmarks" / "estimate_accuracy.py")
    sys.path.insert(0, str(ROOT / "scripts"))
    fit_throughput = _load("fit_throughput", ROOT / "scripts" / "fit_throughput.py")
    from ftplan.planner.estimate.memory import fitted_constants

    shipped = json.dumps(fitted_constants(), sort_keys=True)
    mem_rows, tps_rows, _, _ = bench.collect(CSV)
    seen: list[set[str]] = []
    real_fit = fit_throughput.fit

    def recording_fit(mem, tps, **kw):
        seen.append({m.row["source_id"] for m in mem + tps})
        return real_fit(mem, tps, **kw)

    monkeypatch.setattr(fit_throughput, "fit", recording_fit)
    mem_err, tps_err = bench.leave_one_source_out(mem_rows, tps_rows, quiet=True)
    sources = sorted({m.row["source_id"] for m in mem_rows + tps_rows})
    assert len(seen) == len(sources)
    for left_out, trained_on in zip(sources, seen, strict=True):
        assert left_out not in trained_on  # never fitted on the rows it scores
    assert len(mem_err) == len(mem_rows) and len(tps_err) == len(tps_rows)
    assert json.dumps(fitted_constants(), sort_keys=True) == shipped  # refits never leak into the shipped ones
