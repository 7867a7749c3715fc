"""Shared pytest fixtures. Fixture modules live beside the tests (tests/fixtures_*.py)."""

import os
import tempfile

# Never touch real provider credentials or the network from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
for _var in ("AWS_PROFILE", "RUNPOD_API_KEY", "LAMBDA_API_KEY", "PAPERSPACE_API_KEY"):
    os.environ.pop(_var, None)
# Tests always validate the data files afresh and never write to the user's cache.
os.environ.setdefault("FTPLAN_CACHE_DIR", tempfile.mkdtemp(prefix="ftplan-test-cache-"))

pytest_plugins = ["sshd_fixture"]


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_run_store(tmp_path_factory, monkeypatch):
    """Each test gets its own default run store: never the user's, and no test's finished runs correct
    (through ftplan.planner.runs.corrections) another test's estimates. Tests that name a store still win."""
    if "FTPLAN_STORE" not in os.environ:
        monkeypatch.setenv("FTPLAN_STORE", str(tmp_path_factory.mktemp("store") / "runs.sqlite3"))
