"""The README, run as a newcomer would: its Usage lines one by one in a fresh folder (each must exit 0, or with
the code its comment documents as "exit N"), the local demo against the test sshd, and the Python API example.

Substitutions a fresh machine needs, and nothing else: the test sshd's port and key for `--ssh-port 22` and
`~/.ssh/id_ed25519`, this interpreter for "$PWD/.venv/bin/python", and the recorded run's id for `RUN`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def _block(after_heading: str, lang: str) -> str:
    section = README.split(after_heading, 1)[1]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def usage_commands() -> list[tuple[str, set[int]]]:
    """(command, allowed exit codes) for every command of the Usage block, in order."""
    text = _block("## Usage", "bash").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        command, _, comment = line.partition("  #")
        codes = {0} | {int(c) for c in re.findall(r"exit (\d+)", comment)}
        for part in re.split(r"\s*(?:&&|;)\s*", command.strip()):
            if part:
                out.append((" ".join(part.split()), codes))
    return out


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GOOGLE_", "RUNPOD_", "LAMBDA_", "PAPERSPACE_")) and k != "FTPLAN_LOG"}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", FTPLAN_STORE=str(tmp / "store.sqlite3"),
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp / "aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp / "aws-credentials"), CLOUDSDK_CONFIG=str(tmp / "gcloud"))
    return env


def _run(command: str, cwd: Path, env: dict[str, str], codes: set[int]) -> str:
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode in codes, f"{command}\nexit {proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
    return proc.stdout


def test_usage_block_is_what_this_test_knows():
    commands = [c for c, _ in usage_commands()]
    assert commands[0] == "ftplan check" and any(c.startswith("ftplan launch --provider local") for c in commands)
    assert all(c.startswith("ftplan ") for c in commands), commands


def test_usage_lines_run_in_a_fresh_folder(tmp_path):
    """Every line that needs no machine: the local launch and the lines about its run are the slow test's."""
    work = tmp_path / "fresh"
    work.mkdir()
    env = _env(tmp_path)
    ran = []
    for command, codes in usage_commands():
        if "--provider local" in command or " RUN" in command or command.startswith(("ftplan runs", "ftplan report")):
            continue
        _run(command, work, env, codes)
        ran.append(command.split()[1])
    assert {"check", "estimate", "plan", "gpus", "catalog", "init", "launch", "gc"} <= set(ran)
    assert (work / "ftplan.toml").is_file() and (work / "data" / "alpaca_small.json").is_file()


@pytest.mark.slow
def test_usage_lines_with_the_local_demo_and_its_reports(tmp_path, sshd):
    work = tmp_path / "fresh"
    work.mkdir()
    env = _env(tmp_path)
    run_id = None
    for command, codes in usage_commands():
        command = (command.replace("--ssh-port 22", f"--ssh-port {sshd.port}")
                   .replace("~/.ssh/id_ed25519", str(sshd.client_key))
                   .replace('"$PWD/.venv/bin/python"', sys.executable))
        if " RUN" in command:
            run_id = run_id or json.loads(_run("ftplan runs --json", work, env, {0}))[0]["run_id"]
            command = command.replace(" RUN", f" {run_id}")
        _run(command, work, env, codes)
    [run] = json.loads(_run("ftplan runs --json", work, env, {0}))
    assert run["status"] == "succeeded" and run["provider"] == "local"
    assert (work / "run.html").is_file() and (work / "runs.html").is_file()
    assert run["run_id"] in (work / "run.html").read_text()


def test_python_api_example_runs(tmp_path):
    """The README's worked example, verbatim, in a project folder with one recorded run."""
    from ftplan.planner.runs.store import Store

    work = tmp_path / "project"
    work.mkdir()
    env = _env(tmp_path)
    _run("ftplan init", work, env, {0})
    store = Store(Path(env["FTPLAN_STORE"]))
    store.create_run("ft-example", model="tiny-llama", method="qlora", provider="local", instance_type="local",
                     gpu="cpu", price_hour=0.0, est_hours=0.1, est_usd=0.0, budget_usd=1)
    store.update_run("ft-example", actual_hours=0.05, actual_usd=0.0)
    store.finish_run("ft-example", "succeeded")
    script = work / "example.py"
    script.write_text(_block("## Python API", "python"))
    out = _run(f"{sys.executable} {script}", work, env, {0})
    assert "GiB, fits: True" in out and "ft-example succeeded" in out


def test_documented_shell_completion_completes_commands_and_options(tmp_path):
    """`eval "$(_FTPLAN_COMPLETE=bash_source ftplan)"` defines the completion; asking it completes names."""
    env = _env(tmp_path)
    source = subprocess.run(["ftplan"], env={**env, "_FTPLAN_COMPLETE": "bash_source"}, capture_output=True,
                            text=True, check=True).stdout
    assert "complete " in source and "_FTPLAN_COMPLETE=bash_complete" in source
    ask = {**env, "_FTPLAN_COMPLETE": "bash_complete", "COMP_WORDS": "ftplan es", "COMP_CWORD": "1"}
    out = subprocess.run(["ftplan"], env=ask, capture_output=True, text=True, check=True).stdout
    assert "plain,estimate" in out.splitlines()
    ask.update(COMP_WORDS="ftplan report --b", COMP_CWORD="2")
    out = subprocess.run(["ftplan"], env=ask, capture_output=True, text=True, check=True).stdout
    assert "plain,--by" in out.splitlines()
