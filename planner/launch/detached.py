"""`ftplan launch --detach` and the machine's watchdog, on the launcher's side.

A mixin of `ftplan.planner.launch.launcher.Launcher`: what the launcher tells the watchdog (remote_job/watchdog.py,
started by bootstrap.sh beside training; its settings travel in the 0600 secrets.env as FTPLAN_WATCHDOG_*), and
how a detached launch ends: the run stays recorded as live (phase `detached`, kept by `ftplan gc`), the machine
stays up under its watchdog and its on-instance deadline, and `ftplan attach RUN` / `ftplan pull RUN` take over.
"""

from __future__ import annotations

import time
from typing import Any

from ftplan.planner.launch.launch_plan import LaunchResult


class DetachSteps:
    """Watchdog settings and the detached ending of the launcher."""

    def _watchdog_env(self, owned: bool) -> dict[str, str]:
        """Settings of the machine's watchdog (remote_job/watchdog.py), shipped in secrets.env for bootstrap.sh:
        the guard's price and what is left of the budget, the billing start, the grace, the bucket, the
        provider's metadata kind and the power-off command. None for a free machine (nothing bills)."""
        p = self.plan
        price = self.guard.price_hour()
        if not self.live or not price > 0:
            return {}
        row, _, offer = self.live[-1]
        if p.poweroff_cmd is not None:
            poweroff = p.poweroff_cmd
        elif owned:
            poweroff = ""          # never power off the user's own machine unless configured
        elif offer.provider == "runpod":
            poweroff = "runpodctl stop pod $RUNPOD_POD_ID"   # a container cannot shut down
        else:
            poweroff = 'if [ "$(id -u)" -eq 0 ]; then shutdown -h now; else sudo -n shutdown -h now; fi'
        env = {"FTPLAN_WATCHDOG_PRICE_HOUR": repr(float(price)),
               "FTPLAN_WATCHDOG_STARTED_AT": repr(float(self.store.get_instance(row).created_at or time.time())),
               "FTPLAN_WATCHDOG_PULL_MARGIN_S": repr(float(p.pull_margin_s)),
               "FTPLAN_WATCHDOG_GRACE_MINUTES": repr(float(p.grace_minutes)),
               "FTPLAN_WATCHDOG_METADATA": {"aws": "aws", "gcp": "gcp"}.get(offer.provider, "none"),
               "FTPLAN_WATCHDOG_POWEROFF_CMD": poweroff,
               "FTPLAN_WATCHDOG_POLL_S": repr(min(10.0, max(1.0, float(p.poll_interval_s))))}
        if p.poweroff_cmd is not None:
            env["FTPLAN_WATCHDOG_POWEROFF_CONFIGURED"] = "1"
        # this machine's share: what earlier (lost) machines did not spend; `--on-over-budget continue` leaves
        # the cap to the on-instance deadline, as the launcher's guard does
        if p.budget_usd is not None and p.on_over_budget == "stop":
            env["FTPLAN_WATCHDOG_BUDGET_USD"] = repr(max(0.0, p.budget_usd - self.guard.spent_before_usd))
        if p.bucket:
            env["FTPLAN_WATCHDOG_BUCKET"] = f"{p.bucket.rstrip('/')}/{self.run_id}"
        return env

    def _training_started(self, inst: Any) -> bool:
        """`--detach` returns once the job wrote its first heartbeat (setup done, training under way), so a job
        that fails at once is still seen, pulled and torn down by this launcher. False: the job already ended."""
        runner = self.runner
        self.display.phase("uploading", "waiting for the first training step before detaching")
        while True:
            if self._call_runner(lambda: runner.read_json(self.run_id, "out/heartbeat.json"), inst):
                return True
            if not self._call_runner(lambda: runner.is_running(self.run_id), inst):
                return False
            time.sleep(self.plan.poll_interval_s)

    def _detach(self, inst: Any) -> str:
        """`--detach`: training started; leave the machine to its watchdog and on-instance deadline."""
        self._enter("training", "training (detached)")
        guards = self._guards_text()
        self.store.update_run(self.run_id, phase="detached", launcher_pid=None)
        self.store.add_event(self.run_id, "detached", guards, phase="detached", data={"instance": inst.id})
        self._close_runner()
        return "detached"

    def _guards_text(self) -> str:
        env = getattr(self, "_watchdog_env_sent", None) or {}
        parts = []
        if env:
            grace = float(env.get("FTPLAN_WATCHDOG_GRACE_MINUTES", 15))
            off = env.get("FTPLAN_WATCHDOG_POWEROFF_CMD") or "nothing (a machine ftplan does not own)"
            parts.append(f"the machine's watchdog stops training at a checkpoint if it projects past the budget, "
                         f"and {grace:g} min after training ends without a pull "
                         + (f"uploads out/ to {env['FTPLAN_WATCHDOG_BUCKET']}/final and " if env.get(
                             "FTPLAN_WATCHDOG_BUCKET") else "") + f"runs: {off}")
        else:
            parts.append("no watchdog (the machine bills nothing)")
        if getattr(self, "_deadline_s", None):
            parts.append(f"the on-instance deadline powers it off after {self._deadline_s}s whatever happens")
        note = poweroff_note(self.live[-1][2].provider) if env and self.live else ""
        if note:
            parts.append(note)
        return "; ".join(parts)

    def _detached_result(self) -> LaunchResult:
        p = self.plan
        self.display.done("detached", None)
        hours, usd = self.store.run_cost(self.run_id)
        return LaunchResult(
            run_id=self.run_id, status="detached", artifacts_dir=str(p.run_dir.resolve()),
            estimated={"hours": p.estimate.get("hours"), "usd": p.estimate.get("usd")},
            actual={"hours": hours, "usd": usd}, error=None, teardown_confirmed=True,
            instances=[{"provider": r.provider, "id": r.provider_instance_id, "state": r.state}
                       for r in self.store.instances(self.run_id)],
            guards=self._guards_text(),
        )


def poweroff_note(provider: str) -> str:
    """What a machine of `provider` still bills once it powered itself off ("" where power-off terminates it):
    `poweroff` in catalogs/provider_overheads.json, with its sources in `poweroff_about` there."""
    import json

    from ftplan.catalogs import data_path

    raw = json.loads(data_path("provider_overheads.json").read_text())
    kind = (raw["providers"].get(provider) or {}).get("poweroff", "unverified")
    end = "once it finished, 'ftplan runs --refresh' then 'ftplan gc --yes' ends that bill"
    if kind == "terminates":
        return ""
    if kind == "stops_compute":
        return f"on {provider} a powered-off machine still bills its disk until deleted: {end}"
    return f"on {provider} a powered-off machine may bill in full until terminated: {end}"
