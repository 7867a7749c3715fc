"""`ftplan plan` / `ftplan gpus` on the shipped catalogs: terminal width, host-size grouping, RunPod community
cloud (labelled, --secure-only), purchase modes (GCP reservation/spot/flex-start-only types), suspect spot
prices and price ages; and the launch path sending an offer's RunPod cloud as cloudType."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import ftplan
from test_plan_cli import BASE, good_row, write_cache

ROOT = Path(__file__).resolve().parents[1]
FTPLAN = [sys.executable, "-m", "ftplan.planner.cli"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FTPLAN_CACHE_DIR", str(tmp_path))
    return tmp_path


def run_cli(tmp_path, *args, columns: str | None = "100") -> subprocess.CompletedProcess:
    env = {**os.environ, "FTPLAN_CACHE_DIR": str(tmp_path), "FTPLAN_OFFLINE": "1"}
    env.pop("COLUMNS", None)
    if columns:
        env["COLUMNS"] = columns
    return subprocess.run([*FTPLAN, *args], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


def plan_json(capsys, *args) -> dict:
    rc, out, err = ftplan(capsys, *BASE, "--json", *args)
    assert rc == 0, err
    return json.loads(out)


@pytest.mark.parametrize("args", [BASE, ["gpus"], [*BASE, "--spot"], ["plan", "--model", "qwen2.5-32b", "--method",
                                                                       "qlora", "--dataset-tokens", "10000000"]])
def test_no_line_longer_than_the_terminal(tmp_path, args):
    proc = run_cli(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    long = [line for line in (proc.stdout + proc.stderr).splitlines() if len(line) > 100]
    assert long == []
    assert len(proc.stdout.splitlines()) > 10


def test_wide_and_json_keep_every_column(tmp_path):
    wide = run_cli(tmp_path, *BASE, "--wide")
    header = next(line for line in wide.stdout.splitlines() if line.lstrip().startswith("#"))
    for col in ("provider", "instance", "GPU x n", "region", "market", "est. total $", "headroom GiB", "frontier"):
        assert col in header
    assert max(len(line) for line in wide.stdout.splitlines()) > 100
    data = json.loads(run_cli(tmp_path, *BASE, "--json").stdout)
    assert {"headroom_gib", "cloud", "purchase", "price_date", "suspect_spot", "more_hosts"} <= set(data["offers"][0])


def test_offers_differing_only_by_host_size_are_one_line(capsys):
    data = plan_json(capsys, "--providers", "aws", "--gpu", "L4", "--spot", "--top", "5")
    types = [o["instance_type"] for o in data["offers"]]
    l4x1 = [o for o in data["offers"] if o["gpu_count"] == 1]
    assert len(l4x1) == 1, types  # g6.xlarge stands for g6.2xlarge ... gr6.8xlarge
    assert {"g6.2xlarge", "g6.4xlarge", "gr6.4xlarge"} <= set(l4x1[0]["more_hosts"])
    # Asking for a bigger host lists the sizes again.
    data = plan_json(capsys, "--providers", "aws", "--gpu", "L4", "--spot", "--top", "5", "--min-vcpus", "8")
    ones = [o["instance_type"] for o in data["offers"] if o["gpu_count"] == 1]
    assert len(ones) > 1 and "g6.xlarge" not in ones and all(not o["more_hosts"] for o in data["offers"])


def test_spot_plan_rejects_only_spot_offers(capsys):
    data = plan_json(capsys, "--spot")
    assert data["rejected"] and all(r["offer"]["spot"] for r in data["rejected"])
    assert all(o["spot"] for o in data["offers"])


def test_runpod_community_offers_are_on_by_default_labelled_and_removable(capsys, tmp_path):
    data = plan_json(capsys, "--providers", "runpod", "--on-demand", "--top", "20")
    clouds = {o["cloud"] for o in data["offers"]}
    assert clouds == {"secure", "community"}
    text = run_cli(tmp_path, *BASE, "--providers", "runpod", "--on-demand").stdout
    assert "community" in text and "--secure-only" in text
    data = plan_json(capsys, "--providers", "runpod", "--secure-only", "--top", "20")
    assert {o["cloud"] for o in data["offers"]} == {"secure"}
    assert all(r["offer"]["cloud"] != "community" for r in data["rejected"])


def test_gcp_never_proposes_on_demand_a4_a3_ultra_a3_high_small(capsys):
    sold_by_reservation = ("a4-highgpu-", "a3-ultragpu-", "a3-highgpu-1g", "a3-highgpu-2g", "a3-highgpu-4g")
    big = ["plan", "--model", "llama3.1-70b", "--method", "qlora", "--dataset-tokens", "1000000", "--json",
           "--providers", "gcp", "--top", "200", "--all-regions"]
    rc, out, err = ftplan(capsys, *big, "--on-demand")
    assert rc == 0, err
    offers = json.loads(out)["offers"]
    assert offers and not [o for o in offers if o["instance_type"].startswith(sold_by_reservation)]
    rc, out, err = ftplan(capsys, *big, "--spot", "--gpu", "H100")
    assert any(o["instance_type"] == "a3-highgpu-1g" for o in json.loads(out)["offers"])


def test_gpus_h100_on_demand_ranks_gcp_at_its_list_price(capsys):
    rc, out, err = ftplan(capsys, "gpus", "H100", "--json")
    gcp = json.loads(out)[0]["providers"]["gcp"]
    assert gcp["on_demand_per_gpu_hour"] > 9.7  # the on-demand SKU, not the ~4.2 flex-start one
    rc, out, err = ftplan(capsys, "gpus", "H100", "--on-demand")
    header = out.splitlines()[0].split()
    assert header.index("gcp") > header.index("aws")  # cheapest provider first: GCP is the dearest


def test_suspect_spot_prices_are_labelled(capsys, tmp_path):
    data = plan_json(capsys, "--providers", "aws", "--gpu", "L4", "--spot")
    best = data["offers"][0]
    assert best["region"] == "eu-south-2" and "below its other zones" in best["suspect_spot"]
    text = run_cli(tmp_path, *BASE, "--providers", "aws", "--spot").stdout
    assert "?" in text.splitlines()[4] and "suspect spot" in text
    gpus = run_cli(tmp_path, "gpus", "L4").stdout
    assert "?" in gpus and "suspect spot price" in gpus


def test_old_and_undated_prices_are_flagged(capsys, cache_dir):
    # Undated spot prices (the SkyPilot snapshot) are an indication only: the plan says so.
    data = plan_json(capsys, "--providers", "aws", "--spot")
    assert any("aws spot price(s) of unknown date" in w for w in data["warnings"])
    # A dated on-demand price older than 60 days is flagged; a fresh one is not.
    write_cache(cache_dir, "paperspace", [good_row(price_date="2026-01-15", retrieved_at="2026-12-01",
                                                   billing_granularity_s="1")])
    data = plan_json(capsys, "--providers", "paperspace")
    assert any("paperspace on-demand price(s) up to" in w for w in data["warnings"])
    write_cache(cache_dir, "paperspace", [good_row(price_date=_today(), retrieved_at=_today())])
    assert plan_json(capsys, "--providers", "paperspace")["warnings"] == []


def test_cache_written_by_an_older_ftplan_still_loads(capsys, cache_dir):
    from ftplan.planner.pricing import offers as O

    path = cache_dir / "catalogs" / "paperspace.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(",".join(O.LEGACY_COLUMNS) + "\n" + ",".join(good_row(retrieved_at=_today())[:14]) + "\n")
    data = plan_json(capsys, "--providers", "paperspace")
    assert [o["instance_type"] for o in data["offers"]] == ["A100-80G"]


def _today() -> str:
    import datetime as dt

    return dt.date.today().isoformat()


def test_launch_sends_the_offers_runpod_cloud(tmp_path):
    """A community offer becomes an InstanceRequest with cloud_type COMMUNITY (the adapter sends it as cloudType)."""
    from ftplan.planner.launch.launch_plan import Candidate, LaunchFailed, LaunchPlan
    from ftplan.planner.launch.launcher import Launcher
    from ftplan.planner.runs.store import Store
    from ftplan.providers.errors import CapacityError

    seen = []

    class NoCapacity:
        name = "runpod"

        def create(self, request):
            seen.append(request)
            raise CapacityError("no capacity (test)", provider="runpod")

        def __getattr__(self, _):  # nothing else is reached once every create is refused
            raise AssertionError("unexpected provider call")

    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"text": "hello"}\n')
    plan = LaunchPlan(run_id="cloudtype1", job_config={}, dataset=dataset, model="tiny-llama",
                      method="qlora", runs_dir=tmp_path / "runs", candidates=[
                          Candidate("runpod", "1x_RTXA5000_COMMUNITY", "RTXA5000", 1, "ANY", None, False, 0.16,
                                    cloud="community"),
                          Candidate("runpod", "1x_RTXA5000_SECURE", "RTXA5000", 1, "ANY", None, False, 0.29,
                                    cloud="secure")])
    launcher = Launcher(Store(tmp_path / "runs.sqlite3"), plan, provider_factory=lambda name, **_: NoCapacity())
    try:
        launcher.run()  # ends without an instance: every offer refused for capacity
    except LaunchFailed:
        pass
    assert [r.cloud_type for r in seen] == ["COMMUNITY", "SECURE"]
