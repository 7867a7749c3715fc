"""Multi-node runs on EC2 (issue 13): a cluster placement group per launch attempt, one security group and key
pair shared by its nodes, and an EFA interface where the instance type has one. A mixin of `AWSProvider`
(which supplies `_ec2`, `_zone_name`, `_delete_side_resources`, `_until_visible`, `region`, `poll_interval_s`,
`teardown_wait_s`).

Documented behaviour relied on (EC2 user guide, "Placement groups" and "Elastic Fabric Adapter"):
- A cluster placement group packs instances close together inside one Availability Zone; all nodes are
  launched with `Placement={"GroupName", "AvailabilityZone"}` of the same zone. A group can be deleted only
  once no instance in it is left (InvalidPlacementGroup.InUse until then).
- "To enable OS-bypass functionality, the EFA must be a member of a security group that allows all inbound and
  outbound traffic to and from the security group itself": the shared group gets an ingress and an egress rule
  with IpProtocol -1 and the group itself as source/destination, which is also what lets plain TCP (c10d
  rendezvous, NCCL sockets) between the nodes through.
- EFA is requested per network interface (`InterfaceType="efa"`); with NetworkInterfaces the security groups go
  on the interface (`Groups`), not `SecurityGroupIds`, and a public IPv4 address can be auto-assigned only when
  the instance has a single interface. So one EFA interface at DeviceIndex 0 keeps the node reachable over SSH;
  a p5's other 31 EFA interfaces would need an Elastic IP per node (what dstack does too) and are not added.
Not verifiable against moto 5 (which ignores InterfaceType and has no placement groups; tests/fakes/aws_placement.py
models the groups): that EC2 accepts this exact interface spec for each EFA type, and the EFA software stack on
the image (the Deep Learning Base OSS AMI ships it).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from ftplan.providers.aws_errors import mapped as _mapped
from ftplan.providers.base import RUN_TAG, STORE_TAG
from ftplan.providers.errors import ProviderError, scrub

log = logging.getLogger("ftplan.providers.aws")

PLACEMENT_TAG = "ftplan:placement"  # on each node: the placement group it was launched into
LIVE_STATES = ["pending", "running", "stopping", "stopped"]


class PlacementInUse(ProviderError):
    """EC2 refuses to delete a placement group that still holds an instance."""


class AWSCluster:
    name = "aws"
    multinode = "cluster placement group"
    region: str
    poll_interval_s: float
    teardown_wait_s: float

    def create_placement(self, run_id: str, region: str, zone: str | None, nodes: int, *,
                         store_id: str = "") -> dict[str, Any]:
        region = region or self.region
        ec2 = self._ec2(region)
        name = f"ftplan-{safe_name(run_id)}-{secrets.token_hex(3)}"
        tags = [{"Key": RUN_TAG, "Value": run_id}, {"Key": "Name", "Value": name}]
        if store_id:
            tags.append({"Key": STORE_TAG, "Value": store_id})
        try:
            zone_name = self._zone_name(ec2, zone)
            group = ec2.create_placement_group(
                GroupName=name, Strategy="cluster",
                TagSpecifications=[{"ResourceType": "placement-group", "Tags": tags}])["PlacementGroup"]
        except Exception as exc:
            raise _mapped(exc, f"creating placement group {name} in {region}") from None
        log.info("placement group %s (%d nodes) in %s for run %s", name, nodes, zone_name or region, scrub(run_id))
        return {"provider": self.name, "kind": "placement_group", "id": group.get("GroupId") or name, "name": name,
                "run_id": run_id, "region": region, "zone": zone_name, "nodes": int(nodes)}

    def delete_placement(self, placement: dict[str, Any]) -> None:
        """Delete the group once EC2 has let go of its instances (shutting-down ones still hold it), then the
        nodes' shared security group and key pair if the last node's terminate could not. A node that still
        runs is not waited for: the refusal is raised at once."""
        ec2 = self._ec2(placement.get("region") or self.region)
        deadline = time.monotonic() + self.teardown_wait_s
        while True:
            try:
                self.delete_side_resource(placement)
                break
            except PlacementInUse:
                if time.monotonic() >= deadline or self._placement_busy(ec2, placement["name"], exclude=""):
                    raise
                time.sleep(self.poll_interval_s)
        try:
            groups = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [placement["name"]]},
                                                           {"Name": "tag-key", "Values": [RUN_TAG]}])["SecurityGroups"]
        except Exception as exc:
            raise _mapped(exc, f"finding the security group of {placement['name']}") from None
        side = {"key_name": placement["name"], "security_group_id": groups[0]["GroupId"] if groups else None}
        self._delete_side_resources(ec2, side, instance_id=None, wait_s=self.teardown_wait_s)

    # ---- used by AWSProvider.create / terminate -------------------------------------------------------

    def _shared_access(self, ec2, name: str, public_key: str, cidr: str, vpc_id: str, tags: list[dict],
                       created_at: float, run_id: str) -> dict[str, Any]:
        """The key pair and security group every node of placement `name` uses, made by whichever node comes
        first (a concurrent or later node finds them by name): ssh from `cidr`, everything from the group."""
        from botocore.exceptions import ClientError

        def code(exc: ClientError) -> str:
            return exc.response.get("Error", {}).get("Code", "")

        try:
            ec2.import_key_pair(KeyName=name, PublicKeyMaterial=public_key.encode(),
                                TagSpecifications=[{"ResourceType": "key-pair", "Tags": tags}])
        except ClientError as exc:
            if code(exc) != "InvalidKeyPair.Duplicate":
                raise
        try:
            sg_id = ec2.create_security_group(
                GroupName=name, Description=f"ftplan run {run_id}: nodes of {name}, ssh from {cidr}", VpcId=vpc_id,
                TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}])["GroupId"]
        except ClientError as exc:
            if code(exc) != "InvalidGroup.Duplicate":
                raise
            sg_id = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]},
                                                          {"Name": "vpc-id", "Values": [vpc_id]}])["SecurityGroups"][0]["GroupId"]
        from ftplan.providers.aws_side import _ssh_permission

        for call, perm in ((ec2.authorize_security_group_ingress, _ssh_permission(cidr)),
                           (ec2.authorize_security_group_ingress, self_permission(sg_id)),
                           (ec2.authorize_security_group_egress, self_permission(sg_id))):
            try:
                self._until_visible(created_at, "authorizing " + sg_id,
                                    lambda c=call, p=perm: c(GroupId=sg_id, IpPermissions=[p]))
            except ClientError as exc:
                if code(exc) != "InvalidPermission.Duplicate":
                    raise
        return {"key_name": name, "security_group_id": sg_id, "placement_group": name}

    def _placement_zone(self, ec2, group: str) -> str | None:
        """The zone an earlier node of `group` landed in (a placement created without a zone)."""
        reservations = ec2.describe_instances(Filters=[{"Name": f"tag:{PLACEMENT_TAG}", "Values": [group]},
                                                       {"Name": "instance-state-name", "Values": LIVE_STATES}])
        zones = [i.get("Placement", {}).get("AvailabilityZone") for r in reservations["Reservations"]
                 for i in r["Instances"]]
        return next((z for z in zones if z), None)

    def _efa_interface(self, ec2, type_info: dict[str, Any], zone: str | None, sg_id: str) -> tuple[dict, str] | None:
        """(network interface spec, zone) for an EFA-capable type; None where the type has no EFA."""
        info = type_info.get("NetworkInfo", {})
        if not info.get("EfaSupported") or not info.get("EfaInfo", {}).get("MaximumEfaInterfaces"):
            return None
        if not zone:  # an interface needs a subnet, a subnet lives in one zone: take the first that sells the type
            offers = ec2.describe_instance_type_offerings(
                LocationType="availability-zone",
                Filters=[{"Name": "instance-type", "Values": [type_info["InstanceType"]]}])["InstanceTypeOfferings"]
            zone = min((o["Location"] for o in offers), default=None)
        subnets = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]},
                                                {"Name": "availability-zone", "Values": [zone or ""]}])["Subnets"]
        if not subnets:
            raise ProviderError(f"no default subnet in zone {zone} for the EFA interface of "
                                f"{type_info['InstanceType']}; create one with `aws ec2 create-default-subnet "
                                f"--availability-zone {zone}`", provider=self.name)
        return ({"DeviceIndex": 0, "NetworkCardIndex": 0, "InterfaceType": "efa", "Groups": [sg_id],
                 "SubnetId": subnets[0]["SubnetId"], "AssociatePublicIpAddress": True,
                 "DeleteOnTermination": True}, zone)

    def _placement_busy(self, ec2, group: str, exclude: str) -> bool:
        """Another node of `group` still runs (its shared security group must stay). Unknown counts as busy:
        `delete_placement` and `ftplan gc` delete what is left."""
        try:
            reservations = ec2.describe_instances(Filters=[{"Name": f"tag:{PLACEMENT_TAG}", "Values": [group]},
                                                           {"Name": "instance-state-name", "Values": LIVE_STATES}])
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot tell whether other nodes of %s still run: %s", group, scrub(exc))
            return True
        return any(i["InstanceId"] != exclude for r in reservations["Reservations"] for i in r["Instances"])


def self_permission(sg_id: str) -> dict[str, Any]:
    """Every protocol and port from (or to) the members of `sg_id` itself."""
    return {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg_id, "Description": "ftplan: nodes of one run"}]}


def safe_name(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", run_id).strip("-")[:40] or "run"


_TERMINATED_AT = re.compile(r"\((\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)(?:\.\d+)? ?(?:GMT|UTC|Z)?\)")


def ended_at(raw: dict[str, Any]) -> float | None:
    """EC2 reports when a user (or the instance's own shutdown) ended it only as text in StateTransitionReason:
    "User initiated (2016-05-23 17:27:52 GMT)"; None when that text is absent or says nothing parseable."""
    import calendar

    m = _TERMINATED_AT.search(raw.get("StateTransitionReason") or "")
    if not m:
        return None
    try:
        return float(calendar.timegm(time.strptime(f"{m.group(1)} {m.group(2)}", "%Y-%m-%d %H:%M:%S")))
    except ValueError:
        return None
