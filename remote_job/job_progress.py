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


def peak_memory(device_type: str) -> dict:
    """CUDA: the allocator's peaks. CPU: the process's peak resident set (both fields), labelled so."""
    if device_type == "cuda":
        import torch

        return {"peak_mem_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 4),
                "peak_mem_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 4),
                "mem_source": "torch.cuda.max_memory_allocated/reserved"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
    gib = round(rss_bytes / GIB, 4)
    return {"peak_mem_allocated_gib": gib, "peak_mem_reserved_gib": gib, "mem_source": "process_peak_rss"}


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
