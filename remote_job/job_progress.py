"""What the launcher reads while the job runs: heartbeat.json, metrics.jsonl, summary.json.

Files are replaced atomically (write a temp file, then rename) so a reader over SSH never sees half
a JSON document. The heartbeat is written by a thread so it keeps ticking while the model loads or
a long step runs.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from datetime import datetime, timezone

GIB = 1024**3


def write_json_atomic(path: str, data: dict) -> None:
    # Unique per thread too: the heartbeat thread and the main thread may write the same file at once.
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# Peak of what the device itself has in use (cudaMemGetInfo: CUDA context, allocator cache, paged/managed
# memory bitsandbytes keeps outside torch's allocator), sampled after each step and by the heartbeat.
_DEVICE_PEAK = {"bytes": 0}
# Which estimate figure (ftplan's MemoryEstimate.figures()) each measured peak is compared with.
MEMORY_COMPARISON = {"peak_mem_allocated_gib": "allocated", "peak_mem_reserved_gib": "reserved",
                     "peak_mem_device_gib": "device"}


def sample_device_memory() -> None:
    import torch

    try:
        free, total = torch.cuda.mem_get_info()
    except Exception:  # noqa: BLE001 - a failed sample must never stop training
        return
    _DEVICE_PEAK["bytes"] = max(_DEVICE_PEAK["bytes"], total - free)


def reset_peaks(device_type: str) -> None:
    """After loading: the training peak must not include loading/quantization transients."""
    if device_type == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _DEVICE_PEAK["bytes"] = 0
        sample_device_memory()


def paged_optimizer_bytes(optimizer) -> int:
    """bitsandbytes' paged optimizer states (cudaMallocManaged): invisible to torch's allocator counters."""
    total = 0
    for state in getattr(optimizer, "state", {}).values():
        for value in state.values() if isinstance(state, dict) else ():
            if getattr(value, "is_paged", False):
                total += value.numel() * value.element_size()
    return total


def peak_memory(device_type: str) -> dict:
    """CUDA: the allocator's peaks and the device's. CPU: the process's peak resident set, labelled so."""
    if device_type == "cuda":
        import torch

        sample_device_memory()
        return {"peak_mem_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 4),
                "peak_mem_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 4),
                "peak_mem_device_gib": round(_DEVICE_PEAK["bytes"] / GIB, 4),
                "mem_source": "torch.cuda.max_memory_allocated/reserved + cudaMemGetInfo"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
    gib = round(rss_bytes / GIB, 4)
    return {"peak_mem_allocated_gib": gib, "peak_mem_reserved_gib": gib, "mem_source": "process_peak_rss"}


class StepClock:
    """Tokens/s of training steps only: the first step (CUDA/cuBLAS warm-up), eval and checkpoint saves
    are timed on their own, so the rate is the one the estimate predicts."""

    def __init__(self):
        self.steps_s = 0.0
        self.tokens = 0
        self.warmup_s: float | None = None
        self.warmup_tokens = 0
        self.other = {"eval": 0.0, "checkpoint": 0.0}
        self._t: float | None = None

    def start_step(self) -> None:
        self._t = time.perf_counter()

    def end_step(self, tokens: int) -> None:
        """Call after a device sync (reading the step's token count is one)."""
        dt = time.perf_counter() - (self._t or time.perf_counter())
        if self.warmup_s is None:
            self.warmup_s, self.warmup_tokens = dt, tokens
        else:
            self.steps_s += dt
            self.tokens += tokens

    def add(self, kind: str, seconds: float) -> None:
        self.other[kind] += seconds

    def tokens_per_s(self) -> float | None:
        if self.steps_s > 0 and self.tokens:
            return round(self.tokens / self.steps_s, 2)
        if self.warmup_s:  # a single-step session: only the warm-up step to go by
            return round(self.warmup_tokens / self.warmup_s, 2)
        return None

    def durations(self) -> dict:
        return {"train_steps": round(self.steps_s, 3), "warmup_step": round(self.warmup_s or 0.0, 3),
                "eval": round(self.other["eval"], 3), "checkpoint": round(self.other["checkpoint"], 3)}


class Progress:
    """Shared live state; only the main process writes files (enabled=False elsewhere)."""

    def __init__(self, out_dir: str, every_s: float, device_type: str, enabled: bool,
                 started: float | None = None):
        self.out_dir = out_dir
        self.every_s = every_s
        self.device_type = device_type
        self.enabled = enabled
        self.started = started or time.time()
        self.state = {"status": "starting", "step": 0, "total_steps": None, "epoch": 0, "loss": None,
                      "eval_loss": None, "tokens_per_s": None, "tokens_seen": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)

    def update(self, write: bool = False, **fields) -> None:
        with self._lock:
            self.state.update(fields)
        if write:
            self.write_heartbeat()

    def heartbeat(self) -> dict:
        with self._lock:
            hb = dict(self.state)
        hb.update(peak_memory(self.device_type))
        hb["device"] = self.device_type
        hb["elapsed_s"] = round(time.time() - self.started, 2)
        hb["updated_at"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        hb["updated_unix"] = round(time.time(), 3)
        return hb

    def write_heartbeat(self) -> None:
        if self.enabled:
            write_json_atomic(os.path.join(self.out_dir, "heartbeat.json"), self.heartbeat())

    def start(self) -> None:
        self.write_heartbeat()
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.write_heartbeat()
            except OSError:
                pass  # a full disk must not kill training; the next tick tries again

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def log_metrics(self, record: dict) -> None:
        if self.enabled:
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict) -> None:
        if self.enabled:
            write_json_atomic(os.path.join(self.out_dir, "summary.json"), summary)
