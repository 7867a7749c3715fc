"""Multi-node runs on Compute Engine (issue 13): a compact placement policy per launch attempt and a firewall
rule that lets the nodes reach each other. A mixin of `GCPProvider` (which supplies `_clients`, `_wait_op`,
`_mapped`, `_delete_firewall`, `project`, `zone`, `op_timeout_s`, `poll_interval_s`).

Documented Compute Engine behaviour relied on (cloud.google.com/compute/docs/instances/use-compact-placement-policies):
- A compact placement policy is a regional `resourcePolicies` resource with
  `groupPlacementPolicy.collocation = COLLOCATED` (and `vmCount`, the exact number of VMs it will hold); a VM
  joins it through `resourcePolicies = [policy URL]` at insert, in a zone of the policy's region, and the VMs
  must stop on host maintenance (`onHostMaintenance = TERMINATE`, which GPU VMs use anyway).
- A policy that a VM still uses cannot be deleted (error reason `resourceInUseByAnotherResource`).
- Resource policies carry no labels: the run and store ids live in the description, like the firewall rules'.
- VMs of one VPC network reach each other only where a firewall rule allows it: the rule `<policy>-nodes`
  allows every protocol from the network tag `<policy>` to the same tag, and each node carries that tag.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from ftplan.providers.errors import InstanceGone, ProviderError, scrub

log = logging.getLogger("ftplan.providers.gcp")

PLACEMENT_LABEL = "ftplan-placement"   # on each node: the policy (and network tag) of its run
_READ_TIMEOUT_S = 60.0
_DESCRIPTION = re.compile(r"ftplan run (\S+)(?: \(store (\S*)\))?: ")


def _leaving(status: object) -> bool:
    from ftplan.providers.gcp import _status_name

    return _status_name(status) in ("STOPPING", "PENDING_STOP", "DEPROVISIONING", "TERMINATED", "STOPPED")


class PlacementInUse(ProviderError):
    """Compute refuses to delete a resource policy a VM still uses."""


class GCPCluster:
    name = "gcp"
    multinode = "compact placement policy"
    project: str | None
    zone: str | None
    op_timeout_s: float
    poll_interval_s: float

    def create_placement(self, run_id: str, region: str, zone: str | None, nodes: int, *,
                         store_id: str = "") -> dict[str, Any]:
        from ftplan.providers.gcp import label_value

        c = self._clients()
        cv = c["compute_v1"]
        zone = zone or self.zone
        region = region or (zone.rsplit("-", 1)[0] if zone else "")
        if not region:
            raise ProviderError("GCP needs a region for a placement policy: the offer has none", provider=self.name)
        name = f"ftplan-{label_value(run_id)[:40].strip('-_').replace('_', '-')}-{secrets.token_hex(3)}"
        body = cv.ResourcePolicy(
            name=name, description=f"ftplan run {run_id} (store {store_id}): compact placement of {nodes} nodes",
            group_placement_policy=cv.ResourcePolicyGroupPlacementPolicy(collocation="COLLOCATED", vm_count=int(nodes)))
        try:
            op = c["resource_policies"].insert(project=self.project, region=region, resource_policy_resource=body,
                                               timeout=_READ_TIMEOUT_S)
            self._wait_op(op.name, zone=None, region=region)
        except Exception as exc:
            raise self._mapped(exc, f"creating placement policy {name} in {region}") from None
        log.info("placement policy %s (%d nodes) in %s for run %s", name, nodes, region, scrub(run_id))
        return {"provider": self.name, "kind": "placement_policy", "id": name, "name": name, "run_id": run_id,
                "region": region, "zone": zone, "project": self.project, "nodes": int(nodes),
                "link": f"projects/{self.project}/regions/{region}/resourcePolicies/{name}"}

    def delete_placement(self, placement: dict[str, Any]) -> None:
        """The policy (once Compute has let go of its VMs: one being deleted is waited for, one that runs is
        not) and the nodes' firewall rule."""
        deadline = time.monotonic() + self.op_timeout_s
        while True:
            try:
                self.delete_side_resource(placement)
                break
            except PlacementInUse:
                if time.monotonic() >= deadline or self._placement_busy(placement["name"], exclude="",
                                                                        running_only=True):
                    raise
                time.sleep(self.poll_interval_s)
        self._delete_firewall(placement.get("project") or self.project, f"{placement['name']}-nodes")

    # ---- used by GCPProvider.create / terminate / the side-resource sweep -----------------------------

    def _nodes_firewall(self, placement: dict[str, Any], run_id: str) -> str:
        """Every protocol between the VMs tagged with the policy's name; made by whichever node comes first."""
        c = self._clients()
        cv = c["compute_v1"]
        tag, rule_name = placement["name"], f"{placement['name']}-nodes"
        rule = cv.Firewall(name=rule_name, network="global/networks/default", direction="INGRESS", priority=1000,
                           source_tags=[tag], target_tags=[tag], allowed=[cv.Allowed(I_p_protocol="all")],
                           description=f"ftplan run {run_id}: nodes of {tag} reach each other")
        try:
            op = c["firewalls"].insert(project=self.project, firewall_resource=rule, timeout=_READ_TIMEOUT_S)
            self._wait_op(op.name, zone=None)
        except Exception as exc:
            from google.api_core import exceptions as gx

            if not isinstance(exc, gx.Conflict):   # 409 alreadyExists: another node made it
                raise
        return rule_name

    def _placement_busy(self, placement_name: str, exclude: str, running_only: bool = False) -> bool:
        """Another node of the placement still exists (its firewall rule must stay), or with `running_only`
        one that is not on its way out; unknown counts as busy."""
        c = self._clients()
        req = c["compute_v1"].AggregatedListInstancesRequest(
            project=self.project, filter=f'labels.{PLACEMENT_LABEL} = "{placement_name}"')
        try:
            for _, scoped in c["instances"].aggregated_list(request=req, retry=None, timeout=_READ_TIMEOUT_S):
                if any(raw.name != exclude and not (running_only and _leaving(raw.status))
                       for raw in scoped.instances):
                    return True
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot tell whether other nodes of %s still exist: %s", placement_name, scrub(exc))
            return True
        return False

    def _placement_policies(self) -> list[dict[str, Any]]:
        """Resource policies named ftplan-* whose description says which run made them."""
        c = self._clients()
        req = c["compute_v1"].AggregatedListResourcePoliciesRequest(project=self.project, filter='name eq "ftplan-.*"')
        found = []
        try:
            for scope, scoped in c["resource_policies"].aggregated_list(request=req, retry=None,
                                                                        timeout=_READ_TIMEOUT_S):
                for policy in scoped.resource_policies:
                    m = _DESCRIPTION.match(policy.description or "")
                    if policy.name.startswith("ftplan-") and m:
                        region = scope.rsplit("/", 1)[-1]
                        found.append({"provider": self.name, "kind": "placement_policy", "id": policy.name,
                                      "name": policy.name, "run_id": m.group(1), "region": region,
                                      "project": self.project})
        except Exception as exc:
            raise self._mapped(exc, "listing resource policies") from None
        return found

    def _delete_policy(self, res: dict[str, Any]) -> None:
        from google.api_core import exceptions as gx

        project = res.get("project") or self.project
        c = self._clients()
        try:
            op = c["resource_policies"].delete(project=project, region=res["region"], resource_policy=res["name"],
                                               timeout=_READ_TIMEOUT_S)
            self._wait_op(op.name, zone=None, project=project, region=res["region"])
        except Exception as exc:
            in_use = "resourceInUseByAnotherResource" in str(exc) or "RESOURCE_IN_USE" in str(exc) or (
                isinstance(exc, gx.GoogleAPICallError)
                and any(e.get("reason") == "resourceInUseByAnotherResource" for e in (exc.errors or [])
                        if isinstance(e, dict)))
            if in_use:
                raise PlacementInUse(f"placement policy {res['name']} is still used by a VM; run 'ftplan gc --yes' "
                                     "again once its instances are deleted", provider=self.name) from None
            mapped = self._mapped(exc, f"deleting placement policy {res['name']}")
            if not isinstance(mapped, InstanceGone):  # 404: already gone
                raise mapped from None
