"""The HTML reports as a person sees them: rendered by headless Chromium (Debian's `chromium`) at 1280 and
800 px. Checked: the charts are there and drawn (non-empty, with their points), the numbers on the page are
the store's, and nothing sticks out of the window or needs a horizontal scroll.

A small script is added to a copy of the page (the page itself has none) that measures the layout and
writes the measurements into the DOM, which `chromium --dump-dom` prints. Screenshots of both pages go to
$FTPLAN_REPORT_SHOTS (a folder) when it is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_helpers import ftplan

from ftplan.planner.runs.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")

DAY = 86400.0
T0 = 1764576000.0  # 2025-12-01 08:00 UTC

MEASURE = """<script>
addEventListener('load', () => {
  const W = innerWidth, out = {width: W, scroll_width: document.documentElement.scrollWidth,
                               charts: [], sticking_out: [], scrolling_panels: [], values: []};
  for (const s of document.querySelectorAll('svg.chart')) {
    const b = s.getBoundingClientRect();
    out.charts.push({kind: s.dataset.chart, width: b.width, height: b.height, points: +s.dataset.points,
                     marks: s.querySelectorAll('polyline, rect.bar, circle').length,
                     ticks: [...s.querySelectorAll('text.tick')].map(t => t.textContent)});
  }
  for (const e of document.querySelectorAll('body *')) {
    const b = e.getBoundingClientRect();
    if (b.width > 0 && (b.right > W + 1 || b.left < -1)) out.sticking_out.push(e.tagName + ' ' + e.className);
  }
  for (const p of document.querySelectorAll('.panel'))
    if (p.scrollWidth > p.clientWidth + 1) out.scrolling_panels.push(p.className + ' ' + (p.dataset.group || ''));
  for (const e of document.querySelectorAll('[data-key]'))
    out.values.push({key: e.dataset.key, value: e.dataset.value === undefined ? null : +e.dataset.value,
                     text: e.textContent, visible: e.getClientRects().length > 0});
  const pre = document.createElement('pre'); pre.id = 'ftplan-measure';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>"""


def _run(store: Store, run_id: str, created: float, *, provider: str, gpu: str, price: float, est_h: float,
         act_h: float, status: str = "succeeded", est_mem: float | None = None, mem: float | None = None,
         losses: list | None = None, artifacts: Path | None = None, error: str | None = None) -> None:
    store.create_run(run_id, model="mistral-7b", method="qlora", provider=provider, instance_type=f"{gpu}-box",
                     gpu=gpu, price_hour=price, est_hours=est_h, est_usd=est_h * price, budget_usd=20,
                     est_tokens_per_s=2400.0, est_peak_mem_gib=est_mem, region="us-east-1")
    store.db.execute("UPDATE runs SET created_at = ? WHERE id = ?", (created, run_id))
    steps = [("provisioning", 0), ("waiting", 95), ("connecting", 130), ("uploading", 150), ("training", 190),
             ("pulling", act_h * 3600 - 240), ("teardown", act_h * 3600 - 30)]
    for phase, t in steps:
        store.db.execute("INSERT INTO events (run_id, ts, kind, phase, message) VALUES (?, ?, 'phase', ?, '')",
                         (run_id, created + t, phase))
    for i, (step, loss) in enumerate(losses or []):
        t = 200 + (act_h * 3600 - 450) * (i + 1) / len(losses)
        store.db.execute("INSERT INTO events (run_id, ts, kind, phase, message, data_json) VALUES "
                         "(?, ?, 'progress', 'training', '', ?)",
                         (run_id, created + t, json.dumps({"step": step, "loss": loss, "spent_usd": t / 3600 * price})))
    row = store.add_instance_intent(run_id, provider, price_hour=price)
    store.set_instance_created(row, f"i-{run_id[-4:]}", {})
    store.add_cost(run_id, row, created + 20, created + 20 + act_h * 3600, price)
    store.set_instance_terminated(row)
    h, usd = store.run_cost(run_id)
    store.update_run(run_id, actual_hours=h, actual_usd=usd, measured_tokens_per_s=2050.0 if losses else None,
                     measured_peak_mem_gib=mem, artifacts_dir=str(artifacts) if artifacts else None,
                     summary_json={"losses": losses or []}, error=error)
    store.finish_run(run_id, status)
    store.db.execute("UPDATE runs SET finished_at = ? WHERE id = ?", (created + act_h * 3600 + 60, run_id))


def _artifacts(root: Path) -> Path:
    files = {"out/adapter/adapter_model.safetensors": 83_900_000, "out/adapter/adapter_config.json": 740,
             "out/adapter/tokenizer.json": 3_500_000, "out/adapter/tokenizer_config.json": 1_900,
             "out/summary.json": 2_400, "out/heartbeat.json": 310, "train.log": 48_000}
    for step in (50, 100, 150):
        for shard in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer.json"):
            files[f"out/checkpoints/checkpoint-{step}/{shard}"] = 83_900_000 if "model" in shard else 168_000_000 \
                if "optimizer" in shard else 1_100
    for rel, size in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("wb") as fh:
            fh.truncate(size)   # sparse: real sizes, no real bytes
    return root


def demo_store(tmp: Path) -> Store:
    store = Store(tmp / "runs.sqlite3")
    losses = [[s, round(6.257 - 0.144 * (1 - 0.93 ** (s / 10)) + 0.004 * ((s * 7) % 5 - 2), 4)]
              for s in range(10, 160, 10)]
    _run(store, "ft-20251201-080000-a1b2", T0, provider="aws", gpu="L4", price=0.8048, est_h=1.42, act_h=1.61,
         est_mem=7.45, mem=8.02, losses=losses, artifacts=_artifacts(tmp / "runs" / "a"))
    _run(store, "ft-20251203-120000-c3d4", T0 + 2 * DAY, provider="runpod", gpu="A100-80GB", price=1.64,
         est_h=0.61, act_h=0.55, losses=losses[:8])
    _run(store, "ft-20251209-090000-e5f6", T0 + 8 * DAY, provider="lambda", gpu="A10", price=0.75, est_h=2.1,
         act_h=0.4, status="failed", error="training: job exited with code 1 (CUDA out of memory)")
    _run(store, "ft-20260105-150000-0a0b", T0 + 35 * DAY, provider="aws", gpu="L4", price=0.8048, est_h=1.4,
         act_h=1.37, losses=losses)
    return store


def _render(chromium_args: list[str], page: Path, width: int, tmp: Path) -> dict:
    probe = tmp / f"probe-{width}-{page.name}"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    proc = subprocess.run([CHROMIUM, *chromium_args, f"--window-size={width},900", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="ftplan-measure">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"chromium printed no measurements: {proc.stderr[-1500:]}"
    import html

    return json.loads(html.unescape(found.group(1)))


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage",
                "--virtual-time-budget=3000", "--no-first-run", "--disable-extensions"]


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    store = demo_store(tmp)
    single, multi = tmp / "single.html", tmp / "multi.html"
    from ftplan.planner.cli import main

    for args in (["report", "ft-20251201-080000-a1b2", "--html", str(single)],
                 ["report", "--html", str(multi), "--by", "provider"]):
        assert main([*args, "--store", str(store.path)]) == 0
    shots = os.environ.get("FTPLAN_REPORT_SHOTS")
    if shots:
        for page, name in ((single, "report_single.png"), (multi, "report_multi.png")):
            subprocess.run([CHROMIUM, *CHROME_FLAGS, "--window-size=1280,1700", f"--screenshot={Path(shots) / name}",
                            page.as_uri()], capture_output=True, timeout=120, check=True)
    return store, single, multi, tmp


@pytest.mark.parametrize("width", [1280, 800])
def test_single_run_page_renders_charts_and_the_stores_numbers_without_overflow(pages, width):
    store, single, _, tmp = pages
    m = _render(CHROME_FLAGS, single, width, tmp)
    assert m["width"] == width and m["scroll_width"] <= width, m["scroll_width"]
    assert m["sticking_out"] == [] and m["scrolling_panels"] == []
    charts = {c["kind"]: c for c in m["charts"]}
    assert set(charts) == {"loss", "spend", "phases"}
    for c in charts.values():
        assert c["width"] > 300 and c["height"] > 100 and c["points"] > 0 and c["marks"] > 0, c
        assert len(c["ticks"]) >= 3 and len(set(c["ticks"])) == len(c["ticks"]), c["ticks"]   # readable, distinct
    assert charts["loss"]["points"] == 15
    loss_ticks = [float(t) for t in charts["loss"]["ticks"] if re.fullmatch(r"[\d.]+", t) and float(t) > 5]
    assert loss_ticks and min(loss_ticks) > 5.5     # the loss axis is scaled to the data, not from 0
    assert all(t.startswith("$") for t in charts["spend"]["ticks"] if "." in t)
    run = store.get_run("ft-20251201-080000-a1b2")
    values = {v["key"]: v for v in m["values"]}
    assert values["actual.usd"]["value"] == pytest.approx(run.actual_usd, abs=1e-4)
    assert values["actual.usd"]["text"] == f"${run.actual_usd:,.2f}"
    assert values["estimated.usd"]["value"] == pytest.approx(run.est_usd, abs=1e-4)
    assert values["actual.hours"]["value"] == pytest.approx(run.actual_hours, abs=1e-4)
    assert values["actual.peak_mem_gib"]["text"] == "8.02 GiB" and values["estimated.peak_mem_gib"]["text"] == "7.45 GiB"
    assert values["difference.usd"]["value"] == pytest.approx(run.actual_usd - run.est_usd, abs=1e-3)


def test_single_run_page_groups_artifacts_with_sizes(pages):
    _, single, _, _ = pages
    page = single.read_text()
    groups = re.findall(r'data-group="(\w+)"', page)
    assert groups == ["adapter", "checkpoints", "logs"]
    checkpoints = page.split('data-group="checkpoints"')[1].split("</ul>")[0]
    assert checkpoints.count("<li ") == 3 and "checkpoint-150 (5 files)" in checkpoints   # one line per checkpoint
    assert "80.0 MiB" in page.split('data-group="adapter"')[1].split("</ul>")[0]       # adapter_model.safetensors


@pytest.mark.parametrize("width", [1280, 800])
def test_multi_run_page_charts_cost_cumulative_spend_and_error(pages, width):
    store, _, multi, tmp = pages
    m = _render(CHROME_FLAGS, multi, width, tmp)
    assert m["scroll_width"] <= width and m["sticking_out"] == [] and m["scrolling_panels"] == []
    charts = {c["kind"]: c for c in m["charts"]}
    assert set(charts) == {"cost", "cumulative", "error"}
    assert charts["cost"]["marks"] == 8 and charts["error"]["marks"] == 4 and charts["cumulative"]["points"] == 4
    runs = sorted(store.list_runs(), key=lambda r: r.created_at)
    shown = [v for v in m["values"] if v["key"] == "actual.usd"]
    assert [v["value"] for v in shown] == pytest.approx([r.actual_usd for r in runs], abs=1e-4)
    cumulative = [v["value"] for v in m["values"] if v["key"] == "cumulative_usd"]
    assert cumulative[-1] == pytest.approx(sum(r.actual_usd for r in runs), abs=1e-4)
    total = next(v for v in m["values"] if v["key"] == "total.actual_usd")
    assert total["text"] == f"${sum(r.actual_usd for r in runs):,.2f}"
    by_provider = [v["value"] for v in m["values"] if v["key"] == "group.actual_usd"]   # aws, lambda, runpod
    assert by_provider[0] == pytest.approx(sum(r.actual_usd for r in runs if r.provider == "aws"), abs=1e-4)


def test_a_period_selects_its_runs(pages, capsys, tmp_path):
    store, _, _, _ = pages
    page = tmp_path / "dec.html"
    rc, out, _ = ftplan(capsys, "report", "--html", str(page), "--since", "2025-12-02", "--until", "2025-12-31",
                        "--store", str(store.path))
    assert rc == 0 and "2 runs" in out
    runs = re.findall(r'<tr data-run="([^"]+)"', page.read_text())
    assert runs == ["ft-20251203-120000-c3d4", "ft-20251209-090000-e5f6"]
