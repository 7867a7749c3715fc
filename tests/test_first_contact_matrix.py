"""The fault matrix's first-contact and hostile-machine cases (issue 22), through the real launcher.

Each case is a `Case` of test_fault_matrix.py with a `rig`: its own sshd and/or a relay that breaks the
network on purpose (sshd_fixture.TcpProxy, test_fault_matrix.CutProxy), a runner variant where the machine
itself is what the case is about, and a hook called at each phase and progress line. Real parts as in the
matrix: the Lambda adapter against the fake Lambda API, real sshd processes on 127.0.0.1, real bundle,
runner, pull and teardown. benchmarks/fault_matrix.py prints them with the rest.
"""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from sshd_fixture import SSHD, TcpProxy
from test_fault_matrix import LAMBDA_KEY_ENV, Case, CutProxy, check, run_case
from test_safe_extract_hostile import END, base256, file_member, header, pax, with_size_field

from ftplan.planner.remote.ssh_runner import SSHRunner


class Rig:
    """A machine set-up for one case: `project` overrides, the key to log in with, a runner factory,
    and `hook(phase, step)` where the case does its damage."""

    def __init__(self, tmp: Path, sshd):
        self.tmp, self.sshd = tmp, sshd
        self.project: dict = {}
        self.identity = sshd.client_key
        self.runner_factory = None
        self.fired = False
        self.closers: list = []

    def hook(self, phase: str, step: int | None) -> None:
        pass

    def once(self, phase: str, step: int | None, want: str, min_step: int = 0) -> bool:
        if self.fired or phase != want or (min_step and (step or 0) < min_step):
            return False
        self.fired = True
        return True

    def close(self) -> None:
        for close in self.closers:
            close()


class _OwnSSHD(Rig):
    """A fresh sshd for this case only (its host key and authorized keys are the case's to change)."""

    def __init__(self, tmp, sshd, *, env: str | None = None, authorized: bool = True):
        super().__init__(tmp, sshd)
        self.own = SSHD(tmp / "own-sshd")
        if env is not None:
            self.own.env = env
        self.pub = (self.own.dir / "client_ed25519.pub").read_text()
        if not authorized:
            (self.own.dir / "authorized_keys").write_text("")
        self.own.start()
        self.closers.append(self.own.stop)
        self.identity = self.own.client_key
        self.project = {"ssh_port": self.own.port, "ssh_timeout": 30}

    def host_key_b64(self) -> str:
        return (self.own.dir / "host_ed25519.pub").read_text().split()[1]


class HostKeyBeforeLogin(_OwnSSHD):
    """First boot: sshd answers but refuses the key; the guest agent regenerates the host key, then
    installs the key (GCE). The key seen before login must not be pinned."""

    def __init__(self, tmp, sshd):
        super().__init__(tmp, sshd, authorized=False)
        self.first_key = self.host_key_b64()

    def hook(self, phase, step):
        if self.once(phase, step, "connecting"):
            def boot():
                threading.Event().wait(1.5)            # a few refused logins first
                self.own.restart(new_host_key=True)
                (self.own.dir / "authorized_keys").write_text(self.pub)
            t = threading.Thread(target=boot, daemon=True)
            t.start()
            self.closers.insert(0, lambda: t.join(30))


def _pinned_new_key(got) -> list[str]:
    pins = (Path(got["run_dir"]) / "known_hosts")
    text = pins.read_text() if pins.exists() else ""
    rig = got.get("rig")
    return [] if rig is None or rig.host_key_b64() in text else ["the key pinned is not the host key after boot"]


class HostKeyAfterLogin(_OwnSSHD):
    """After the first login the machine answers with another host key (re-created or spoofed)."""

    def __init__(self, tmp, sshd):
        super().__init__(tmp, sshd)
        self.proxy = TcpProxy(self.own.host, self.own.port)
        self.closers.insert(0, self.proxy.close)
        self.project = {"ssh_port": self.proxy.port, "ssh_timeout": 30}

    def hook(self, phase, step):
        if self.once(phase, step, "training", min_step=2):
            self.own.restart(new_host_key=True)
            self.proxy.reset_on_next_send()          # the open session dies: the runner must reconnect


class ResetMidStatusRead(Rig):
    def __init__(self, tmp, sshd):
        super().__init__(tmp, sshd)
        self.proxy = TcpProxy(sshd.host, sshd.port)
        self.closers.append(self.proxy.close)
        self.project = {"ssh_port": self.proxy.port}

    def hook(self, phase, step):
        if self.once(phase, step, "training", min_step=2):
            self.proxy.reset_on_next_send()          # the next heartbeat read gets a TCP RST


class BlackholeThatRecovers(Rig):
    """Packets vanish for 3 s (a Wi-Fi roam), well within the reconnect grace, then flow again."""

    def __init__(self, tmp, sshd):
        super().__init__(tmp, sshd)
        self.proxy = CutProxy(sshd.port)
        self.closers.append(self.proxy.close)
        self.project = {"ssh_port": self.proxy.port, "ssh_reconnect": 30}

    def hook(self, phase, step):
        if self.once(phase, step, "training", min_step=2):
            self.proxy.mode = "blackhole"
            threading.Timer(3.0, lambda: setattr(self.proxy, "mode", "open")).start()


class GPUWithoutDriver(_OwnSSHD):
    """A GPU offer whose image has no working nvidia-smi (no FTPLAN_NO_GPU_CHECK on this sshd). The wait for
    the driver is shortened from 300 s to 2 s so the case stays quick."""

    def __init__(self, tmp, sshd):
        super().__init__(tmp, sshd, env="FTPLAN_NO_SHUTDOWN=1")

        class ShortGpuWait(SSHRunner):
            def preflight(self, **kw):
                return super().preflight(**{**kw, "gpu_wait_s": 2})

        self.runner_factory = ShortGpuWait


HOSTILE_STREAMS = {
    "negative size": lambda: file_member("a.txt", b"hello") + with_size_field(header("b.bin"), base256(-1536)) + END,
    "non-numeric PAX size": lambda: pax({"size": "abc"}) + file_member("a.txt", b"hello") + END,
    "huge member": lambda: bytes(header("huge.bin", size=2**40)) + b"x" * 4096,
}


def hostile_machine(kind: str):
    """The machine's artifact sender replaced by one that answers every pull with a crafted tar stream."""

    class HostileSender(Rig):
        def __init__(self, tmp, sshd):
            super().__init__(tmp, sshd)
            stream = tmp / "hostile.tar"
            stream.write_bytes(HOSTILE_STREAMS[kind]())
            sender = tmp / "hostile-python"
            sender.write_text(f"#!/bin/sh\ncat '{stream}'\n")
            sender.chmod(sender.stat().st_mode | stat.S_IXUSR)

            class Runner(SSHRunner):
                _PULL_PYTHONS = (str(sender),)

            self.runner_factory = Runner

    return HostileSender


def _nothing_escaped(got) -> list[str]:
    run_dir = Path(got["run_dir"])
    bad = [p for p in ("out/huge.bin", "out/b.bin") if (run_dir / p).exists()]
    return [f"hostile member reached runs/<id>/: {bad}"] if bad else []


def first_contact_cases() -> list[Case]:
    quick = {"steps": 6, "step_s": 0.05}
    return [
        Case("ssh: host key replaced before the first login", "succeeded", rig=HostKeyBeforeLogin,
             expect_artifacts=("out/summary.json",), verify=_pinned_new_key),
        Case("ssh: host key changed after the first login", "failed", rig=HostKeyAfterLogin,
             fault={"steps": 300, "step_s": 0.1}, expect_error="host key"),
        Case("ssh: reset mid-status-read", "succeeded", rig=ResetMidStatusRead, fault={"steps": 12, "step_s": 0.1},
             expect_artifacts=("out/summary.json",)),
        Case("ssh: black hole that recovers within the grace", "succeeded", rig=BlackholeThatRecovers,
             fault={"steps": 30, "step_s": 0.1}, expect_artifacts=("out/summary.json",)),
        Case("preflight: GPU offer without nvidia-smi", "failed", rig=GPUWithoutDriver, expect_error="nvidia-smi"),
        # A stream the extractor refuses fails the run with the reason (nothing written); the machine goes.
        *[Case(f"pull: hostile out/ ({kind})", "failed", rig=hostile_machine(kind), fault=quick,
               expect_error="refused artifact out", verify=_nothing_escaped) for kind in HOSTILE_STREAMS],
        Case("pull: out/ missing on the machine", "failed", fault={**quick, "rm_out": True},
             expect_error="out does not exist"),
        Case("pull: out/ empty on the machine", "failed", fault={**quick, "empty_out": True},
             expect_error="no summary"),
    ]


# ---- pytest ------------------------------------------------------------------------------------
from fakes.lambda_api import fake_lambda  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", first_contact_cases(), ids=lambda c: c.name)
def test_first_contact_case(case, tmp_path, fake_lambda, sshd, monkeypatch):  # noqa: F811
    monkeypatch.setenv(LAMBDA_KEY_ENV, fake_lambda.api_key)
    got = run_case(case, tmp_path, fake_lambda, sshd)
    assert check(case, got) == [], got["error"]
    assert "Traceback" not in got["error"]
