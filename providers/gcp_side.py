"""Firewall rules (and placement policies, gcp_cluster.py) an interrupted GCP create leaves behind, for `ftplan gc`. A mixin of `GCPProvider`, which
supplies `_clients()`, `_wait_op()`, `_mapped()` and `project`."""

from __future__ import annotations

import logging
import re
from typing import Any

from ftplan.providers.errors import AuthError, InstanceGone, ProviderError, scrub

_READ_TIMEOUT_S = 60.0


class GCPSideResources:
    name = "gcp"
    project: str | None

    # ---- side resources of an interrupted create (`ftplan gc`) ----------------------------------------

    def list_side_resources(self) -> list[dict[str, Any]]:
        """Firewall rules `ftplan-...-ssh` made by `create`. The rule is inserted before the VM, so a launcher
        killed in between leaves it with no instance whose `terminate` would delete it. Firewall rules take no
        labels: the run id is read from the description `create` writes ("ftplan run <id>: ssh from ...")."""
        c = self._clients()
        req = c["compute_v1"].ListFirewallsRequest(project=self.project, filter='name eq "ftplan-.*-(ssh|nodes)"')
        try:
            rules = list(c["firewalls"].list(request=req, retry=None, timeout=_READ_TIMEOUT_S))
        except Exception as exc:
            raise self._mapped(exc, "listing firewall rules") from None
        found: list[dict[str, Any]] = []
        for rule in rules:
            m = re.match(r"ftplan run (\S+): (ssh from |nodes of )", rule.description or "")
            if rule.name.startswith("ftplan-") and m:  # a rule someone else named ftplan-* is not ours
                found.append({"provider": self.name, "kind": "firewall", "id": rule.name, "name": rule.name,
                              "run_id": m.group(1), "project": self.project})
        try:
            policies = self._placement_policies()
        except AuthError as exc:  # a role without compute.resourcePolicies.list: policies are free, go on
            logging.getLogger("ftplan.providers.gcp").warning("placement policies not swept: %s", scrub(exc))
            policies = []
        return found + policies

    def delete_side_resource(self, res: dict[str, Any]) -> None:
        if res.get("kind") == "placement_policy":
            return self._delete_policy(res)
        if res.get("kind") != "firewall":
            raise ProviderError(f"unknown GCP side resource {res.get('kind')} {res.get('name')}", provider=self.name)
        project = res.get("project") or self.project
        try:
            op = self._clients()["firewalls"].delete(project=project, firewall=res["name"], timeout=_READ_TIMEOUT_S)
            self._wait_op(op.name, zone=None, project=project)
        except Exception as exc:
            mapped = self._mapped(exc, f"deleting firewall rule {res['name']}")
            if not isinstance(mapped, InstanceGone):  # 404: already gone
                raise mapped from None
