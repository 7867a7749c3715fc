"""What the launcher tells the SSH runner about one instance: whose host key to expect, how long a first boot
may take, and whether "connection refused" means "nothing will ever listen" (machines ftplan does not boot)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

UNBOOTED_PROVIDERS = ("local", "ssh")  # already running when we connect: no first boot to wait for
SALVAGE_S = 600.0  # the same on a machine that answers (a finished job's out/ may be large)


def first_boot_s(provider: str) -> float | None:
    """catalogs/provider_overheads.json `first_boot_s` of a provider, None when it has none."""
    from ftplan.catalogs import data_path

    try:
        raw = json.loads(data_path("provider_overheads.json").read_text())
        value = raw["providers"].get(provider, {}).get("first_boot_s")
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def host_key_alias(inst: Any) -> str:
    """The known_hosts name of an instance: its provider and id, so a replacement instance on a recycled
    ip:port gets a fresh pin instead of a 'host key changed' refusal (known_hosts names hold no spaces or commas)."""
    return re.sub(r"[\s,]", "_", f"{getattr(inst, 'provider', 'host')}/{getattr(inst, 'id', '?')}")


def runner_options(provider: Any, inst: Any, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Keyword arguments for SSHRunner describing `inst`."""
    name = getattr(inst, "provider", "")
    published = None
    lookup = getattr(provider, "published_host_keys", None)
    if lookup is not None:
        try:
            published = lookup(inst) or None
        except Exception as exc:  # noqa: BLE001 - no published keys: pin after the first login instead
            if log:
                log(f"could not read the host keys {name} published for {getattr(inst, 'id', '?')}: "
                    f"{type(exc).__name__}; pinning after the first login")
    return {"host_key_alias": host_key_alias(inst), "expected_host_keys": published,
            "refused_is_fatal": name in UNBOOTED_PROVIDERS, "first_boot_s": first_boot_s(name)}


def preflight_options(offer: Any) -> dict[str, Any]:
    """SSHRunner.preflight arguments for an offer: the GPUs nvidia-smi must list (none for CPU or unknown
    local/ssh machines) and whether to wait for cloud-init (not on machines ftplan did not boot)."""
    gpu = str(getattr(offer, "gpu", "") or "").lower()
    amd = gpu.startswith("mi") or "amd" in gpu or "radeon" in gpu  # no nvidia-smi there
    gpus = 0 if amd or gpu in ("", "cpu", "unknown", "none") else int(getattr(offer, "gpu_count", 0) or 0)
    unbooted = getattr(offer, "provider", "") in UNBOOTED_PROVIDERS
    return {"gpus": gpus, "cloud_init_s": 0 if unbooted else 600}
