"""Resume from the bucket's last checkpoint (issue 14): a detached run's machine is reclaimed mid-training, taking
its disk with it; nothing was ever pulled to the laptop. `ftplan attach RUN` sees the machine gone, fetches the
newest checkpoint the watchdog uploaded (sha256-verified), rents the offer again and finishes from that step.
Real parts as in test_detach_laptop_free.py (CLI processes, fake Lambda API, sshd, bootstrap + watchdog, moto S3)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from cli_helpers import FTPLAN_PROCESS
from fakes.lambda_api import fake_lambda  # noqa: F401  (fixture)
from fakes.runpod_graphql import fake_runpod  # noqa: F401  (fixture)
from test_detach_laptop_free import bucket_keys, detached_launch, s3, wait_for  # noqa: F401  (s3 is a fixture)
from test_fault_matrix import stop_leftover_jobs


def _newest_uploaded(env: dict, run_id: str) -> int:
    steps = [int(k.split("/checkpoints/checkpoint-")[1].split("/")[0]) for k in bucket_keys(env, f"ftplan/{run_id}/")
             if "/checkpoints/checkpoint-" in k and k.endswith("MANIFEST.sha256.json") and "/final/" not in k]
    return max(steps, default=0)


def test_attach_resumes_a_reclaimed_detached_run_from_the_buckets_checkpoint(
        tmp_path, fake_lambda, sshd, s3):  # noqa: F811
    try:
        launch, store, _, env = detached_launch(tmp_path, fake_lambda, sshd, s3, {"steps": 60, "step_s": 0.3})
        assert launch.returncode == 0, launch.stderr[-2000:]
        run_id = json.loads(launch.stdout)["run_id"]
        wait_for(lambda: _newest_uploaded(s3["laptop"], run_id) >= 6, 120, "a checkpoint in the bucket")
        # The provider reclaims the machine: job, disk and all.
        (inst,) = fake_lambda.live_instances()
        fake_lambda.preempt(inst["id"])
        stop_leftover_jobs(tmp_path / "remote")
        uploaded = _newest_uploaded(s3["laptop"], run_id)
        shutil.rmtree(tmp_path / "remote" / run_id)
        local = tmp_path / "runs" / run_id / "out" / "checkpoints"
        assert not list(local.glob("checkpoint-*/COMPLETE")), "the laptop pulled nothing: the bucket is the only copy"

        attach = subprocess.run([*FTPLAN_PROCESS, "attach", run_id, "--store", str(store), "--json"], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=300)
        assert attach.returncode == 0, attach.stdout[-3000:] + attach.stderr[-2000:]
        result = json.loads(attach.stdout)
        assert result["status"] == "succeeded", result
        assert len(fake_lambda.calls("POST", "/instance-operations/launch")) == 2
        assert fake_lambda.live_instances() == []
        summary = json.loads((Path(result["artifacts_dir"]) / "out" / "summary.json").read_text())
        assert summary["steps"] == 60 and summary["resumed_from_step"] >= min(uploaded, 6), summary
        from ftplan.planner.runs.store import Store

        s = Store(store)
        (fetched,) = s.events(run_id, "bucket_checkpoint")
        assert "sha256 verified" in fetched.message
        assert len(s.costs(run_id)) == 2 and s.instances(run_id, open_only=True) == []
    finally:
        stop_leftover_jobs(tmp_path / "remote")


def test_a_tampered_bucket_checkpoint_is_not_resumed_from(tmp_path):
    """The fetch is verified: a checkpoint whose bytes differ from its manifest is refused (event recorded) and the
    run resumes from what the laptop already has."""
    import boto3
    from moto.server import ThreadedMotoServer

    from ftplan.planner.launch.launch_plan import Candidate, LaunchPlan
    from ftplan.planner.launch.launcher import Launcher
    from ftplan.planner.runs.store import Store
    from ftplan.remote_job import job_bucket

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    import os

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        s3c = boto3.client("s3")
        s3c.create_bucket(Bucket="runs")
        ck = tmp_path / "ck" / "checkpoint-8"
        ck.mkdir(parents=True)
        (ck / "trainable.bin").write_bytes(b"x" * 100)
        (ck / "COMPLETE").write_text("")
        job_bucket.upload_tree(str(ck), "s3://runs/p/r-1/checkpoints/checkpoint-8")
        s3c.put_object(Bucket="runs", Key="p/r-1/checkpoints/checkpoint-8/trainable.bin", Body=b"y" * 100)
        store = Store(tmp_path / "s.sqlite3")
        store.create_run("r-1")
        plan = LaunchPlan(run_id="r-1", job_config={}, dataset=tmp_path, candidates=[Candidate(
            provider="lambda", instance_type="t", gpu="A10", price_hour=1.0)], model="m", method="qlora",
            runs_dir=tmp_path / "runs", budget_usd=5.0, bucket="s3://runs/p")
        launcher = Launcher(store, plan)
        assert launcher._have_checkpoint() is False
        (bad,) = store.events("r-1", "bucket_checkpoint_failed")
        assert "sha256" in bad.message
        assert not (plan.run_dir / "out" / "checkpoints" / "checkpoint-8").exists()
        # the honest copy is fetched
        job_bucket.upload_tree(str(ck), "s3://runs/p/r-1/checkpoints/checkpoint-8")
        assert launcher._have_checkpoint() is True
        assert (plan.run_dir / "out" / "checkpoints" / "checkpoint-8" / "trainable.bin").read_bytes() == b"x" * 100
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def test_spot_recovery_resumes_from_the_buckets_checkpoint_when_none_was_pulled(
        tmp_path, sshd, monkeypatch, fake_runpod):  # noqa: F811
    """The launcher syncs nothing (sync interval longer than the run); the spot pod is reclaimed once the watchdog
    has put a checkpoint in the bucket: the next offer resumes from that checkpoint, not from step 0."""
    import shutil as _shutil

    from test_detach_faults import S3Bucket
    from test_fault_matrix import EXAMPLE, _SignalDisplay, stub_files
    from test_spot_recovery import project

    from ftplan.planner.commands.launch import build_plan
    from ftplan.planner.launch.launcher import Launcher
    from ftplan.planner.launch.project_config import load_project
    from ftplan.planner.runs.store import Store

    bucket = S3Bucket().start(tmp_path)
    fake = fake_runpod
    try:
        for k, v in {**bucket.laptop, **bucket.scoped, "RUNPOD_API_KEY": fake.api_key}.items():
            monkeypatch.setenv(k, v)
        fake.ssh_host, fake.ssh_port = "127.0.0.1", sshd.port
        job, fault = stub_files(tmp_path, {"steps": 40, "step_s": 0.25})
        cfg_path = project(tmp_path, fake, sshd, job, fault, recovery=True)
        cfg_path.write_text(cfg_path.read_text().replace("sync_every_min = 0.005", "sync_every_min = 600").replace(
            "[launch]\n", '[launch]\nbucket = "s3://runs/ftplan"\nbucket_env = { AWS_ENDPOINT_URL = "RUN_BUCKET_URL", '
            'AWS_ACCESS_KEY_ID = "RUN_BUCKET_KEY_ID", AWS_SECRET_ACCESS_KEY = "RUN_BUCKET_SECRET", '
            'AWS_DEFAULT_REGION = "RUN_BUCKET_REGION" }\n', 1))
        cfg = load_project(cfg_path)
        cfg.launch.runs_dir = str(tmp_path / "runs")
        plan = build_plan(cfg, EXAMPLE, identity=sshd.client_key)
        remote_run = tmp_path / "remote" / plan.run_id

        class ReclaimAfterUpload(_SignalDisplay):
            preempted = False

            def progress(self, progress, **kw):
                if not self.preempted and _newest_uploaded(bucket.laptop, plan.run_id) >= 4:
                    self.preempted = True
                    for pod in fake.live_instances():
                        fake.preempt(pod["id"])
                    stop_leftover_jobs(remote_run.parent)
                    _shutil.rmtree(remote_run, ignore_errors=True)

        display = ReclaimAfterUpload(None, False, None, fake)
        store = Store(tmp_path / "runs.sqlite3")
        result = Launcher(store, plan, display=display).run()
    finally:
        stop_leftover_jobs(tmp_path / "remote")
        bucket.stop()
    assert display.preempted and result.status == "succeeded", result.error
    kinds = [e.kind for e in store.events(result.run_id)]
    assert "instance_lost" in kinds and "bucket_checkpoint" in kinds and "resume_from" in kinds
    assert not store.events(result.run_id, "sync"), "the launcher pulled a checkpoint itself"
    summary = json.loads((Path(result.artifacts_dir) / "out" / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["resumed_from_step"] >= 4
