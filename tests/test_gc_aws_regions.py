"""`ftplan gc` sweeps every AWS region a run was recorded in, not only the adapter's default region.

The case: the launcher was killed inside `create` in eu-west-1, so the store has an intent row (no
instance id) and the instance exists at AWS, tagged with the run id. Only a tag sweep of eu-west-1
finds it.
"""

from __future__ import annotations

import json
import os

import pytest
from cli_helpers import ftplan
from fakes.aws_moto import MotoEC2, isolate_aws_env  # sets MOTO_AMIS_PATH before moto loads

from ftplan.planner.runs.store import Store
from ftplan.providers.base import InstanceRequest


@pytest.fixture
def moto(tmp_path, monkeypatch):
    isolate_aws_env(monkeypatch, tmp_path)
    server = MotoEC2().start()
    yield server
    server.stop()


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_gc_finds_an_orphan_in_the_region_its_run_was_recorded_in(moto, tmp_path, capsys):
    from ftplan.providers.aws import AWSProvider

    run_id = "ft-region-0001"
    store = Store(tmp_path / "runs.sqlite3")
    store.create_run(run_id, status="provisioning")
    store.update_run(run_id, launcher_pid=_dead_pid())
    store.add_instance_intent(run_id, "aws", instance_type="g5.xlarge", gpu="A10G", region="eu-west-1",
                              price_hour=1.0)
    # The create went through at AWS, but the launcher died before recording the id.
    adapter = AWSProvider(region="eu-west-1", endpoint_url=moto.url, public_ip_lookup=lambda: "203.0.113.9",
                          poll_interval_s=0.01, teardown_wait_s=2)
    inst = adapter.create(InstanceRequest(run_id=run_id, instance_type="g5.xlarge", gpu="A10G", gpu_count=1,
                                          region="eu-west-1", ssh_public_key=_pubkey()))
    cfg = tmp_path / "ftplan.toml"
    cfg.write_text(f'[providers.aws]\nendpoint_url = "{moto.url}"\n')

    rc, out, err = ftplan(capsys, "gc", "--json", "--store", str(store.path), "--config", str(cfg))
    found = {i["id"]: i for i in json.loads(out)["instances"]}
    assert rc == 0, err
    assert found[inst.id]["action"] == "orphan" and found[inst.id]["run_id"] == run_id

    rc, out, err = ftplan(capsys, "gc", "--yes", "--json", "--store", str(store.path), "--config", str(cfg))
    assert rc == 0, err
    assert adapter.list_instances(run_id) == []
    assert store.get_run(run_id).status == "failed"


def _pubkey() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " ftplan"
