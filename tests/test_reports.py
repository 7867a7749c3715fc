"""Reports from the run store (runs table, one run, totals, HTML) and estimate corrections."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest
from cli_helpers import ftplan

from ftplan.planner.runs.corrections import apply_corrections, correction_for
from ftplan.planner.runs.store import Store


def _run(store: Store, run_id: str, *, provider: str, created: float, est_usd: float, hours: float, price: float,
         status: str = "succeeded", losses=None, gpu="A10", tps=None, est_tps=None, mem=None, est_mem=None):
    store.create_run(run_id, model="tiny-llama", method="qlora", provider=provider, instance_type="t", gpu=gpu,
                     price_hour=price, est_hours=est_usd / price, est_usd=est_usd, budget_usd=10,
                     est_tokens_per_s=est_tps, est_peak_mem_gib=est_mem)
    store.db.execute("UPDATE runs SET created_at = ? WHERE id = ?", (created, run_id))
    for phase, t in (("provisioning", 0), ("training", 60), ("pulling", 3000), ("teardown", 3100)):
        store.db.execute("INSERT INTO events (run_id, ts, kind, phase, message) VALUES (?, ?, 'phase', ?, '')",
                         (run_id, created + t, phase))
    row = store.add_instance_intent(run_id, provider, price_hour=price)
    store.set_instance_created(row, "i-" + run_id, {})
    store.add_cost(run_id, row, created, created + hours * 3600, price)
    store.set_instance_terminated(row)
    h, usd = store.run_cost(run_id)
    store.update_run(run_id, actual_hours=h, actual_usd=usd, summary_json={"losses": losses or []},
                     measured_tokens_per_s=tps, measured_peak_mem_gib=mem)
    store.finish_run(run_id, status)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "runs.sqlite3")
    jan, feb = 1735732800.0, 1738411200.0       # 2025-01-01 12:00 UTC, 2025-02-01 12:00 UTC
    _run(s, "ft-a", provider="lambda", created=jan, est_usd=1.0, hours=2.0, price=0.75,
         losses=[[1, 4.0], [2, 3.0], [3, 2.5]])
    _run(s, "ft-b", provider="runpod", created=jan + 3600, est_usd=2.0, hours=1.0, price=0.5)
    _run(s, "ft-c", provider="lambda", created=feb, est_usd=3.0, hours=1.0, price=1.0, status="failed")
    return s


def test_runs_json_lists_estimated_and_actual(store, capsys):
    rc, out, _ = ftplan(capsys, "runs", "--json", "--store", str(store.path))
    rows = {r["run_id"]: r for r in json.loads(out)}
    assert rc == 0 and set(rows) == {"ft-a", "ft-b", "ft-c"}
    assert rows["ft-a"]["actual"] == {"hours": pytest.approx(2.0), "usd": pytest.approx(1.5)}
    assert rows["ft-a"]["estimated"]["usd"] == 1.0 and rows["ft-c"]["status"] == "failed"


@pytest.mark.parametrize("columns", [100, 80])
def test_runs_table_fits_the_terminal(store, capsys, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    rc, out, _ = ftplan(capsys, "runs", "--store", str(store.path))
    lines = out.splitlines()
    assert rc == 0 and max(len(line) for line in lines) <= columns
    assert all(any(line.startswith(rid) for line in lines) for rid in ("ft-a", "ft-b", "ft-c"))
    assert "act $" in lines[0] and "$1.50" in out
    rc, out, _ = ftplan(capsys, "runs", "--wide", "--store", str(store.path))
    assert "instance" in out.splitlines()[0] and "est h" in out.splitlines()[0]


def test_runs_text_table_has_every_run(store, capsys):
    rc, out, _ = ftplan(capsys, "runs", "--store", str(store.path))
    assert rc == 0
    for rid in ("ft-a", "ft-b", "ft-c"):
        assert rid in out
    assert "$1.50" in out


def test_totals_by_provider_and_month(store, capsys):
    _, out, _ = ftplan(capsys, "report", "--by", "provider", "--json", "--store", str(store.path))
    by = {r["provider"]: r for r in json.loads(out)}
    assert by["lambda"]["runs"] == 2 and by["lambda"]["actual_usd"] == pytest.approx(2.5)
    assert by["runpod"]["actual_usd"] == pytest.approx(0.5)
    _, out, _ = ftplan(capsys, "report", "--by", "month", "--json", "--store", str(store.path))
    months = {r["month"]: r for r in json.loads(out)}
    assert months["2025-01"]["runs"] == 2 and months["2025-01"]["est_usd"] == pytest.approx(3.0)
    assert months["2025-02"]["actual_hours"] == pytest.approx(1.0)


def test_run_report_has_phases_costs_and_losses(store, capsys):
    rc, out, _ = ftplan(capsys, "report", "ft-a", "--json", "--store", str(store.path))
    rep = json.loads(out)
    assert rc == 0 and rep["status"] == "succeeded"
    assert [p["phase"] for p in rep["phases"]] == ["provisioning", "training", "pulling", "teardown"]
    assert rep["phases"][1]["seconds"] == pytest.approx(2940)
    assert [p["loss"] for p in rep["losses"]] == [4.0, 3.0, 2.5]
    assert rep["estimated"]["usd"] == 1.0 and rep["actual"]["usd"] == pytest.approx(1.5)
    rc, text, _ = ftplan(capsys, "report", "ft-a", "--store", str(store.path))
    assert "estimated $1.00, actual $1.50" in text and "training" in text


def test_html_report_is_self_contained_with_three_charts(store, capsys, tmp_path):
    page = tmp_path / "a.html"
    rc, _, _ = ftplan(capsys, "report", "ft-a", "--html", str(page), "--store", str(store.path))
    html = page.read_text()
    assert rc == 0 and html.count("<svg") == 3
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)     # nothing fetched from elsewhere
    assert "<script" not in html
    loss_chart = html.split("<svg")[1]
    assert len(re.search(r' points="([^"]+)"', loss_chart).group(1).split()) == 3   # one point per loss


@pytest.mark.parametrize("args, needle", [
    (["report", "ft-nope"], "no run 'ft-nope'"),
    (["report"], "either a RUN"),
    (["report", "ft-a", "--by", "month"], "either a RUN"),
    (["report", "--by", "month", "--since", "yesterday"], "--since 'yesterday' is not a date"),
    (["report", "ft-a", "--since", "2025-01-01"], "either a RUN"),
    (["runs", "--limit", "0"], "--limit"),
])
def test_report_input_errors_are_one_line(store, capsys, args, needle):
    rc, _, err = ftplan(capsys, *args, "--store", str(store.path))
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error:") and needle in err


def test_totals_show_unknown_estimates_as_unknown_not_zero(store, capsys):
    store.create_run("ft-noest", model="tiny-llama", method="qlora", provider="local", instance_type="local",
                     gpu="cpu", price_hour=0.0)
    store.finish_run("ft-noest", "succeeded")
    _, out, _ = ftplan(capsys, "report", "--by", "provider", "--store", str(store.path))
    local = next(line for line in out.splitlines() if line.startswith("local"))
    assert local.split()[2:] == ["-", "-", "-", "-"]
    _, out, _ = ftplan(capsys, "report", "--by", "provider", "--json", "--store", str(store.path))
    assert {r["provider"]: r["est_hours"] for r in json.loads(out)}["local"] is None


def test_json_floats_are_rounded_to_what_they_mean(store, capsys):
    store.update_run("ft-b", est_peak_mem_gib=7.448060607910156, est_tokens_per_s=2412.345678)
    _, out, _ = ftplan(capsys, "report", "ft-b", "--json", "--store", str(store.path))
    rep = json.loads(out)
    assert rep["peak_mem_gib"]["estimated"] == 7.45 and rep["tokens_per_s"]["estimated"] == 2412.35
    floats = re.findall(r"\d+\.(\d+)", out)
    assert floats and max(len(f) for f in floats) <= 6


def test_multi_run_overview_json_has_cumulative_spend_and_errors(store, capsys, tmp_path):
    page = tmp_path / "all.html"
    rc, out, _ = ftplan(capsys, "report", "--html", str(page), "--json", "--store", str(store.path))
    ov = json.loads(out)
    assert rc == 0 and [r["run_id"] for r in ov["runs"]] == ["ft-a", "ft-b", "ft-c"]
    assert [r["cumulative_usd"] for r in ov["runs"]] == pytest.approx([1.5, 2.0, 3.0])
    assert ov["runs"][0]["error_pct"]["usd"] == 50.0 and ov["runs"][1]["error_pct"]["usd"] == -75.0
    assert page.read_text().count("<svg") == 3


def test_no_store_yet_is_a_one_line_error(tmp_path, capsys):
    rc, _, err = ftplan(capsys, "runs", "--store", str(tmp_path / "none.sqlite3"))
    assert rc == 2 and "no run store" in err and err.count("\n") == 1


# ---- corrections --------------------------------------------------------------------------------
@dataclass
class Mem:
    total: float


@dataclass
class Est:
    tokens_per_s: float
    hours: float
    memory: Mem
    headroom_gib: float
    fits: bool = True
    notes: list = field(default_factory=list)


def test_corrections_use_the_median_of_measured_runs(tmp_path):
    s = Store(tmp_path / "c.sqlite3")
    for i, (tps, mem) in enumerate(((500, 12.0), (600, 13.0), (5000, 12.5))):   # one odd run
        _run(s, f"ft-{i}", provider="lambda", created=1e9 + i, est_usd=1, hours=1, price=1, gpu="A10",
             tps=tps, est_tps=1000, mem=mem, est_mem=10.0)
    _run(s, "ft-other-gpu", provider="lambda", created=1e9, est_usd=1, hours=1, price=1, gpu="H100",
         tps=5000, est_tps=1000)
    corr = correction_for(s, "A10", "tiny-llama", "qlora")
    assert corr.runs == 3 and corr.throughput_factor == pytest.approx(0.6) and corr.memory_factor == pytest.approx(1.25)
    est, note = apply_corrections(Est(1000.0, 2.0, Mem(10.0), headroom_gib=2.0), "A10", "tiny-llama", "qlora", s)
    assert est.tokens_per_s == pytest.approx(600) and est.hours == pytest.approx(2.0 / 0.6)
    assert est.memory.total == pytest.approx(12.5) and est.headroom_gib == pytest.approx(-0.5) and not est.fits
    assert note and "3 measured run(s)" in note and note in est.notes


def test_no_measured_runs_leaves_the_estimate_alone(tmp_path):
    s = Store(tmp_path / "c.sqlite3")
    original = Est(1000.0, 2.0, Mem(10.0), headroom_gib=2.0)
    est, note = apply_corrections(original, "A10", "tiny-llama", "qlora", s)
    assert est is original and note is None


def test_estimate_command_uses_measured_runs_of_the_same_gpu_model_method(tmp_path, capsys, monkeypatch):
    s = Store(tmp_path / "c.sqlite3")
    _run(s, "ft-m", provider="lambda", created=1e9, est_usd=1, hours=1, price=1, gpu="A10",
         tps=500, est_tps=1000, mem=12.0, est_mem=10.0)
    monkeypatch.setenv("FTPLAN_STORE", str(s.path))
    args = ("estimate", "--model", "tiny-llama", "--method", "qlora", "--seq-len", "128", "--json",
            "--dataset-tokens", "100000")
    rc, out, _ = ftplan(capsys, *args, "--gpu", "A10")
    corrected = json.loads(out)
    monkeypatch.setenv("FTPLAN_STORE", str(tmp_path / "none.sqlite3"))
    _, out, _ = ftplan(capsys, *args, "--gpu", "A10")
    plain = json.loads(out)
    assert rc == 0 and any("corrected from 1 measured run" in n for n in corrected["notes"])
    assert corrected["throughput_tokens_per_s"] == pytest.approx(plain["throughput_tokens_per_s"] * 0.5, rel=0.01)
    mem = corrected["memory_gib"]
    assert mem["total"] == pytest.approx(plain["memory_gib"]["total"] * 1.2, rel=0.01)
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"), abs=0.01)
    # another GPU is not corrected
    _, out, _ = ftplan(capsys, *args, "--gpu", "L4")
    assert not any("corrected" in n for n in json.loads(out)["notes"])


def test_plan_uses_measured_runs_for_that_gpu_only(tmp_path, capsys, monkeypatch):
    s = Store(tmp_path / "c.sqlite3")
    _run(s, "ft-p", provider="lambda", created=1e9, est_usd=1, hours=1, price=1, gpu="L4",
         tps=250, est_tps=1000)
    args = ("plan", "--model", "tiny-llama", "--method", "qlora", "--seq-len", "512", "--dataset-tokens", "50000000",
            "--providers", "aws", "--gpu", "L4,L40S", "--on-demand", "--json", "--top", "200")

    def train_hours(out):
        offers = json.loads(out)["offers"]
        return {o["gpu"]: o["train_hours"] for o in offers if o["gpu_count"] == 1}

    monkeypatch.setenv("FTPLAN_STORE", str(tmp_path / "none.sqlite3"))
    _, out, _ = ftplan(capsys, *args)
    plain = train_hours(out)
    monkeypatch.setenv("FTPLAN_STORE", str(s.path))
    rc, out, _ = ftplan(capsys, *args)
    corrected = train_hours(out)
    assert rc == 0 and "corrected from 1 measured run" in json.loads(out)["corrections"][0]
    assert corrected["L4"] == pytest.approx(plain["L4"] * 4, rel=0.01)
    assert corrected["L40S"] == pytest.approx(plain["L40S"], rel=0.001)
