"""Faults of a multi-node launch, on your own machines: two real sshd's on 127.0.0.2 and 127.0.0.3.

Each case is a function `case(tmp) -> {"problems", "status", "live_instances", ...}` that starts its own
servers (so `benchmarks/fault_matrix.py` can run them as rows, like tests/test_fault_matrix.py's
`gc_second_store`); the tests assert `problems == []`. `live_instances` counts what would bill or run on:
instance rows not closed plus jobs still alive on either machine. The job is the fault matrix's
stand-in (`STUB_JOB`: the job's file protocol without torch, shipped through the bundle's override), so the
launcher is what is under test; tests/test_multinode_launch_e2e.py runs the real job across both machines.

  - one of the hosts unreachable at start: nothing runs anywhere, every row closed, the error names the node;
  - node 1's job killed mid-training: the run fails naming node 1, node 0's newest checkpoint is pulled back,
    no job is left on either machine, secrets.env gone from both;
  - Ctrl-C (SIGINT to the launcher process) while node 1 is still connecting: cancelled (exit 130), nothing
    started, nothing left;
  - all or nothing: the second node's create raises CapacityError: the first node is terminated, the
    placement deleted, and the next offer (another placement) is taken and runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import FTPLAN_PROCESS
from sshd_fixture import SSHD, free_port
from test_fault_matrix import EXAMPLE, ROOT, stub_files

pytestmark = pytest.mark.slow

HOSTS = ("127.0.0.2", "127.0.0.3")


# ---- shared parts -----------------------------------------------------------------------------
def two_machines(tmp: Path) -> list[SSHD]:
    """Two sshd's on two loopback addresses that accept one client key (as a cluster's machines do)."""
    servers = [SSHD(tmp / f"sshd-{h}", host=h) for h in HOSTS]
    (servers[1].dir / "authorized_keys").write_text((servers[0].dir / "client_ed25519.pub").read_text())
    return [s.start() for s in servers]


def project(tmp: Path, fault: dict[str, Any], *, connect_timeout: float = 3) -> Path:
    job, fault_file = stub_files(tmp, fault)
    (tmp / "remote").mkdir(exist_ok=True)
    cfg = tmp / "ftplan.toml"
    cfg.write_text(f"""
[job]
model = "tiny-llama"
dataset = "{EXAMPLE}"
checkpoint_every_steps = 2
[launch]
budget_usd = 5
poll_interval_s = 0.1
sync_every_min = 0.005
pull_margin_min = 0
ssh_connect_timeout_s = {connect_timeout}
ssh_reconnect_s = 3
remote_python = "{sys.executable}"
rdzv_port = {free_port(HOSTS[0])}
[launch.bundle_extra_files]
"job/train.py" = "{job}"
"fault.json" = "{fault_file}"
[providers.ssh]
remote_root = "{tmp / 'remote'}"
price_hour = 0.5
gpu = "cpu"
""")
    return cfg


def host_arg(user: str, host: str, port: int) -> str:
    return f"{user}@{host}:{port}"


def launch_on(tmp: Path, n_hosts: int) -> dict[str, Any]:
    """A clean launch of the stand-in job (6 steps) on 1 or 2 of the machines: the launcher's own cost of a
    second node (connect, ship, start, watch, stop) is the difference of the two `seconds`."""
    servers = two_machines(tmp)[:n_hosts] if n_hosts == 2 else [SSHD(tmp / "sshd-a", host=HOSTS[0]).start()]
    try:
        cfg = project(tmp, {"steps": 6, "step_s": 0.05})
        t0 = time.monotonic()
        proc = launch_process(tmp, cfg, [host_arg(s.user, s.host, s.port) for s in servers], servers[0].client_key)
        rc, res, err = finish(proc)
        seconds = time.monotonic() - t0
    finally:
        for s in servers:
            s.stop()
    left, problems = leftovers(tmp, tmp / "runs.sqlite3")
    if rc != 0 or res.get("status") != "succeeded":
        problems.append(f"exit {rc}, status {res.get('status')!r}: {res.get('error')} {err[-500:]}")
    return {"problems": problems, "status": res.get("status"), "live_instances": left, "seconds": seconds}


def launch_process(tmp: Path, cfg: Path, hosts: list[str], key: Path) -> subprocess.Popen:
    args = ["launch", "--config", str(cfg), "--provider", "ssh", "--identity", str(key), "--yes", "--json",
            "--store", str(tmp / "runs.sqlite3"), "--runs-dir", str(tmp / "runs")]
    for h in hosts:
        args += ["--host", h]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([*FTPLAN_PROCESS, *args], cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_event(store: Path, kind: str, like: str = "%", timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if store.exists():
            try:
                with sqlite3.connect(store, timeout=5) as db:
                    if db.execute("SELECT 1 FROM events WHERE kind = ? AND message LIKE ? LIMIT 1",
                                  (kind, like)).fetchone():
                        return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no '{kind}' event like {like!r} within {timeout_s}s")


def job_groups(remote: Path) -> list[int]:
    """Process groups of jobs started under `remote` (from the pid files bootstrap writes) with a process still
    running (a zombie bootstrap its parent has not reaped yet runs nothing)."""
    wanted = set()
    for pid_file in remote.rglob("pid"):
        try:
            wanted.add(int(pid_file.read_text().strip()))
        except (ValueError, OSError):
            continue
    alive = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp in wanted and state != "Z":
            alive.add(pgrp)
    return sorted(alive)


def stop_jobs(remote: Path) -> None:
    for pgid in job_groups(remote):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def open_rows(store: Path) -> int:
    with sqlite3.connect(store) as db:
        return db.execute("SELECT COUNT(*) FROM instances WHERE state NOT IN ('terminated', 'create_failed')"
                          ).fetchone()[0]


def leftovers(tmp: Path, store: Path) -> tuple[int, list[str]]:
    """(instances or jobs left, problems): every row closed, no job alive, no secrets.env on either machine."""
    remote = tmp / "remote"
    problems = []
    rows = open_rows(store) if store.exists() else 0
    jobs = job_groups(remote)
    if rows:
        problems.append(f"{rows} instance row(s) not closed")
    if jobs:
        problems.append(f"{len(jobs)} job(s) still running on the machines")
    secrets = [str(p.relative_to(remote)) for p in remote.rglob("secrets.env")]
    if secrets:
        problems.append(f"secrets.env left: {secrets}")
    return rows + len(jobs), problems


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    out, err = proc.communicate(timeout=timeout)
    try:
        res = json.loads(out)
    except ValueError:
        res = {"status": "-", "error": f"no JSON on stdout: {out[-300:]!r}"}
    return proc.returncode, res, err


# ---- the cases --------------------------------------------------------------------------------
def unreachable_host_at_start(tmp: Path) -> dict[str, Any]:
    """Node 1's address answers nothing (no sshd there): the launch fails before any job starts."""
    a = SSHD(tmp / "sshd-a", host=HOSTS[0]).start()
    try:
        cfg = project(tmp, {"steps": 6, "step_s": 0.05}, connect_timeout=2)
        dead = host_arg(a.user, HOSTS[1], free_port(HOSTS[1]))   # nothing listens there
        proc = launch_process(tmp, cfg, [host_arg(a.user, a.host, a.port), dead], a.client_key)
        rc, res, err = finish(proc)
    finally:
        a.stop()
    store = tmp / "runs.sqlite3"
    left, problems = leftovers(tmp, store)
    error = res.get("error") or ""
    if rc != 1 or res.get("status") != "failed":
        problems.append(f"exit {rc}, status {res.get('status')!r} (expected 1, failed)")
    if "node 1" not in error or HOSTS[1] not in error:
        problems.append(f"the error does not name node 1 and its host: {error!r}")
    if list((tmp / "remote").rglob("job.json")) and list((tmp / "remote").rglob("train.log")):
        problems.append("a job was started although one machine was unreachable")
    if "Traceback" in err:
        problems.append("traceback on stderr")
    return {"problems": problems, "status": res.get("status"), "live_instances": left, "error": error}


def node_killed_mid_training(tmp: Path) -> dict[str, Any]:
    """kill -9 of node 1's job (its process group) while both train: the run stops and says which node."""
    a, b = two_machines(tmp)
    remote = tmp / "remote"
    try:
        cfg = project(tmp, {"steps": 400, "step_s": 0.1})
        proc = launch_process(tmp, cfg, [host_arg(a.user, a.host, a.port), host_arg(b.user, b.host, b.port)],
                              a.client_key)
        store = tmp / "runs.sqlite3"
        try:
            wait_event(store, "progress", timeout_s=120)   # the launcher follows node 0's training
            deadline = time.monotonic() + 60
            while not list(remote.glob("ft-*/out/checkpoints/checkpoint-*/COMPLETE")):   # node 0 has a checkpoint
                assert time.monotonic() < deadline, "node 0 wrote no checkpoint within 60 s"
                time.sleep(0.05)
            pid_files = list((remote / "node1").rglob("pid"))
            os.killpg(int(pid_files[0].read_text().strip()), signal.SIGKILL)
            t0 = time.monotonic()
            rc, res, err = finish(proc)
            lost_to_exit_s = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        for s in (a, b):
            s.stop()
    left, problems = leftovers(tmp, store)
    stop_jobs(remote)
    error = res.get("error") or ""
    if rc != 1 or res.get("status") != "failed":
        problems.append(f"exit {rc}, status {res.get('status')!r} (expected 1, failed)")
    if not error.startswith(f"node 1 ({a.user}@{HOSTS[1]}:{b.port}) lost"):
        problems.append(f"the error does not say node 1 was lost: {error!r}")
    run_dir = Path(res.get("artifacts_dir") or tmp / "runs" / "?")
    ckpts = sorted(p.parent.name for p in run_dir.glob("out/checkpoints/checkpoint-*/COMPLETE"))
    if not ckpts:
        problems.append("no checkpoint of node 0 was pulled back")
    with sqlite3.connect(store) as db:
        lost = db.execute("SELECT data_json FROM events WHERE kind = 'node_lost'").fetchall()
    if [json.loads(d)["node"] for (d,) in lost] != [1]:
        problems.append(f"node_lost events: {lost}")
    if "Traceback" in err:
        problems.append("traceback on stderr")
    return {"problems": problems, "status": res.get("status"), "live_instances": left, "error": error,
            "checkpoints": ckpts, "lost_to_exit_s": lost_to_exit_s}


def ctrl_c_while_second_node_connects(tmp: Path) -> dict[str, Any]:
    """SIGINT to the launcher while node 1 accepts TCP but never sends its SSH banner (a machine still booting)."""
    a = SSHD(tmp / "sshd-a", host=HOSTS[0]).start()
    silent = socket.socket()
    silent.bind((HOSTS[1], 0))
    silent.listen(8)                  # the kernel completes the handshake; nobody ever answers
    try:
        cfg = project(tmp, {"steps": 6, "step_s": 0.05}, connect_timeout=60)
        proc = launch_process(tmp, cfg, [host_arg(a.user, a.host, a.port),
                                         host_arg(a.user, HOSTS[1], silent.getsockname()[1])], a.client_key)
        store = tmp / "runs.sqlite3"
        try:
            wait_event(store, "phase", "node 1: ssh %")
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            rc, res, err = finish(proc)
            stop_s = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        silent.close()
        a.stop()
    left, problems = leftovers(tmp, store)
    if rc != 130 or res.get("status") != "cancelled":
        problems.append(f"exit {rc}, status {res.get('status')!r} (expected 130, cancelled)")
    if list((tmp / "remote").rglob("train.log")):
        problems.append("a job was started although node 1 never connected")
    if "Traceback" in err:
        problems.append("traceback on stderr")
    return {"problems": problems, "status": res.get("status"), "live_instances": left, "stop_s": stop_s}


def capacity_on_second_create(tmp: Path) -> dict[str, Any]:
    """All or nothing, in process: the first offer's node 1 cannot be created (CapacityError): node 0 is
    terminated, its placement deleted, and the next offer (a new placement, both nodes) runs the job."""
    from ftplan.planner.launch.launch_plan import Candidate, build_plan
    from ftplan.planner.launch.launcher import Launcher
    from ftplan.planner.launch.project_config import load_project, with_overrides
    from ftplan.planner.runs.store import Store
    from ftplan.providers.errors import CapacityError
    from ftplan.providers.ssh import SSHHostProvider

    class RackedHosts(SSHHostProvider):
        """Your two machines behind a placement that can run out, as a cloud's cluster placement can."""

        multinode = "test racks"

        def __init__(self, **options: Any):
            super().__init__(**options)
            self.calls: list[tuple[str, str]] = []

        def create_placement(self, run_id, region, zone, nodes, *, store_id=""):
            placement = {**super().create_placement(run_id, region, zone, nodes, store_id=store_id),
                         "id": f"rack-{len([c for c in self.calls if c[0] == 'create_placement'])}", "kind": "rack"}
            self.calls.append(("create_placement", placement["id"]))
            return placement

        def delete_placement(self, placement):
            self.calls.append(("delete_placement", placement["id"]))

        def create(self, request):
            self.calls.append(("create", f"{request.placement['id']}/node{request.node_rank}"))
            if request.instance_type == "full-rack" and request.node_rank == 1:
                raise CapacityError("no room for a second node in this rack", provider="ssh")
            return super().create(request)

        def terminate(self, instance):
            self.calls.append(("terminate", instance.id.split(":")[1]))
            super().terminate(instance)

    a, b = two_machines(tmp)
    try:
        cfg = with_overrides(load_project(project(tmp, {"steps": 4, "step_s": 0.05})), **{"launch.providers": ["ssh"]})
        hosts = [host_arg(a.user, a.host, a.port), host_arg(b.user, b.host, b.port)]
        plan = build_plan(cfg, EXAMPLE, host=hosts, identity=a.client_key)
        plan.candidates = [Candidate(provider="ssh", instance_type=kind, gpu="cpu", region="lab", price_hour=0.5,
                                     nodes=2) for kind in ("full-rack", "spare-rack")]
        made: list[RackedHosts] = []

        def factory(name: str, **options: Any) -> RackedHosts:
            made.append(RackedHosts(**options))
            return made[-1]

        store = Store(tmp / "runs.sqlite3")
        result = Launcher(store, plan, provider_factory=factory).run()
    finally:
        for s in (a, b):
            s.stop()
    left, problems = leftovers(tmp, tmp / "runs.sqlite3")
    calls = made[0].calls if made else []
    expected = [("create_placement", "rack-0"), ("create", "rack-0/node0"), ("create", "rack-0/node1"),
                ("terminate", f"{a.user}@{HOSTS[0]}"), ("delete_placement", "rack-0"),
                ("create_placement", "rack-1"), ("create", "rack-1/node0"), ("create", "rack-1/node1")]
    if calls[:len(expected)] != expected:
        problems.append(f"calls {calls[:len(expected)]} != {expected}")
    if sorted(calls[len(expected):]) != sorted([("terminate", f"{a.user}@{HOSTS[0]}"),
                                                ("terminate", f"{b.user}@{HOSTS[1]}"),
                                                ("delete_placement", "rack-1")]):
        problems.append(f"teardown calls {calls[len(expected):]}")
    if result.status != "succeeded":
        problems.append(f"status {result.status} ({result.error})")
    rows = store.instances(plan.run_id)
    states = [(r.instance_type, r.state) for r in rows]
    if states != [("full-rack", "terminated"), ("full-rack", "create_failed"), ("spare-rack", "terminated"),
                  ("spare-rack", "terminated")]:
        problems.append(f"instance rows {states}")
    # The budget counts both nodes: the deadline each node was given is what is left of $5 at 2 x $0.50/h.
    deadlines = [e.json("data_json")["deadline_s"] for e in store.events(plan.run_id, "job_started")]
    if len(deadlines) != 2 or not all(0.95 * 5 / 1.0 * 3600 <= d <= 5 / 1.0 * 3600 for d in deadlines):
        problems.append(f"deadlines {deadlines} are not the budget at both nodes' price (~18000 s)")
    return {"problems": problems, "status": result.status, "live_instances": left}


# ---- the tests --------------------------------------------------------------------------------
def test_the_stand_in_job_launches_on_two_machines_and_leaves_nothing(tmp_path):
    got = launch_on(tmp_path, 2)
    assert got["problems"] == [], got


def test_one_host_unreachable_at_start_runs_nothing_and_names_the_node(tmp_path):
    got = unreachable_host_at_start(tmp_path)
    assert got["problems"] == [], got


def test_a_node_killed_mid_training_stops_all_and_keeps_node_0s_checkpoint(tmp_path):
    got = node_killed_mid_training(tmp_path)
    assert got["problems"] == [], got


def test_ctrl_c_while_the_second_node_connects_leaves_nothing(tmp_path):
    got = ctrl_c_while_second_node_connects(tmp_path)
    assert got["problems"] == [], got


def test_no_capacity_for_a_second_node_terminates_the_first_and_takes_the_next_offer(tmp_path):
    got = capacity_on_second_create(tmp_path)
    assert got["problems"] == [], got
