"""A GPU offer whose machine cannot give the job a GPU: the launch fails fast naming the device problem and
stores no calibration (end to end on the `local` provider: real sshd, bundle, job; the offer says A10G)."""

from __future__ import annotations

import json
import sqlite3

import pytest
from cli_helpers import ftplan
from test_launch_local_e2e import local_project

pytestmark = pytest.mark.slow


def test_gpu_offer_on_a_machine_without_a_usable_gpu_fails_without_calibration(tmp_path, capsys, monkeypatch, sshd):
    monkeypatch.chdir(tmp_path)
    cfg = local_project(tmp_path, sshd)
    cfg.write_text(cfg.read_text().replace("[providers.local]\n", '[providers.local]\ngpu = "A10G"\n'))
    store = tmp_path / "runs.sqlite3"
    rc, out, err = ftplan(capsys, "launch", "--config", str(cfg), "--identity", str(sshd.client_key), "--yes",
                          "--json", "--store", str(store), "--runs-dir", str(tmp_path / "runs"))
    assert rc == 1, out + err
    assert "torch cannot use it" in out + err
    row = sqlite3.connect(store).execute(
        "SELECT measured_tokens_per_s, measured_peak_mem_gib, summary_json, config_json FROM runs").fetchone()
    assert row[0] is None and row[1] is None
    summary = json.loads(row[2])
    assert summary["phase"] == "setup" and summary["steps"] == 0 and "DeviceMismatch" in summary["error"]
    assert json.loads(row[3])["expect_gpu"] is True
