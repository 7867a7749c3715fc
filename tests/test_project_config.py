"""ftplan.toml: `ftplan init` writes a valid commented file; `launch` reads it; flags win; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import ftplan

from ftplan.planner.launch.project_config import load_project, with_overrides

EXAMPLE = Path(__file__).resolve().parent.parent / "remote_job" / "examples" / "alpaca_small.json"


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err


def test_init_writes_a_commented_file_that_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = ftplan(capsys, "init", "--model", "tiny-llama", "--budget", "7.5", "--dataset", "d.jsonl")
    assert rc == 0 and "ftplan.toml" in out
    text = (tmp_path / "ftplan.toml").read_text()
    for section in ("[job]", "[launch]", "[providers.local]", "budget_usd", "spot", "regions", "on_over_budget"):
        assert section in text
    assert text.count("#") > 20  # commented for a human
    cfg = load_project()  # ./ftplan.toml by default
    assert cfg.job.model == "tiny-llama" and cfg.job.dataset == "d.jsonl" and cfg.launch.budget_usd == 7.5


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ftplan(capsys, "init")[0] == 0
    rc, _, err = ftplan(capsys, "init")
    assert_one_line_error(rc, err, "already exists", "--force")
    assert ftplan(capsys, "init", "--force", "--budget", "3")[0] == 0
    assert load_project(tmp_path / "ftplan.toml").launch.budget_usd == 3


def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "ftplan.toml"
    p.write_text(body)
    return p


def test_flags_override_the_file_in_a_dry_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _write(tmp_path, f"""
[job]
model = "tiny-llama"
dataset = "{EXAMPLE}"
max_steps = 5
[launch]
providers = ["local"]
budget_usd = 1.0
[providers.local]
price_hour = 0.5
""")
    store = tmp_path / "runs.sqlite3"
    rc, out, err = ftplan(capsys, "launch", "--config", str(cfg), "--budget", "2.5", "--dry-run", "--json",
                          "--store", str(store))
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["dry_run"] is True
    assert plan["budget_usd"] == 2.5                      # the flag won
    assert plan["offer"]["provider"] == "local" and plan["offer"]["price_hour"] == 0.5  # from the file
    assert plan["model"] == "tiny-llama"
    assert not store.exists()                             # a dry run records nothing


def test_dry_run_text_shows_instance_price_estimate_and_budget(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, f'[job]\ndataset = "{EXAMPLE}"\n[launch]\nproviders = ["local"]\nbudget_usd = 1\n'
                     '[providers.local]\nprice_hour = 0.25\n')
    rc, out, err = ftplan(capsys, "launch", "--dry-run")
    assert rc == 0, err
    assert "local" in out and "$0.25/h" in out and "budget $1.00" in out


@pytest.mark.parametrize("body, needles", [
    ('[launch]\nbudget_usd = "twenty"\n', ["launch.budget_usd"]),
    ('[job]\nmehtod = "qlora"\n', ["unknown key", "job.mehtod"]),
    ('[job]\nmethod = "dpo"\n', ["job.method"]),
    ('[providers.runpod]\napi_key = "rp_secret_value_123"\n', ["api_key_env"]),
    ('[job\nmodel = 1\n', ["not valid TOML"]),
])
def test_bad_project_files_are_one_line_errors(tmp_path, capsys, monkeypatch, body, needles):
    monkeypatch.chdir(tmp_path)
    cfg = _write(tmp_path, body)
    rc, _, err = ftplan(capsys, "launch", "--config", str(cfg), "--dry-run", "--budget", "1",
                        "--dataset", str(EXAMPLE), "--provider", "local")
    assert_one_line_error(rc, err, *needles)
    assert "rp_secret_value_123" not in err


@pytest.mark.parametrize("args, needles", [
    (["--config", "missing.toml"], ["missing.toml", "ftplan init"]),
    (["--budget", "-3"], ["--budget"]),
    (["--budget", "1", "--dataset", "nope.jsonl"], ["nope.jsonl"]),
    (["--budget", "1"], ["no dataset"]),
    (["--dataset", str(EXAMPLE)], ["no budget"]),
    (["--budget", "1", "--dataset", str(EXAMPLE), "--model", "no-such-model"], ["no-such-model"]),
    (["--budget", "1", "--dataset", str(EXAMPLE), "--provider", "ssh"], ["--host"]),
    (["--budget", "1", "--dataset", str(EXAMPLE), "--provider", "ssh", "--host", "root@gpu:99999"], ["invalid --host", "port"]),
    (["--budget", "1", "--dataset", str(EXAMPLE), "--identity", "no-key"], ["no-key"]),
])
def test_bad_launch_flags_are_one_line_errors(tmp_path, capsys, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    rc, _, err = ftplan(capsys, "launch", "--provider", "local", "--dry-run", *args) if "--provider" not in args \
        else ftplan(capsys, "launch", "--dry-run", *args)
    assert_one_line_error(rc, err, *needles)


def test_launch_without_yes_and_without_a_terminal_refuses(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = ftplan(capsys, "launch", "--provider", "local", "--budget", "1", "--dataset", str(EXAMPLE),
                        "--store", str(tmp_path / "s.sqlite3"))
    assert_one_line_error(rc, err, "--yes")
    assert not (tmp_path / "s.sqlite3").exists()


def test_overrides_validate_values():
    from ftplan.planner.errors import UserError
    from ftplan.planner.launch.project_config import ProjectConfig

    cfg = with_overrides(ProjectConfig(), **{"job.max_steps": 7, "launch.budget_usd": None})
    assert cfg.job.max_steps == 7 and cfg.launch.budget_usd is None
    with pytest.raises(UserError):
        with_overrides(ProjectConfig(), **{"launch.sync_every_min": -1})
