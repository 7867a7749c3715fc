"""The machine guards its own budget (remote_job/watchdog.py), run as the real script in a real process.

Buckets are real servers: moto's S3 server for s3://, and a GCS JSON API fake (pytest-httpserver) for gs://;
the spot notices come from a fake instance-metadata server speaking IMDSv2 / GCE metadata.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WATCHDOG = ROOT / "remote_job" / "watchdog.py"


def make_run(tmp: Path, heartbeat: dict | None = None) -> Path:
    run = tmp / "run"
    (run / "out").mkdir(parents=True)
    if heartbeat is not None:
        (run / "out" / "heartbeat.json").write_text(json.dumps(heartbeat))
    return run


def finish(run: Path, with_adapter: bool = True) -> None:
    if with_adapter:
        (run / "out" / "adapter").mkdir(parents=True, exist_ok=True)
        (run / "out" / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
        (run / "out" / "summary.json").write_text('{"status": "finished"}')
    (run / "exit_code").write_text("0\n")


def start(run: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WATCHDOG), "--run-dir", str(run), "--poll-s", "0.2", *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def status(run: Path) -> dict:
    return json.loads((run / "watchdog.json").read_text())


def wait_for(pred, timeout: float = 30.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


@pytest.fixture()
def s3(monkeypatch, tmp_path):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3").create_bucket(Bucket="runs")
    yield env
    server.stop()


def test_over_budget_projection_stops_training_at_a_checkpoint(tmp_path):
    # 100 of 1000 steps in 360 s: 3240 s left; at $10/h with $1 spent that projects ~$11 > $5.
    run = make_run(tmp_path, {"step": 100, "total_steps": 1000, "elapsed_s": 360.0})
    proc = start(run, "--price-hour", "10", "--budget-usd", "5", "--started-at", str(time.time() - 360),
                 "--poweroff-cmd", "")
    try:
        assert wait_for(lambda: (run / "STOP").exists()), "the watchdog never asked the job to stop"
        assert "budget" in (run / "STOP").read_text()
        assert [a["action"] for a in status(run)["actions"]][:2] == ["started", "stop_requested"]
    finally:
        proc.kill()


def test_within_budget_and_odd_heartbeats_do_not_stop_training(tmp_path):
    run = make_run(tmp_path, {"step": "nan", "total_steps": [1], "loss": "sk-secret"})
    proc = start(run, "--price-hour", "1", "--budget-usd", "100", "--poweroff-cmd", "")
    try:
        assert wait_for(lambda: (run / "watchdog.json").exists())
        time.sleep(1.0)
        (run / "out" / "heartbeat.json").write_text(json.dumps({"step": 10, "total_steps": 20, "elapsed_s": 10}))
        time.sleep(1.0)
        assert not (run / "STOP").exists()
        assert proc.poll() is None
    finally:
        proc.kill()


def test_finished_run_nobody_pulled_is_uploaded_then_powered_off(tmp_path, s3):
    run = make_run(tmp_path, {"step": 5, "total_steps": 5, "elapsed_s": 5})
    marker = tmp_path / "powered_off"
    proc = start(run, "--price-hour", "1", "--budget-usd", "100", "--grace-minutes", "0.02",
                 "--bucket", "s3://runs/run-1", "--poweroff-cmd", f"touch {marker}", env=s3)
    finish(run)
    assert proc.wait(timeout=60) == 0, proc.stdout.read()
    assert marker.exists(), "the machine was not powered off"
    st = status(run)
    assert [a["action"] for a in st["actions"]][-2:] == ["uploaded", "power_off"]
    # What a user then fetches is the adapter, verified against the manifest.
    sys.path.insert(0, str(ROOT / "remote_job"))
    import job_bucket

    dest = tmp_path / "fetched"
    manifest = job_bucket.download_tree("s3://runs/run-1/final", str(dest))
    assert "adapter/adapter_model.safetensors" in manifest
    assert (dest / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (run / "out" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_launcher_that_pulled_means_no_upload_and_power_off(tmp_path):
    run = make_run(tmp_path)
    marker = tmp_path / "powered_off"
    proc = start(run, "--price-hour", "1", "--grace-minutes", "5", "--bucket", "s3://never/used",
                 "--poweroff-cmd", f"touch {marker}")
    finish(run)
    (run / "launcher_pulled").write_text("")
    assert proc.wait(timeout=30) == 0  # well inside the 5-minute grace: the pull ends the wait
    assert marker.exists()
    assert "uploaded" not in [a["action"] for a in status(run)["actions"]]


def test_a_job_killed_without_an_exit_code_ends_the_watch_too(tmp_path):
    """bootstrap killed -9 (the OOM killer): no exit_code will come. The watchdog must not wait for training
    forever: the machine powers off after the grace period (and on your own machine the watchdog exits)."""
    run = make_run(tmp_path, {"step": 2, "total_steps": 50, "elapsed_s": 2})
    job = subprocess.Popen(["sleep", "600"])
    (run / "pid").write_text(f"{job.pid}\n")
    marker = tmp_path / "powered_off"
    proc = start(run, "--price-hour", "1", "--budget-usd", "100", "--grace-minutes", "0.01",
                 "--poweroff-cmd", f"touch {marker}")
    try:
        assert wait_for(lambda: (run / "watchdog.json").exists(), 20)
        time.sleep(1.0)
        assert proc.poll() is None and not marker.exists(), "a running job is not over"
        job.kill()
        job.wait()
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
    finally:
        job.kill()
        proc.kill()
    assert marker.exists()
    assert [a["action"] for a in status(run)["actions"]][-2:] == ["training_ended", "power_off"]


def test_aws_spot_notice_checkpoints_and_uploads_the_checkpoint(tmp_path, s3, httpserver):
    httpserver.expect_request("/latest/api/token", method="PUT").respond_with_data("tok")
    httpserver.expect_request("/latest/meta-data/spot/instance-action",
                              headers={"X-aws-ec2-metadata-token": "tok"}).respond_with_data(
        '{"action": "terminate", "time": "2026-12-07T12:00:00Z"}')
    run = make_run(tmp_path, {"step": 3, "total_steps": 100, "elapsed_s": 3})
    proc = start(run, "--price-hour", "1", "--bucket", "s3://runs/run-2", "--metadata", "aws",
                 "--metadata-url", httpserver.url_for("").rstrip("/"), "--poweroff-cmd", "", env=s3)
    try:
        assert wait_for(lambda: (run / "STOP").exists())
        assert "spot" in (run / "STOP").read_text()
        ckpt = run / "out" / "checkpoints" / "checkpoint-3"   # the job answers STOP with a checkpoint
        ckpt.mkdir(parents=True)
        (ckpt / "adapter_model.safetensors").write_bytes(b"w" * 100)
        (ckpt / "COMPLETE").write_text("")
        assert wait_for(lambda: any(a["action"] == "uploaded" for a in status(run)["actions"]))
    finally:
        proc.kill()
    import boto3

    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="runs")["Contents"]}
    assert "run-2/checkpoints/checkpoint-3/adapter_model.safetensors" in keys
    assert "run-2/checkpoints/checkpoint-3/MANIFEST.sha256.json" in keys


def test_gcp_preempted_and_gcs_upload(tmp_path, httpserver):
    from werkzeug import Response

    httpserver.expect_request("/computeMetadata/v1/instance/preempted",
                              headers={"Metadata-Flavor": "Google"}).respond_with_data("TRUE")
    stored: dict[str, bytes] = {}

    def upload(request):
        stored[request.args["name"]] = request.get_data()
        return Response(json.dumps({"name": request.args["name"]}), content_type="application/json")

    httpserver.expect_request("/upload/storage/v1/b/bkt/o", method="POST").respond_with_handler(upload)
    run = make_run(tmp_path, {"step": 1, "total_steps": 10, "elapsed_s": 1})
    ckpt = run / "out" / "checkpoints" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("")
    (ckpt / "state.pt").write_bytes(b"s" * 10)
    env = {"STORAGE_EMULATOR_HOST": httpserver.url_for("").rstrip("/")}
    proc = start(run, "--price-hour", "1", "--bucket", "gs://bkt/r", "--metadata", "gcp",
                 "--metadata-url", httpserver.url_for("").rstrip("/"), "--poweroff-cmd", "", env=env)
    try:
        assert wait_for(lambda: "r/checkpoints/checkpoint-1/MANIFEST.sha256.json" in stored)
    finally:
        proc.kill()
    manifest = json.loads(stored["r/checkpoints/checkpoint-1/MANIFEST.sha256.json"])
    assert set(manifest) == {"COMPLETE", "state.pt"}


def test_unsafe_manifest_paths_are_refused(tmp_path, s3):
    sys.path.insert(0, str(ROOT / "remote_job"))
    import boto3
    import job_bucket

    client = boto3.client("s3")
    client.put_object(Bucket="runs", Key="evil/MANIFEST.sha256.json",
                      Body=json.dumps({"../../escape": {"sha256": "0" * 64, "size": 1}}))
    with pytest.raises(ValueError, match="unsafe path"):
        job_bucket.download_tree("s3://runs/evil", str(tmp_path / "dest"))
    assert not (tmp_path / "escape").exists()


def test_bad_price_is_refused_at_start(tmp_path):
    run = make_run(tmp_path)
    proc = subprocess.run([sys.executable, str(WATCHDOG), "--run-dir", str(run), "--price-hour", "0"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--price-hour must be a positive number" in proc.stderr


def test_ftplan_pull_fetches_the_bucket_upload_verified(tmp_path, s3):
    """The case users fear, its last step: the watchdog uploaded, the laptop never came back; `ftplan pull`."""
    sys.path.insert(0, str(ROOT / "remote_job"))
    import job_bucket

    from ftplan.planner.runs.store import Store

    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    job_bucket.upload_tree(str(out), "s3://runs/r-77/final")
    store_path = tmp_path / "runs.sqlite3"
    store = Store(store_path)
    store.create_run("r-77", config_json={"bucket": "s3://runs"}, artifacts_dir=str(tmp_path / "art"))
    store.close()
    cli = [sys.executable, "-m", "ftplan.planner.cli"]
    ok = subprocess.run([*cli, "pull", "r-77", "--store", str(store_path)], capture_output=True, text=True,
                        timeout=120, env={**os.environ, **s3})
    assert ok.returncode == 0, ok.stderr
    assert "sha256 verified" in ok.stdout
    got = tmp_path / "art" / "bucket" / "adapter" / "adapter_model.safetensors"
    assert got.read_bytes() == (out / "adapter" / "adapter_model.safetensors").read_bytes()
    # Tampered upload: one line, exit 2, no traceback.
    import boto3

    boto3.client("s3").put_object(Bucket="runs", Key="r-77/final/adapter/adapter_model.safetensors", Body=b"x")
    bad = subprocess.run([*cli, "pull", "r-77", "--store", str(store_path), "--dest", str(tmp_path / "d2")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, **s3})
    assert bad.returncode == 2 and "failed verification" in bad.stderr and "Traceback" not in bad.stderr
    unknown = subprocess.run([*cli, "pull", "nope", "--store", str(store_path)], capture_output=True, text=True,
                             timeout=60)
    assert unknown.returncode == 2 and "ftplan runs" in unknown.stderr


def test_a_tampered_fetch_keeps_the_earlier_good_copy(tmp_path, s3):
    sys.path.insert(0, str(ROOT / "remote_job"))
    import boto3
    import job_bucket

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"good")
    job_bucket.upload_tree(str(src), "s3://runs/t/final")
    dest = tmp_path / "dest"
    job_bucket.download_tree("s3://runs/t/final", str(dest))
    boto3.client("s3").put_object(Bucket="runs", Key="t/final/a.bin", Body=b"evil")
    with pytest.raises(ValueError, match="sha256"):
        job_bucket.download_tree("s3://runs/t/final", str(dest))
    assert (dest / "a.bin").read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".partial-")] == []


def test_checkpoints_reach_the_bucket_as_they_are_made(tmp_path, s3):
    run = make_run(tmp_path, {"step": 2, "total_steps": 100, "elapsed_s": 2})
    proc = start(run, "--price-hour", "1", "--bucket", "s3://runs/run-5", "--poweroff-cmd", "", env=s3)
    try:
        for step in (2, 4):
            ckpt = run / "out" / "checkpoints" / f"checkpoint-{step}"
            ckpt.mkdir(parents=True)
            (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(64))
            (ckpt / "COMPLETE").write_text("")
            assert wait_for(lambda s=step: (run / "watchdog.json").exists() and any(
                a.get("what") == f"checkpoints/checkpoint-{s}" for a in status(run)["actions"]))
        half = run / "out" / "checkpoints" / "checkpoint-6"   # still being written: no COMPLETE yet
        half.mkdir()
        (half / "adapter_model.safetensors").write_bytes(b"partial")
        time.sleep(1.0)
    finally:
        proc.kill()
    import boto3

    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="runs")["Contents"]}
    assert {"run-5/checkpoints/checkpoint-2/MANIFEST.sha256.json",
            "run-5/checkpoints/checkpoint-4/MANIFEST.sha256.json"} <= keys
    assert not any(k.startswith("run-5/checkpoints/checkpoint-6/") for k in keys)
