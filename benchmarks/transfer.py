"""Artifact pull speed: `SSHRunner.pull` vs OpenSSH `scp` of the same file, in the same run.

Usage: python benchmarks/transfer.py [--mib 512] [--reps 3]

Starts its own sshd on 127.0.0.1 (as the tests do: /usr/sbin/sshd, needs openssh-server and
openssh-client), writes a random file of --mib MiB into a run's out/ folder on the 'remote' side,
then alternates, --reps times each, `pull` through the system ssh client (`pull_transport="openssh"`)
and through paramiko (`"paramiko"`) - both: a remote sender streams tar while hashing each file in the
same pass, manifest on stderr; safe extraction + local hashing + manifest check -, `scp -i KEY -P PORT`
(OpenSSH's own client, no verification) and, for reference, paramiko's default `sftp.get` (no
verification), so that all see the same warm page cache and machine load. Throughput is file size / wall
time; the median of the repetitions is reported. Ends with `key: value` lines: the load average before
and after, pull_mib_s (the default transport), pull_openssh_mib_s, pull_paramiko_mib_s, scp_mib_s,
sftp_get_mib_s, ratio_vs_scp (the default transport's) and, per transport, the median and range of the
ratios to the scp of the same repetition (paired: less sensitive to a shared machine's load), and the
local CPU seconds per GiB each transport cost (this process plus its ssh client).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sshd_fixture import SSHD  # noqa: E402

from ftplan.planner.remote.openssh_pull import choose_transport  # noqa: E402
from ftplan.planner.remote.ssh_runner import SSHRunner  # noqa: E402

MIB = 2**20


def make_random_file(path: Path, mib: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(MIB))


def local_cpu_s() -> float:
    """CPU seconds of this process and of its waited-for children (the ssh client)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="artifact size in MiB (default 512)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each method (default 3)")
    args = parser.parse_args()
    if shutil.which("scp") is None:
        print("error: scp not found; apt-get install -y openssh-client", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="ftplan-transfer-"))
    server = SSHD(work / "sshd").start()
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {m: [] for m in ("openssh", "paramiko", "scp", "sftp_get")}
    cpu_s: dict[str, list[float]] = {"openssh": [], "paramiko": []}  # this process + its finished ssh
    try:
        remote_root = work / "remote"
        artifact = remote_root / "bench" / "out" / "artifact.bin"
        make_random_file(artifact, args.mib)
        size_mib = artifact.stat().st_size / MIB
        runners = {
            t: SSHRunner(server.host, server.port, server.user, server.client_key, work / "known_hosts",
                         remote_root=str(remote_root), connect_timeout_s=20, pull_transport=t)
            for t in ("openssh", "paramiko")
        }
        for runner in runners.values():
            runner.connect()
        scp = ["scp", "-q", *server.ssh_args(), "-P", str(server.port),
               f"{server.user}@{server.host}:{artifact}", str(work / "scp.bin")]
        for rep in range(args.reps):
            for transport, runner in runners.items():
                cpu = local_cpu_s()
                t = time.perf_counter()
                runner.pull("bench", "out/artifact.bin", work / "pulled")
                times[transport].append(time.perf_counter() - t)
                cpu_s[transport].append(local_cpu_s() - cpu)
                if runner.last_pull_transport != transport:
                    print(f"error: the {transport} pull went through {runner.last_pull_transport}", file=sys.stderr)
                    return 1
            t = time.perf_counter()
            subprocess.run(scp, check=True)
            times["scp"].append(time.perf_counter() - t)
            (work / "scp.bin").unlink()
            t = time.perf_counter()
            runners["paramiko"].sftp.get(str(artifact), str(work / "sftp.bin"))  # paramiko's default, for reference
            times["sftp_get"].append(time.perf_counter() - t)
            (work / "sftp.bin").unlink()
            print(f"rep {rep + 1}: " + ", ".join(f"{m} {size_mib / v[-1]:.0f} MiB/s" for m, v in times.items())
                  + f" (load {os.getloadavg()[0]:.2f})", flush=True)
        for runner in runners.values():
            runner.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    def rate(method: str) -> float:
        return size_mib / statistics.median(times[method])

    def paired(method: str) -> list[float]:
        # Each pull and the scp of the same rep see about the same load from other processes: the
        # median of these paired ratios drifts less with a shared machine's load than a ratio of medians.
        return sorted(s / p for p, s in zip(times[method], times["scp"], strict=True))

    default = choose_transport(None)
    default = "openssh" if default == "auto" and shutil.which("ssh") else default
    default = "paramiko" if default == "auto" else default
    print(f"file_mib: {size_mib:.0f}")
    print(f"reps: {args.reps}")
    print(f"load_avg_before: {' '.join(f'{x:.2f}' for x in load_before)}")
    print(f"load_avg_after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"default_transport: {default}")
    print(f"pull_mib_s: {rate(default):.1f}")
    print(f"pull_openssh_mib_s: {rate('openssh'):.1f}")
    print(f"pull_paramiko_mib_s: {rate('paramiko'):.1f}")
    print(f"scp_mib_s: {rate('scp'):.1f}")
    print(f"sftp_get_mib_s: {rate('sftp_get'):.1f}")
    print(f"ratio_vs_sftp_get: {rate(default) / rate('sftp_get'):.2f}")
    print(f"ratio_vs_scp: {rate(default) / rate('scp'):.2f}")
    for method in ("openssh", "paramiko"):
        ratios = paired(method)
        print(f"ratio_vs_scp_paired_median_{method}: {statistics.median(ratios):.2f}")
        print(f"ratio_vs_scp_paired_range_{method}: {ratios[0]:.2f}-{ratios[-1]:.2f}")
    print(f"ratio_vs_scp_paired_median: {statistics.median(paired(default)):.2f}")
    # Local CPU seconds per GiB pulled: steadier than speed on a shared machine (the client's own cost).
    for method in ("openssh", "paramiko"):
        print(f"local_cpu_s_per_gib_{method}: {statistics.median(cpu_s[method]) * 1024 / size_mib:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
