"""Artifact pull speed: `SSHRunner.pull` vs OpenSSH `scp` of the same file, in the same run.

Usage: python benchmarks/transfer.py [--mib 512] [--reps 3]

Starts its own sshd on 127.0.0.1 (as the tests do: /usr/sbin/sshd, needs openssh-server and
openssh-client), writes a random file of --mib MiB into a run's out/ folder on the 'remote' side,
then alternates `pull` (one exec channel: a remote sender streams tar while hashing each file in
the same pass, manifest on stderr; safe extraction + local hashing + manifest check), `scp -i KEY
-P PORT` (OpenSSH's own client, sftp protocol, no verification) and, for reference,
paramiko's default `sftp.get` (no verification), --reps times each,
alternating so that both see the same warm page cache and machine load. Throughput is file size / wall time; the median
of the repetitions is reported. Ends with `key: value` lines: pull_mib_s, scp_mib_s, sftp_get_mib_s,
ratio_vs_sftp_get, ratio_vs_scp (the headline; target >= 0.8) and ratio_vs_scp_paired_median.
"""

from __future__ import annotations

import argparse
import os
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

from ftplan.planner.remote.ssh_runner import SSHRunner  # noqa: E402

MIB = 2**20


def make_random_file(path: Path, mib: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(MIB))


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
    try:
        remote_root = work / "remote"
        artifact = remote_root / "bench" / "out" / "artifact.bin"
        make_random_file(artifact, args.mib)
        size_mib = artifact.stat().st_size / MIB
        runner = SSHRunner(server.host, server.port, server.user, server.client_key, work / "known_hosts",
                           remote_root=str(remote_root), connect_timeout_s=20)
        runner.connect()
        scp = ["scp", "-q", *server.ssh_args(), "-P", str(server.port),
               f"{server.user}@{server.host}:{artifact}", str(work / "scp.bin")]
        pull_s, scp_s, sftp_s = [], [], []
        for rep in range(args.reps):
            t = time.perf_counter()
            runner.pull("bench", "out/artifact.bin", work / "pulled")
            pull_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run(scp, check=True)
            scp_s.append(time.perf_counter() - t)
            (work / "scp.bin").unlink()
            t = time.perf_counter()
            runner.sftp.get(str(artifact), str(work / "sftp.bin"))  # paramiko's default, for reference
            sftp_s.append(time.perf_counter() - t)
            (work / "sftp.bin").unlink()
            print(f"rep {rep + 1}: pull {size_mib / pull_s[-1]:.0f} MiB/s, scp {size_mib / scp_s[-1]:.0f} MiB/s, "
                  f"sftp.get {size_mib / sftp_s[-1]:.0f} MiB/s (load {os.getloadavg()[0]:.1f})", flush=True)
        runner.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    pull_mib_s = size_mib / statistics.median(pull_s)
    scp_mib_s = size_mib / statistics.median(scp_s)
    print(f"file_mib: {size_mib:.0f}")
    print(f"reps: {args.reps}")
    sftp_mib_s = size_mib / statistics.median(sftp_s)
    print(f"pull_mib_s: {pull_mib_s:.1f}")
    print(f"scp_mib_s: {scp_mib_s:.1f}")
    print(f"sftp_get_mib_s: {sftp_mib_s:.1f}")
    print(f"ratio_vs_sftp_get: {pull_mib_s / sftp_mib_s:.2f}")
    print(f"ratio_vs_scp: {pull_mib_s / scp_mib_s:.2f}")
    # Each pull and the scp right after it see about the same load from other processes: the median of
    # these paired ratios drifts less with a shared machine's load than the ratio of the two medians.
    paired = statistics.median(s / p for p, s in zip(pull_s, scp_s, strict=True))
    print(f"ratio_vs_scp_paired_median: {paired:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
