"""What a multi-node launch is about to do, before anything runs: several `--host` (or `hosts = [...]` in
ftplan.toml) make one run of that many nodes; a plan's multi-node offer reaches `launch --dry-run` with its
node count, the price of all nodes together and the link that bounds the step; bad combinations are one-line
errors (exit 2); providers without a placement primitive never launch several nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import error_line, ftplan

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "remote_job" / "examples" / "alpaca_small.json"


def project(tmp_path: Path, providers_ssh: str = "") -> Path:
    cfg = tmp_path / "ftplan.toml"
    cfg.write_text(f"""
[job]
model = "tiny-llama"
method = "lora"
dataset = "{EXAMPLE}"
[launch]
budget_usd = 5
[providers.ssh]
price_hour = 0.25
gpu = "cpu"
{providers_ssh}
""")
    return cfg


def test_several_hosts_are_one_run_of_that_many_nodes_at_their_total_price(tmp_path, capsys):
    cfg = project(tmp_path)
    hosts = ["--host", "me@10.0.0.5", "--host", "me@10.0.0.6:2222"]
    rc, out, err = ftplan(capsys, "launch", "--config", str(cfg), *hosts, "--dry-run", "--json")
    assert rc == 0, err
    offer = json.loads(out)["offer"]
    assert offer["provider"] == "ssh" and offer["nodes"] == 2
    assert offer["price_hour_all_nodes"] == pytest.approx(0.5)
    rc, out, _ = ftplan(capsys, "launch", "--config", str(cfg), *hosts, "--dry-run")
    assert "2 x ssh" in out and "$0.25/h each, $0.50/h for all 2 nodes" in out


def test_hosts_listed_in_the_project_file_work_like_repeated_host_flags(tmp_path, capsys):
    cfg = project(tmp_path, 'hosts = ["me@10.0.0.5", "me@10.0.0.6", "me@10.0.0.7"]')
    rc, out, err = ftplan(capsys, "launch", "--config", str(cfg), "--provider", "ssh", "--dry-run", "--json")
    assert rc == 0, err
    assert json.loads(out)["offer"]["nodes"] == 3


def test_the_api_takes_a_list_of_hosts(tmp_path):
    from ftplan.api import launch

    preview = launch(project(tmp_path), host=["me@10.0.0.5", "me@10.0.0.6"], dry_run=True)
    assert preview.offer["nodes"] == 2 and preview.offer["price_hour_all_nodes"] == pytest.approx(0.5)


@pytest.mark.parametrize("args, says", [
    (["--host", "me@10.0.0.5", "--host", "me@10.0.0.6", "--nodes", "3"], "--nodes 3 but 2 --host given"),
    (["--host", "me@10.0.0.5", "--host", "me@10.0.0.5"], "given twice"),
    (["--host", "me@10.0.0.5", "--host", "me@10.0.0.6", "--detach"], "--detach is for one machine"),
    (["--nodes", "0"], "--nodes must be"),
    (["--provider", "local", "--nodes", "2"], "--provider local is this one machine"),
    (["--gpus", "0"], "--gpus must be"),
])
def test_bad_node_settings_are_one_line_errors(tmp_path, capsys, args, says):
    provider = [] if "--provider" in args else ["--provider", "ssh"]
    line = error_line(capsys, "launch", "--config", str(project(tmp_path)), *provider, *args,
                      "--dry-run", "--yes")
    assert says in line


def test_a_cloud_plan_with_several_nodes_reaches_the_dry_run_with_its_bounding_link(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = ftplan(capsys, "launch", "--model", "llama3.1-70b", "--method", "full", "--provider", "aws",
                          "--nodes", "3", "--budget", "100000", "--dataset", str(EXAMPLE), "--dry-run", "--json")
    assert rc == 0, err
    summary = json.loads(out)
    offer = summary["offer"]
    assert offer["nodes"] == 3
    assert offer["price_hour_all_nodes"] == pytest.approx(3 * offer["price_hour"])
    assert offer["network"] and offer["bounding_link"]
    # memory per GPU is sharded over all 3 x 8 GPUs: less than the 80 GiB card holds
    assert summary["estimated"]["peak_mem_gib"] < 80
    assert all(f.split("/")[1].startswith("3 x ") for f in summary["fallbacks"])


def test_providers_without_a_placement_primitive_never_launch_several_nodes(monkeypatch):
    from ftplan.planner.errors import UserError
    from ftplan.planner.launch.launch_plan import Candidate
    from ftplan.planner.launch.preflight import usable_candidates

    monkeypatch.setenv("LAMBDA_API_KEY", "lambda-test-key")
    two = Candidate(provider="lambda", instance_type="gpu_8x_h100_sxm5", gpu="H100", gpu_count=8, price_hour=24,
                    nodes=2)
    one = Candidate(provider="lambda", instance_type="gpu_8x_h100_sxm5", gpu="H100", gpu_count=8, price_hour=24)
    assert usable_candidates([two, one], {}) == [one]
    with pytest.raises(UserError, match="lambda adapter cannot place several machines together"):
        usable_candidates([two], {})
