"""First-line checks for `--provider local` (the demo): an sshd on 127.0.0.1, a key it accepts, and a
Python there that has the `job` extra. Each failure is one UserError that says how to fix it, before
anything is bundled or recorded, instead of a connect timeout minutes later.
"""

from __future__ import annotations

import getpass
import shlex
import socket
from pathlib import Path

from ftplan.planner.errors import UserError

JOB_MODULES = ("torch", "transformers", "peft", "accelerate")
_KEYGEN = ("ssh-keygen -t ed25519 -N '' -f ~/.ssh/id_ed25519 && cat ~/.ssh/id_ed25519.pub >> "
           "~/.ssh/authorized_keys")


def check_local_demo(port: int = 22, identity: Path | str | None = None, remote_python: str | None = None,
                     user: str | None = None, timeout_s: float = 5.0) -> None:
    """Raise UserError naming the first missing requirement of a local launch; return when all are met."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
            pass
    except OSError:
        raise UserError(
            f"--provider local needs an SSH server on 127.0.0.1:{port} and nothing answers there; start one "
            "(Debian/Ubuntu: sudo apt-get install -y openssh-server && sudo service ssh start) or pass "
            "--ssh-port PORT of the one you run") from None
    if identity is None:
        raise UserError(f"--provider local logs in with a key you already authorized; pass --identity KEY "
                        f"(none yet? {_KEYGEN})")
    key = Path(identity).expanduser()
    if not key.is_file():
        raise UserError(f"--identity {key}: no such key file (create one: {_KEYGEN})")
    missing = _missing_job_modules(port, key, remote_python, user or getpass.getuser(), timeout_s)
    if missing:
        where = remote_python or "python3"
        raise UserError(
            f"{where} on 127.0.0.1 cannot import {', '.join(missing)} (the job extra); install it there "
            f"({where} -m pip install 'ftplan[job]', CPU torch first: pip install torch) or pass "
            "--remote-python of a Python that has it")


def _missing_job_modules(port: int, key: Path, remote_python: str | None, user: str,
                         timeout_s: float) -> list[str]:
    """Log in as the launcher will, and ask the job's Python which of the job's modules it cannot find.

    Without --remote-python the launcher builds its own venv there, so only the login is checked."""
    import paramiko

    from ftplan.providers.errors import scrub

    client = paramiko.SSHClient()
    # Loopback only, nothing sent but a probe: the launcher itself pins the host key on first contact.
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        client.connect("127.0.0.1", port, username=user, key_filename=str(key), timeout=timeout_s,
                       banner_timeout=timeout_s, auth_timeout=timeout_s, allow_agent=False, look_for_keys=False)
    except paramiko.AuthenticationException:
        raise UserError(f"sshd on 127.0.0.1:{port} refused the key {key} for {user}; authorize it: "
                        f"cat {key}.pub >> ~/.ssh/authorized_keys") from None
    except (OSError, paramiko.SSHException) as exc:
        raise UserError(f"cannot log in to 127.0.0.1:{port} with {key}: {scrub(str(exc))}; check that it is an "
                        "SSH server and that the key is a private key") from None
    try:
        if not remote_python:
            return []
        probe = f"import importlib.util as u; print(' '.join(m for m in {JOB_MODULES!r} if u.find_spec(m) is None))"
        _, stdout, stderr = client.exec_command(f"{shlex.quote(remote_python)} -c {shlex.quote(probe)}",
                                                timeout=60)
        out = stdout.read().decode(errors="replace").strip()
        if stdout.channel.recv_exit_status() != 0:
            raise UserError(f"--remote-python {remote_python} does not run on 127.0.0.1 "
                            f"({scrub(stderr.read().decode(errors='replace').strip())[:160]}); pass the path of a "
                            "Python that exists there")
        return out.split()
    finally:
        client.close()
