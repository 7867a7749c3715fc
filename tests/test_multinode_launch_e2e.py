"""End to end over two machines: `ftplan launch --provider ssh --host A --host B` on two real sshd's, one on
127.0.0.2 and one on 127.0.0.3 (each its own "node"), the real job under torchrun's c10d rendezvous (gloo on
the CPU, DDP) on a tiny model, the adapter pulled back from node 0 and verified, the run recorded with 2 nodes,
and secrets.env gone from both machines afterwards."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest
from cli_helpers import ftplan
from sshd_fixture import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "remote_job" / "examples" / "alpaca_small.json"
pytestmark = pytest.mark.slow


def two_hosts(sshd_factory):
    """Two sshd's on two loopback addresses that accept one client key (as a cluster's machines do)."""
    a = sshd_factory(host="127.0.0.2")
    b = sshd_factory(host="127.0.0.3")
    (b.dir / "authorized_keys").write_text((a.dir / "client_ed25519.pub").read_text())
    return a.start(), b.start()


def project(tmp_path: Path, *, max_steps: int = 6, checkpoint_every: int = 2, throttle: float = 0.0,
            connect_timeout: float = 20) -> Path:
    remote = tmp_path / "remote"
    remote.mkdir(exist_ok=True)
    cfg = tmp_path / "ftplan.toml"
    cfg.write_text(f"""
[job]
model = "tiny-llama"
method = "lora"
dataset = "{EXAMPLE}"
seq_len = 64
batch_size = 2
grad_accum = 1
max_steps = {max_steps}
checkpoint_every_steps = {checkpoint_every}
heartbeat_every_s = 0.3
throttle_s_per_step = {throttle}
learning_rate = 0.001

[launch]
budget_usd = 1.0
poll_interval_s = 0.3
sync_every_min = 0.02
pull_margin_min = 0
ssh_connect_timeout_s = {connect_timeout}
ssh_reconnect_s = 5
remote_python = "{sys.executable}"
rdzv_port = {free_port("127.0.0.2")}

[providers.ssh]
remote_root = "{remote}"
price_hour = 0.25
gpu = "cpu"
""")
    return cfg


def host_arg(server) -> str:
    return f"{server.user}@{server.host}:{server.port}"


def events(store: Path, run_id: str, kind: str) -> list[dict]:
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT message, data_json FROM events WHERE run_id = ? AND kind = ?",
                          (run_id, kind)).fetchall()
    return [{"message": m, "data": json.loads(d) if d else None} for m, d in rows]


def test_two_machines_train_one_job_and_come_back_verified(tmp_path, capsys, monkeypatch, sshd_factory):
    a, b = two_hosts(sshd_factory)
    monkeypatch.chdir(tmp_path)
    cfg = project(tmp_path)
    store = tmp_path / "runs.sqlite3"
    rc, out, err = ftplan(capsys, "launch", "--config", str(cfg), "--provider", "ssh", "--host", host_arg(a),
                          "--host", host_arg(b), "--identity", str(a.client_key), "--yes", "--json",
                          "--store", str(store), "--runs-dir", str(tmp_path / "runs"))
    assert rc == 0, err[-3000:] + out
    res = json.loads(out)
    assert res["status"] == "succeeded", res
    run_dir = Path(res["artifacts_dir"])

    # One job over both machines: two processes (one per node), rank 0 on node 0 wrote the summary and adapter.
    summary = json.loads((run_dir / "out" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps"] == 6
    assert summary["num_processes"] == 2 and summary["config"]["nnodes"] == 2
    assert summary["config"]["rdzv_endpoint"].startswith("127.0.0.2:")
    losses = [loss for _, loss in summary["losses"]]
    assert losses[-1] < losses[0]
    # Pulled from node 0 through the checked stream: the adapter is there and matches the machine's manifest.
    assert (run_dir / "out" / "adapter" / "adapter_config.json").is_file()
    assert any((run_dir / "out" / "adapter").glob("*.safetensors"))

    # Recorded with 2 nodes: two instance rows, one per host, both closed, the run's config says nnodes = 2.
    assert sorted(i["id"].split(":")[1].split("@")[1] for i in res["instances"]) == ["127.0.0.2", "127.0.0.3"]
    assert all(i["state"] == "terminated" for i in res["instances"])
    rc, out, _ = ftplan(capsys, "report", res["run_id"], "--json", "--store", str(store))
    rep = json.loads(out)
    assert rep["status"] == "succeeded"
    with sqlite3.connect(store) as db:
        config = json.loads(db.execute("SELECT config_json FROM runs WHERE id = ?", (res["run_id"],)).fetchone()[0])
    assert config["nnodes"] == 2
    group = [e["data"] for e in events(store, res["run_id"], "node_group") if e["data"].get("hosts")]
    assert group and group[0]["nodes"] == 2 and group[0]["hosts"] == [f"127.0.0.2:{a.port}", f"127.0.0.3:{b.port}"]
    # Both machines bill: one cost span per node at $0.25/h, and the run's total is their sum.
    with sqlite3.connect(store) as db:
        costs = db.execute("SELECT price_hour, hours, usd FROM costs WHERE run_id = ?", (res["run_id"],)).fetchall()
    assert len(costs) == 2 and all(price == 0.25 for price, _, _ in costs)
    assert res["actual"]["usd"] == pytest.approx(sum(usd for _, _, usd in costs), abs=1e-4)

    # Nothing secret is left on either machine; node 1 worked in its own folder under the run root.
    remote = tmp_path / "remote"
    node0 = remote / res["run_id"]
    node1 = remote / "node1" / res["run_id"]
    assert (node0 / "job.json").is_file() and (node1 / "job.json").is_file()
    assert json.loads((node1 / "job.json").read_text())["node_rank"] == 1
    assert not list(remote.rglob("secrets.env"))
    assert not (node1 / "out" / "adapter").exists()   # rank 0 alone writes the adapter
