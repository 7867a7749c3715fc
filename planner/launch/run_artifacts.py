"""Artifacts of a run on the launcher's side: pull `out/` and the log back into `runs/<id>/`, sync the newest
checkpoint during training, salvage what exists on failure, and ship a checkpoint back for a spot resume.

A mixin of `ftplan.planner.launch.launcher.Launcher` (it uses the launcher's runner, plan and store), kept apart so the
state machine reads as phases and this file as "what is on disk and how it got there".
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftplan.planner.launch.launch_plan import InstanceLost
from ftplan.planner.launch.teardown import scrubbed as _scrub
from ftplan.planner.remote.ssh_options import SALVAGE_S


class ArtifactSteps:
    """Pull, sync, salvage and resume-bundle steps of the launcher."""

    def _pull(self, rel: str) -> list[Path]:
        """Remote `<run dir>/<rel>` -> local `runs/<id>/<rel>` (same relative layout)."""
        local_dir = self.plan.run_dir / Path(rel).parent
        local_dir.mkdir(parents=True, exist_ok=True)
        got = self.runner.pull(self.run_id, rel, local_dir)
        for path in got or []:
            self.pulled.append(str(path))
        return list(got or [])

    def _sync_checkpoints(self, inst: Any) -> None:
        """Pull the newest checkpoint the job should have written (once), so a lost instance loses little.

        Only that one folder: pulling all of out/ while the job writes and rotates checkpoints would
        race with it and move the same bytes again and again."""
        every = int(self.plan.job_config.get("checkpoint_every_steps") or 0)
        step = self.last_progress.step
        if every <= 0 or step < every:
            return
        name = f"checkpoint-{step // every * every}"
        local = self.plan.run_dir / "out" / "checkpoints" / name
        if (local / "COMPLETE").is_file():
            return
        try:
            got = self._call_runner(lambda: self._pull(f"out/checkpoints/{name}"), inst)
            self.store.add_event(self.run_id, "sync", f"{name}: {len(got)} files", phase="training")
        except InstanceLost:
            raise
        except Exception as exc:  # noqa: BLE001 - not written yet, or rotated away: the next sync tries again
            self.store.add_event(self.run_id, "sync_failed", _scrub(exc), phase="training")
            return
        if not (self.plan.run_dir / "out" / "tokenizer").exists():  # a resume needs the same tokenizer
            try:
                self._call_runner(lambda: self._pull("out/tokenizer"), inst)
            except InstanceLost:
                raise
            except Exception:  # noqa: BLE001 - jobs with a hub tokenizer write none
                pass

    def _pull_all(self) -> None:
        for rel in ("out", "train.log"):
            self._pull(rel)
        self.store.add_event(self.run_id, "pulled", f"{len(self.pulled)} files", phase="pulling")
        self._mark_pulled()
        self._watchdog_report()

    def _mark_pulled(self) -> None:
        """`launcher_pulled` in the remote run folder: the watchdog then powers off without uploading."""
        try:
            path = f"{self.runner.run_dir(self.run_id)}/launcher_pulled"
            with self.runner.sftp.open(path, "w") as fh:
                fh.write("pulled by ftplan\n")
        except Exception as exc:  # noqa: BLE001 - the watchdog then uploads after its grace: safe, only slower
            self.store.add_event(self.run_id, "pulled_marker_failed", _scrub(exc), phase="pulling")

    def _watchdog_report(self) -> dict[str, Any] | None:
        """What the machine's watchdog did (watchdog.json), as an event and a line on the display."""
        try:
            doc = self.runner.read_json(self.run_id, "watchdog.json")
        except Exception:  # noqa: BLE001 - no watchdog on this run (free machine) or unreadable: nothing to show
            return None
        if not isinstance(doc, dict):
            return None
        from ftplan.planner.runs.store import scrub_data
        from ftplan.providers.errors import scrub

        doc = scrub_data(doc)   # it came from the machine
        summary = scrub(watchdog_summary(doc))
        self.store.add_event(self.run_id, "watchdog", summary, phase=self._phase,
                             data={"state": doc.get("state"), "actions": (doc.get("actions") or [])[-10:]})
        self.display.log(f"watchdog: {summary}")
        return doc

    def _runner_reached(self) -> bool:
        """Whether SSH ever got in: a machine never reached has nothing to salvage, kill or clean."""
        return self.runner is not None and bool(getattr(self.runner, "ever_connected", True))

    @contextmanager
    def _ssh_bounded(self) -> Iterator[None]:
        """Teardown's SSH work within a bound: on a machine that stopped answering, one short reconnect
        attempt and then every call fails at once, so terminate follows within seconds (not 3 x 300 s)."""
        bounded = getattr(self.runner, "bounded", None)
        if bounded is None:
            yield
            return
        with bounded(SALVAGE_S):
            yield

    def _salvage(self) -> None:
        """Best effort on failure/cancel: what the job wrote so far. A job that is still running keeps
        rewriting its files (a checksummed pull would race with it), so then the JSON status files are
        read as they are, the log is tailed, and only the newest checkpoint is pulled. Nothing when the
        machine was never reached; call it inside `_ssh_bounded()`."""
        if not self._runner_reached():
            return
        try:
            self._salvage_files()
        finally:  # this launcher handles the machine: its watchdog stands down instead of waiting its grace
            self._mark_pulled()

    def _salvage_files(self) -> None:
        if self.job_finished:
            for rel in ("out", "train.log"):
                try:
                    self._pull(rel)
                except Exception:  # noqa: BLE001 - salvage never blocks teardown
                    pass
            return
        out = self.plan.run_dir / "out"
        out.mkdir(parents=True, exist_ok=True)
        for name in ("heartbeat.json", "summary.json"):
            try:
                data = self.runner.read_json(self.run_id, f"out/{name}")
                if data is not None:
                    (out / name).write_text(json.dumps(data, indent=1))
                    self.pulled.append(str(out / name))
            except Exception:  # noqa: BLE001
                pass
        try:
            text, _ = self.runner.tail_log(self.run_id, 0)
            (self.plan.run_dir / "train.log").write_text(text)
        except Exception:  # noqa: BLE001
            pass
        try:
            self._sync_checkpoints(None)
        except Exception:  # noqa: BLE001
            pass

    def _have_checkpoint(self) -> bool:
        """A checkpoint to resume from: a newer one the machine's watchdog put in the run's bucket is fetched
        (verified) first, so a lost machine costs only the steps since its last upload."""
        self._fetch_bucket_checkpoint()
        return _newest_checkpoint(self.plan.run_dir / "out" / "checkpoints") is not None

    def _run_bucket(self) -> str | None:
        """<bucket>/<run id>, where the watchdog uploads (the plan's, or the run record's for `attach`)."""
        bucket = self.plan.bucket or (self.plan.job_config or {}).get("bucket")
        return f"{str(bucket).rstrip('/')}/{self.run_id}" if bucket else None

    def _fetch_bucket_checkpoint(self) -> str | None:
        """Download the bucket's newest complete checkpoint into runs/<id>/out/checkpoints when it is newer than
        the newest pulled one (staged, sha256-verified; a failure keeps what is there). Its name, or None."""
        url = self._run_bucket()
        if not url:
            return None
        from ftplan.remote_job import job_bucket

        ckpt_dir = self.plan.run_dir / "out" / "checkpoints"
        local = _newest_checkpoint(ckpt_dir)
        have = _step(local.name) if local is not None else -1
        try:
            newer = [n for n in job_bucket.checkpoints_in(url) if _step(n) > have]
            if not newer:
                return None
            name = newer[-1]
            job_bucket.download_tree(job_bucket.join(url, "checkpoints", name), str(ckpt_dir / name))
        except Exception as exc:  # noqa: BLE001 - no credentials here, bucket gone, tampered: resume from what we have
            self.store.add_event(self.run_id, "bucket_checkpoint_failed", _scrub(exc), phase=self._phase)
            return None
        if not (ckpt_dir / name / "COMPLETE").is_file():
            self.store.add_event(self.run_id, "bucket_checkpoint_failed", f"{name} has no COMPLETE marker",
                                 phase=self._phase)
            return None
        tok = self.plan.run_dir / "out" / "tokenizer"
        if not tok.exists():   # a resume needs the job's own tokenizer when it wrote one (the watchdog uploads it)
            try:
                job_bucket.download_tree(job_bucket.join(url, "tokenizer"), str(tok))
            except Exception:  # noqa: BLE001 - jobs with a hub tokenizer write none
                pass
        self.store.add_event(self.run_id, "bucket_checkpoint", f"{name} from {url}/checkpoints (sha256 verified)",
                             phase=self._phase, data={"checkpoint": name, "local_before": local.name if local else None})
        return name

    def _bundle(self, *, resume: bool) -> Path:
        """The job bundle; on recovery it also carries the newest checkpoint (pulled, or from the bucket) to
        resume from. `_resume_after_loss` (set by `ftplan attach` of a run whose machine is gone) resumes too."""
        cfg = {k: v for k, v in self.plan.job_config.items() if k != "bucket"}  # the run record's, not the job's
        extra = dict(self.plan.extra_files)
        if extra and not getattr(self, "_bundle_files_recorded", False):   # `attach` rebuilds the same job from it
            self._bundle_files_recorded = True
            self.store.add_event(self.run_id, "bundle_files", "", data={"extra_files": {k: str(v) for k, v in
                                                                                      extra.items()}})
        cfg["resume"] = True  # the job resumes only if out/checkpoints has something
        if getattr(self, "_resume_after_loss", False) and not resume:
            resume = self._have_checkpoint()
        if resume:
            ckpt = _newest_checkpoint(self.plan.run_dir / "out" / "checkpoints")
            if ckpt is not None:
                extra[f"out/checkpoints/{ckpt.name}"] = ckpt
                tok = self.plan.run_dir / "out" / "tokenizer"
                if tok.is_dir():
                    extra["out/tokenizer"] = tok
                self.store.add_event(self.run_id, "resume_from", ckpt.name, phase="recovering")
        return self.bundle_builder(cfg, self.plan.dataset, self.plan.run_dir / "bundle.tar.gz", extra_files=extra)


def watchdog_summary(doc: dict[str, Any]) -> str:
    """One line from watchdog.json: its state and what it did (stop, upload, power off)."""
    acts = [a for a in (doc.get("actions") or []) if isinstance(a, dict) and a.get("action") != "started"]
    said = []
    for a in acts[-4:]:
        what = str(a.get("action"))
        if a.get("reason"):
            what += f" ({a['reason']})"
        elif a.get("to"):
            what += f" to {a['to']}"
        elif a.get("error"):
            what += f" ({a['error']})"
        said.append(what)
    spent = doc.get("spent_usd")
    money = f", ${spent:.4f} of ${doc['budget_usd']:.2f} by its clock" if isinstance(spent, (int, float)) and \
        isinstance(doc.get("budget_usd"), (int, float)) else ""
    return f"{doc.get('state', '?')}{money}" + (": " + "; ".join(said) if said else "")


def _step(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _newest_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    # Only finished checkpoints (the job's COMPLETE marker); a half-pulled one is useless.
    found = [d for d in ckpt_dir.iterdir() if d.is_dir() and d.name.startswith("checkpoint-")
             and (d / "COMPLETE").is_file()]
    found.sort(key=lambda d: int(d.name.rsplit("-", 1)[-1]) if d.name.rsplit("-", 1)[-1].isdigit() else -1)
    return found[-1] if found else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
