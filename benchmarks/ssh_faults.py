"""How fast the SSH runner notices a broken network, against a real sshd behind a TCP relay that breaks on purpose.

Usage: python benchmarks/ssh_faults.py [--reps 3]

Ends with `key: value` lines (medians of --reps runs, seconds), default runner settings unless said:
- dead_peer_detect_s: a connected runner's path goes silent (packets lost, as when a NAT forgets the
  flow or the VM's host dies); time until the keepalive watchdog drops the connection (stated bound: 30).
- dead_peer_call_recovers_s: the same, time until a status read that was in flight returns, over a
  fresh connection.
- teardown_unreachable_s: the machine dies during training; teardown's SSH work (kill, two status
  reads, log tail, salvage pull, secrets removal) inside `bounded()` until it gives up and terminate
  may run (stated bound: 60).
- never_answering_connect_s: a machine that accepts TCP but never answers, with a 30 s connect budget:
  time until the error (the budget plus seconds).
- refused_local_s: `--provider local|ssh` with nothing listening: time until "nothing listens on".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sshd_fixture import SSHD, TcpProxy, free_port  # noqa: E402

from ftplan.planner.remote.ssh_runner import SSHRunner, SSHRunnerError  # noqa: E402


def _runner(host, port, server: SSHD, work: Path, **kw) -> tuple[SSHRunner, list[tuple[float, str]]]:
    events: list[tuple[float, str]] = []
    runner = SSHRunner(host, port, server.user, server.client_key, work / f"kh-{time.monotonic_ns()}",
                       remote_root=str(work / "remote"), log=lambda m: events.append((time.monotonic(), m)), **kw)
    return runner, events


def dead_peer(server: SSHD, work: Path) -> tuple[float, float]:
    proxy = TcpProxy(server.host, server.port)
    runner, events = _runner(proxy.host, proxy.port, server, work, connect_timeout_s=20)
    try:
        runner.connect()
        assert runner.read_json("bench", "out/heartbeat.json") == {"step": 1}
        t0 = time.monotonic()
        proxy.blackhole()
        got = runner.read_json("bench", "out/heartbeat.json")
        done = time.monotonic() - t0
        assert got == {"step": 1}
        dead = next(t for t, m in events if "the connection is dead" in m) - t0
        return dead, done
    finally:
        runner.close()
        proxy.close()


def teardown_unreachable(server: SSHD, work: Path) -> float:
    proxy = TcpProxy(server.host, server.port)
    runner, _ = _runner(proxy.host, proxy.port, server, work, connect_timeout_s=20)
    try:
        runner.connect()
        time.sleep(1)
        t0 = time.monotonic()
        proxy.blackhole(new_too=True)
        with runner.bounded(600):
            for call in (lambda: runner.kill("bench"), lambda: runner.read_json("bench", "out/heartbeat.json"),
                         lambda: runner.read_json("bench", "out/summary.json"), lambda: runner.tail_log("bench", 0),
                         lambda: runner.pull("bench", "out/checkpoints", work / "salvage"),
                         lambda: runner.remove_secrets("bench")):
                try:
                    call()
                except SSHRunnerError:
                    pass
        return time.monotonic() - t0
    finally:
        runner.close()
        proxy.close()


def never_answering(server: SSHD, work: Path) -> float:
    proxy = TcpProxy(server.host, server.port)
    proxy.blackhole(new_too=True)
    runner, _ = _runner(proxy.host, proxy.port, server, work, connect_timeout_s=30)
    t0 = time.monotonic()
    try:
        runner.connect()
    except SSHRunnerError:
        pass
    finally:
        proxy.close()
    return time.monotonic() - t0


def refused_local(server: SSHD, work: Path) -> float:
    runner, _ = _runner("127.0.0.1", free_port(), server, work, connect_timeout_s=300, refused_is_fatal=True)
    t0 = time.monotonic()
    try:
        runner.connect()
    except SSHRunnerError:
        pass
    return time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftplan-ssh-faults-"))
    out = work / "remote" / "bench" / "out"
    out.mkdir(parents=True)
    (out / "heartbeat.json").write_text(json.dumps({"step": 1}))
    server = SSHD(work / "sshd").start()
    results: dict[str, list[float]] = {k: [] for k in (
        "dead_peer_detect_s", "dead_peer_call_recovers_s", "teardown_unreachable_s", "never_answering_connect_s",
        "refused_local_s")}
    try:
        for rep in range(args.reps):
            dead, done = dead_peer(server, work)
            results["dead_peer_detect_s"].append(dead)
            results["dead_peer_call_recovers_s"].append(done)
            results["teardown_unreachable_s"].append(teardown_unreachable(server, work))
            results["never_answering_connect_s"].append(never_answering(server, work))
            results["refused_local_s"].append(refused_local(server, work))
            print(f"rep {rep + 1}: " + ", ".join(f"{k}={v[-1]:.1f}" for k, v in results.items()), flush=True)
    finally:
        server.stop()
    for key, values in results.items():
        print(f"{key}: {statistics.median(values):.1f}")
    return 0


if __name__ == "__main__":
    threading.excepthook = lambda args: None  # relay threads of closed proxies
    sys.exit(main())
