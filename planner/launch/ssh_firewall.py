"""Letting you back in: move a run's SSH firewall rule to this machine's current egress address.

AWS and GCP runs open port 22 to one source range only (the launcher's public /32 at create time, or the
configured `ssh_cidr`). After a network change (a laptop on another Wi-Fi, a VPN switched on) the rule
keeps you out: packets are dropped, so SSH times out instead of saying why. `ftplan attach` checks that
case before it takes a run over: when sshd does not answer and this machine's address is outside the
rule, it asks (or takes `--update-firewall`) and then calls the adapter's `allow_ssh_from`, which adds the
new range before it revokes the old one. Without consent nothing changes and nothing is torn down.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from ftplan.planner.errors import UserError

FIREWALLED_PROVIDERS = ("aws", "gcp")  # adapters with a per-run ingress rule (allow_ssh_from)


def sshd_answers(host: str, port: int, timeout_s: float = 8.0) -> bool:
    """True when something at host:port sends an SSH banner within `timeout_s` (a dropped SYN, a reset or
    a silent relay all count as no)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def outside(address: str, cidr: str) -> bool:
    """Whether `address` falls outside the rule's `cidr` (a different IP family counts as outside)."""
    try:
        return ipaddress.ip_address(address) not in ipaddress.ip_network(cidr, strict=False)
    except (ValueError, TypeError):
        return True


def reopen_if_moved(provider: Any, inst: Any, *, update_firewall: bool | None,
                    confirm: Callable[[str], bool] | None = None,
                    probe: Callable[[str, int], bool] = sshd_answers,
                    note: Callable[[str, dict[str, Any]], None] | None = None,
                    wanted_cidr: str | None = None) -> str | None:
    """Before reconnecting to `inst`: if sshd does not answer and this machine's egress address moved out
    of the instance's rule, replace the rule (consent: `update_firewall=True`, or `confirm(question)` when
    it is None). Returns the new source range, or None when nothing needed changing.

    Raises UserError (nothing changed, nothing torn down) when the rule keeps this machine out and the
    user did not agree; the message says how to agree."""
    from ftplan.providers.net import ssh_cidr_for, validate_cidr

    rule = (getattr(inst, "extra", None) or {}).get("ssh_cidr")
    endpoint = getattr(inst, "ssh", None)
    if getattr(inst, "provider", "") not in FIREWALLED_PROVIDERS or not rule or endpoint is None:
        return None
    if probe(endpoint.host, endpoint.port):
        return None                              # reachable: the firewall is not in the way
    lookup = getattr(provider, "public_ip_lookup", None)
    if lookup is None:
        return None
    from ftplan.providers.errors import ProviderError

    try:
        here = lookup()
    except ProviderError:
        return None                              # cannot tell; the reconnect's own errors will say more
    if not outside(here, rule):
        return None                              # same network as at launch: something else is wrong
    new = validate_cidr(wanted_cidr) if wanted_cidr and not outside(here, wanted_cidr) else ssh_cidr_for(here)
    question = (f"{inst.provider} instance {inst.id} accepts SSH only from {rule}, and this machine now reaches "
                f"the internet as {here}. Replace the rule with {new}?")
    agreed = update_firewall if update_firewall is not None else bool(confirm and confirm(question))
    if not agreed:
        raise UserError(f"{inst.provider} instance {inst.id} accepts SSH only from {rule} and this machine is now "
                        f"{here}; rerun 'ftplan attach' with --update-firewall to allow {new} (the run keeps going "
                        "meanwhile; nothing was changed)")
    provider.allow_ssh_from(inst, new)
    if note is not None:
        note(f"ssh source moved from {rule} to {new}", {"old": rule, "new": new})
    return new
