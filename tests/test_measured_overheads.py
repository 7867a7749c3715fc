"""The planner's setup and download minutes come from what earlier runs' bootstraps measured (summary.json
`bootstrap`, stored with the run), per provider, and from catalogs/provider_overheads.json otherwise;
`ftplan plan` names the source."""

from __future__ import annotations

import json

import pytest
from cli_helpers import ftplan

from ftplan.planner.pricing.optimizer import Filters, load_overheads, plan_offers
from ftplan.planner.runs import corrections
from ftplan.planner.runs.store import Store, default_store_path

PLAN = ["plan", "--model", "mistral-7b", "--method", "qlora", "--dataset-tokens", "5000000"]
GIB = 2**30


def boot(env_s=60, wait_s=0, first_step_s=150, download_s=30, download_bytes=int(14.5 * GIB), status="ok",
         reused=False) -> dict:
    return {"env_s": env_s, "wait_s": wait_s, "ready_s": env_s + wait_s, "first_step_s": first_step_s,
            "reused_venv": reused, "liger": "installed",
            "download": {"status": status, "download_s": download_s, "download_bytes": download_bytes}}


def add_run(store: Store, run_id: str, provider: str, bootstrap: dict | None, status: str = "succeeded") -> None:
    summary = {"status": "succeeded", "steps": 10} | ({"bootstrap": bootstrap} if bootstrap else {})
    store.create_run(run_id, model="mistral-7b", method="qlora", provider=provider, instance_type="g6.xlarge",
                     gpu="L4", status="training")
    store.finish_run(run_id, status, summary_json=summary)


def test_one_bootstrap_gives_setup_without_the_download_wait_and_a_rate():
    setup_s, env_s, rate = corrections.bootstrap_sample(boot(env_s=60, wait_s=40, first_step_s=190))
    assert (setup_s, env_s) == (150, 60)  # 190 s to the first step, 40 of them waiting for the weights
    assert rate == pytest.approx(14.5 / 0.5)  # GiB per minute
    assert corrections.bootstrap_sample(boot(reused=True)) is None  # a resumed run built nothing
    assert corrections.bootstrap_sample({"env_s": None}) is None and corrections.bootstrap_sample("x") is None
    assert corrections.bootstrap_sample(boot(download_bytes=5_000_000))[2] is None  # config files: latency
    assert corrections.bootstrap_sample(boot(status="failed"))[2] is None
    assert corrections.bootstrap_sample(boot(first_step_s=None))[0] == 60  # the job never stepped


def test_no_store_means_catalog_defaults_and_no_store_is_created():
    assert not default_store_path().exists()
    assert corrections.stored_overheads() == {}
    assert not default_store_path().exists()


def test_medians_of_the_last_runs_per_provider():
    store = Store(default_store_path())
    for i, env in enumerate([30, 90, 60]):
        add_run(store, f"ft-aws-{i}", "aws", boot(env_s=env, first_step_s=env + 60))
    add_run(store, "ft-aws-old-style", "aws", None)           # before bootstraps recorded anything
    add_run(store, "ft-aws-resume", "aws", boot(reused=True))
    add_run(store, "ft-gcp-0", "gcp", boot(env_s=120, first_step_s=300, download_s=60), status="failed")
    store.create_run("ft-live", model="m", method="qlora", provider="runpod", status="training",
                     summary_json={"bootstrap": boot()})  # still running: not counted
    store.close()
    got = corrections.stored_overheads()
    assert set(got) == {"aws", "gcp"}
    assert got["aws"].runs == 3 and got["aws"].env_min == 1.0 and got["aws"].setup_min == 2.0
    assert got["gcp"].setup_min == 5.0 and got["gcp"].download_gib_per_min == pytest.approx(14.5)
    assert "aws: setup 2.0 min (environment 1.0)" in got["aws"].note()


def test_only_the_newest_runs_count():
    store = Store(default_store_path())
    for i in range(corrections.LAST_RUNS + 5):
        add_run(store, f"ft-{i:02d}", "aws", boot(env_s=600 if i < 5 else 60, first_step_s=None))
    store.close()
    assert corrections.stored_overheads()["aws"].env_min == 1.0  # the five oldest (10 min) fell out


def request():
    from ftplan.planner.commands.estimate import estimate as estimate_cmd
    from ftplan.planner.commands.plan import build_request

    opts = {p.name: p.default for p in estimate_cmd.params if p.name != "model_arg"}
    opts.update(method="qlora", dataset_tokens=5_000_000, loss="fused")
    return build_request("mistral-7b", **opts)


def setups(result) -> dict[str, float]:
    return {o.provider: o.setup_min for o in result.offers}


def test_measured_setup_and_rate_replace_the_catalog_for_that_provider_only():
    req = request()
    weights_min_at_6 = req.model.params_total() * 2 / GIB / 6.0
    fast = corrections.MeasuredOverheads("aws", runs=4, setup_min=2.0, env_min=1.0, download_gib_per_min=30.0,
                                         download_runs=4)
    result = plan_offers(req, Filters(providers=("aws", "gcp")), measured={"aws": fast})
    got = setups(result)
    catalog = load_overheads()["gcp"]
    # gcp: the catalog's setup, plus the part of a 6 GiB/min download that outlasts the environment install
    assert got["gcp"] == pytest.approx(catalog.setup_min + max(0.0, weights_min_at_6 - catalog.env_min))
    # aws: measured setup; its measured 30 GiB/min download (~0.45 min) hides inside the 1 min install
    assert got["aws"] == pytest.approx(2.0)
    assert any("from earlier runs' bootstraps: aws: setup 2.0 min" in n and "gcp: catalog defaults" in n
               for n in result.notes)
    assert not any("bootstraps" in n for n in plan_offers(req, Filters(providers=("gcp",)), measured={}).notes)


def test_plan_cli_says_which_source_it_used(capsys):
    rc, out, _ = ftplan(capsys, *PLAN, "--providers", "aws")
    assert rc == 0 and "bootstraps" not in out
    store = Store(default_store_path())
    add_run(store, "ft-a", "aws", boot(env_s=45, first_step_s=105))
    store.close()
    rc, out, _ = ftplan(capsys, *PLAN, "--providers", "aws", "--json")
    data = json.loads(out)
    assert rc == 0 and data["offers"][0]["overheads"]["setup_min"] == pytest.approx(1.75, abs=0.01)
    assert any("aws: setup 1.8 min (environment 0.8)" in w for w in data["warnings"])
