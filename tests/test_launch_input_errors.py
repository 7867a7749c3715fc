"""Bad config values, flags, provider names and missing credentials: one `error:` line, exit 2, and nothing
recorded (no run folder, no run in the store). Through the real CLI entry point."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from cli_helpers import ftplan

EXAMPLE = Path(__file__).resolve().parent.parent / "remote_job" / "examples" / "alpaca_small.json"


def one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _project(tmp_path: Path, extra: str = "", launch: str = "") -> Path:
    cfg = tmp_path / "ftplan.toml"
    cfg.write_text(f'[job]\nmodel = "tiny-llama"\ndataset = "{EXAMPLE}"\n[launch]\nbudget_usd = 5\n{launch}\n{extra}\n')
    return cfg


def _nothing_recorded(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
    store = tmp_path / "runs.sqlite3"
    if store.exists():
        with sqlite3.connect(store) as db:
            assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0


@pytest.mark.parametrize("body, needle", [
    ('[providers.local]\nprice_hour = "abc"', "price_hour"),
    ('[providers.local]\nprice_hour = inf', "price_hour"),
    ('[providers.lambda]\nAPI_KEY = "sk-123456"', "keys do not belong"),
    ('[providers.runpod]\nToken = "abcdef"', "keys do not belong"),
])
def test_bad_provider_section_values_are_one_line(tmp_path, capsys, monkeypatch, body, needle):
    monkeypatch.chdir(tmp_path)
    cfg = _project(tmp_path, body)
    rc, _, err = ftplan(capsys, "launch", "--config", str(cfg), "--dry-run")
    one_line_error(rc, err, needle)
    assert "sk-123456" not in err and "abcdef" not in err


@pytest.mark.parametrize("launch_body, needle", [
    ("poll_interval_s = inf", "poll_interval_s"),
    ("budget_usd = inf", "budget_usd"),
    ("sync_every_min = nan", "sync_every_min"),
])
def test_infinite_or_nan_settings_are_refused(tmp_path, capsys, monkeypatch, launch_body, needle):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "ftplan.toml"
    cfg.write_text(f'[job]\nmodel = "tiny-llama"\ndataset = "{EXAMPLE}"\n[launch]\n{launch_body}\n'
                   + ("budget_usd = 5\n" if "budget" not in launch_body else ""))
    rc, _, err = ftplan(capsys, "launch", "--config", str(cfg), "--dry-run", "--provider", "local")
    one_line_error(rc, err, needle)


def test_budget_flag_inf_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _project(tmp_path)
    rc, _, err = ftplan(capsys, "launch", "--config", str(cfg), "--dry-run", "--provider", "local", "--budget", "inf")
    one_line_error(rc, err, "budget")


@pytest.mark.parametrize("name, hint", [("runpd", "did you mean 'runpod'"), ("AWS", "did you mean 'aws'"),
                                        ("azure", "choose one of")])
def test_unknown_provider_names_are_errors_everywhere(tmp_path, capsys, monkeypatch, name, hint):
    monkeypatch.chdir(tmp_path)
    cfg = _project(tmp_path)
    rc, _, err = ftplan(capsys, "launch", "--config", str(cfg), "--provider", name, "--yes",
                        "--store", str(tmp_path / "runs.sqlite3"))
    one_line_error(rc, err, f"unknown provider '{name}'", hint)
    rc, _, err = ftplan(capsys, "gc", "--provider", name, "--store", str(tmp_path / "runs.sqlite3"))
    one_line_error(rc, err, f"unknown provider '{name}'", hint)
    cfg.write_text(cfg.read_text().replace("[launch]\n", f'[launch]\nproviders = ["{name}"]\n'))
    rc, _, err = ftplan(capsys, "launch", "--config", str(cfg), "--dry-run")
    one_line_error(rc, err, f"unknown provider '{name}'")
    _nothing_recorded(tmp_path)


def test_init_into_a_missing_folder_is_one_line_and_writes_nothing(tmp_path, capsys):
    target = tmp_path / "nope" / "ftplan.toml"
    rc, _, err = ftplan(capsys, "init", "--path", str(target))
    one_line_error(rc, err, "does not exist")
    assert not (tmp_path / "nope").exists()


def test_init_escapes_quotes_and_backslashes(tmp_path, capsys):
    from ftplan.planner.launch.project_config import load_project

    target = tmp_path / "ftplan.toml"
    rc, _, err = ftplan(capsys, "init", "--path", str(target), "--dataset", 'C:\\data\\my "best" set.jsonl')
    assert rc == 0, err
    assert load_project(target).job.dataset == 'C:\\data\\my "best" set.jsonl'


def test_init_with_an_infinite_budget_leaves_no_file(tmp_path, capsys):
    target = tmp_path / "ftplan.toml"
    rc, _, err = ftplan(capsys, "init", "--path", str(target), "--budget", "inf")
    one_line_error(rc, err, "budget")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def _pinned(provider: str, price: float = 0.75) -> str:
    return (f'[[launch.offers]]\nprovider = "{provider}"\ninstance_type = "x"\ngpu = "A10"\n'
            f'region = "us-east-1"\nprice_hour = {price}\n')


@pytest.mark.parametrize("provider, var", [("runpod", "RUNPOD_API_KEY"), ("lambda", "LAMBDA_API_KEY"),
                                           ("paperspace", "PAPERSPACE_API_KEY")])
def test_missing_api_key_is_bad_input_and_nothing_is_recorded(tmp_path, capsys, monkeypatch, provider, var):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(var, raising=False)
    cfg = _project(tmp_path, extra=_pinned(provider))
    rc, _, err = ftplan(capsys, "launch", "--config", str(cfg), "--yes", "--store", str(tmp_path / "runs.sqlite3"),
                        "--runs-dir", str(tmp_path / "runs"))
    one_line_error(rc, err, var)
    assert "teardown" not in err
    _nothing_recorded(tmp_path)


def test_missing_aws_credentials_are_named_before_any_network_call(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cfg = _project(tmp_path, extra=_pinned("aws"))
    rc, _, err = ftplan(capsys, "launch", "--config", str(cfg), "--yes", "--store", str(tmp_path / "runs.sqlite3"),
                        "--runs-dir", str(tmp_path / "runs"))
    one_line_error(rc, err, "AWS credentials", "AWS_ACCESS_KEY_ID")
    _nothing_recorded(tmp_path)


def test_template_keys_api_key_env_is_accepted_by_dry_run_and_launch_alike(tmp_path, capsys, monkeypatch):
    """`api_key_env` (suggested by the template) names the variable; an unset one is the same one-line error
    whether or not it is a dry run, and an option no adapter takes is refused by both."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MY_LAMBDA_KEY", raising=False)
    monkeypatch.delenv("LAMBDA_API_KEY", raising=False)
    cfg = _project(tmp_path, extra='[providers.lambda]\napi_key_env = "MY_LAMBDA_KEY"\n' + _pinned("lambda"))
    rc, out, err = ftplan(capsys, "launch", "--config", str(cfg), "--dry-run")
    assert rc == 0, err
    rc, _, err = ftplan(capsys, "launch", "--config", str(cfg), "--yes", "--store", str(tmp_path / "runs.sqlite3"),
                        "--runs-dir", str(tmp_path / "runs"))
    one_line_error(rc, err, "MY_LAMBDA_KEY")
    _nothing_recorded(tmp_path)
    cfg.write_text(cfg.read_text().replace('api_key_env = "MY_LAMBDA_KEY"', 'flavour = "vanilla"'))
    for extra in (["--dry-run"], ["--yes", "--store", str(tmp_path / "runs.sqlite3")]):
        rc, _, err = ftplan(capsys, "launch", "--config", str(cfg), *extra)
        one_line_error(rc, err, "flavour", "not an option")
    _nothing_recorded(tmp_path)


def test_aws_profile_from_the_template_is_accepted(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _project(tmp_path, extra='[providers.aws]\nprofile = "default"\n' + _pinned("aws"))
    rc, _, err = ftplan(capsys, "launch", "--config", str(cfg), "--dry-run")
    assert rc == 0, err


@pytest.mark.parametrize("host", ["root\n@gpu-box", "root@gpu-box\n:22"])
def test_a_trailing_newline_never_passes_validation(tmp_path, capsys, monkeypatch, host):
    """`$` matches before a final newline; the validators use `\\Z`, so a newline cannot ride into a command."""
    from ftplan.providers.errors import ProviderError
    from ftplan.providers.lambda_cloud import check_run_id
    from ftplan.providers.ssh import parse_host_spec

    with pytest.raises(ProviderError):
        check_run_id("ft-20250101-abcd\n")
    from ftplan.providers.aws import _PUBKEY

    assert not _PUBKEY.match("ssh-ed25519 AAAAC3Nz ftplan\nssh-rsa AAAAB3 evil")
    with pytest.raises(ValueError):
        parse_host_spec(host)
    monkeypatch.chdir(tmp_path)
    cfg = _project(tmp_path)
    rc, _, err = ftplan(capsys, "launch", "--config", str(cfg), "--provider", "ssh", "--host", host, "--dry-run")
    one_line_error(rc, err)
