"""The machine guards its own budget: a watchdog that ships with the job and outlives the SSH session.

Started by bootstrap.sh beside training (detached, standard library only), it reads the job's heartbeat and
  * stops training at a checkpoint (the STOP file) when the measured rate projects past the budget: the same
    rule as the launcher's guard (ftplan.planner.launch.budget), so whichever sees it first acts;
  * uploads each complete checkpoint to `<bucket>/checkpoints/` as the job makes it;
  * on a spot interruption notice (AWS IMDSv2 `spot/instance-action`, GCP metadata `instance/preempted`)
    asks for a checkpoint at once and uploads it when it appears;
  * once training has ended, waits `--grace-minutes` for a launcher to pull (the launcher writes
    `launcher_pulled` in the run folder); if none did, uploads the artifacts to the run's bucket when one is
    configured; then powers the machine off, so a finished run never idles until the budget deadline;
  * writes what it did to `watchdog.json`, which the launcher and `ftplan attach` read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import job_bucket  # noqa: E402  (the job folder is on sys.path: this file runs as a script)

STATUS_FILE = "watchdog.json"
# actions whose record also goes to the bucket (the rest stay on the machine's disk)
_SHARED_ACTIONS = ("started", "stop_requested", "training_ended", "uploaded", "upload_failed", "power_off")
PULLED_MARKER = "launcher_pulled"


def finite(value) -> float | None:
    """A finite float or None: the heartbeat is written by a process we do not trust to be sane."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        x = float(value)
    except (ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None


def remaining_s(hb: dict) -> float | None:
    """Seconds to the last step at the measured rate (ftplan.planner.launch.budget.Progress.remaining_s)."""
    step, total = finite(hb.get("step")) or 0, finite(hb.get("total_steps")) or 0
    if step <= 0 or total <= 0:
        return None
    left = max(0.0, total - step)
    tps, seen = finite(hb.get("tokens_per_s")), finite(hb.get("tokens_seen"))
    if tps and seen:
        return left * (seen / step) / tps
    elapsed = finite(hb.get("elapsed_s")) or 0.0
    return left * (elapsed / step) if elapsed > 0 else None


def projected_total_usd(hb: dict, spent_usd: float, price_hour: float, margin_s: float) -> float | None:
    left = remaining_s(hb)
    return None if left is None else spent_usd + (left + margin_s) / 3600.0 * price_hour


def spot_notice(kind: str, base_url: str | None, timeout_s: float = 2.0) -> str | None:
    """The provider's interruption notice, or None. Unreachable metadata = no notice (not an error)."""
    try:
        if kind == "aws":
            base = base_url or "http://169.254.169.254"
            put = urllib.request.Request(f"{base}/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
            with urllib.request.urlopen(put, timeout=timeout_s) as r:
                token = r.read().decode()
            get = urllib.request.Request(f"{base}/latest/meta-data/spot/instance-action",
                                         headers={"X-aws-ec2-metadata-token": token})
            with urllib.request.urlopen(get, timeout=timeout_s) as r:   # 404 until a notice exists
                return "aws spot instance-action: " + r.read().decode()[:200]
        if kind == "gcp":
            base = base_url or "http://metadata.google.internal"
            get = urllib.request.Request(f"{base}/computeMetadata/v1/instance/preempted",
                                         headers={"Metadata-Flavor": "Google"})
            with urllib.request.urlopen(get, timeout=timeout_s) as r:
                return "gcp instance preempted" if r.read().decode().strip().upper() == "TRUE" else None
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return None


class Watchdog:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.run_dir = os.path.abspath(args.run_dir)
        self.out_dir = os.path.join(self.run_dir, args.out_dir)
        self.actions: list[dict] = []
        self.state = "watching"
        self.stop_requested = False
        self.uploaded_checkpoint: str | None = None

    # ---- files -----------------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def heartbeat(self) -> dict:
        try:
            with open(os.path.join(self.out_dir, "heartbeat.json"), encoding="utf-8") as fh:
                hb = json.load(fh)
            return hb if isinstance(hb, dict) else {}
        except (OSError, ValueError):
            return {}

    def act(self, action: str, **detail) -> None:
        self.actions.append({"at": round(time.time(), 3), "action": action, **detail})
        self.write_status()
        if self.a.bucket and action in _SHARED_ACTIONS:
            self.share_status()

    def share_status(self) -> None:
        """A copy of watchdog.json at <bucket>/watchdog.json: what `ftplan runs --refresh` reads once the machine
        is off. Best effort: a failed copy never stops the watchdog (nor its power-off)."""
        try:
            job_bucket.put_file(self._path(STATUS_FILE), job_bucket.join(self.a.bucket, STATUS_FILE))
        except Exception:  # noqa: BLE001
            pass

    def write_status(self) -> None:
        hb = getattr(self, "last_heartbeat", None) or {}
        doc = {"state": self.state, "updated_unix": round(time.time(), 3), "actions": self.actions[-50:],
               "spent_usd": round(self.spent_usd(), 4), "budget_usd": self.a.budget_usd,
               "step": finite(hb.get("step")), "total_steps": finite(hb.get("total_steps"))}
        tmp = self._path(STATUS_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
        os.replace(tmp, self._path(STATUS_FILE))

    def spent_usd(self, now: float | None = None) -> float:
        return max(0.0, (now or time.time()) - self.a.started_at) / 3600.0 * self.a.price_hour

    def request_stop(self, reason: str) -> None:
        if not self.stop_requested:
            with open(self._path(self.a.stop_file), "w", encoding="utf-8") as fh:
                fh.write(reason + "\n")
            self.stop_requested = True
            self.act("stop_requested", reason=reason)

    def training_ended(self) -> bool:
        return os.path.exists(self._path("exit_code")) or self.job_vanished()

    def job_vanished(self) -> bool:
        """bootstrap.sh's process group (./pid) is gone without writing ./exit_code: killed -9 (the OOM killer,
        a user). Nothing will train again, so the machine must not idle until its deadline (nor, on a machine
        ftplan does not own, this watchdog live forever)."""
        try:
            with open(self._path("pid"), encoding="utf-8") as fh:
                pid = int(fh.read().strip())
        except (OSError, ValueError):
            return False   # not started yet
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return not os.path.exists(self._path("exit_code"))   # (it may have written exit_code meanwhile)
        except OSError:
            return False   # alive under another user
        return False

    # ---- the loop --------------------------------------------------------------------------------
    def tick(self) -> bool:
        """One look at the machine; False once the watchdog is done (powered off or nothing left)."""
        if not self.training_ended():
            hb = self.heartbeat()
            self.last_heartbeat = hb
            projected = projected_total_usd(hb, self.spent_usd(), self.a.price_hour, self.a.pull_margin_s)
            if self.a.budget_usd is not None and projected is not None and projected > self.a.budget_usd:
                self.request_stop(f"projected ${projected:.2f} > budget ${self.a.budget_usd:.2f}")
            notice = spot_notice(self.a.metadata, self.a.metadata_url) if self.a.metadata != "none" else None
            if notice:
                if self.state != "preempted":   # once: the notice stays up until the machine goes
                    self.state = "preempted"
                    self.request_stop(notice)
                    self.upload_latest_checkpoint()
            elif self.a.bucket:   # checkpoints reach the bucket as they are made: a lost machine loses little
                ckpt = job_bucket.latest_checkpoint(self.out_dir)
                if ckpt and ckpt != self.uploaded_checkpoint:
                    self.upload(ckpt, "checkpoints/" + os.path.basename(ckpt))
                    self.uploaded_checkpoint = ckpt
                    self.upload_tokenizer()
            return True
        if self.state not in ("finished", "uploaded"):
            if self.state == "preempted":   # the checkpoint made at the STOP, if the wait above missed it
                self.upload_newest_checkpoint()
            self.last_heartbeat = self.heartbeat() or getattr(self, "last_heartbeat", None)
            self.state = "finished"
            self.ended_at = time.time()
            self.act("training_ended")
        pulled = os.path.exists(self._path(PULLED_MARKER))
        if not pulled and time.time() - self.ended_at < self.a.grace_minutes * 60:
            return True
        if not pulled and self.a.bucket and self.state != "uploaded":
            self.upload(self.out_dir, "final")
            self.state = "uploaded"
        self.power_off("launcher pulled" if pulled else "no launcher pulled within the grace period")
        return False

    def upload(self, folder: str, label: str) -> None:
        try:
            n = job_bucket.upload_tree(folder, job_bucket.join(self.a.bucket, label))
            self.act("uploaded", what=label, files=n, to=job_bucket.join(self.a.bucket, label))
        except Exception as exc:  # an upload failure must not keep the machine billing: power off anyway
            self.act("upload_failed", what=label, error=str(exc)[:300])

    def upload_tokenizer(self) -> None:
        """out/tokenizer once (the job writes it before training): a resume from the bucket needs it."""
        tok = os.path.join(self.out_dir, "tokenizer")
        if not getattr(self, "tokenizer_uploaded", False) and os.path.isdir(tok):
            self.tokenizer_uploaded = True
            self.upload(tok, "tokenizer")

    def upload_latest_checkpoint(self) -> None:
        """After a notice: the newest checkpoint at once if it is not up yet, then the one the job makes at the
        STOP (waiting up to checkpoint_wait_s: the provider gives about two minutes)."""
        if not self.a.bucket:
            return
        before = self.upload_newest_checkpoint()
        deadline = time.time() + self.a.checkpoint_wait_s
        while time.time() < deadline and not self.training_ended():
            ckpt = job_bucket.latest_checkpoint(self.out_dir)
            if ckpt and ckpt != before:
                self.upload_newest_checkpoint()
                return
            time.sleep(min(0.5, self.a.poll_s))

    def upload_newest_checkpoint(self) -> str | None:
        """Upload the newest complete checkpoint unless it is up already; returns it."""
        ckpt = job_bucket.latest_checkpoint(self.out_dir)
        if self.a.bucket and ckpt and ckpt != self.uploaded_checkpoint:
            self.upload(ckpt, "checkpoints/" + os.path.basename(ckpt))
            self.uploaded_checkpoint = ckpt
        return ckpt

    def power_off(self, reason: str) -> None:
        self.state = "powering_off"
        # FTPLAN_NO_SHUTDOWN=1 (the machine's opt-out, as bootstrap.sh's deadline) stops the built-in power-off;
        # a command the user configured (ftplan.toml launch.poweroff_cmd) still runs.
        allowed = (os.environ.get("FTPLAN_NO_SHUTDOWN", "0") != "1"
                   or os.environ.get("FTPLAN_WATCHDOG_POWEROFF_CONFIGURED") == "1")
        self.act("power_off", reason=reason, command=self.a.poweroff_cmd if allowed else None)
        if self.a.poweroff_cmd and allowed:
            os.system(self.a.poweroff_cmd)  # noqa: S605  (the operator's configured command, not user data)

    def run(self) -> int:
        self.ended_at = 0.0
        self.act("started", pid=os.getpid())
        while True:
            if not os.path.isdir(self.run_dir):  # the launcher cleaned the run folder up: nothing left to guard
                return 0
            try:
                if not self.tick():
                    return 0
            except Exception as exc:  # a watchdog that dies leaves the machine billing: log and keep watching
                self.act("error", error=f"{type(exc).__name__}: {exc}"[:300])
            time.sleep(self.a.poll_s)


def _env(name: str, default=None):
    """Defaults from FTPLAN_WATCHDOG_<NAME>: the launcher ships them in the 0600 secrets.env that bootstrap.sh
    sources, so bootstrap starts the watchdog with no arguments of its own."""
    value = os.environ.get("FTPLAN_WATCHDOG_" + name)
    return default if value is None else (value or None) if default is None else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default=".")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--stop-file", default="STOP")
    price = _env("PRICE_HOUR")
    p.add_argument("--price-hour", type=float, required=price is None, default=price)
    p.add_argument("--budget-usd", type=float, default=_env("BUDGET_USD"))
    p.add_argument("--started-at", type=float, default=_env("STARTED_AT"),
                   help="unix time the machine started billing")
    p.add_argument("--pull-margin-s", type=float, default=_env("PULL_MARGIN_S", 600.0))
    p.add_argument("--grace-minutes", type=float, default=_env("GRACE_MINUTES", 15.0))
    p.add_argument("--bucket", default=_env("BUCKET"), help="s3://bucket/prefix or gs://bucket/prefix")
    p.add_argument("--metadata", choices=("aws", "gcp", "none"), default=_env("METADATA", "none"))
    p.add_argument("--metadata-url", default=_env("METADATA_URL"), help="metadata server base URL (tests)")
    p.add_argument("--poweroff-cmd", default=_env("POWEROFF_CMD", "sudo -n shutdown -h now"),
                   help="'' for none (machines ftplan does not own)")
    p.add_argument("--poll-s", type=float, default=_env("POLL_S", 10.0))
    p.add_argument("--checkpoint-wait-s", type=float, default=90.0)
    a = p.parse_args(argv)
    if not (a.price_hour > 0 and math.isfinite(a.price_hour)):
        p.error("--price-hour must be a positive number")
    if a.started_at is None:
        a.started_at = time.time()
    return a


if __name__ == "__main__":
    sys.exit(Watchdog(parse_args()).run())
