#!/usr/bin/env python3
"""How fast `ftplan plan` ranks: in-process over the shipped catalogs and a synthetic 100k-offer catalog,
and the cold process, printed beside `python -c pass` measured in the same run.

    .venv/bin/python benchmarks/plan_speed.py [--runs 7]

`rank_*_ms` times `optimizer.rank()`: the estimate once per (GPU type, count), then a total, budget and
cap decision for every offer, in cost order per group (the global order is a lazy merge;
`full_order_100k_ms` is the extra time to walk all of it). The evaluator here is a fixed-cost stand-in
so that only the ranking is measured; the catalog index (`index_*_ms`) is built once per loaded table.
Times are CPU time (process_time; user+sys of the child for cold runs), medians of --runs; the
`*_wall_*` lines give wall-clock for comparison (on a shared machine they include waiting for a core).
Ends with `key: value` lines.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftplan.planner.pricing import optimizer as opt  # noqa: E402
from ftplan.planner.pricing.offers import OfferTable  # noqa: E402

PLAN = ["plan", "--model", "mistral-7b", "--method", "qlora", "--dataset-tokens", "5000000"]


def median_ms(fn, runs: int) -> tuple[float, float]:
    """(median CPU ms, median wall ms). CPU time is what this code costs; wall time also counts waiting
    for a core, which on a shared machine says more about the neighbours than about ftplan."""
    cpu, wall = [], []
    for _ in range(runs):
        c, t = time.process_time(), time.perf_counter()
        fn()
        cpu.append((time.process_time() - c) * 1000)
        wall.append((time.perf_counter() - t) * 1000)
    return statistics.median(cpu), statistics.median(wall)


def evaluator(gpu: str, count: int) -> opt.Need:
    return opt.Need(peak_gib=12.0, train_hours=3.0 / count)


def synthetic(base: OfferTable, n: int, seed: int = 7) -> OfferTable:
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        r = base.rows[rng.randrange(len(base.rows))]
        price = round(r[7] * rng.uniform(0.5, 2.0), 4)
        spot = round(price * rng.uniform(0.2, 0.9), 4) if r[8] is not None else None
        rows.append((r[0], f"{r[1]}-{k}", *r[2:7], price, spot, *r[9:]))
    return OfferTable(rows)


def cold_median(argv: list[str], runs: int, env: dict) -> tuple[float, float]:
    """(median CPU s, median wall s) of a fresh process; CPU = user + sys of the child."""
    cpu, wall = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
        wall.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if proc.returncode != 0:
            raise SystemExit(f"{argv} failed: {proc.stderr.strip()}")
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FTPLAN_CACHE_DIR"] = cache
        t = time.perf_counter()
        shipped = OfferTable.load()
        load_ms = (time.perf_counter() - t) * 1000
        index_ms = median_ms(lambda: (setattr(shipped, "_groups", None), opt.group_rows(shipped)), 1)
        rank_all = median_ms(lambda: opt.rank(shipped, evaluator), args.runs)
        big = synthetic(shipped, 100_000)
        index_big = median_ms(lambda: opt.group_rows(big), 1)
        rank_big = median_ms(lambda: opt.rank(big, evaluator, budget=50.0), args.runs)
        result = opt.rank(big, evaluator, budget=50.0)
        full_big = median_ms(lambda: sum(1 for _ in result.iter_ranked()), 1)
        print(f"shipped offers: {len(shipped)}; synthetic offers: {len(big)} "
              f"({len(result)} feasible prices within a $50 budget)")

        env = dict(os.environ, FTPLAN_CACHE_DIR=cache)
        ftplan = [sys.executable, "-m", "ftplan.planner.cli", *PLAN]
        subprocess.run(ftplan, env=env, cwd=ROOT, capture_output=True)  # warm the OS file cache and parse memo
        cold = cold_median(ftplan, args.runs, env)
        bare = cold_median([sys.executable, "-c", "pass"], args.runs, env)

    print(f"load_shipped_wall_ms: {load_ms:.1f}")
    print(f"index_shipped_ms: {index_ms[0]:.1f}")
    print(f"index_100k_ms: {index_big[0]:.1f}")
    print(f"full_order_100k_ms: {full_big[0]:.1f}")
    print(f"rank_all_catalogs_wall_ms: {rank_all[1]:.1f}")
    print(f"rank_100k_wall_ms: {rank_big[1]:.1f}")
    print(f"plan_cold_median_wall_s: {cold[1]:.3f}")
    print(f"python_pass_median_wall_s: {bare[1]:.3f}")
    print(f"python_pass_median_s: {bare[0]:.3f}")
    print(f"plan_cold_over_python_pass: {cold[0] / bare[0]:.1f}")
    print(f"rank_all_catalogs_ms: {rank_all[0]:.1f}")
    print(f"rank_100k_ms: {rank_big[0]:.1f}")
    print(f"plan_cold_median_s: {cold[0]:.3f}")


if __name__ == "__main__":
    main()
