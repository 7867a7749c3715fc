"""The built wheel is the product: it holds one import name (`ftplan`) and every data file the code reads, and a
fresh virtualenv with only the base install runs `ftplan estimate`, `plan`, `init` + `launch --dry-run` and the
Python API from it, in a folder far from this repository (so nothing is read from the checkout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
NETWORK_ERRORS = ("NewConnectionError", "Could not find a version", "Temporary failure in name resolution",
                  "No matching distribution")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # This venv's setuptools when it is new enough (no download); else pip's isolated build fetches one.
    try:
        import setuptools

        isolation = [] if int(setuptools.__version__.split(".")[0]) < 77 else ["--no-build-isolation"]
    except ImportError:
        isolation = []
    # Build from a copy: an in-place build writes build/ and *.egg-info into the checkout, and two xdist
    # workers building the same tree at once race on them.
    src = out / "src"
    skip_top = {".venv", ".git", "build", "dist", ".pytest_cache", ".ruff_cache", ".hypothesis", "runs"}
    shutil.copytree(ROOT, src, ignore=lambda d, names: [
        n for n in names if (Path(d) == ROOT and (n in skip_top or n.endswith(".egg-info"))) or n == "__pycache__"])
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", *isolation, "-q", "-w", str(out)],
                   check=True, capture_output=True, text=True, cwd=out)
    [whl] = out.glob("ftplan-*.whl")
    return whl


def test_wheel_holds_only_ftplan_and_every_data_file(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"ftplan", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    tracked = subprocess.run(["git", "ls-files", "catalogs", "remote_job"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    data = [p for p in tracked if not p.endswith(".py")]
    assert data, "git lists no data files"
    missing = [p for p in data if f"ftplan/{p}" not in names]
    assert missing == [], f"data files not in the wheel: {missing}"
    assert "ftplan/py.typed" in names
    for pkg in ("planner/estimate", "planner/pricing", "planner/launch", "planner/remote", "planner/runs",
                "planner/commands", "providers", "remote_job", "catalogs"):
        assert f"ftplan/{pkg}/__init__.py" in names, pkg


def test_a_fresh_venv_runs_the_main_commands_from_the_wheel(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    proc = subprocess.run([str(bin_dir / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and any(e in proc.stderr for e in NETWORK_ERRORS):
        pytest.skip(f"the package index is not reachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["FTPLAN_CACHE_DIR"] = str(tmp_path / "cache")
    env["FTPLAN_STORE"] = str(tmp_path / "runs.sqlite3")

    def run(*args: str) -> str:
        done = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
        return done.stdout

    out = run(str(bin_dir / "ftplan"), "estimate", "--model", "mistral-7b", "--method", "qlora")
    assert "mistral-7b" in out and "A100-80GB" in out
    out = run(str(bin_dir / "ftplan"), "plan", "--model", "mistral-7b", "--method", "qlora", "--dataset-tokens",
              "5000000", "--top", "3")
    assert "feasible" in out
    run(str(bin_dir / "ftplan"), "init")
    out = run(str(bin_dir / "ftplan"), "launch", "--budget", "20", "--dry-run")
    assert "plan for run" in out and "data/alpaca_small.json" in out
    code = ("import sys, ftplan; t = ftplan.estimate(model='mistral-7b', method='qlora').memory.total; "
            "print(ftplan.__file__); print(t); "
            "print([m for m in ('torch', 'paramiko', 'boto3') if m in sys.modules])")
    where, total, heavy = run(str(bin_dir / "python"), "-c", code).splitlines()
    assert where.startswith(str(env_dir)) and 4 < float(total) < 12 and heavy == "[]"
