"""Checks that run before a launch records anything: is the provider's SDK installed, are its credentials
set, are its options ones the adapter takes.

Why here and not at `create`: a launch that fails inside `create` for a missing key leaves a run record,
a `runs/<id>/` folder and a "teardown not confirmed" message that buries the cause. A missing key or extra
is bad input: one line naming the variable or the `pip install`, exit 2, nothing recorded.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Any

from ftplan.planner.errors import UserError

# provider -> (module that must import, extra to install)
SDKS = {"aws": ("boto3", "aws"), "gcp": ("google.cloud.compute_v1", "gcp"), "runpod": ("runpod", "runpod")}
# provider -> the environment variable its adapter reads the API key from (when no api_key option is given)
KEY_ENV = {"runpod": "RUNPOD_API_KEY", "lambda": "LAMBDA_API_KEY", "paperspace": "PAPERSPACE_API_KEY"}
# Keys of a [providers.X] section that the launcher translates before building the adapter.
TRANSLATED_KEYS = {"api_key_env": ("runpod", "lambda", "paperspace"), "profile": ("aws",)}


def sdk_problem(name: str) -> str:
    """Why the provider's SDK cannot be used ("" when it can)."""
    module, extra = SDKS.get(name, (None, None))
    if module is None:
        return ""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return "" if found else f"the {name} adapter needs its SDK: pip install 'ftplan[{extra}]'"


def credentials_problem(name: str, options: dict[str, Any]) -> str:
    """Why the provider has no credentials ("" when it has, or when this cannot be told without a network call)."""
    if name in KEY_ENV:
        if options.get("api_key"):
            return ""
        var = options.get("api_key_env") or KEY_ENV[name]
        if os.environ.get(var):
            return ""
        return f"no {name} API key: set the environment variable {var}"
    if name == "aws":
        if options.get("endpoint_url"):
            return ""  # a test endpoint (moto): its own credentials
        try:
            import boto3

            session = boto3.Session(profile_name=options.get("profile") or None)
            found = session.get_credentials() is not None
        except Exception as exc:  # noqa: BLE001 - e.g. ProfileNotFound
            from ftplan.providers.errors import scrub

            return f"AWS credentials: {' '.join(scrub(exc).split())}; run `aws configure` or set AWS_PROFILE"
        return "" if found else ("no AWS credentials: run `aws configure`, or set AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    return ""  # gcp: Application Default Credentials may come from the metadata server; create says so


def options_problem(name: str, options: dict[str, Any]) -> str:
    """An option the adapter does not take (same answer for --dry-run and launch)."""
    from ftplan.providers.base import ADAPTERS

    if name not in ADAPTERS:
        return ""
    module_name, cls_name = ADAPTERS[name].split(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
        params = inspect.signature(cls.__init__).parameters
    except Exception:  # noqa: BLE001 - cannot inspect: let the adapter decide
        return ""
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return ""
    accepted = {p for p in params if p != "self"}
    for key in options:
        if key in accepted or name in TRANSLATED_KEYS.get(key, ()):
            continue
        valid = sorted(accepted | {k for k, names in TRANSLATED_KEYS.items() if name in names})
        return f"[providers.{name}] {key}: not an option of the {name} adapter; valid: {', '.join(valid)}"
    return ""


def adapter_kwargs(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options as the adapter takes them: `api_key_env = "VAR"` becomes the key read from $VAR (registered
    as a secret, never stored), `profile` (AWS) selects the profile through AWS_PROFILE."""
    from ftplan.providers.errors import register_secret

    opts = dict(options)
    var = opts.pop("api_key_env", None)
    if var and name in TRANSLATED_KEYS["api_key_env"]:
        value = os.environ.get(str(var))
        if not value:
            raise UserError(f"[providers.{name}] api_key_env = \"{var}\": the environment variable {var} is not set")
        register_secret(value)
        opts.setdefault("api_key", value)
    profile = opts.pop("profile", None)
    if profile and name == "aws":
        os.environ["AWS_PROFILE"] = str(profile)
    return opts


def usable_candidates(candidates: list[Any], provider_options: dict[str, dict[str, Any]]) -> list[Any]:
    """The offers whose provider has its SDK and credentials. Raises UserError (naming the first problem) when
    none is left, so nothing is recorded; offers on other providers are kept when only some lack a key."""
    problems: dict[str, str] = {}
    for name in dict.fromkeys(c.provider for c in candidates):
        opts = provider_options.get(name, {})
        bad_option = options_problem(name, opts)
        if bad_option:
            raise UserError(bad_option)
        problem = sdk_problem(name) or credentials_problem(name, opts)
        if problem:
            problems[name] = problem
    # Multi-node offers only where the adapter can place the machines together; its single-node offers stay.
    single_only = {name: (f"the {name} adapter cannot place several machines together (no placement primitive); "
                          "multi-node runs need aws, gcp, or --provider ssh with one --host per machine")
                   for name in dict.fromkeys(c.provider for c in candidates if getattr(c, "nodes", 1) > 1)
                   if name not in problems and not multinode_adapter(name)}
    usable = [c for c in candidates if c.provider not in problems
              and not (getattr(c, "nodes", 1) > 1 and c.provider in single_only)]
    if not usable and (problems or single_only):
        raise UserError(next(iter({**problems, **single_only}.values())))
    return usable


def multinode_adapter(name: str) -> bool:
    """Whether the provider's adapter can launch one run on several machines (`Provider.multinode`). `ssh` can
    whenever several hosts are given, which the launch checks itself."""
    from ftplan.providers.base import ADAPTERS

    if name == "ssh":
        return True
    if name not in ADAPTERS:
        return False
    module_name, cls_name = ADAPTERS[name].split(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except Exception:  # noqa: BLE001 - an adapter that does not import cannot launch anything
        return False
    return bool(getattr(cls, "multinode", ""))
