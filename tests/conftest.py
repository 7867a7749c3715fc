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
