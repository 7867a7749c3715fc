"""Fit the estimator's few global constants to the published measurements; rewrite catalogs/throughput.json.

Usage: python scripts/fit_throughput.py [--csv ../shared/calibration/published-measurements.csv] [--dry-run]

Fitted (grid search, median absolute relative error over the scored rows of benchmarks/estimate_accuracy.py;
the memory constants only among values that keep every row within MEMORY_MAX_ERR, because a median-only fit
trades a few badly underestimated rows - OOMs after the instance is paid for - for a slightly better median):
- memory.activation_working_set: multiplier of one block's backward working set, on rows that report
  allocated memory (LitGPT, PEFT), so fragmentation does not enter;
- memory.allocator_fragmentation: on rows reporting reserved / device memory;
- throughput.utilisation[method] and overhead_s_per_block[method]: on rows with a fixed token count per step.
Only the planner's read-only catalog is written; the CLI never reads ../shared.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import estimate_accuracy as bench  # noqa: E402

from ftplan.catalogs import data_path  # noqa: E402
from ftplan.planner.estimate import memory  # noqa: E402
from ftplan.planner.estimate.throughput import _method_key  # noqa: E402


def _set(consts: dict) -> None:
    memory.fitted_constants.cache_clear()
    path = data_path("throughput.json")
    path.write_text(json.dumps(consts, indent=1) + "\n")


MEMORY_MAX_ERR = 0.20


def _median_err(rows, predict, measured) -> float:
    return statistics.median(abs(predict(m) - measured(m)) / measured(m) for m in rows)


def _memory_objective(rows) -> tuple[bool, float, float]:
    """(any row beyond MEMORY_MAX_ERR, median error, max error) over `rows`: smaller is better."""
    errs = [abs(bench.predicted_mem(m) - m.measured_mem_gib) / m.measured_mem_gib for m in rows]
    return max(errs) > MEMORY_MAX_ERR, statistics.median(errs), max(errs)


def main(argv: list[str]) -> int:
    csv_path = Path(argv[argv.index("--csv") + 1]) if "--csv" in argv else bench.DEFAULT_CSV
    path = data_path("throughput.json")
    original = path.read_text()
    consts = json.loads(original)
    mem_rows, tps_rows, _, _ = bench.collect(csv_path)
    allocated = [m for m in mem_rows if m.mem_quantity == "allocated"]
    reserved = [m for m in mem_rows if m.mem_quantity != "allocated"]
    try:
        best = None
        for k in (0.5, 0.75, 1.0, 1.5, 2.0, 3.0):  # >= 0.5: a block's gradients always exist
            consts["memory"]["activation_working_set"] = k
            _set(consts)
            best = min(best or (_memory_objective(allocated), k), (_memory_objective(allocated), k))
        consts["memory"]["activation_working_set"] = best[1]
        print(f"activation_working_set: {best[1]} (median err {best[0][1]:.3f}, max {best[0][2]:.3f} "
              f"on {len(allocated)} rows)")
        best = None
        for f in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4):  # the caching allocator always rounds blocks up
            consts["memory"]["allocator_fragmentation"] = f
            _set(consts)
            best = min(best or (_memory_objective(reserved), f), (_memory_objective(reserved), f))
        consts["memory"]["allocator_fragmentation"] = best[1]
        print(f"allocator_fragmentation: {best[1]} (median err {best[0][1]:.3f}, max {best[0][2]:.3f} "
              f"on {len(reserved)} rows)")
        table = consts["throughput"]
        for method in ("full", "lora", "qlora"):
            rows = [m for m in tps_rows if _method_key(m.req) == method]
            if not rows:
                continue
            best = None
            for u, ov in itertools.product([x / 100 for x in range(15, 71, 5)], [0, 0.001, 0.002, 0.004, 0.008]):
                table["utilisation"][method], table["overhead_s_per_block"][method] = u, ov
                _set(consts)
                err = _median_err(rows, bench.predicted_tps, lambda m: m.measured_tps)
                best = min(best or (err, u, ov), (err, u, ov))
            table["utilisation"][method], table["overhead_s_per_block"][method] = best[1], best[2]
            print(f"{method}: utilisation {best[1]}, overhead {best[2]} s/block (median err {best[0]:.3f}, "
                  f"{len(rows)} rows)")
    finally:
        path.write_text(original)
        memory.fitted_constants.cache_clear()
    if "--dry-run" not in argv:
        _set(consts)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
