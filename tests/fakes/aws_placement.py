"""EC2 placement groups for the moto server: moto 5 answers CreatePlacementGroup with NotImplementedError.

Modelled from the EC2 API reference (CreatePlacementGroup / DescribePlacementGroups / DeletePlacementGroup,
shapes from botocore's ec2 service model) and the error list
(https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html):
- InvalidPlacementGroup.Duplicate: the name exists already in the region;
- InvalidPlacementGroup.Unknown: RunInstances or DeletePlacementGroup names a group that does not exist;
- InvalidPlacementGroup.InUse: DeletePlacementGroup while an instance launched into it is not terminated.
Which instances a group holds is read from the RunInstances answers (moto itself drops Placement.GroupName)
and their state from moto's backend, so a terminate through moto frees the group as on EC2.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

ACTIONS = {"CreatePlacementGroup", "DescribePlacementGroups", "DeletePlacementGroup"}
_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"


@dataclass
class Group:
    name: str
    group_id: str
    strategy: str
    region: str
    tags: dict[str, str]
    instances: set[str] = field(default_factory=set)


@dataclass
class PlacementGroups:
    groups: dict[tuple[str, str], Group] = field(default_factory=dict)   # (region, name)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(0x1000))

    def clear(self) -> None:
        self.groups.clear()

    # ---- the three actions: (status, code, message) on error, or (200, xml) ---------------------------

    def handle(self, action: str, region: str, params: dict[str, str]) -> tuple[int, str, str]:
        if action == "CreatePlacementGroup":
            return self._create(region, params)
        if action == "DescribePlacementGroups":
            return self._describe(region, params)
        return self._delete(region, params)

    def _create(self, region, params):
        name = params.get("GroupName", "")
        if (region, name) in self.groups:
            return 400, "InvalidPlacementGroup.Duplicate", f"The placement group '{name}' already exists."
        tags = {}
        for key, value in params.items():
            m = re.fullmatch(r"TagSpecification\.(\d+)\.Tag\.(\d+)\.Key", key)
            if m and params.get(f"TagSpecification.{m.group(1)}.ResourceType") == "placement-group":
                tags[value] = params.get(f"TagSpecification.{m.group(1)}.Tag.{m.group(2)}.Value", "")
        group = Group(name, f"pg-{next(self._ids):017x}", params.get("Strategy", "cluster"), region, tags)
        self.groups[(region, name)] = group
        return 200, "", _doc("CreatePlacementGroupResponse", f"<placementGroup>{_item(group)}</placementGroup>")

    def _describe(self, region, params):
        names = [v for k, v in params.items() if re.fullmatch(r"GroupName\.\d+", k)]
        filters = {}
        for key, fname in params.items():
            m = re.fullmatch(r"Filter\.(\d+)\.Name", key)
            if m:
                filters[fname] = [v for k, v in params.items() if re.fullmatch(rf"Filter\.{m.group(1)}\.Value\.\d+", k)]
        found = []
        for group in self.groups.values():
            if group.region != region or (names and group.name not in names):
                continue
            if all(_matches(group, fname, values) for fname, values in filters.items()):
                found.append(group)
        missing = [n for n in names if (region, n) not in self.groups]
        if missing:
            return 400, "InvalidPlacementGroup.Unknown", f"The Placement Group '{missing[0]}' is unknown."
        items = "".join(f"<item>{_item(g)}</item>" for g in found)
        return 200, "", _doc("DescribePlacementGroupsResponse", f"<placementGroupSet>{items}</placementGroupSet>")

    def _delete(self, region, params):
        name = params.get("GroupName", "")
        group = self.groups.get((region, name))
        if group is None:
            return 400, "InvalidPlacementGroup.Unknown", f"The Placement Group '{name}' is unknown."
        if any(state != "terminated" for state in instance_states(region, group.instances).values()):
            return 400, "InvalidPlacementGroup.InUse", f"The placement group '{name}' is in use and may not be deleted."
        del self.groups[(region, name)]
        return 200, "", _doc("DeletePlacementGroupResponse", "<return>true</return>")

    # ---- RunInstances ---------------------------------------------------------------------------------

    def refuse_launch(self, region: str, params: dict[str, str]) -> tuple[int, str, str] | None:
        name = params.get("Placement.GroupName")
        if name and (region, name) not in self.groups:
            return 400, "InvalidPlacementGroup.Unknown", f"The Placement Group '{name}' is unknown."
        return None

    def launched(self, region: str, params: dict[str, str], body: bytes) -> None:
        name = params.get("Placement.GroupName")
        if name and (region, name) in self.groups:
            ids = re.findall(rb"<instanceId>(i-[0-9a-f]+)</instanceId>", body)
            self.groups[(region, name)].instances.update(i.decode() for i in ids)


def region_of(authorization: str, default: str = "us-east-1") -> str:
    """The region of a SigV4 request: Credential=AKID/20261207/us-east-1/ec2/aws4_request."""
    m = re.search(r"Credential=[^/]+/\d{8}/([a-z0-9-]+)/", authorization or "")
    return m.group(1) if m else default


def instance_states(region: str, ids: set[str] | list[str]) -> dict[str, str]:
    """moto's state name of each instance (an instance moto no longer knows counts as terminated)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    backend = ec2_backends[DEFAULT_ACCOUNT_ID][region]
    states = {}
    for iid in ids:
        try:
            states[iid] = backend.get_instance(iid).state
        except Exception:  # noqa: BLE001 - moto forgot it (reset): gone
            states[iid] = "terminated"
    return states


def _matches(group: Group, name: str, values: list[str]) -> bool:
    if name == "tag-key":
        return any(v in group.tags for v in values)
    if name.startswith("tag:"):
        return group.tags.get(name[4:]) in values
    if name == "group-name":
        return group.name in values
    if name == "strategy":
        return group.strategy in values
    if name == "state":
        return "available" in values
    raise ValueError(f"fake placement groups do not understand filter {name!r}")


def _item(group: Group) -> str:
    tags = "".join(f"<item><key>{escape(k)}</key><value>{escape(v)}</value></item>" for k, v in group.tags.items())
    return (f"<groupName>{escape(group.name)}</groupName><state>available</state>"
            f"<strategy>{escape(group.strategy)}</strategy><groupId>{group.group_id}</groupId>"
            f"<tagSet>{tags}</tagSet>"
            f"<groupArn>arn:aws:ec2:{group.region}:123456789012:placement-group/{escape(group.name)}</groupArn>")


def _doc(root: str, inner: str) -> str:
    return (f'<?xml version="1.0" encoding="UTF-8"?><{root} xmlns="{_NS}">'
            f"<requestId>ftplan-placement-0001</requestId>{inner}</{root}>")
