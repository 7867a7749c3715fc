"""The AWS adapter's per-run side resources: the security group's ssh rule (and its later update), and the
key pairs / groups / placement groups an interrupted create (or run) leaves for `ftplan gc`. A mixin of `AWSProvider`, which supplies
`_ec2(region)`, `regions`, `region` and `poll_interval_s`."""

from __future__ import annotations

import logging
import time
from typing import Any

from ftplan.providers.aws_errors import mapped as _mapped
from ftplan.providers.base import RUN_TAG, Instance
from ftplan.providers.errors import AuthError, ProviderError, scrub
from ftplan.providers.net import validate_cidr

log = logging.getLogger("ftplan.providers.aws")


class AWSSideResources:
    name = "aws"
    region: str
    regions: list[str]
    poll_interval_s: float

    def _ec2(self, region: str) -> Any:  # pragma: no cover - provided by AWSProvider
        raise NotImplementedError

    def allow_ssh_from(self, instance: Instance, cidr: str) -> None:
        """Open port 22 of the run's security group to `cidr` first, then revoke the earlier sources, so
        there is no moment with no way in."""
        from botocore.exceptions import ClientError

        cidr = validate_cidr(cidr)
        sg_id = instance.extra.get("security_group_id")
        if not sg_id:
            raise ProviderError(f"instance {instance.id} has no ftplan security group to update", provider=self.name)
        ec2 = self._ec2(instance.region)
        try:
            group = ec2.describe_security_groups(GroupIds=[sg_id])["SecurityGroups"][0]
            try:
                ec2.authorize_security_group_ingress(GroupId=sg_id, IpPermissions=[_ssh_permission(cidr)])
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "InvalidPermission.Duplicate":
                    raise
            old = [p for p in group.get("IpPermissions", []) if p.get("FromPort") == 22 and p.get("ToPort") == 22]
            stale = []
            for perm in old:
                v4 = [r for r in perm.get("IpRanges", []) if r.get("CidrIp") != cidr]
                v6 = [r for r in perm.get("Ipv6Ranges", []) if r.get("CidrIpv6") != cidr]
                if v4 or v6:
                    stale.append({"IpProtocol": perm["IpProtocol"], "FromPort": 22, "ToPort": 22,
                                  **({"IpRanges": [{"CidrIp": r["CidrIp"]} for r in v4]} if v4 else {}),
                                  **({"Ipv6Ranges": [{"CidrIpv6": r["CidrIpv6"]} for r in v6]} if v6 else {})})
            if stale:
                ec2.revoke_security_group_ingress(GroupId=sg_id, IpPermissions=stale)
        except Exception as exc:
            raise _mapped(exc, f"updating ssh access of {sg_id}") from None
        instance.extra["ssh_cidr"] = cidr
        log.info("ssh to %s now allowed from %s", instance.id, cidr)

    def _delete_side_resources(self, ec2, side: dict[str, Any], instance_id: str | None, wait_s: float) -> None:
        """Best effort: a security group can only go once its instance is terminated, so wait for that."""
        from botocore.exceptions import BotoCoreError, ClientError

        sg_id = side.get("security_group_id")
        deadline = time.monotonic() + wait_s
        while sg_id:
            try:
                ec2.delete_security_group(GroupId=sg_id)
                break
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code == "InvalidGroup.NotFound":
                    break
                if code != "DependencyViolation" or time.monotonic() >= deadline:
                    log.warning("security group %s of instance %s left behind: %s", sg_id, instance_id, scrub(exc))
                    break
                time.sleep(min(self.poll_interval_s, max(0.0, deadline - time.monotonic())))
            except BotoCoreError as exc:
                log.warning("security group %s left behind: %s", sg_id, scrub(exc))
                break
        key_name = side.get("key_name")
        if key_name:
            try:
                ec2.delete_key_pair(KeyName=key_name)
            except (ClientError, BotoCoreError) as exc:
                log.warning("key pair %s left behind: %s", key_name, scrub(exc))

    # ---- side resources of an interrupted create (`ftplan gc`) ----------------------------------------

    def list_side_resources(self) -> list[dict[str, Any]]:
        """Key pairs and security groups tagged `ftplan:run-id` in every swept region. A launcher killed
        between `import_key_pair` and `run_instances` leaves them with no instance that would delete them."""
        tag = [{"Name": "tag-key", "Values": [RUN_TAG]}]
        found: list[dict[str, Any]] = []
        for region in self.regions:
            ec2 = self._ec2(region)
            try:
                pairs = ec2.describe_key_pairs(Filters=tag)["KeyPairs"]
                groups = [g for page in ec2.get_paginator("describe_security_groups").paginate(Filters=tag)
                          for g in page["SecurityGroups"]]
            except Exception as exc:
                raise _mapped(exc, f"listing key pairs and security groups in {region}") from None
            try:
                placements = ec2.describe_placement_groups(Filters=tag)["PlacementGroups"]  # multi-node runs
            except Exception as exc:
                mapped = _mapped(exc, f"listing placement groups in {region}")
                if not isinstance(mapped, AuthError):
                    raise mapped from None
                # A policy written before multi-node runs may lack ec2:DescribePlacementGroups; the groups are
                # free, so the sweep of what bills goes on without them.
                log.warning("placement groups not swept: %s", scrub(mapped))
                placements = []
            for kind, items, id_key, name_key in (("key_pair", pairs, "KeyPairId", "KeyName"),
                                                  ("security_group", groups, "GroupId", "GroupName"),
                                                  ("placement_group", placements, "GroupId", "GroupName")):
                for item in items:
                    tags = {t["Key"]: t["Value"] for t in item.get("Tags", [])}
                    found.append({"provider": self.name, "kind": kind, "id": item.get(id_key) or item[name_key],
                                  "name": item[name_key], "run_id": tags.get(RUN_TAG, ""), "region": region})
        return found

    def delete_side_resource(self, res: dict[str, Any]) -> None:
        from botocore.exceptions import ClientError

        ec2 = self._ec2(res.get("region") or self.region)
        what = f"{res.get('kind')} {res.get('name')}"
        try:
            if res.get("kind") == "key_pair":
                ec2.delete_key_pair(KeyName=res["name"])
            elif res.get("kind") == "security_group":
                ec2.delete_security_group(GroupId=res["id"])
            elif res.get("kind") == "placement_group":
                ec2.delete_placement_group(GroupName=res["name"])
            else:
                raise ProviderError(f"unknown AWS side resource {what}", provider=self.name)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("InvalidGroup.NotFound", "InvalidKeyPair.NotFound", "InvalidPlacementGroup.Unknown"):
                return  # already gone: what we wanted
            if code == "InvalidPlacementGroup.InUse":
                from ftplan.providers.aws_cluster import PlacementInUse

                raise PlacementInUse(f"{what} still holds instances; run 'ftplan gc --yes' again once they are "
                                     "terminated", provider=self.name) from None
            if code == "DependencyViolation":
                raise ProviderError(f"{what} is still used by an instance; run 'ftplan gc --yes' again once that "
                                    "instance is terminated", provider=self.name) from None
            raise _mapped(exc, f"deleting {what}") from None
        except ProviderError:
            raise
        except Exception as exc:
            raise _mapped(exc, f"deleting {what}") from None


def _ssh_permission(cidr: str) -> dict[str, Any]:
    """tcp/22 from `cidr`; EC2 wants IPv6 sources in Ipv6Ranges/CidrIpv6 (model shape IpPermission)."""
    if ":" in cidr:
        return {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                "Ipv6Ranges": [{"CidrIpv6": cidr, "Description": "ftplan ssh"}]}
    return {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
            "IpRanges": [{"CidrIp": cidr, "Description": "ftplan ssh"}]}
