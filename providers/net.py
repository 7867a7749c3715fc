"""The caller's public IP address, for firewall rules that open SSH to this machine only.

Cloud firewalls see the address after NAT, so the local interface address is useless here; we ask a
plain-text echo service. `FTPLAN_PUBLIC_IP` overrides the lookup (offline CI, VPNs, bastions).
"""

from __future__ import annotations

import ipaddress
import os

from ftplan.providers.errors import ProviderError

ECHO_URL = "https://checkip.amazonaws.com"
ENV_OVERRIDE = "FTPLAN_PUBLIC_IP"


def public_ip(url: str = ECHO_URL, timeout_s: float = 10.0) -> str:
    """Return this machine's public IPv4/IPv6 address as seen from the internet."""
    override = os.environ.get(ENV_OVERRIDE, "").strip()
    if override:
        return _validated(override, f"${ENV_OVERRIDE}")
    import httpx

    try:
        resp = httpx.get(url, timeout=timeout_s, follow_redirects=True)
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        raise ProviderError(
            f"could not look up this machine's public IP at {url} ({type(exc).__name__}); "
            f"set {ENV_OVERRIDE} or pass an explicit SSH CIDR"
        ) from None
    return _validated(resp.text.strip(), url)


def ssh_cidr_for(address: str) -> str:
    """A single-host CIDR for `address` (/32 for IPv4, /128 for IPv6)."""
    ip = ipaddress.ip_address(address)
    return f"{ip}/{32 if ip.version == 4 else 128}"


def validate_cidr(cidr: str) -> str:
    """Normalise a CIDR such as '203.0.113.7/32'; raise ProviderError on anything else."""
    try:
        return str(ipaddress.ip_network(cidr.strip(), strict=False))
    except ValueError:
        raise ProviderError(f"SSH source '{cidr}' is not a CIDR block such as 203.0.113.7/32") from None


def _validated(text: str, origin: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ProviderError(
            f"{origin} returned '{text[:60]}', which is not an IP address; set {ENV_OVERRIDE}"
        ) from None
