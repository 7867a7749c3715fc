"""`ftplan launch --provider local`: the demo's own needs (an sshd on 127.0.0.1, a key it accepts, a Python
there with the job extra) are checked first, each a one-line error with the fix, and nothing is recorded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cli_helpers import error_line
from sshd_fixture import free_port, keygen

from ftplan.planner.errors import UserError
from ftplan.planner.launch.local_preflight import check_local_demo

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "remote_job" / "examples" / "alpaca_small.json"


def _launch(capsys, tmp_path, *args: str) -> str:
    line = error_line(capsys, "launch", "--provider", "local", "--budget", "1", "--dataset", str(EXAMPLE), "--yes",
                      "--store", str(tmp_path / "s.sqlite3"), "--runs-dir", str(tmp_path / "runs"), *args)
    assert not (tmp_path / "s.sqlite3").exists() and not (tmp_path / "runs").exists()   # nothing recorded
    return line


def test_no_sshd_on_the_port_says_how_to_start_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    port = free_port()
    line = _launch(capsys, tmp_path, "--ssh-port", str(port))
    assert f"127.0.0.1:{port}" in line and "openssh-server" in line and "--ssh-port" in line


def test_no_key_says_how_to_make_and_authorize_one(tmp_path, capsys, monkeypatch, sshd):
    monkeypatch.chdir(tmp_path)
    line = _launch(capsys, tmp_path, "--ssh-port", str(sshd.port))
    assert "--identity" in line and "ssh-keygen" in line and "authorized_keys" in line


def test_a_key_sshd_refuses_says_to_authorize_it(tmp_path, capsys, monkeypatch, sshd):
    monkeypatch.chdir(tmp_path)
    stranger = keygen(tmp_path / "stranger")
    line = _launch(capsys, tmp_path, "--ssh-port", str(sshd.port), "--identity", str(stranger))
    assert "refused the key" in line and f"cat {stranger}.pub >> ~/.ssh/authorized_keys" in line


def test_a_python_without_the_job_extra_is_named_with_the_install_line(tmp_path, capsys, monkeypatch, sshd):
    monkeypatch.chdir(tmp_path)
    bare = tmp_path / "bare-venv"
    import venv

    venv.EnvBuilder(with_pip=False).create(bare)
    line = _launch(capsys, tmp_path, "--ssh-port", str(sshd.port), "--identity", str(sshd.client_key),
                   "--remote-python", str(bare / "bin" / "python"))
    assert "cannot import torch, transformers, peft, accelerate" in line and "ftplan[job]" in line


def test_ssh_port_is_only_for_local(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, "launch", "--provider", "aws", "--ssh-port", "2222", "--budget", "1", "--dataset",
                      str(EXAMPLE), "--dry-run")
    assert "--ssh-port" in line and "--provider local" in line


def test_everything_in_place_passes(sshd):
    if sshd.user is None:  # pragma: no cover - the fixture always knows its user
        pytest.skip("no user")
    check_local_demo(sshd.port, sshd.client_key, sys.executable, sshd.user)
    with pytest.raises(UserError, match="does not run"):
        check_local_demo(sshd.port, sshd.client_key, "/no/such/python", sshd.user)
