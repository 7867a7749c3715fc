"""Machines ftplan does not provision: `ssh` (bring your own: `--host user@host[:port] --identity KEY`, or
several `--host` for one multi-node run) and `local` (this machine over SSH on 127.0.0.1: on-premise GPUs, the
demo, end-to-end tests).

There is nothing to create or tear down: `create` returns the endpoint at once, `terminate` is a
successful no-op that never connects to the machine (the launcher's runner removes the run's own
processes and files), and `list_instances` is empty, so `ftplan gc` can never touch a machine
it does not own.
"""

from __future__ import annotations

import getpass
import ipaddress
import os
import re
from dataclasses import dataclass

from ftplan.providers.base import Instance, InstanceRequest, InstanceState, Provider, SSHEndpoint
from ftplan.providers.errors import ProviderError

_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")
_HOSTNAME = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
_EXAMPLE = "expected user@host[:port], e.g. ubuntu@10.0.0.5:22 or ubuntu@gpu-box"


class HostSpecError(ProviderError, ValueError):
    """A bad `--host` or `--identity`. The message is one line that says how to fix it; the CLI
    should turn it into a UserError (exit 2)."""


@dataclass(frozen=True)
class HostSpec:
    user: str
    host: str
    port: int = 22

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


def parse_host_spec(spec: str, default_user: str | None = None) -> HostSpec:
    """Parse `user@host[:port]` (`user@` optional: defaults to the local user; IPv6 as `[addr]`)."""
    text = (spec or "").strip()
    bad = f"invalid --host {spec!r}: {_EXAMPLE}"
    if not text or any(c.isspace() for c in text) or text.count("@") > 1:
        raise HostSpecError(bad, provider="ssh")
    user, _, rest = text.rpartition("@")
    if "@" in text and not user:
        raise HostSpecError(bad, provider="ssh")
    user = user or default_user or getpass.getuser()
    if not _USER.match(user):
        raise HostSpecError(f"invalid --host {spec!r}: user {user!r} is not a valid login name; {_EXAMPLE}",
                            provider="ssh")
    port_text = None
    if rest.startswith("["):  # [IPv6]:port
        host, sep, tail = rest[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise HostSpecError(bad, provider="ssh")
        port_text = tail[1:] if tail else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise HostSpecError(f"invalid --host {spec!r}: {host!r} is not an IPv6 address", provider="ssh") from None
    else:
        host, sep, port_text = rest.partition(":")
        port_text = port_text if sep else None
        if not _HOSTNAME.match(host):
            raise HostSpecError(f"invalid --host {spec!r}: {host!r} is not a host name or IP address; {_EXAMPLE}",
                                provider="ssh")
    port = 22
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise HostSpecError(f"invalid --host {spec!r}: port {port_text!r} must be a number from 1 to 65535",
                                provider="ssh")
        port = int(port_text)
    return HostSpec(user=user, host=host, port=port)


def check_identity(identity: str | os.PathLike | None) -> str | None:
    if identity is None:
        return None
    path = os.path.expanduser(os.fspath(identity))
    if not os.path.isfile(path):
        raise HostSpecError(f"--identity {path}: no such key file; pass the private key that logs in to the host",
                            provider="ssh")
    return os.path.abspath(path)


class SSHHostProvider(Provider):
    """Machines you already have. `identity` is the private key file (None: ssh-agent / default keys).

    `hosts` (several machines) makes one multi-node run: node k is `hosts[k]`, and the address the other
    nodes reach it on is the host as written (node 0's is the rendezvous address), so name the hosts as
    they see each other (a private address or a name their resolver knows)."""

    name = "ssh"
    region = "on-prem"

    def __init__(self, host: str | None = None, identity: str | os.PathLike | None = None,
                 hosts: list[str] | None = None):
        texts = list(hosts) if hosts else ([host] if host is not None else [])
        if not texts:
            raise HostSpecError("--provider ssh needs --host user@host[:port] (once per machine)", provider="ssh")
        if hosts and host and host not in texts:
            raise HostSpecError(f"[providers.ssh] has both host = {host!r} and hosts = [...]; keep one",
                                provider="ssh")
        self.specs = [parse_host_spec(text) for text in texts]
        seen: set[tuple[str, int]] = set()
        for spec in self.specs:
            if (spec.host, spec.port) in seen:
                raise HostSpecError(f"--host {spec} is given twice; each node of a run is its own machine",
                                    provider="ssh")
            seen.add((spec.host, spec.port))
        self.spec = self.specs[0]
        self.identity = check_identity(identity)
        # One job across several of your machines: the hosts themselves are the placement.
        self.multinode = "your own machines over ssh" if len(self.specs) > 1 else ""

    @staticmethod
    def _endpoint(spec: HostSpec) -> SSHEndpoint:
        return SSHEndpoint(host=spec.host, port=spec.port, user=spec.user)

    def create(self, request: InstanceRequest) -> Instance:
        if not 0 <= request.node_rank < len(self.specs):
            raise ProviderError(f"node {request.node_rank} of {request.nodes} has no machine: {len(self.specs)} "
                                "--host given; pass one --host per node", provider="ssh")
        spec = self.specs[request.node_rank]
        return Instance(
            provider=self.name, id=f"ssh:{spec}:{request.run_id}", run_id=request.run_id, region=self.region,
            instance_type=request.instance_type, state=InstanceState.RUNNING, public_ip=spec.host,
            private_ip=spec.host, ssh=self._endpoint(spec),
            extra={"identity": self.identity, "owned": False, "node_rank": request.node_rank},
        )

    def wait_ready(self, instance: Instance, timeout_s: float) -> SSHEndpoint:
        instance.ssh = instance.ssh or self._endpoint(self.spec)
        instance.state = InstanceState.RUNNING
        return instance.ssh

    def describe(self, instance: Instance) -> Instance:
        # The machine outlives the run; once the run released it, it stays released.
        if not instance.state.is_gone:
            instance.state = InstanceState.RUNNING
        return instance

    def terminate(self, instance: Instance) -> None:
        """Release the machine without touching it: it is not ours to shut down."""
        instance.state = InstanceState.TERMINATED

    def list_instances(self, run_id: str | None = None) -> list[Instance]:
        return []

    def create_placement(self, run_id: str, region: str, zone: str | None, nodes: int, *,
                         store_id: str = "") -> dict:
        """Nothing to create: the machines are where they are. Refused when fewer hosts than nodes were given."""
        if nodes > len(self.specs):
            raise ProviderError(f"{nodes} nodes need {nodes} --host; {len(self.specs)} given", provider="ssh")
        return {"provider": self.name, "kind": "hosts", "id": run_id, "name": ",".join(map(str, self.specs[:nodes])),
                "run_id": run_id, "region": self.region, "zone": None}

    def delete_placement(self, placement: dict) -> None:
        return None


class LocalProvider(SSHHostProvider):
    """This machine over SSH on 127.0.0.1 (so the launcher's code path is the same as for a cloud)."""

    name = "local"
    region = "local"

    def __init__(self, port: int = 22, user: str | None = None, identity: str | os.PathLike | None = None):
        user = user or getpass.getuser()
        super().__init__(f"{user}@127.0.0.1:{port}", identity)
