"""End to end on the `local` provider: real sshd on 127.0.0.1, the real QLoRA job on tiny-llama (CPU),
the real SSH runner and bundle, artifacts in runs/, and a report whose actual cost comes from the
configured hourly price."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cli_helpers import ftplan

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "remote_job" / "examples" / "alpaca_small.json"
pytestmark = pytest.mark.slow


def local_project(tmp_path: Path, sshd, *, price_hour: float = 0.5, max_steps: int = 4, checkpoint_every: int = 2,
                  extra_job: str = "",
                  extra_launch: str = "") -> Path:
    remote = tmp_path / "remote"
    remote.mkdir(exist_ok=True)
    cfg = tmp_path / "ftplan.toml"
    cfg.write_text(f"""
[job]
model = "tiny-llama"
method = "qlora"
dataset = "{EXAMPLE}"
seq_len = 128
batch_size = 2
grad_accum = 1
max_steps = {max_steps}
checkpoint_every_steps = {checkpoint_every}
heartbeat_every_s = 0.5
{extra_job}
[launch]
providers = ["local"]
budget_usd = 1.0
poll_interval_s = 0.3
sync_every_min = 0.02
pull_margin_min = 0
ssh_connect_timeout_s = 20
remote_python = "{sys.executable}"
{extra_launch}
[providers.local]
port = {sshd.port}
user = "{sshd.user}"
price_hour = {price_hour}
remote_root = "{remote}"
""")
    return cfg


def test_launch_local_trains_pulls_artifacts_and_reports_cost(tmp_path, capsys, monkeypatch, sshd):
    monkeypatch.chdir(tmp_path)
    cfg = local_project(tmp_path, sshd, price_hour=0.5)
    store = tmp_path / "runs.sqlite3"
    rc, out, err = ftplan(capsys, "launch", "--config", str(cfg), "--identity", str(sshd.client_key), "--yes",
                          "--json", "--store", str(store), "--runs-dir", str(tmp_path / "runs"))
    assert rc == 0, err + out
    res = json.loads(out)
    assert res["status"] == "succeeded", res
    run_dir = Path(res["artifacts_dir"])
    assert run_dir == (tmp_path / "runs" / res["run_id"]).resolve()
    # The trained adapter and tokenizer, the job's summary and log, pulled back before teardown.
    summary = json.loads((run_dir / "out" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps"] == 4
    assert (run_dir / "out" / "adapter" / "adapter_config.json").is_file()
    assert any((run_dir / "out" / "adapter").glob("*.safetensors"))
    assert (run_dir / "train.log").stat().st_size > 0
    # Cost = measured hours x configured price; the run is closed and nothing is left open.
    assert res["actual"]["hours"] > 0
    assert res["actual"]["usd"] == pytest.approx(res["actual"]["hours"] * 0.5, abs=1e-4)   # both rounded to 4 places
    assert all(i["state"] == "terminated" for i in res["instances"])

    rc, out, _ = ftplan(capsys, "report", res["run_id"], "--json", "--store", str(store))
    assert rc == 0
    rep = json.loads(out)
    assert rep["status"] == "succeeded" and rep["provider"] == "local" and rep["price_hour"] == 0.5
    assert rep["actual"]["usd"] == pytest.approx(res["actual"]["usd"])
    phases = [p["phase"] for p in rep["phases"]]
    for phase in ("provisioning", "waiting", "connecting", "uploading", "training", "pulling", "teardown"):
        assert phase in phases
    assert phases.index("pulling") < phases.index("teardown")
    assert [[p["step"], p["loss"]] for p in rep["losses"]] == summary["losses"]
    assert [p["step"] for p in rep["losses"]] == [1, 2, 3, 4]
    assert rep["tokens_per_s"]["actual"] == summary["tokens_per_s"]
    assert rep["peak_mem_gib"]["actual"] > 0
    assert "out/adapter/adapter_config.json" in rep["artifacts"]
    assert "id_ed25519" not in rep["artifacts"]

    html = tmp_path / "r.html"
    rc, out, _ = ftplan(capsys, "report", res["run_id"], "--html", str(html), "--store", str(store))
    assert rc == 0 and html.read_text().count("<svg") == 3   # loss, spend, minutes per phase

    rc, out, _ = ftplan(capsys, "runs", "--json", "--store", str(store))
    rows = json.loads(out)
    assert [r["run_id"] for r in rows] == [res["run_id"]] and rows[0]["actual"]["usd"] == res["actual"]["usd"]
