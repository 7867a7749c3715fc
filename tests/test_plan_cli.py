"""`ftplan plan` and `ftplan gpus` through the CLI entry point: output, filters, one-line errors (exit 2)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import error_line, ftplan

from ftplan.planner.pricing import offers as O

ROOT = Path(__file__).resolve().parents[1]
BASE = ["plan", "--model", "mistral-7b", "--method", "qlora", "--dataset-tokens", "5000000"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FTPLAN_CACHE_DIR", str(tmp_path))
    return tmp_path


def plan_json(capsys, *args) -> dict:
    rc, out, err = ftplan(capsys, *BASE, "--json", *args)
    assert rc == 0, err
    return json.loads(out)


def test_ranked_json_cheapest_first_and_every_offer_fits(capsys):
    data = plan_json(capsys)
    offers = data["offers"]
    assert len(offers) == 10
    keys = {"provider", "instance_type", "gpu", "gpu_count", "region", "spot", "price_hour", "hours", "total_usd",
            "headroom_gib", "overheads"}
    assert all(keys <= set(o) for o in offers)
    totals = [o["total_usd"] for o in offers]
    assert totals == sorted(totals)
    for o in offers:
        assert o["headroom_gib"] >= 0.1 * o["peak_gib"] - 0.01          # the 10 % margin holds
        assert o["total_usd"] == pytest.approx(o["price_hour"] * o["billed_hours"], abs=1e-3)
        assert o["hours"] > o["train_hours"]                               # overheads are billed too
        assert set(o["overheads"]) == {"provision_min", "setup_min", "pull_min", "preemption_h"}
    assert any(o["pareto"] for o in offers) and all(o["pareto"] for o in data["frontier"])
    assert data["rejected"] and all({"offer", "reason", "kind"} <= set(r) for r in data["rejected"])
    assert {c["origin"] for c in data["catalogs"]} == {"shipped"}


def test_cheapest_offer_is_the_cheapest_catalog_row_that_fits(capsys):
    """Cross-check from the catalog files: no on-demand L4/L40S row on AWS is cheaper than the plan's pick."""
    best = plan_json(capsys, "--providers", "aws", "--on-demand", "--gpu", "L4,L40S")["offers"][0]
    with open(O.shipped_path("aws"), newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["gpu"] == best["gpu"] and r["gpu_count"] == "1"]
    cheapest = min(float(r["price_hour"]) for r in rows)
    assert best["gpu_count"] == 1 and best["price_hour"] == pytest.approx(cheapest)


def test_table_output_marks_frontier_and_lists_rejections(capsys):
    rc, out, err = ftplan(capsys, *BASE, "--top", "5", "--wide")
    assert rc == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("#"))
    for col in ("provider", "instance", "GPU x n", "region", "$/h", "est. h", "est. total $", "headroom GiB"):
        assert col in header
    assert sum(1 for line in lines if line.lstrip()[:2] in {f"{i} " for i in range(1, 6)}) == 5
    assert any(line.rstrip().endswith("*") for line in lines)
    assert "rejected (cheapest first):" in out
    assert "has no bf16" not in out  # T4s are planned in fp16, as the launched job runs them


def test_gpus_without_bf16_are_planned_in_fp16(capsys):
    data = plan_json(capsys, "--gpu", "T4", "--top", "3")
    assert data["offers"], data
    assert all(o["strategy"].endswith("fp16") for o in data["offers"])


def test_filters_apply(capsys):
    data = plan_json(capsys, "--spot", "--gpu", "l4", "--regions", "us-east-1,us-west-2", "--top", "20",
                     "--all-regions")
    assert data["offers"]
    assert all(o["spot"] and o["gpu"] == "L4" and o["region"] in ("us-east-1", "us-west-2") for o in data["offers"])
    data = plan_json(capsys, "--providers", "lambda,runpod", "--on-demand", "--min-vcpus", "16", "--max-hourly", "3")
    assert all(o["provider"] in ("lambda", "runpod") and not o["spot"] and o["vcpus"] >= 16 and o["price_hour"] <= 3
               for o in data["offers"])


def test_budget_too_small_names_the_cheapest_offer_that_fits(capsys):
    line = error_line(capsys, *BASE, "--budget", "0.01")
    assert "nothing fits within the $0.01 budget" in line and "cheapest offer that fits is" in line
    need = float(line.rsplit("at least ", 1)[1])
    data = plan_json(capsys, "--budget", str(need))
    assert data["offers"] and all(o["total_usd"] <= need for o in data["offers"])
    over = [r for r in data["rejected"] if r["kind"] == "budget"]
    assert all(r["over_usd"] > 0 and r["offer"]["total_usd"] >= need for r in over)


@pytest.mark.parametrize("args, expect", [
    (["--budget", "0"], "--budget must be a positive number"),
    (["--budget", "-3"], "--budget must be a positive number"),
    (["--providers", "awz"], "unknown provider 'awz' (did you mean aws?)"),
    (["--regions", "us-est-1"], "unknown region 'us-est-1' (did you mean"),
    (["--gpu", "H10"], "unknown GPU 'H10'"),
    (["--max-hourly", "0"], "--max-hourly must be a positive number"),
])
def test_bad_input_is_one_line_exit_2(capsys, args, expect):
    assert expect in error_line(capsys, *BASE, *args)


def test_missing_dataset_size_is_a_user_error(capsys):
    line = error_line(capsys, "plan", "--model", "mistral-7b", "--method", "qlora")
    assert "--dataset-tokens" in line


def test_job_too_big_for_every_offer(capsys):
    line = error_line(capsys, "plan", "--model", "llama3.1-70b", "--method", "full", "--dataset-tokens", "1000",
                      "--providers", "paperspace", "--gpu", "A4000")
    assert "no offer can hold" in line and "short by" in line


def write_cache(cache_dir: Path, provider: str, rows: list[list[str]]) -> Path:
    path = cache_dir / "catalogs" / f"{provider}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(O.COLUMNS)
        w.writerows(rows)
    return path


def good_row(**kw) -> list[str]:
    d = dict(provider="paperspace", instance_type="A100-80G", gpu="A100-80GB", gpu_count="1", gpu_memory_gib="80",
             vcpus="12", ram_gib="80", price_hour="3.18", spot_price_hour="", region="East Coast (NY2)", zone="",
             billing_granularity_s="3600", source="test", retrieved_at="2026-11-30", cloud="", purchase="",
             price_date="")
    d.update(kw)
    return [d[c] for c in O.COLUMNS]


def test_corrupt_catalog_row_names_file_and_line(capsys, cache_dir):
    path = write_cache(cache_dir, "paperspace", [good_row(), good_row(instance_type="H100", price_hour="abc")])
    line = error_line(capsys, *BASE)
    assert f"{path}:3" in line and "price_hour 'abc' is not a number" in line
    write_cache(cache_dir, "paperspace", [good_row(spot_price_hour="9")])
    assert "spot price 9 above on-demand" in error_line(capsys, *BASE)


def test_refreshed_cache_wins_and_old_data_warns_on_every_plan(capsys, cache_dir):
    write_cache(cache_dir, "paperspace", [good_row(price_hour="0.01", retrieved_at="2020-01-01")])
    rc, out, err = ftplan(capsys, *BASE, "--providers", "paperspace", "--json")
    assert rc == 0
    assert err.count("\n") == 1 and err.startswith("warning: prices are older than 30 days (paperspace")
    data = json.loads(out)
    assert [(o["instance_type"], o["price_hour"]) for o in data["offers"]] == [("A100-80G", 0.01)]
    assert data["catalogs"] == [{"provider": "paperspace", "origin": "cache", "retrieved_at": "2020-01-01",
                                 "age_days": data["catalogs"][0]["age_days"], "price_dates": [],
                                 "undated_rows": 1}]
    assert any("on-demand price(s) of unknown date" in w or "up to" in w for w in data["warnings"])
    rc, _, err = ftplan(capsys, *BASE, "--providers", "paperspace")
    assert rc == 0 and "warning: prices are older than 30 days" in err


def test_gpus_lists_cheapest_price_per_provider(capsys):
    rc, out, err = ftplan(capsys, "gpus", "--json")
    assert rc == 0, err
    entries = {e["gpu"]: e for e in json.loads(out)}
    h100 = entries["H100"]["providers"]
    # Lambda's gpu_1x_h100_pcie is 3.29 $/h in the shipped snapshot, in every region.
    assert h100["lambda"]["on_demand_per_gpu_hour"] == pytest.approx(3.29)
    assert h100["lambda"]["spot_per_gpu_hour"] is None
    with open(O.shipped_path("aws"), newline="") as fh:
        l40s = [r for r in csv.DictReader(fh) if r["gpu"] == "L40S" and r["spot_price_hour"]]
    assert entries["L40S"]["providers"]["aws"]["spot_per_gpu_hour"] == pytest.approx(
        min(float(r["spot_price_hour"]) / int(r["gpu_count"]) for r in l40s))
    rc, out, _ = ftplan(capsys, "gpus", "a6000")     # Lambda's A6000 is the same card as RunPod's RTXA6000
    assert rc == 0 and "RTXA6000" in out and "lambda" in out.splitlines()[0]
    assert "unknown GPU 'Z9000'" in error_line(capsys, "gpus", "Z9000")


def test_cold_cli_stays_light_and_exits_2_on_bad_input(tmp_path):
    """A real process: the planner path imports no SDK or torch, and bad input is one stderr line, rc 2."""
    code = ("import sys\nfrom ftplan.planner.cli import main\nrc = main(sys.argv[1:])\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'boto3', 'google.cloud', "
            "'runpod', 'paramiko') if m in sys.modules]\nprint('HEAVY', heavy)\n")
    env = {"FTPLAN_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    ok = subprocess.run([sys.executable, "-c", code, *BASE, "--top", "3"], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "HEAVY []" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "ftplan.planner.cli", *BASE, "--providers", "nope"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown provider 'nope'" in bad.stderr
