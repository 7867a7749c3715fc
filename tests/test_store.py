"""The run store: versioned migrations, the instance lifecycle gc relies on, and crash durability."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

from cli_helpers import ftplan

from ftplan.planner.runs.store import MIGRATIONS, SCHEMA_VERSION, Store


def _tables(path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_fresh_store_has_all_tables_and_latest_version(tmp_path):
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    assert store.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
    assert {"runs", "instances", "events", "costs", "schema_migrations"} <= _tables(path)
    store.close()
    # Reopening applies nothing twice.
    again = Store(path)
    assert again.db.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(MIGRATIONS)


def test_old_store_is_migrated_and_keeps_its_runs(tmp_path):
    path = tmp_path / "old.sqlite3"
    old = Store(path, migrate_to=1)
    assert old.schema_version() == 1
    old.db.execute("INSERT INTO runs (id, created_at, updated_at, status, model) VALUES ('r-old', 1, 1, 'succeeded', 'm')")
    old.close()
    new = Store(path)
    assert new.schema_version() == SCHEMA_VERSION
    run = new.get_run("r-old")
    assert run.model == "m" and run.status == "succeeded"
    assert run.measured_tokens_per_s is None  # column added by migration 2


def test_store_from_a_newer_ftplan_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "new.sqlite3"
    Store(path).db.execute("INSERT INTO schema_migrations VALUES (99, 'future', 0)")
    rc, _out, err = ftplan(capsys, "runs", "--store", str(path))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error:") and "newer than this ftplan" in err


def test_not_a_store_is_a_user_error_through_the_cli(tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("this is not a database " * 100)
    proc = subprocess.run([sys.executable, "-m", "ftplan.planner.cli", "runs", "--store", str(bogus)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "not an ftplan run store" in lines[0]


def test_instance_lifecycle_is_open_until_terminated(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    store.create_run("r1", model="tiny-llama", method="qlora")
    row = store.add_instance_intent("r1", "lambda", instance_type="gpu_1x_a10", price_hour=0.75)
    assert [r.state for r in store.instances("r1", open_only=True)] == ["intent"]
    store.set_instance_created(row, "i-123", {"id": "i-123"})
    assert store.instances(open_only=True)[0].provider_instance_id == "i-123"
    store.set_instance_terminated(row)
    assert store.instances(open_only=True) == []
    assert store.get_instance(row).terminated_at is not None


def test_costs_sum_hours_times_price(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    store.create_run("r1")
    store.add_cost("r1", None, 1000.0, 1000.0 + 1800, 2.0)   # half an hour at $2/h
    store.add_cost("r1", None, 5000.0, 5000.0 + 3600, 0.5)   # an hour at $0.5/h
    hours, usd = store.run_cost("r1")
    assert abs(hours - 1.5) < 1e-9 and abs(usd - 1.5) < 1e-9


def test_writes_survive_a_killed_writer(tmp_path):
    """The intent row is committed the moment it is written: a writer killed right after leaves it for gc."""
    path = tmp_path / "s.sqlite3"
    code = (
        f"import os; from ftplan.planner.runs.store import Store; s = Store(r'{path}'); s.create_run('r-k');"
        "s.add_instance_intent('r-k', 'lambda'); os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd())
    assert proc.returncode == -9
    rows = Store(path).instances(open_only=True)
    assert [(r.run_id, r.state) for r in rows] == [("r-k", "intent")]


def test_short_run_id_prefix_finds_the_run(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    store.create_run("ft-20250101-aaaa")
    store.create_run("ft-20250101-bbbb")
    assert store.get_run("ft-20250101-b").id == "ft-20250101-bbbb"
    assert store.get_run("ft-2025") is None  # ambiguous


def test_three_processes_opening_a_fresh_store_together_all_succeed(tmp_path):
    """The schema version is read inside the write transaction: no "table runs already exists"."""
    for attempt in range(3):
        path = tmp_path / f"race{attempt}.sqlite3"
        code = (f"from ftplan.planner.runs.store import Store; s = Store(r'{path}'); "
                "s.create_run('r-%d' % __import__('os').getpid()); print(s.store_id)")
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(3)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
        assert len({out.strip() for out, _ in outs}) == 1     # one store id, made once
        assert Store(path).schema_version() == SCHEMA_VERSION


def test_store_id_is_made_once_and_kept(tmp_path):
    path = tmp_path / "s.sqlite3"
    first = Store(path).store_id
    assert first.startswith("st") and len(first) > 6
    assert Store(path).store_id == first
    assert Store(tmp_path / "other.sqlite3").store_id != first


def test_read_only_store_folder_says_read_only(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            import pytest

            pytest.skip("running as root: folder permissions do not bind")
        rc, _out, err = ftplan(capsys, "runs", "--store", str(folder / "runs.sqlite3"))
    finally:
        folder.chmod(0o755)
    assert rc == 2 and err.count("\n") == 1
    assert "read-only" in err and "not an ftplan run store" not in err


def test_secrets_are_scrubbed_before_they_are_stored(tmp_path, monkeypatch):
    token = "hf_STOREsecret987654321"
    monkeypatch.setenv("HF_TOKEN", token)
    store = Store(tmp_path / "s.sqlite3")
    store.create_run("r1")
    store.update_run("r1", error=f"401 with {token}", summary_json={"error": f"bad token {token}", "loss": [1.0]})
    store.add_event("r1", "progress", f"echo {token}", data={"loss": token, "step": 3})
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert token.encode() not in raw
    again = Store(tmp_path / "s.sqlite3")
    assert again.get_run("r1").json("summary_json")["loss"] == [1.0]
    assert again.events("r1")[0].json("data_json")["step"] == 3
