"""`ftplan check` against the fake provider servers, moto and a real sshd: what is installed, which credential
was found (named by its source, never its value), whether a read-only call works, and the exit code."""

from __future__ import annotations

import json

import pytest
from cli_helpers import ftplan
from fakes import lambda_api, paperspace_api, runpod_graphql
from fakes.aws_moto import MotoEC2, isolate_aws_env

fake_lambda = lambda_api.fake_lambda
fake_paperspace = paperspace_api.fake_paperspace
fake_runpod = runpod_graphql.fake_runpod

AWS_SECRET = "planted/AWS+secret+check+0a1b2c3d4e5f"


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No credential of any provider, no AWS/GCP config files, no instance metadata."""
    home = tmp_path / "home"
    home.mkdir()
    isolate_aws_env(monkeypatch, home)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS", "RUNPOD_API_KEY",
                "LAMBDA_API_KEY", "PAPERSPACE_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(home / "gcloud"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def moto_server():
    server = MotoEC2().start()
    yield server
    server.stop()


def _config(path, text: str):
    path.write_text(text)
    return str(path)


def test_nothing_configured_lists_every_provider_with_its_fix_and_exits_1(clean_env, capsys):
    cfg = _config(clean_env / "ftplan.toml", "[providers.local]\nport = 1\n")
    rc, out, _ = ftplan(capsys, "check", "--config", cfg, "--json")
    rows = {r["provider"]: r for r in json.loads(out)}
    assert rc == 1 and set(rows) == {"aws", "gcp", "runpod", "lambda", "paperspace", "local"}
    assert not any(r["usable"] for r in rows.values())
    assert rows["lambda"]["credential"] is None and "LAMBDA_API_KEY" in rows["lambda"]["fix"]
    assert rows["aws"]["credential"] is None and "aws configure" in rows["aws"]["fix"]
    assert "gcloud auth application-default login" in rows["gcp"]["fix"]
    assert rows["lambda"]["call"] is None            # no credential: no call made
    assert "127.0.0.1:1" in rows["local"]["fix"]
    rc, out, _ = ftplan(capsys, "check", "--config", cfg)
    assert rc == 1 and "no provider is usable yet" in out


def test_fakes_answer_the_read_only_call_and_keys_are_named_never_shown(clean_env, capsys, monkeypatch, fake_lambda,
                                                                       fake_paperspace, fake_runpod, moto_server):
    monkeypatch.setenv("MY_LAMBDA_KEY", fake_lambda.api_key)
    monkeypatch.setenv("PAPERSPACE_API_KEY", fake_paperspace.api_key)
    monkeypatch.setenv("RUNPOD_API_KEY", fake_runpod.api_key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIACHECK0KEY1234567")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    cfg = _config(clean_env / "ftplan.toml", f"""
[providers.lambda]
base_url = "{fake_lambda.url}"
api_key_env = "MY_LAMBDA_KEY"
[providers.paperspace]
base_url = "{fake_paperspace.url}"
[providers.runpod]
api_base_url = "{fake_runpod.url}"
[providers.aws]
endpoint_url = "{moto_server.url}"
""")
    rc, out, err = ftplan(capsys, "check", "--config", cfg, "--json", "--provider", "lambda", "--provider",
                          "paperspace", "--provider", "runpod", "--provider", "aws")
    rows = {r["provider"]: r for r in json.loads(out)}
    assert rc == 0, (out, err)
    for name in ("lambda", "paperspace", "runpod", "aws"):
        assert rows[name]["usable"] and rows[name]["call_ok"] and rows[name]["call"] == "list instances", rows[name]
    assert rows["lambda"]["credential"] == "environment variable MY_LAMBDA_KEY"
    assert rows["runpod"]["credential"] == "environment variable RUNPOD_API_KEY"
    assert "AWS_ACCESS_KEY_ID" in rows["aws"]["credential"]
    for secret in (fake_lambda.api_key, fake_paperspace.api_key, fake_runpod.api_key, AWS_SECRET):
        assert secret not in out + err


def test_a_rejected_key_fails_the_call_with_a_fix_that_names_the_variable(clean_env, capsys, monkeypatch,
                                                                          fake_lambda):
    monkeypatch.setenv("LAMBDA_API_KEY", "wrong-key-abcdef0123456789")
    cfg = _config(clean_env / "ftplan.toml", f'[providers.lambda]\nbase_url = "{fake_lambda.url}"\n')
    rc, out, err = ftplan(capsys, "check", "--config", cfg, "--provider", "lambda")
    assert rc == 1 and "call: FAIL" in out and "LAMBDA_API_KEY" in out
    assert "wrong-key-abcdef0123456789" not in out + err


def test_verbose_logs_the_provider_requests_without_the_key(clean_env, capsys, monkeypatch, fake_lambda):
    monkeypatch.setenv("LAMBDA_API_KEY", fake_lambda.api_key)
    cfg = _config(clean_env / "ftplan.toml", f'[providers.lambda]\nbase_url = "{fake_lambda.url}"\n')
    rc, out, err = ftplan(capsys, "-v", "check", "--config", cfg, "--provider", "lambda")
    assert rc == 0 and "lambda GET" in err and "200" in err, err
    assert "httpx" not in err                                   # libraries only with -vv
    rc, out, err = ftplan(capsys, "-vv", "check", "--config", cfg, "--provider", "lambda")
    assert rc == 0 and "lambda GET" in err and "httpx" in err, err
    assert fake_lambda.api_key not in out + err
    rc, out, err = ftplan(capsys, "-q", "check", "--config", cfg, "--provider", "lambda")
    assert rc == 0 and "lambda GET" not in err
    monkeypatch.setenv("FTPLAN_LOG", "debug")
    rc, out, err = ftplan(capsys, "check", "--config", cfg, "--provider", "lambda")
    assert "lambda GET" in err


def test_logged_secrets_and_tracebacks_are_scrubbed(monkeypatch):
    import io
    import logging

    from ftplan.planner.log_setup import configure_logging

    monkeypatch.setenv("RUNPOD_API_KEY", "rp-secret-value-123456")
    stream = io.StringIO()
    configure_logging(verbose=2, stream=stream)
    log = logging.getLogger("ftplan.providers.runpod")
    log.info("calling with key %s", "rp-secret-value-123456")
    try:
        raise RuntimeError("Authorization: Bearer rp-secret-value-123456")
    except RuntimeError:
        log.exception("request failed")
    text = stream.getvalue()
    assert "calling with key ***" in text and "request failed" in text and "RuntimeError" in text
    assert "rp-secret-value-123456" not in text
    configure_logging()  # back to warnings only


def test_local_sshd_is_usable(clean_env, capsys, sshd):
    cfg = _config(clean_env / "ftplan.toml", f"[providers.local]\nport = {sshd.port}\n")
    rc, out, _ = ftplan(capsys, "check", "--config", cfg, "--provider", "local")
    assert rc == 0 and "usable: local" in out
