"""The launcher's cost of running one job on two machines, and how fast it stops when one goes wrong.

    .venv/bin/python benchmarks/multinode_launch.py [--repeat 3]

Two real sshd's on 127.0.0.2 and 127.0.0.3 (tests/test_multinode_launch_faults.py's cases, the fault
matrix's stand-in job: 6 short steps, no torch), each case `--repeat` times. Prints `key: value` lines, each a
median with its min and max: `launch_1_node_s` and `launch_2_nodes_s` (the whole `ftplan launch` process,
start to exit, on one machine and on two), `second_node_extra_s` (their difference: connect, ship, start,
watch and stop one more node), `node_lost_to_exit_s` (kill -9 of node 1's job to the launcher's exit, node
0's checkpoints pulled and every job stopped), `ctrl_c_to_exit_s` (SIGINT while node 1 is still connecting
to the exit), and `leaked_instances` (rows left open or jobs left running, summed over every case: 0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_multinode_launch_faults as mf  # noqa: E402


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f}, n {len(values)})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="ftplan-multinode-launch-"))
    cases = {"launch_1_node_s": (lambda t: mf.launch_on(t, 1), "seconds"),
             "launch_2_nodes_s": (lambda t: mf.launch_on(t, 2), "seconds"),
             "node_lost_to_exit_s": (mf.node_killed_mid_training, "lost_to_exit_s"),
             "ctrl_c_to_exit_s": (mf.ctrl_c_while_second_node_connects, "stop_s")}
    figures: dict[str, list[float]] = {k: [] for k in cases}
    leaked, failed = 0, 0
    for i in range(args.repeat):
        for key, (case, figure) in cases.items():
            tmp = work / f"{key}-{i}"
            tmp.mkdir()
            got = case(tmp)
            leaked += got["live_instances"]
            if got["problems"]:
                failed += 1
                print(f"# {key} run {i}: {'; '.join(got['problems'])}", file=sys.stderr)
            figures[key].append(got[figure])
    for key, values in figures.items():
        print(f"{key}: {spread(values)}")
    extra = [two - one for one, two in zip(figures["launch_1_node_s"], figures["launch_2_nodes_s"], strict=True)]
    print(f"second_node_extra_s: {spread(extra)}")
    print(f"load_average_1m: {os.getloadavg()[0]:.2f}")
    print(f"failed_checks: {failed}")
    print(f"leaked_instances: {leaked}")
    return 0 if failed == 0 and leaked == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
