"""The live line says what its projected total adds, and the launcher's log lines reach `ftplan -v`."""

from __future__ import annotations

import logging

from ftplan.planner.launch.budget import Progress
from ftplan.planner.launch.live_display import LiveDisplay, NullDisplay


def test_projection_names_the_pull_margin_it_includes(capsys):
    display = LiveDisplay()
    display.progress(Progress(step=49, total_steps=50, loss=6.113, tokens_per_s=900.0), spent=0.0347,
                     projected=0.1157, budget=1.0, eta_s=12.0, margin=0.0810)
    line = " ".join(capsys.readouterr().err.split())   # rich may wrap at 80 columns
    assert "spent $0.0347" in line and "projected $0.1157 (incl. $0.0810 pull margin) / budget $1.00" in line


def test_without_a_margin_the_projection_is_the_run_alone(capsys):
    LiveDisplay().progress(Progress(step=1, total_steps=2), spent=0.01, projected=0.02, budget=None, eta_s=None)
    line = " ".join(capsys.readouterr().err.split())   # rich may wrap at 80 columns
    assert "projected $0.0200 / budget -" in line and "margin" not in line


def test_runner_log_lines_go_to_the_ftplan_logger(caplog):
    with caplog.at_level(logging.INFO, logger="ftplan.launch"):
        NullDisplay().log("connection lost while pulling out/ (reset); reconnecting (1/3)")
        LiveDisplay(quiet=True).log("pinned host key of 10.0.0.5")
    assert [r.getMessage() for r in caplog.records] == [
        "connection lost while pulling out/ (reset); reconnecting (1/3)", "pinned host key of 10.0.0.5"]
