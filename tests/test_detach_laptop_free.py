"""The run outlives the laptop: `ftplan launch --detach --bucket s3://...`, then no launcher ever again.

Real parts: the CLI in its own process (it exits after detaching: the laptop is gone), the Lambda adapter
against the fake Lambda API, the real bundle and bootstrap.sh over a real sshd on 127.0.0.1, the watchdog that
bootstrap starts, moto's S3 server as the bucket, `ftplan pull` and `ftplan attach` as a user runs them. The
machine gets the (moto) bucket key only through launch.bucket_env -> its 0600 secrets.env: the sshd session
does not inherit this process's environment. The stand-in job of the fault matrix keeps this fast; the
real QLoRA job on the local provider is the slow test at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import FTPLAN_PROCESS
from fakes.lambda_api import fake_lambda  # noqa: F401  (fixture)
from test_fault_matrix import LAMBDA_KEY_ENV, stop_leftover_jobs, stub_files, write_project

ROOT = Path(__file__).resolve().parent.parent
GRACE_MIN = 0.05   # 3 s: the watchdog's wait for a pull after training ended


@pytest.fixture()
def s3(tmp_path):
    """moto's S3 server; the laptop's view of it in `laptop`, the machine's in `machine` (scoped names)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    laptop = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
              "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "none"),
              "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    import boto3

    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="runs")
    # The scoped key the user names in ftplan.toml: these variables hold it on the laptop.
    scoped = {"RUN_BUCKET_URL": url, "RUN_BUCKET_KEY_ID": "testing", "RUN_BUCKET_SECRET": "testing",
              "RUN_BUCKET_REGION": "us-east-1"}
    yield {"laptop": laptop, "scoped": scoped}
    server.stop()


BUCKET_ENV = ('bucket_env = { AWS_ENDPOINT_URL = "RUN_BUCKET_URL", AWS_ACCESS_KEY_ID = "RUN_BUCKET_KEY_ID", '
              'AWS_SECRET_ACCESS_KEY = "RUN_BUCKET_SECRET", AWS_DEFAULT_REGION = "RUN_BUCKET_REGION" }')


def wait_for(pred, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def bucket_keys(env: dict, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    return [o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix=prefix).get("Contents", [])]


def idle_after_finish_s(status: dict) -> float:
    """Seconds from training's end to the power-off command, from the watchdog's own record."""
    at = {a["action"]: a["at"] for a in status["actions"]}
    return at["power_off"] - at["training_ended"]


def test_detached_run_uploads_to_the_bucket_powers_off_and_pulls_verified(tmp_path, fake_lambda, sshd, s3):  # noqa: F811
    powered = tmp_path / "powered_off"
    job, fault = stub_files(tmp_path, {"steps": 12, "step_s": 0.4})
    cfg = write_project(tmp_path, fake_lambda, sshd, job, fault)
    cfg.write_text(cfg.read_text().replace("[launch]\n", f'[launch]\npoweroff_cmd = "touch {powered}"\n'
                                                         f"{BUCKET_ENV}\n", 1))
    store = tmp_path / "runs.sqlite3"
    env = {**os.environ, LAMBDA_KEY_ENV: fake_lambda.api_key, "PYTHONPATH": str(ROOT), **s3["laptop"],
           **s3["scoped"]}
    fake_lambda.ssh_host = "127.0.0.1"
    try:
        launch = subprocess.run(
            [*FTPLAN_PROCESS, "launch", "--config", str(cfg), "--identity", str(sshd.client_key), "--yes", "--json",
             "--detach", "--bucket", "s3://runs/ftplan", "--grace-minutes", str(GRACE_MIN), "--store", str(store),
             "--runs-dir", str(tmp_path / "runs")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert launch.returncode == 0, launch.stderr[-2000:]
        result = json.loads(launch.stdout)
        run_id = result["run_id"]
        assert result["status"] == "detached"
        assert "watchdog" in result["guards"] and "s3://runs/ftplan/" + run_id + "/final" in result["guards"]
        # Lambda documents no stop: the user is told what still bills after the power-off and what ends it.
        assert "on lambda a powered-off machine may bill in full until terminated" in result["guards"]
        assert "'ftplan gc --yes'" in result["guards"]
        # No launcher is alive now. The run stays recorded as live; gc keeps its machine.
        runs = subprocess.run([*FTPLAN_PROCESS, "runs", "--store", str(store)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert run_id in runs.stdout and "training" in runs.stdout, runs.stdout + runs.stderr
        gc = subprocess.run([*FTPLAN_PROCESS, "gc", "--config", str(cfg), "--store", str(store), "--json"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert all(i["action"] == "keep" for i in json.loads(gc.stdout)["instances"]), gc.stdout
        assert len(fake_lambda.live_instances()) == 1

        # The job finishes; nobody pulls; the watchdog uploads, then runs the power-off command.
        remote = tmp_path / "remote" / run_id
        wait_for(powered.exists, 120, "the watchdog's power-off command")
        status = json.loads((remote / "watchdog.json").read_text())
        actions = [a["action"] + ("" if a.get("what") in (None, "final") else ":" + a["what"])
                   for a in status["actions"]]
        assert actions.index("training_ended") < actions.index("uploaded") < actions.index("power_off")
        # checkpoints went up as they were made, before training ended
        assert any(a.startswith("uploaded:checkpoints/") for a in actions[:actions.index("training_ended")])
        assert status["actions"][-1]["reason"] == "no launcher pulled within the grace period"
        assert f"ftplan/{run_id}/final/MANIFEST.sha256.json" in bucket_keys(s3["laptop"], f"ftplan/{run_id}/")
        assert status["spent_usd"] <= status["budget_usd"] == 5
        idle = idle_after_finish_s(status)
        print(f"idle_after_finish_s: {idle:.1f} (grace {GRACE_MIN * 60:.0f} s)")
        # The scoped key reached the machine only in its 0600 secrets.env, never the run record.
        assert "RUN_BUCKET" not in (remote / "train.log").read_text()
        assert oct((remote / "secrets.env").stat().st_mode & 0o777) == "0o600"

        pull = subprocess.run([*FTPLAN_PROCESS, "pull", run_id, "--store", str(store), "--dest",
                               str(tmp_path / "pulled")], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert pull.returncode == 0 and "sha256 verified" in pull.stdout, pull.stderr
        summary = json.loads((tmp_path / "pulled" / "summary.json").read_text())
        assert summary["status"] == "succeeded" and summary["steps"] == 12

        # Back at the laptop: attach takes over, reads what the watchdog did, and tears the machine down.
        attach = subprocess.run([*FTPLAN_PROCESS, "attach", run_id, "--store", str(store), "--json"], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=300)
        assert attach.returncode == 0, attach.stderr[-2000:]
        assert json.loads(attach.stdout)["status"] == "succeeded"
        assert len(fake_lambda.live_instances()) == 0
        from ftplan.planner.runs.store import Store

        s = Store(store)
        said = [e.message for e in s.events(run_id, "watchdog")]
        assert said and said[-1].startswith("powering_off"), said
        run = s.get_run(run_id)
        assert run.actual_usd is not None and run.actual_usd <= run.budget_usd
    finally:
        stop_leftover_jobs(tmp_path / "remote")


def test_bucket_must_be_s3_or_gs(tmp_path, capsys):
    from cli_helpers import error_line

    cfg = tmp_path / "ftplan.toml"
    cfg.write_text('[job]\nmodel = "tiny-llama"\ndataset = "x.jsonl"\n[launch]\nbudget_usd = 1\n')
    line = error_line(capsys, "launch", "--config", str(cfg), "--bucket", "https://example.com/x", "--dry-run")
    assert "bucket" in line


def test_a_named_bucket_key_that_is_not_set_is_refused(tmp_path, capsys, monkeypatch):
    from cli_helpers import error_line

    monkeypatch.delenv("NOT_SET_BUCKET_KEY", raising=False)
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = tmp_path / "ftplan.toml"
    cfg.write_text(f'[job]\nmodel = "tiny-llama"\ndataset = "{data}"\n[launch]\nbudget_usd = 1\nproviders = ["local"]\n'
                   'bucket = "s3://bkt/p"\nbucket_env = { AWS_ACCESS_KEY_ID = "NOT_SET_BUCKET_KEY" }\n'
                   '[providers.local]\nprice_hour = 0.5\n')
    line = error_line(capsys, "launch", "--config", str(cfg), "--dry-run")
    assert "NOT_SET_BUCKET_KEY" in line and "instance role" in line


@pytest.mark.slow
def test_real_job_detached_adapter_comes_back_from_the_bucket_and_loads(tmp_path, sshd, s3):
    """The real QLoRA job on tiny-llama (CPU) on the local provider: detach, never attach, pull, load with peft."""
    from test_launch_local_e2e import local_project

    powered = tmp_path / "powered_off"
    cfg = local_project(tmp_path, sshd, price_hour=0.5, max_steps=4,
                        extra_launch=f'poweroff_cmd = "touch {powered}"\n{BUCKET_ENV}\n')
    store = tmp_path / "runs.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **s3["laptop"], **s3["scoped"]}
    try:
        launch = subprocess.run(
            [*FTPLAN_PROCESS, "launch", "--config", str(cfg), "--identity", str(sshd.client_key), "--yes", "--json",
             "--detach", "--bucket", "s3://runs/ftplan", "--grace-minutes", str(GRACE_MIN), "--store", str(store),
             "--runs-dir", str(tmp_path / "runs")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert launch.returncode == 0, launch.stderr[-2000:]
        run_id = json.loads(launch.stdout)["run_id"]
        wait_for(powered.exists, 900, "the watchdog's power-off command")
        status = json.loads((tmp_path / "remote" / run_id / "watchdog.json").read_text())
        assert "uploaded" in [a["action"] for a in status["actions"]]
        assert status["spent_usd"] <= status["budget_usd"]
        print(f"idle_after_finish_s: {idle_after_finish_s(status):.1f} (grace {GRACE_MIN * 60:.0f} s)")
        pull = subprocess.run([*FTPLAN_PROCESS, "pull", run_id, "--store", str(store), "--dest",
                               str(tmp_path / "pulled")], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert pull.returncode == 0 and "sha256 verified" in pull.stdout, pull.stderr
        adapter = tmp_path / "pulled" / "adapter"
        from peft import PeftConfig

        assert PeftConfig.from_pretrained(str(adapter)).peft_type.value == "LORA"
        from safetensors.torch import load_file

        weights = load_file(str(adapter / "adapter_model.safetensors"))
        assert weights and any("lora_A" in k for k in weights)
    finally:
        stop_leftover_jobs(tmp_path / "remote")


def detached_launch(tmp_path: Path, fake, sshd, s3, fault: dict, *, budget: float = 5) -> tuple[subprocess.CompletedProcess, Path, Path, dict]:
    """`ftplan launch --detach --bucket s3://runs/ftplan` in its own process, with the stand-in job."""
    powered = tmp_path / "powered_off"
    job, fault_file = stub_files(tmp_path, fault)
    cfg = write_project(tmp_path, fake, sshd, job, fault_file)
    text = cfg.read_text().replace("budget_usd = 5\n", f"budget_usd = {budget}\n", 1)
    cfg.write_text(text.replace("[launch]\n", f'[launch]\npoweroff_cmd = "touch {powered}"\n{BUCKET_ENV}\n', 1))
    store = tmp_path / "runs.sqlite3"
    env = {**os.environ, LAMBDA_KEY_ENV: fake.api_key, "PYTHONPATH": str(ROOT), **s3["laptop"], **s3["scoped"]}
    fake.ssh_host = "127.0.0.1"
    launch = subprocess.run(
        [*FTPLAN_PROCESS, "launch", "--config", str(cfg), "--identity", str(sshd.client_key), "--yes", "--json",
         "--detach", "--bucket", "s3://runs/ftplan", "--grace-minutes", str(GRACE_MIN), "--store", str(store),
         "--runs-dir", str(tmp_path / "runs")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return launch, store, powered, env


def test_a_job_that_fails_at_once_is_not_detached_but_pulled_and_torn_down(tmp_path, fake_lambda, sshd, s3):  # noqa: F811
    try:
        launch, store, _, _ = detached_launch(tmp_path, fake_lambda, sshd, s3, {"fail_at": 1})
        result = json.loads(launch.stdout)
        assert launch.returncode == 1 and result["status"] == "failed", launch.stderr[-2000:]
        assert "injected failure" in result["error"]
        assert len(fake_lambda.live_instances()) == 0
    finally:
        stop_leftover_jobs(tmp_path / "remote")


def test_over_budget_with_no_launcher_alive_stops_at_a_checkpoint_that_reaches_the_bucket(
        tmp_path, fake_lambda, sshd, s3):  # noqa: F811
    """A slow job ($0.75/h, 80 s of steps left) on a $0.01 budget (48 s): the watchdog, not a launcher, stops it."""
    try:
        launch, store, powered, env = detached_launch(tmp_path, fake_lambda, sshd, s3,
                                                      {"steps": 400, "step_s": 0.2}, budget=0.01)
        assert launch.returncode == 0, launch.stderr[-2000:]
        run_id = json.loads(launch.stdout)["run_id"]
        wait_for(powered.exists, 180, "the watchdog's power-off command")
        status = json.loads((tmp_path / "remote" / run_id / "watchdog.json").read_text())
        stops = [a for a in status["actions"] if a["action"] == "stop_requested"]
        assert stops and "budget" in stops[0]["reason"]
        assert status["spent_usd"] <= status["budget_usd"]
        keys = bucket_keys(s3["laptop"], f"ftplan/{run_id}/final/")
        assert any(k.endswith("/COMPLETE") and "/checkpoints/checkpoint-" in k for k in keys), keys
        pull = subprocess.run([*FTPLAN_PROCESS, "pull", run_id, "--store", str(store), "--dest",
                               str(tmp_path / "pulled")], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert pull.returncode == 0, pull.stderr
        summary = json.loads((tmp_path / "pulled" / "summary.json").read_text())
        assert summary["status"] == "stopped" and summary["steps"] < 400
    finally:
        stop_leftover_jobs(tmp_path / "remote")
