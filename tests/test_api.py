"""The Python API, used as a script would: only `import ftplan` and its public names.

Each call must return what the CLI prints for the same arguments (`--json` is compared field for field),
raise `ftplan.UserError` on bad input, and never load torch, paramiko or a provider SDK on the estimate
and plan paths.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ftplan

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "remote_job" / "examples" / "alpaca_small.json"
HEAVY = ("torch", "transformers", "paramiko", "boto3", "botocore", "google.cloud", "runpod")


def _cli_json(*args: str, cwd: Path | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-m", "ftplan.planner.cli", *args], capture_output=True, text=True,
                          cwd=cwd, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_import_and_estimate_in_a_fresh_interpreter_load_no_heavy_module():
    code = ("import sys, ftplan; t = ftplan.estimate(model='mistral-7b', method='qlora').memory.total; "
            f"print(t); print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    total, loaded = proc.stdout.splitlines()[0], proc.stdout.splitlines()[1:] or [""]
    assert 4 < float(total) < 12          # Mistral-7B QLoRA at seq 2048: single-digit GiB, not the 14 GiB fp16
    assert loaded == [""], f"estimate loaded {loaded}"


def test_import_ftplan_alone_loads_no_planner_module():
    code = "import sys, ftplan; print(sorted(m for m in sys.modules if m.startswith('ftplan.')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_estimate_all_gpus_equals_the_cli_json():
    result = ftplan.estimate(model="mistral-7b", method="qlora", dataset_tokens=5_000_000)
    assert result.to_dict() == _cli_json("estimate", "--model", "mistral-7b", "--method", "qlora",
                                         "--dataset-tokens", "5000000", "--json")
    assert len(result.rows) > 10 and result.memory.total == result.rows[0].memory.total
    assert result.params_total > 7e9 and 0 < result.params_trainable < 1e8


def test_estimate_one_gpu_equals_the_cli_json_and_says_what_would_fit():
    result = ftplan.estimate(model="llama3.1-8b", method="lora", gpu="L4", seq_len=4096, epochs=2,
                             dataset_tokens=1_000_000)
    assert result.to_dict() == _cli_json("estimate", "--model", "llama3.1-8b", "--method", "lora", "--gpu", "L4",
                                         "--seq-len", "4096", "--epochs", "2", "--dataset-tokens", "1000000",
                                         "--json")
    assert not result.fits and result.estimate.headroom_gib < 0
    assert result.would_fit and {h.kind for h in result.would_fit} <= {"gpu_count", "gpu", "method", "batch"}
    assert result.hours == pytest.approx(2_000_000 / result.tokens_per_s / 3600)


def test_estimate_counts_a_dataset_file_like_the_cli():
    result = ftplan.estimate(model="tiny-llama", method="qlora", gpu="T4", dataset=EXAMPLE, seq_len=512)
    cli = _cli_json("estimate", "--model", "tiny-llama", "--method", "qlora", "--gpu", "T4", "--dataset",
                    str(EXAMPLE), "--seq-len", "512", "--json")
    assert result.to_dict() == cli and result.training_tokens > 0 and "records" in result.dataset


def test_for_gpu_picks_one_row_by_alias():
    result = ftplan.estimate(model="mistral-7b", method="qlora")
    row = result.for_gpu("a100-80gb")
    assert row.gpu.name == "A100-80GB" and row.fits


def test_plan_equals_the_cli_json_and_its_best_offer_is_the_cheapest():
    kwargs = dict(model="mistral-7b", method="qlora", dataset_tokens=5_000_000, budget=20, market="spot")
    result = ftplan.plan(**kwargs)
    cli = _cli_json("plan", "--model", "mistral-7b", "--method", "qlora", "--dataset-tokens", "5000000",
                    "--budget", "20", "--spot", "--json")
    assert result.to_dict() == cli
    assert result.best.spot and result.best.total_usd <= 20
    assert result.best.total_usd == min(o.total_usd for o in result.offers)


def test_plan_filters_take_lists_or_comma_strings():
    a = ftplan.plan(model="mistral-7b", method="qlora", dataset_tokens=1_000_000, providers=["aws", "gcp"])
    b = ftplan.plan(model="mistral-7b", method="qlora", dataset_tokens=1_000_000, providers="aws,gcp")
    assert {o.provider for o in a.offers} <= {"aws", "gcp"}
    assert a.to_dict()["offers"] == b.to_dict()["offers"]


def test_estimate_takes_every_new_knob_as_the_cli_does():
    opts = dict(loss="chunked", lora_dropout=0.1, packing=False, peak_seq_len=700, fused_optimizer=True,
                compile=True, modules_to_save="lm_head", dora=True, activation_offload=True, seq_len=1024)
    result = ftplan.estimate(model="llama3.1-8b", method="lora", gpu="A100-80GB", **opts)
    cli = _cli_json("estimate", "--model", "llama3.1-8b", "--method", "lora", "--gpu", "A100-80GB", "--loss",
                    "chunked", "--lora-dropout", "0.1", "--no-packing", "--peak-seq-len", "700",
                    "--fused-optimizer", "--compile", "--modules-to-save", "lm_head", "--dora",
                    "--activation-offload", "--seq-len", "1024", "--json")
    assert result.to_dict() == cli
    s = result.to_dict()["settings"]
    assert (s["loss"], s["peak_seq_len"], s["dora"], s["modules_to_save"]) == ("chunked", 700, True, ["lm_head"])
    plain = ftplan.estimate(model="llama3.1-8b", method="lora", gpu="A100-80GB", seq_len=1024)
    assert result.memory.logits != plain.memory.logits and result.memory.trainable > plain.memory.trainable


def test_estimate_prompt_and_freeze_knobs_and_moe_version_change_the_estimate():
    few = ftplan.estimate(model="mistral-7b", method="prompt", gpu="L4", num_virtual_tokens=8)
    many = ftplan.estimate(model="mistral-7b", method="prompt", gpu="L4", num_virtual_tokens=200)
    assert few.params_trainable < many.params_trainable
    two = ftplan.estimate(model="mistral-7b", method="freeze", gpu="L4", train_layers=2)
    eight = ftplan.estimate(model="mistral-7b", method="freeze", gpu="L4", train_layers=8)
    assert two.params_trainable < eight.params_trainable
    v4 = ftplan.estimate(model="mixtral-8x7b", method="qlora", gpu="H100", transformers_version="4.46")
    v5 = ftplan.estimate(model="mixtral-8x7b", method="qlora", gpu="H100", transformers_version="5.2")
    assert v4.memory.weights < v5.memory.weights  # 4.x quantizes the per-expert Linears


def test_estimate_over_several_nodes_equals_the_cli_json():
    result = ftplan.estimate(model="llama3.1-8b", method="full", gpu="H100", gpus=8, nodes=2, node_gbps=100)
    cli = _cli_json("estimate", "--model", "llama3.1-8b", "--method", "full", "--gpu", "H100", "--gpus", "8",
                    "--nodes", "2", "--node-gbps", "100", "--json")
    assert result.to_dict() == cli and cli["nodes"] == 2 and cli["bounding_link"]
    table = ftplan.estimate(model="llama3.1-8b", method="full", gpus=8, nodes=2)
    assert table.to_dict() == _cli_json("estimate", "--model", "llama3.1-8b", "--method", "full", "--gpus", "8",
                                        "--nodes", "2", "--json")


def test_plan_assumes_the_launched_jobs_loss_and_estimate_the_trainers():
    kwargs = dict(model="llama3.1-8b", method="qlora", dataset_tokens=2_000_000, seq_len=4096)
    launched = ftplan.plan(**kwargs)
    assert launched.to_dict() == _cli_json("plan", "--model", "llama3.1-8b", "--method", "qlora",
                                           "--dataset-tokens", "2000000", "--seq-len", "4096", "--json")
    standard = ftplan.plan(**kwargs, loss="standard")
    assert (launched.loss, standard.loss) == ("fused", "standard")
    assert launched.best.peak_gib < standard.best.peak_gib  # no full-vocabulary logits
    assert ftplan.estimate(model="llama3.1-8b", method="qlora").to_dict()["settings"]["loss"] == "standard"


def test_plan_takes_the_nodes_filter():
    result = ftplan.plan(model="llama3.1-70b", method="full", dataset_tokens=1_000_000, nodes=2)
    assert result.offers and {o.nodes for o in result.offers} == {2}
    with pytest.raises(ftplan.UserError, match="nodes"):
        ftplan.plan(model="llama3.1-8b", method="qlora", nodes=9)


def test_text_outputs_say_which_loss_they_assumed():
    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "ftplan.planner.cli", *args], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    est = run("estimate", "--model", "mistral-7b", "--method", "qlora", "--gpu", "L4")
    plan = run("plan", "--model", "mistral-7b", "--method", "qlora", "--dataset-tokens", "1000000", "--wide")
    assert [ln for ln in est.splitlines() if ln.startswith("loss: standard")]
    assert [ln for ln in plan.splitlines() if ln.startswith("loss: fused")]


@pytest.mark.parametrize("call, needle", [
    (lambda: ftplan.estimate(model="no-such-model", method="qlora"), "no-such-model"),
    (lambda: ftplan.estimate(model="mistral-7b", method="qlora", gpu="H900"), "H900"),
    (lambda: ftplan.estimate(model="mistral-7b", method="qlora", seq_len=0), "seq"),
    (lambda: ftplan.estimate(model="mistral-7b", method="qlora", sequence_length=512), "sequence_length"),
    (lambda: ftplan.plan(model="mistral-7b", method="qlora", dataset_tokens=5_000_000, budget=0.01),
     "budget"),
    (lambda: ftplan.plan(model="mistral-7b", method="qlora", market="cheap"), "market"),
])
def test_bad_input_raises_user_error_with_the_clis_message(call, needle):
    with pytest.raises(ftplan.UserError) as info:
        call()
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_launch_dry_run_of_the_init_project_equals_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "-m", "ftplan.planner.cli", "init"], check=True, capture_output=True)
    preview = ftplan.launch("ftplan.toml", budget=20, dry_run=True)
    cli = _cli_json("launch", "--budget", "20", "--dry-run", "--json", cwd=tmp_path)
    mine, theirs = preview.to_dict(), cli
    assert mine.pop("run_id") and theirs.pop("run_id")     # a fresh id per call
    assert mine == theirs and preview.offer["price_hour"] > 0 and preview.budget_usd == 20


def test_launch_refuses_bad_options_before_planning(tmp_path):
    with pytest.raises(ftplan.UserError, match="budget"):
        ftplan.launch(provider="local", dataset=EXAMPLE, dry_run=True, store=tmp_path / "s.sqlite3")
    with pytest.raises(ftplan.UserError, match="ssh_port"):
        ftplan.launch(provider="aws", dataset=EXAMPLE, budget=1, ssh_port=2222, dry_run=True)
    assert not (tmp_path / "s.sqlite3").exists()


def test_runs_and_report_read_the_store(tmp_path):
    from ftplan.planner.runs.store import Store

    store = Store(tmp_path / "runs.sqlite3")
    store.create_run("ft-x", model="tiny-llama", method="qlora", provider="lambda", instance_type="gpu_1x_a10",
                     gpu="A10", price_hour=0.75, est_hours=1.0, est_usd=0.75, budget_usd=5)
    row = store.add_instance_intent("ft-x", "lambda", price_hour=0.75)
    store.set_instance_created(row, "i-1", {})
    store.add_cost("ft-x", row, 1000.0, 1000.0 + 7200, 0.75)
    store.set_instance_terminated(row)
    hours, usd = store.run_cost("ft-x")
    store.update_run("ft-x", actual_hours=hours, actual_usd=usd)
    store.finish_run("ft-x", "succeeded")

    [run] = ftplan.runs(store=store.path)
    assert (run.run_id, run.status, run.provider) == ("ft-x", "succeeded", "lambda")
    assert run.actual.hours == pytest.approx(2.0) and run.actual.usd == pytest.approx(1.5)
    assert [run.to_dict()] == _cli_json("runs", "--json", "--store", str(store.path))
    rep = ftplan.report("ft-x", store=store.path)
    assert rep["actual"]["usd"] == pytest.approx(1.5) and rep["instances"][0]["id"] == "i-1"
    with pytest.raises(ftplan.UserError, match="no run store"):
        ftplan.runs(store=tmp_path / "missing.sqlite3")


@pytest.mark.slow
def test_launch_runs_the_local_demo_and_runs_lists_it(tmp_path, sshd):
    """A real launch through the API: the test sshd, the real job on tiny-llama (CPU), the run store."""
    cfg = tmp_path / "ftplan.toml"
    cfg.write_text(f"""
[job]
seq_len = 128
batch_size = 2
grad_accum = 1
checkpoint_every_steps = 2
heartbeat_every_s = 0.5
[launch]
poll_interval_s = 0.3
pull_margin_min = 0
ssh_connect_timeout_s = 20
[providers.local]
user = "{sshd.user}"
price_hour = 0.5
remote_root = "{tmp_path / 'remote'}"
""")
    store = tmp_path / "runs.sqlite3"
    result = ftplan.launch(cfg, provider="local", ssh_port=sshd.port, identity=sshd.client_key, dataset=EXAMPLE,
                           max_steps=2, budget=1, remote_python=sys.executable, store=store,
                           runs_dir=tmp_path / "runs")
    assert result.status == "succeeded" and result.teardown_confirmed, result.error
    assert result.actual["usd"] == pytest.approx(result.actual["hours"] * 0.5, abs=1e-4)
    [run] = ftplan.runs(store=store)
    assert run.run_id == result.run_id and run.provider == "local" and run.status == "succeeded"
    assert any(g["group"] == "adapter" for g in ftplan.report(run.run_id, store=store)["artifact_groups"])
