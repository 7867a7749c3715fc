"""What comes back from the machine is not trusted: odd heartbeat values never stop a run or a report,
and secrets in it are scrubbed before they are stored or shown."""

from __future__ import annotations

import json

import pytest
from cli_helpers import ftplan

from ftplan.planner.launch.budget import Progress
from ftplan.planner.runs.store import Store

ODD = ["nan", "inf", "-inf", "hf_x" * 4, [1, 2], {"a": 1}, None, True, "1e309", float("nan"), 10**400, ""]


@pytest.mark.parametrize("value", ODD, ids=repr)
def test_odd_heartbeat_values_become_numbers_or_nothing(value):
    p = Progress.from_heartbeat({"step": value, "total_steps": value, "loss": value, "tokens_per_s": value,
                                 "elapsed_s": value, "tokens_seen": value, "status": value})
    assert isinstance(p.step, int) and isinstance(p.total_steps, int) and isinstance(p.tokens_seen, int)
    assert p.loss is None or (isinstance(p.loss, float) and p.loss == p.loss and abs(p.loss) != float("inf"))
    assert isinstance(p.status, str)
    p.remaining_s()  # never raises


def test_heartbeat_that_is_not_an_object_is_no_progress():
    for hb in ([1, 2], "text", 3, None):
        assert Progress.from_heartbeat(hb).step == 0


def test_live_display_prints_odd_progress(capsys):
    from ftplan.planner.launch.live_display import LiveDisplay

    display = LiveDisplay(quiet=False)
    display.progress(Progress.from_heartbeat({"step": "3", "loss": "nan", "tokens_per_s": "fast"}), spent=0.1,
                     projected=None, budget=1.0, eta_s=None)
    display.done("succeeded", None)
    assert "step 3/" in capsys.readouterr().err


def test_report_html_survives_odd_values_from_an_older_store(tmp_path, capsys, monkeypatch):
    """Events written before values were coerced (or by another tool) hold text where numbers belong."""
    token = "hf_REPORTsecret99887766"
    monkeypatch.setenv("HF_TOKEN", token)
    path = tmp_path / "runs.sqlite3"
    store = Store(path)
    store.create_run("ft-odd-0001", model="tiny-llama", method="qlora", status="succeeded")
    for step, loss in ((1, "nan"), (2, token), (3, [1]), (4, 2.5)):
        store.db.execute("INSERT INTO events (run_id, ts, kind, phase, message, data_json) VALUES (?, ?, ?, ?, ?, ?)",
                         ("ft-odd-0001", 1000.0 + step, "progress", "training", "",
                          json.dumps({"step": step, "loss": loss, "spent_usd": "x"})))
    store.update_run("ft-odd-0001", summary_json={"losses": [[1, "nan"], ["two", 3.0], {"step": 3, "loss": token}]})
    html = tmp_path / "run.html"
    rc, out, err = ftplan(capsys, "report", "ft-odd-0001", "--store", str(path), "--html", str(html))
    assert rc == 0, err
    assert "Traceback" not in err and token not in out + err
    assert token not in html.read_text()
    rc, out, err = ftplan(capsys, "report", "ft-odd-0001", "--store", str(path))
    assert rc == 0 and token not in out + err
