"""Spot recovery: the fake RunPod preempts the pod mid-run; the launcher notices, closes that instance,
rents the next spot offer and resumes from the last checkpoint it pulled, within the budget."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from fakes.runpod_graphql import fake_runpod  # noqa: F401  (fixture)
from test_fault_matrix import EXAMPLE, _SignalDisplay, stop_leftover_jobs, stub_files

pytestmark = pytest.mark.slow


def project(tmp: Path, fake, sshd, job: Path, fault: Path, *, recovery: bool) -> Path:
    (tmp / "remote").mkdir(exist_ok=True)
    cfg = tmp / "ftplan.toml"
    offers = "".join(f"""
[[launch.offers]]
provider = "runpod"
instance_type = "{gpu}"
gpu = "{gpu}"
region = "EU"
spot = true
price_hour = {price}
""" for gpu, price in (("NVIDIA GeForce RTX 4090", 0.34), ("NVIDIA A100 80GB PCIe", 1.19)))
    cfg.write_text(f"""
[job]
dataset = "{EXAMPLE}"
checkpoint_every_steps = 2
[launch]
providers = ["runpod"]
budget_usd = 5
spot_recovery = {str(recovery).lower()}
poll_interval_s = 0.1
sync_every_min = 0.005
pull_margin_min = 0
ssh_connect_timeout_s = 5
wait_ready_timeout_s = 10
remote_python = "{sys.executable}"
[launch.bundle_extra_files]
"job/train.py" = "{job}"
"fault.json" = "{fault}"
{offers}
[providers.runpod]
api_base_url = "{fake.url}"
poll_s = 0.02
remote_root = "{tmp / 'remote'}"
""")
    return cfg


class Preempter(_SignalDisplay):
    """Once a checkpoint has been pulled back, the provider reclaims the pod: the machine, its job and its
    disk are gone (here: the fake marks the pod EXITED, and we end the job and wipe its run dir)."""

    def __init__(self, fake, run_dir: Path, remote_run: Path):
        super().__init__(None, False, None, fake)
        self.run_dir, self.remote_run, self.preempted = run_dir, remote_run, False

    def progress(self, progress, **kw):
        pulled = list((self.run_dir / "out" / "checkpoints").glob("checkpoint-*/COMPLETE"))
        if not self.preempted and progress.step >= 4 and pulled:
            self.preempted = True
            for pod in self.fake.live_instances():
                self.fake.preempt(pod["id"])
            stop_leftover_jobs(self.remote_run.parent)
            shutil.rmtree(self.remote_run, ignore_errors=True)


def _launch(tmp_path, fake, sshd, monkeypatch, *, recovery: bool):
    from ftplan.planner.commands.launch import build_plan
    from ftplan.planner.launch.launcher import Launcher
    from ftplan.planner.launch.project_config import load_project
    from ftplan.planner.runs.store import Store

    monkeypatch.setenv("RUNPOD_API_KEY", fake.api_key)
    fake.ssh_host, fake.ssh_port = "127.0.0.1", sshd.port
    job, fault = stub_files(tmp_path, {"steps": 30, "step_s": 0.25})
    cfg = load_project(project(tmp_path, fake, sshd, job, fault, recovery=recovery))
    cfg.launch.runs_dir = str(tmp_path / "runs")
    plan = build_plan(cfg, EXAMPLE, identity=sshd.client_key)
    store = Store(tmp_path / "runs.sqlite3")
    display = Preempter(fake, plan.run_dir, tmp_path / "remote" / plan.run_id)
    try:
        result = Launcher(store, plan, display=display).run()
    finally:
        stop_leftover_jobs(tmp_path / "remote")
    return result, store, display


def test_preempted_spot_run_resumes_on_the_next_offer(tmp_path, fake_runpod, sshd, monkeypatch):  # noqa: F811
    result, store, display = _launch(tmp_path, fake_runpod, sshd, monkeypatch, recovery=True)
    assert display.preempted, "the pod was never preempted"
    assert result.status == "succeeded", result.error
    assert fake_runpod.live_instances() == []
    rows = store.instances(result.run_id)
    assert len(rows) == 2 and all(r.state == "terminated" for r in rows)
    assert len(fake_runpod.created()) == 2
    kinds = [e.kind for e in store.events(result.run_id)]
    assert "instance_lost" in kinds and "resume_from" in kinds
    summary = json.loads((Path(result.artifacts_dir) / "out" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps"] == 30
    assert summary["resumed_from_step"] and summary["resumed_from_step"] >= 2  # not from scratch
    # Both instances were billed, and the total is what the report shows.
    costs = store.costs(result.run_id)
    assert len(costs) == 2
    assert result.actual["usd"] == pytest.approx(sum(c.usd for c in costs))


def test_without_spot_recovery_a_preemption_ends_the_run(tmp_path, fake_runpod, sshd, monkeypatch):  # noqa: F811
    result, store, display = _launch(tmp_path, fake_runpod, sshd, monkeypatch, recovery=False)
    assert display.preempted
    assert result.status == "failed" and "disappeared" in result.error
    assert fake_runpod.live_instances() == []
    assert len(fake_runpod.created()) == 1
    assert list((Path(result.artifacts_dir) / "out" / "checkpoints").glob("checkpoint-*/COMPLETE"))
