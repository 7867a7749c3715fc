"""Fit the estimator's few global constants to the published measurements; rewrite catalogs/throughput.json.

Usage: python scripts/fit_throughput.py [--csv ../shared/calibration/published-measurements.csv] [--dry-run]

`fit(mem_rows, tps_rows)` is also what `benchmarks/estimate_accuracy.py` calls once per left-out source
(leave-one-source-out), so everything fitted here is refitted there. Fitted (grid search, median absolute
relative error; the memory constants only among values that keep every row within MEMORY_MAX_ERR, because
a median-only fit trades a few badly underestimated rows - OOMs after the instance is paid for - for a
slightly better median):
- memory.activation_working_set: multiplier of one block's backward working set, on rows that report
  allocated memory, so fragmentation does not enter;
- memory.allocator_fragmentation: on rows reporting reserved / device memory;
- throughput.utilisation and seconds_per_launch: ONE value each for every method (the methods differ by
  their modelled FLOPs, dequantization and optimizer traffic, not by a constant of their own), on rows with
  a fixed token count per step.
A set without rows keeps the prior (the shipped value). Only the planner's read-only catalog is written;
the CLI never reads ../shared. Fitting never writes the file: it changes the in-process constants.
"""

from __future__ import annotations

import copy
import itertools
import json
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import estimate_accuracy as bench  # noqa: E402

from ftplan.catalogs import data_path  # noqa: E402
from ftplan.planner.estimate import memory  # noqa: E402

MEMORY_MAX_ERR = 0.20
WORKING_SET_GRID = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)  # >= 0.5: a block's gradients always exist
FRAGMENTATION_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)  # the caching allocator always rounds blocks up
UTILISATION_GRID = tuple(x / 100 for x in range(15, 81, 5))
LAUNCH_GRID = tuple(round(x * 1e-6, 9) for x in (5, 10, 15, 20, 25, 30, 40, 50, 60))
ABOUT = ("Fitted constants of the estimator, written by scripts/fit_throughput.py from the published measurements "
         "(shared/calibration/published-measurements.csv, scored rows listed by benchmarks/estimate_accuracy.py, which "
         "also refits them once per left-out source). memory.activation_working_set: multiplier of one block's backward "
         "working set; memory.allocator_fragmentation: reserved - allocated as a fraction of activation + logit bytes; "
         "allocator_fixed_gib and cuda_context_gib are measured (CUDA 12 lazy loading), not fitted. "
         "throughput.utilisation: fraction of the GPU's dense peak the matmuls reach (one value for every method); "
         "throughput.seconds_per_launch: CPU time per kernel launch (a step takes the longer of GPU time and launch "
         "time). Multi-GPU scaling is computed from each GPU's interconnect bandwidth, not fitted.")


@contextmanager
def constants(consts: dict):
    """Every estimate inside uses `consts` (the cached dict is swapped in place, then restored)."""
    live = memory.fitted_constants()
    saved = copy.deepcopy(live)
    live.clear()
    live.update(copy.deepcopy(consts))
    try:
        yield
    finally:
        live.clear()
        live.update(saved)


def _memory_objective(rows) -> tuple[bool, float, float]:
    """(any row beyond MEMORY_MAX_ERR, median error, max error) over `rows`: smaller is better."""
    errs = [abs(bench.predicted_mem(m) - m.measured_mem_gib) / m.measured_mem_gib for m in rows]
    return max(errs) > MEMORY_MAX_ERR, statistics.median(errs), max(errs)


def _grid(consts: dict, rows, objective, setters: list, grid) -> tuple:
    best = None
    for values in grid:
        trial = copy.deepcopy(consts)
        for set_value, v in zip(setters, values, strict=True):
            set_value(trial, v)
        with constants(trial):
            score = objective(rows)
        if best is None or score < best[0]:
            best = (score, values)
    return best


def fit(mem_rows, tps_rows, prior: dict | None = None, log=print) -> dict:
    """The fitted constants for these rows (a new dict; `prior` or the shipped file gives the rest)."""
    consts = copy.deepcopy(prior or json.loads(data_path("throughput.json").read_text()))
    consts["about"] = ABOUT
    allocated = [m for m in mem_rows if m.mem_quantity == "allocated"]
    reserved = [m for m in mem_rows if m.mem_quantity != "allocated"]
    mem = consts["memory"]
    if allocated:
        score, (k,) = _grid(consts, allocated, _memory_objective,
                            [lambda c, v: c["memory"].__setitem__("activation_working_set", v)],
                            [(x,) for x in WORKING_SET_GRID])
        mem["activation_working_set"] = k
        log(f"activation_working_set: {k} (median err {score[1]:.3f}, max {score[2]:.3f} on {len(allocated)} rows)")
    if reserved:
        score, (f,) = _grid(consts, reserved, _memory_objective,
                            [lambda c, v: c["memory"].__setitem__("allocator_fragmentation", v)],
                            [(x,) for x in FRAGMENTATION_GRID])
        mem["allocator_fragmentation"] = f
        log(f"allocator_fragmentation: {f} (median err {score[1]:.3f}, max {score[2]:.3f} on {len(reserved)} rows)")
    if tps_rows:
        def tps_err(rows):
            return statistics.median(abs(bench.predicted_tps(m) - m.measured_tps) / m.measured_tps for m in rows)

        table = consts["throughput"]
        score, (u, ov) = _grid(consts, tps_rows, tps_err,
                               [lambda c, v: c["throughput"].__setitem__("utilisation", v),
                                lambda c, v: c["throughput"].__setitem__("seconds_per_launch", v)],
                               list(itertools.product(UTILISATION_GRID, LAUNCH_GRID)))
        table["utilisation"], table["seconds_per_launch"] = u, ov
        log(f"utilisation {u}, {ov * 1e6:.0f} us per kernel launch (median err {score:.3f}, {len(tps_rows)} rows)")
    return consts


def main(argv: list[str]) -> int:
    csv_path = Path(argv[argv.index("--csv") + 1]) if "--csv" in argv else bench.DEFAULT_CSV
    mem_rows, tps_rows, _, _ = bench.collect(csv_path)
    consts = fit(mem_rows, tps_rows)
    if "--dry-run" not in argv:
        path = data_path("throughput.json")
        path.write_text(json.dumps(consts, indent=1) + "\n")
        memory.fitted_constants.cache_clear()
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
