"""Learn from finished runs: measured tokens/s and peak memory correct later estimates, and measured
bootstraps replace the catalog's setup and download overheads.

For each (gpu, model, method) the store holds, per finished run, what the estimate said and what the
job measured. The correction factor is the median of measured/estimated over those runs (the median,
so one odd run, e.g. a throttled test, does not swing it). A later estimate for the same triple is
scaled by it, and says so in its notes.

Per provider, the bootstrap's own timings (summary.json `bootstrap`, written by remote_job/bootstrap.sh and
train.py) give the setup minutes (environment install + the job's start to its first step, without the
time spent waiting for the weights) and the weight download rate, as medians of the last runs.

Only the store (sqlite3) is imported: this sits on the `ftplan estimate/plan` path.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from typing import Any

# Runs whose measurements are trustworthy: the job got far enough to measure a steady rate.
_USABLE = ("succeeded", "stopped_over_budget")
# Factors outside this band are more likely a broken measurement than a bad estimate.
_SANE = (0.05, 20.0)


@dataclass(frozen=True)
class Correction:
    gpu: str
    model: str
    method: str
    runs: int
    throughput_factor: float | None   # measured / estimated tokens/s
    memory_factor: float | None       # measured / estimated peak GiB

    def note(self) -> str:
        parts = []
        if self.throughput_factor is not None:
            parts.append(f"throughput x{self.throughput_factor:.2f}")
        if self.memory_factor is not None:
            parts.append(f"peak memory x{self.memory_factor:.2f}")
        return (f"corrected from {self.runs} measured run(s) of {self.model} {self.method} on {self.gpu}: "
                + ", ".join(parts))


def _median_ratio(pairs: list[tuple[Any, Any]]) -> float | None:
    ratios = [float(m) / float(e) for m, e in pairs if m and e and float(e) > 0]
    ratios = [r for r in ratios if _SANE[0] <= r <= _SANE[1]]
    return statistics.median(ratios) if ratios else None


def correction_for(store: Any, gpu: str, model: str, method: str) -> Correction | None:
    """The correction for this triple, or None when no finished run measured it."""
    rows = store.db.execute(
        "SELECT est_tokens_per_s, measured_tokens_per_s, est_peak_mem_gib, measured_peak_mem_gib FROM runs "
        f"WHERE lower(gpu) = lower(?) AND model = ? AND method = ? AND status IN ({', '.join('?' * len(_USABLE))})"
        " AND (measured_tokens_per_s IS NOT NULL OR measured_peak_mem_gib IS NOT NULL)",
        (gpu, model, method, *_USABLE),
    ).fetchall()
    if not rows:
        return None
    tput = _median_ratio([(r[1], r[0]) for r in rows])
    mem = _median_ratio([(r[3], r[2]) for r in rows])
    if tput is None and mem is None:
        return None
    return Correction(gpu=gpu, model=model, method=method, runs=len(rows), throughput_factor=tput,
                      memory_factor=mem)


def corrections_by_gpu(store: Any, model: str, method: str) -> dict[str, Correction]:
    """Corrections for every GPU that finished runs of this model and method measured (for `ftplan plan`)."""
    gpus = [r[0] for r in store.db.execute(
        "SELECT DISTINCT gpu FROM runs WHERE model = ? AND method = ? AND gpu IS NOT NULL", (model, method))]
    found = {}
    for gpu in gpus:
        corr = correction_for(store, gpu, model, method)
        if corr is not None:
            found[gpu.lower()] = corr
    return found


def stored_corrections(model: str, method: str) -> dict[str, Correction]:
    """`corrections_by_gpu` from the default run store, or {} when there is none (never creates one)."""
    from ftplan.planner.runs.store import Store, default_store_path

    path = default_store_path()
    if not path.is_file():
        return {}
    try:
        return corrections_by_gpu(Store(path), model, method)
    except Exception:  # noqa: BLE001 - a broken store must not break a plan
        return {}


def apply_corrections(estimate: Any, gpu: str, model: str, method: str, store: Any) -> tuple[Any, str | None]:
    """Return (corrected estimate, note) or (estimate unchanged, None).

    Works on the planner's `Estimate` (a dataclass or pydantic model with `tokens_per_s`, `hours`,
    `memory.total`, `headroom_gib`, `fits`, `notes`); fields it does not have are left alone.
    """
    corr = correction_for(store, gpu, model, method) if store is not None else None
    if corr is None:
        return estimate, None
    changes: dict[str, Any] = {}
    if corr.throughput_factor is not None and getattr(estimate, "tokens_per_s", None):
        changes["tokens_per_s"] = estimate.tokens_per_s * corr.throughput_factor
        if getattr(estimate, "hours", None) is not None:
            changes["hours"] = estimate.hours / corr.throughput_factor
    memory = getattr(estimate, "memory", None)
    if corr.memory_factor is not None and memory is not None and getattr(memory, "total", None):
        new_total = memory.total * corr.memory_factor
        changes["memory"] = _scale_memory(memory, corr.memory_factor)
        if getattr(estimate, "headroom_gib", None) is not None:
            headroom = estimate.headroom_gib - (new_total - memory.total)
            changes["headroom_gib"] = headroom
            if hasattr(estimate, "fits"):
                changes["fits"] = headroom >= 0
    note = corr.note()
    notes = getattr(estimate, "notes", None)
    if isinstance(notes, (list, tuple)):
        changes["notes"] = [*notes, note]
    return _replace(estimate, **changes), note


# The components of ftplan.planner.estimate.memory.MemoryEstimate; `total` is their sum, so scaling each keeps it so.
_MEMORY_COMPONENTS = ("weights", "trainable", "gradients", "optimizer", "activations", "logits",
                      "allocator_overhead", "cuda_context")


def _scale_memory(memory: Any, factor: float) -> Any:
    """Scale every memory component by `factor`, so the breakdown still sums to the corrected peak."""
    if dataclasses.is_dataclass(memory) and "total" not in {f.name for f in dataclasses.fields(memory)}:
        known = {f.name for f in dataclasses.fields(memory)}
        return dataclasses.replace(memory, **{k: getattr(memory, k) * factor
                                              for k in _MEMORY_COMPONENTS if k in known})
    return _replace(memory, total=memory.total * factor)


def _replace(obj: Any, **changes: Any) -> Any:
    if not changes:
        return obj
    if dataclasses.is_dataclass(obj):
        known = {f.name for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **{k: v for k, v in changes.items() if k in known})
    if hasattr(obj, "model_copy"):
        return obj.model_copy(update=changes)
    if isinstance(obj, dict):
        return {**obj, **changes}
    raise TypeError(f"cannot correct an estimate of type {type(obj).__name__}")


# ---------------------------------------------------------------- setup and download, per provider
# How many recent runs per provider count, and the smallest download whose rate means anything (a few files
# of config measure latency, not bandwidth).
LAST_RUNS = 10
MIN_RATE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class MeasuredOverheads:
    """What fresh bootstraps on one provider measured: medians over its last runs."""

    provider: str
    runs: int
    setup_min: float                    # environment + job start to the first step, download wait excluded
    env_min: float                      # of which the environment install (the download overlaps it)
    download_gib_per_min: float | None  # None: no run downloaded enough to measure a rate
    download_runs: int = 0

    def note(self) -> str:
        rate = (f", weights at {self.download_gib_per_min:.1f} GiB/min ({self.download_runs} download(s))"
                if self.download_gib_per_min else "")
        return (f"{self.provider}: setup {self.setup_min:.1f} min (environment {self.env_min:.1f}){rate}, "
                f"median of {self.runs} measured run(s)")


def bootstrap_sample(boot: Any) -> tuple[float, float, float | None] | None:
    """(setup_s, env_s, download GiB/min or None) from one summary's `bootstrap`, or None when it does
    not describe a fresh bootstrap (a reused venv, a --remote-python run, a broken record)."""
    if not isinstance(boot, dict) or boot.get("reused_venv") or not isinstance(boot.get("env_s"), (int, float)):
        return None
    env_s = float(boot["env_s"])
    first, wait = boot.get("first_step_s"), boot.get("wait_s") or 0
    setup_s = float(first) - float(wait) if isinstance(first, (int, float)) and first >= env_s + wait else env_s
    if env_s <= 0 or setup_s > 6 * 3600:
        return None
    rate = None
    dl = boot.get("download")
    if isinstance(dl, dict) and dl.get("status") == "ok":
        got, secs = dl.get("download_bytes"), dl.get("download_s")
        if isinstance(got, (int, float)) and isinstance(secs, (int, float)) and got >= MIN_RATE_BYTES and secs > 0:
            rate = got / 2**30 / (secs / 60)
    return setup_s, env_s, rate


def overheads_from_rows(rows: Any) -> dict[str, MeasuredOverheads]:
    """rows: (provider, bootstrap JSON or None) newest first. Medians of each provider's last LAST_RUNS."""
    samples: dict[str, list[tuple[float, float, float | None]]] = {}
    for provider, bootstrap_json in rows:
        if not provider or not bootstrap_json or len(samples.get(provider, ())) >= LAST_RUNS:
            continue
        try:
            sample = bootstrap_sample(json.loads(bootstrap_json))
        except (TypeError, ValueError):
            continue
        if sample is not None:
            samples.setdefault(provider, []).append(sample)
    out = {}
    for provider, got in samples.items():
        rates = [r for _, _, r in got if r]
        out[provider] = MeasuredOverheads(
            provider=provider, runs=len(got), setup_min=statistics.median(s for s, _, _ in got) / 60,
            env_min=statistics.median(e for _, e, _ in got) / 60,
            download_gib_per_min=statistics.median(rates) if rates else None, download_runs=len(rates))
    return out


# Any finished run: a job that failed or was cancelled after its bootstrap still measured the bootstrap.
_FINISHED = ("succeeded", "failed", "stopped_over_budget", "cancelled")
# The newest finished runs per provider are picked by rowid first (the sort never carries the summaries, which
# hold every step's loss); then only their `bootstrap` objects leave SQLite.
_RECENT = 200
_NEWEST = ("SELECT rowid, provider FROM runs WHERE provider IS NOT NULL AND summary_json IS NOT NULL AND status IN ("
           + ", ".join("?" * len(_FINISHED)) + f") ORDER BY created_at DESC LIMIT {_RECENT}")
_BOOTSTRAPS = "SELECT rowid, json_extract(summary_json, '$.bootstrap') FROM runs WHERE rowid IN ({})"


def _bootstrap_rows(db: Any) -> list[tuple[str, Any]]:
    """(provider, bootstrap JSON) of each provider's LAST_RUNS newest finished runs, newest first."""
    picked: dict[int, str] = {}
    count: dict[str, int] = {}
    for rowid, provider in db.execute(_NEWEST, _FINISHED):
        if count.get(provider, 0) < LAST_RUNS:
            picked[rowid] = provider
            count[provider] = count.get(provider, 0) + 1
    if not picked:
        return []
    found = dict(db.execute(_BOOTSTRAPS.format(", ".join("?" * len(picked))), list(picked)))
    return [(provider, found.get(rowid)) for rowid, provider in picked.items()]


def stored_overheads() -> dict[str, MeasuredOverheads]:
    """Measured overheads from the default run store, or {} when there is none (never creates one).

    Two small read-only queries, without opening the store as Store does (no migrations): this is on
    `ftplan plan`'s path.
    """
    import sqlite3

    from ftplan.planner.runs.store import default_store_path

    path = default_store_path()
    if not path.is_file():
        return {}
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return overheads_from_rows(_bootstrap_rows(db))
        finally:
            db.close()
    except sqlite3.Error:  # a broken or older store must not break a plan
        return {}
