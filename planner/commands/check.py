"""`ftplan check`: can this machine use each provider? Per provider: is its extra installed, which credential
was found (its source: an environment variable's name, a file, a profile, never the value), and does a
read-only call (listing instances, the cheapest call every adapter has) succeed. Exit 0 when at least one
provider is usable, 1 when none is.

Provider options come from ftplan.toml (`[providers.X]`), as `ftplan launch` reads them, so a custom
endpoint, profile or `api_key_env` is checked as it will be used.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click

from ftplan.planner.errors import UserError

CLOUDS = ("aws", "gcp", "runpod", "lambda", "paperspace")
CHOICES = (*CLOUDS, "local")


def credential_source(name: str, options: dict[str, Any]) -> tuple[str | None, str]:
    """(where the credential comes from, or None; the fix when there is none). Never reads out a value."""
    from ftplan.planner.launch.preflight import KEY_ENV

    if name in KEY_ENV:
        if options.get("api_key"):
            return "api_key option", ""
        var = options.get("api_key_env") or KEY_ENV[name]
        if os.environ.get(var):
            return f"environment variable {var}", ""
        return None, f"set the environment variable {var} (or api_key_env in [providers.{name}])"
    if name == "aws":
        return _aws_source(options)
    if name == "gcp":
        return _gcp_source()
    if name == "local":
        key = options.get("identity")
        return (f"key file {key}" if key else "ssh keys of this user"), ""
    return None, ""


def _aws_source(options: dict[str, Any]) -> tuple[str | None, str]:
    fix = "run `aws configure`, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    try:
        import boto3

        session = boto3.Session(profile_name=options.get("profile") or None)
        creds = session.get_credentials()
    except Exception as exc:  # noqa: BLE001 - ProfileNotFound, a broken config file
        from ftplan.providers.errors import scrub

        return None, f"{' '.join(scrub(exc).split())}; {fix}"
    if creds is None:
        return None, fix
    method = getattr(creds, "method", "") or "credential chain"
    where = {"env": "environment variables AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
             "shared-credentials-file": "shared credentials file", "config-file": "AWS config file",
             "iam-role": "instance metadata (IAM role)", "container-role": "container credentials",
             "sso": "AWS SSO", "assume-role": "assumed role", "explicit": "explicit keys"}.get(method, method)
    profile = options.get("profile") or session.profile_name
    return (f"{where} (profile {profile})" if profile and method != "env" else where), ""


def _gcp_source() -> tuple[str | None, str]:
    """Application Default Credentials, found the way google.auth looks, without the metadata probe when
    this is evidently not a Google VM (that probe waits for a timeout)."""
    fix = "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a key file"
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if path:
        return (f"GOOGLE_APPLICATION_CREDENTIALS ({path})", "") if Path(path).is_file() else \
            (None, f"GOOGLE_APPLICATION_CREDENTIALS names {path}, which does not exist; {fix}")
    config = Path(os.environ.get("CLOUDSDK_CONFIG") or Path.home() / ".config" / "gcloud")
    adc = config / "application_default_credentials.json"
    if adc.is_file():
        return f"gcloud application-default credentials ({adc})", ""
    try:
        on_gce = "Google" in Path("/sys/class/dmi/id/product_name").read_text()
    except OSError:
        on_gce = False
    return ("metadata server (this is a Google VM)", "") if on_gce else (None, fix)


def _extra(name: str) -> tuple[bool, str]:
    from ftplan.planner.launch.preflight import sdk_problem

    problem = sdk_problem(name)
    return (not problem), problem


def _read_only_call(name: str, options: dict[str, Any]) -> tuple[bool, str]:
    """List the instances (read-only, free, on every adapter); for `local`, an SSH banner on 127.0.0.1."""
    from ftplan.providers.errors import scrub

    if name == "local":
        import socket

        port = int(options.get("port", 22))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
                s.settimeout(3)
                banner = s.recv(64)
        except OSError as exc:
            return False, f"no SSH server on 127.0.0.1:{port} ({exc.strerror or exc})"
        return (True, "") if banner.startswith(b"SSH-") else (False, f"127.0.0.1:{port} is not an SSH server")
    from ftplan.planner.launch.preflight import adapter_kwargs
    from ftplan.providers.base import get_provider

    try:
        provider = get_provider(name, **adapter_kwargs(name, options))
        found = provider.list_instances()
    except UserError as exc:
        return False, str(exc)
    except Exception as exc:  # noqa: BLE001 - every failure is the answer, shown on one line
        return False, f"{type(exc).__name__}: {' '.join(scrub(exc).split())[:300]}"
    return True, f"{len(found)} ftplan instance(s) listed"


def check_provider(name: str, options: dict[str, Any]) -> dict[str, Any]:
    from ftplan.planner.launch.preflight import options_problem

    installed, extra_fix = _extra(name) if name in CLOUDS else (True, "")
    source, cred_fix = credential_source(name, options) if installed else (None, "")
    row: dict[str, Any] = {
        "provider": name, "extra_installed": installed, "credential": source,
        "call": None, "call_ok": None, "seconds": None, "usable": False,
        "fix": extra_fix or cred_fix or None,
    }
    bad_option = options_problem(name, options)
    if bad_option:
        row["fix"] = bad_option
        return row
    if not installed or (source is None and name != "local"):
        return row
    start = time.monotonic()
    ok, detail = _read_only_call(name, options)
    row.update(call="list instances" if name != "local" else "ssh banner", call_ok=ok,
               seconds=round(time.monotonic() - start, 2), usable=ok)
    if ok:
        row["detail"] = detail
    else:
        row["fix"] = detail
    return row


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("ok" if ok else "FAIL")


@click.command("check")
@click.option("--provider", "providers", multiple=True, type=click.Choice(CHOICES),
              help="Only these providers (repeatable). Default: all.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Project file with [providers.X] options (default ./ftplan.toml when present).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per provider.")
@click.pass_context
def check(ctx, providers, config_path, as_json):
    """Which providers this machine can use: extra installed, credential found (by source), a read-only call."""
    from ftplan.planner.launch.preflight import SDKS
    from ftplan.planner.launch.project_config import load_project

    cfg = load_project(config_path, required=config_path is not None)
    names = list(dict.fromkeys(providers)) or list(CHOICES)
    rows = [check_provider(n, cfg.provider_options(n)) for n in names]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        width = max(len(r["provider"]) for r in rows)
        for r in rows:
            cred = r["credential"] or "none"
            extra = "ok" if r["provider"] in SDKS and r["extra_installed"] else (
                "MISSING" if r["provider"] in SDKS else "built-in")
            line = (f"{r['provider']:<{width}}  extra {extra:<8}  "
                    f"credential: {cred}  call: {_mark(r['call_ok'])}")
            click.echo(line + ("  -> usable" if r["usable"] else ""))
            if r.get("fix"):
                click.echo(f"{'':<{width}}  fix: {r['fix']}")
        usable = [r["provider"] for r in rows if r["usable"]]
        click.echo(f"usable: {', '.join(usable)}" if usable else "no provider is usable yet; see the fixes above")
    ctx.exit(0 if any(r["usable"] for r in rows) else 1)
