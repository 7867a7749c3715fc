"""AWS EC2 adapter (boto3, standard credential chain).

Per create: a key pair and a security group (tcp/22 from the caller's /32, or `ssh_cidr`), both named
`ftplan-<run>-<suffix>` and tagged `ftplan:run-id`; the newest Deep Learning AMI found by name;
`InstanceInitiatedShutdownBehavior=terminate` plus a user-data `shutdown -h +N`, so the instance ends its
own billing after `max_lifetime_s` even if the launcher dies. Teardown removes the key pair and group.
Multi-node runs (issue 13): `create_placement` makes a cluster placement group; each node is launched into it,
shares one key pair and security group named after it (which admits the group's own members on every port)
and gets an EFA interface where the type has one; see providers/aws_cluster.py.

Documented EC2 behaviour this adapter relies on (and handles):
- Eventual consistency. "If you run a command to modify or describe the resource that you just created, its
  ID might not have propagated throughout the system, and you will get an error responding that the resource
  does not exist"; after TerminateInstances a NotFound "does not mean that the instance is or will be
  terminated" (EC2 developer guide, "Eventual consistency in the Amazon EC2 API",
  https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html). botocore's own waiters encode
  it: InstanceExists/InstanceRunning retry on InvalidInstanceID.NotFound, SecurityGroupExists on
  InvalidGroup.NotFound, KeyPairExists on InvalidKeyPair.NotFound (botocore/data/ec2/2016-11-15/waiters-2.json).
  So within `consistency_window_s` of this process creating a resource (instance `extra["created_at"]`), a
  NotFound means "not visible yet" and is retried with backoff; `terminate` retries until EC2 acknowledges,
  and only a read-back showing shutting-down/terminated, or a NotFound after the window, counts as gone.
- Error codes (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html):
  Insufficient*Capacity -> CapacityError (next offer); InvalidInstanceType / Unsupported (type not offered in
  this region/zone) -> OfferUnavailable (next offer); VcpuLimitExceeded etc. -> QuotaError naming the quota;
  AuthFailure/UnauthorizedOperation -> AuthError naming the variables; OptInRequired / PendingVerification
  (account not yet able to launch) -> BillingError with the console page. Throttling (RequestLimitExceeded)
  and 5xx are retried by botocore's standard mode (https://docs.aws.amazon.com/sdkref/latest/guide/feature-retry-behavior.html).
- Images: the Base OSS DLAMI's release notes list supported_ec2_instances G4dn ... P6-B300 with driver 595,
  no P3 (https://docs.aws.amazon.com/dlami/latest/devguide/appendix-ami-release-notes.html); V100 (p3/p3dn)
  offers are refused unless an explicit image is given (see providers/gpu_support.py).
- Host keys: GetConsoleOutput carries cloud-init's SSH HOST KEY KEYS block (providers/host_keys.py).

Retries: botocore is limited to 2 attempts, because capacity errors are HTTP 500 and the launcher's
own failover (next offer) is the better retry. `ClientToken` keeps that one retry from doubling an instance.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from ftplan.providers.aws_cluster import PLACEMENT_TAG, AWSCluster, ended_at, safe_name
from ftplan.providers.aws_errors import NOT_VISIBLE_YET
from ftplan.providers.aws_errors import mapped as _mapped
from ftplan.providers.aws_side import AWSSideResources, _ssh_permission
from ftplan.providers.base import (
    RUN_TAG,
    STORE_TAG,
    Instance,
    InstanceRequest,
    InstanceState,
    Provider,
    SSHEndpoint,
)
from ftplan.providers.errors import (
    CapacityError,
    InstanceGone,
    OfferUnavailable,
    ProviderError,
    import_sdk,
    scrub,
)
from ftplan.providers.gpu_support import is_volta, refuse_non_cuda
from ftplan.providers.host_keys import from_console_output
from ftplan.providers.net import public_ip, ssh_cidr_for, validate_cidr

log = logging.getLogger("ftplan.providers.aws")

# Ubuntu DLAMI with the NVIDIA driver + CUDA; AWS publishes a new one every few weeks, so find it by name.
DLAMI_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"
AMAZON_OWNER = "amazon"
SSH_USER = "ubuntu"

_STATES = {
    "pending": InstanceState.PENDING,
    "running": InstanceState.RUNNING,
    "stopping": InstanceState.STOPPING,
    "stopped": InstanceState.STOPPED,
    "shutting-down": InstanceState.TERMINATING,
    "terminated": InstanceState.TERMINATED,
}
_ZONE_ID = re.compile(r"^[a-z]{2,5}\d+-az\d+\Z")
_PUBKEY = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,3}( [^\n]*)?\Z")


class AWSProvider(AWSCluster, AWSSideResources, Provider):
    """EC2 in one home region (others are reached through `InstanceRequest.region`)."""

    name = "aws"

    def __init__(
        self,
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        ssh_cidr: str | None = None,
        public_ip_lookup: Callable[[], str] | None = None,
        regions: list[str] | None = None,
        poll_interval_s: float = 5.0,
        teardown_wait_s: float = 300.0,
        consistency_window_s: float = 180.0,
        image: str | None = None,
    ):
        self.region = region
        self.image = image  # [providers.aws] image = "ami-..." or an AMI name pattern; default: the newest DLAMI
        self.endpoint_url = endpoint_url
        self.ssh_cidr = validate_cidr(ssh_cidr) if ssh_cidr else None
        self.public_ip_lookup = public_ip_lookup or public_ip
        self.regions = list(regions or [region])  # swept by list_instances
        self.poll_interval_s = poll_interval_s
        self.teardown_wait_s = teardown_wait_s
        # botocore's InstanceExists waiter: 40 x 5 s; a NotFound within this window is "not visible yet".
        self.consistency_window_s = consistency_window_s
        self._clients: dict[str, Any] = {}
        self._session = None

    # ---- the five calls -------------------------------------------------------------------------------

    def create(self, request: InstanceRequest) -> Instance:
        region = request.region or self.region
        ec2 = self._ec2(region)
        public_key = _validated_public_key(request.ssh_public_key)
        refuse_non_cuda(request.gpu, self.name)
        image = request.image or self.image
        if image is None and (is_volta(request.gpu) or request.instance_type.startswith(("p3.", "p3dn."))):
            raise OfferUnavailable(
                f"{request.instance_type} ({request.gpu}) is not supported by the current Deep Learning Base OSS AMI "
                "(its release notes list G4dn...P6, driver 595, no P3/V100); skipping this offer - give an image with "
                "a Volta-capable driver (NVIDIA 580 branch or older) as `image = \"ami-...\"` under [providers.aws] to launch it",
                provider=self.name,
            )
        group = (request.placement or {}).get("name")  # a node of a multi-node run (create_placement)
        base_name = group or f"ftplan-{safe_name(request.run_id)}-{secrets.token_hex(3)}"
        side: dict[str, Any] = {"key_name": None, "security_group_id": None}
        try:
            cidr = self._ssh_cidr(request)
            zone = self._zone_name(ec2, request.zone or (request.placement or {}).get("zone"))
            type_info = self._instance_type(ec2, request.instance_type)
            arch = "x86_64" if "x86_64" in type_info["ProcessorInfo"]["SupportedArchitectures"] else \
                type_info["ProcessorInfo"]["SupportedArchitectures"][0]
            image_id, root_device = self._image(ec2, image, arch)
            vpc_id = self._default_vpc(ec2, region)

            tags = [{"Key": RUN_TAG, "Value": request.run_id}, {"Key": "Name", "Value": base_name}]
            if request.store_id:
                tags.append({"Key": STORE_TAG, "Value": request.store_id})
            created_at = time.time()
            if group:
                # All nodes share one key pair and group; they stay when this create fails (other nodes may
                # be using them): delete_placement and `ftplan gc` remove them with the placement.
                shared = self._shared_access(ec2, group, public_key, cidr, vpc_id, tags, created_at, request.run_id)
                zone = zone or self._placement_zone(ec2, group)
            else:
                ec2.import_key_pair(
                    KeyName=base_name, PublicKeyMaterial=public_key.encode(),
                    TagSpecifications=[{"ResourceType": "key-pair", "Tags": tags}],
                )
                side["key_name"] = base_name
                sg = ec2.create_security_group(
                    GroupName=base_name, Description=f"ftplan run {request.run_id}: ssh from {cidr}", VpcId=vpc_id,
                    TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}],
                )
                side["security_group_id"] = sg["GroupId"]
                self._until_visible(created_at, "authorizing ssh on " + sg["GroupId"], lambda: (
                    ec2.authorize_security_group_ingress(GroupId=sg["GroupId"], IpPermissions=[_ssh_permission(cidr)])))
            sg_id = shared["security_group_id"] if group else side["security_group_id"]
            params: dict[str, Any] = {
                "ImageId": image_id,
                "InstanceType": request.instance_type,
                "MinCount": 1,
                "MaxCount": 1,
                "KeyName": base_name,
                "SecurityGroupIds": [sg_id],
                "InstanceInitiatedShutdownBehavior": "terminate",
                "UserData": _lifetime_user_data(request.max_lifetime_s),
                "MetadataOptions": {"HttpTokens": "required"},
                "BlockDeviceMappings": [{
                    "DeviceName": root_device,
                    "Ebs": {"VolumeSize": int(request.disk_gib), "VolumeType": "gp3", "DeleteOnTermination": True},
                }],
                "TagSpecifications": [
                    {"ResourceType": "instance", "Tags": tags + ([{"Key": PLACEMENT_TAG, "Value": group}] if group else [])},
                    {"ResourceType": "volume", "Tags": tags},
                ],
                # One token per call (a node of a placement is not its first node); botocore's retry reuses it.
                "ClientToken": f"{base_name}-{secrets.token_hex(3)}" if group else base_name,
            }
            efa = self._efa_interface(ec2, type_info, zone, sg_id) if group else None
            if efa:
                params.pop("SecurityGroupIds")  # EC2: groups go on the interface when NetworkInterfaces is given
                params["NetworkInterfaces"], zone = [efa[0]], efa[1]
            if zone or group:
                params["Placement"] = {**({"GroupName": group} if group else {}), **({"AvailabilityZone": zone} if zone else {})}
            if request.spot:
                params["InstanceMarketOptions"] = {
                    "MarketType": "spot",
                    "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
                }
            # The just-made key pair and group may not be visible to RunInstances yet; ClientToken makes the
            # retry idempotent (the same token never launches a second instance).
            raw = self._until_visible(created_at, "launching " + request.instance_type,
                                      lambda: ec2.run_instances(**params))["Instances"][0]
        except BaseException as exc:
            # Half-made runs leave nothing behind: key pairs and groups are free, but they clutter the account.
            self._delete_side_resources(ec2, side, instance_id=None, wait_s=0)  # nothing here for a shared node
            raise _mapped(exc, f"creating {request.instance_type} in {region}") from None
        instance = Instance(
            provider=self.name, id=raw["InstanceId"], run_id=request.run_id, region=region,
            zone=raw.get("Placement", {}).get("AvailabilityZone") or zone, instance_type=request.instance_type,
            spot=request.spot,
            extra={**side, **(shared if group else {}), "ssh_cidr": cidr, "image_id": image_id,
                   "created_at": round(time.time(), 3), **({"efa": True} if efa else {})},
        )
        _apply(instance, raw)
        log.info("created %s (%s) in %s for run %s", instance.id, instance.instance_type, instance.zone,
                 scrub(instance.run_id))
        return instance

    def wait_ready(self, instance: Instance, timeout_s: float) -> SSHEndpoint:
        ec2 = self._ec2(instance.region)
        deadline = time.monotonic() + timeout_s
        unseen = 0
        while True:
            raw = self._describe_raw(ec2, instance.id)
            if raw is None:
                if not self._fresh(instance):
                    instance.state = InstanceState.TERMINATED
                    raise InstanceGone(f"instance {instance.id} no longer exists", provider=self.name)
                unseen += 1  # created moments ago: not visible yet (eventual consistency), keep asking
                log.info("instance %s not visible yet (try %d); retrying", instance.id, unseen)
            else:
                _apply(instance, raw)
                if instance.state is InstanceState.RUNNING and instance.public_ip:
                    instance.ssh = SSHEndpoint(host=instance.public_ip, port=22, user=SSH_USER)
                    return instance.ssh
                if instance.state.is_gone or instance.state is InstanceState.STOPPED:
                    reason = raw.get("StateReason", {})
                    text = f"instance {instance.id} is {raw['State']['Name']}: {reason.get('Message', 'no reason given')}"
                    if "Capacity" in reason.get("Code", "") or "Capacity" in reason.get("Message", ""):
                        raise CapacityError(text, provider=self.name)
                    raise InstanceGone(text, provider=self.name)
            left = deadline - time.monotonic()
            if left <= 0:
                if raw is None:
                    what = "is still not visible to DescribeInstances"
                elif instance.public_ip is None and instance.state is InstanceState.RUNNING:
                    what = "has no public IP (does the default subnet assign one?)"
                else:
                    what = f"is still {raw['State']['Name']}"
                raise ProviderError(f"instance {instance.id} {what} after {timeout_s:.0f}s", provider=self.name)
            time.sleep(min(self._backoff(unseen) if raw is None else self.poll_interval_s, left))

    def describe(self, instance: Instance) -> Instance:
        raw = self._describe_raw(self._ec2(instance.region), instance.id)
        if raw is None:
            if not self._fresh(instance):  # a fresh instance keeps its state: not visible yet is not gone
                instance.state = InstanceState.TERMINATED
        else:
            _apply(instance, raw)
        return instance

    def terminate(self, instance: Instance) -> None:
        ec2 = self._ec2(instance.region)
        attempt = 0
        while True:  # until EC2 acknowledges; a NotFound for a fresh instance is "not visible yet"
            try:
                ec2.terminate_instances(InstanceIds=[instance.id])
                break
            except Exception as exc:
                mapped = _mapped(exc, f"terminating {instance.id}")
                if not isinstance(mapped, InstanceGone):
                    raise mapped from None
                if not self._fresh(instance):
                    break  # long after creation: NotFound means it is gone; the read-back decides
                log.info("terminate: %s not visible yet (try %d); retrying", instance.id, attempt + 1)
            time.sleep(self._backoff(attempt))
            attempt += 1
        ack_deadline = time.monotonic() + max(self.poll_interval_s, min(self.consistency_window_s, 60.0))
        attempt = 0
        while True:  # read back: only the provider's word counts
            raw = self._describe_raw(ec2, instance.id)
            if raw is None and not self._fresh(instance):
                instance.state = InstanceState.TERMINATED
                break
            if raw is not None:
                _apply(instance, raw)
                if instance.state.is_gone:
                    break
            if time.monotonic() >= ack_deadline:
                now = "not visible" if raw is None else f"still {raw['State']['Name']}"
                raise ProviderError(
                    f"instance {instance.id} is {now} after terminate; check the EC2 console and run `ftplan gc`",
                    provider=self.name,
                )
            time.sleep(self._backoff(attempt))
            attempt += 1
        log.info("terminated %s (%s)", instance.id, instance.state.value)
        group = instance.extra.get("placement_group")
        if group and self._placement_busy(ec2, group, exclude=instance.id):
            log.info("security group and key pair of %s stay for its other nodes", group)
            return
        self._delete_side_resources(ec2, instance.extra, instance_id=instance.id, wait_s=self.teardown_wait_s)

    def list_instances(self, run_id: str | None = None) -> list[Instance]:
        tag_filter = {"Name": f"tag:{RUN_TAG}", "Values": [run_id]} if run_id else {"Name": "tag-key", "Values": [RUN_TAG]}
        live = {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}
        found: list[Instance] = []
        for region in self.regions:
            ec2 = self._ec2(region)
            try:
                pages = ec2.get_paginator("describe_instances").paginate(Filters=[tag_filter, live])
                raws = [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
            except Exception as exc:
                raise _mapped(exc, f"listing instances in {region}") from None
            for raw in raws:
                tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
                # With an EFA interface the groups are the interface's (EC2 lists them on the instance too).
                attached = raw.get("SecurityGroups") or [g for n in raw.get("NetworkInterfaces", []) for g in n.get("Groups", [])]
                groups = [g["GroupId"] for g in attached if g.get("GroupName", "").startswith("ftplan-")]
                group = raw.get("Placement", {}).get("GroupName") or tags.get(PLACEMENT_TAG)
                inst = Instance(
                    provider=self.name, id=raw["InstanceId"], run_id=tags.get(RUN_TAG, ""), region=region,
                    zone=raw.get("Placement", {}).get("AvailabilityZone"), instance_type=raw.get("InstanceType", ""),
                    spot=raw.get("InstanceLifecycle") == "spot",
                    extra={"key_name": raw.get("KeyName"), "security_group_id": groups[0] if groups else None,
                           **({"placement_group": group} if group else {})},
                    store_id=tags.get(STORE_TAG, ""),
                )
                _apply(inst, raw)
                found.append(inst)
        return found

    # ---- host keys and the ssh rule (issue 22) --------------------------------------------------------

    def published_host_keys(self, instance: Instance) -> list[str] | None:
        """cloud-init's host key block from the serial console; None until cloud-init has printed it."""
        try:
            out = self._ec2(instance.region).get_console_output(InstanceId=instance.id)
        except Exception as exc:
            mapped = _mapped(exc, f"reading the console of {instance.id}")
            if isinstance(mapped, InstanceGone):
                return None  # not visible yet, or gone: either way nothing published
            raise mapped from None
        return from_console_output(out.get("Output") or "")

    # ---- helpers --------------------------------------------------------------------------------------

    def _fresh(self, instance: Instance) -> bool:
        """Created by this adapter less than `consistency_window_s` ago (wall clock: survives a restart)."""
        created = instance.extra.get("created_at")
        return isinstance(created, (int, float)) and time.time() - created < self.consistency_window_s

    def _backoff(self, attempt: int) -> float:
        return min(self.poll_interval_s * (2 ** min(attempt, 10)), 15.0)

    def _until_visible(self, created_at: float, doing: str, call: Callable[[], Any]) -> Any:
        """Run `call`, retrying with backoff while EC2 says a resource made since `created_at` does not exist."""
        from botocore.exceptions import ClientError

        attempt = 0
        while True:
            try:
                return call()
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code not in NOT_VISIBLE_YET or time.time() - created_at >= self.consistency_window_s:
                    raise
                log.info("%s: %s right after creating it (eventual consistency); retrying", doing, code)
            time.sleep(self._backoff(attempt))
            attempt += 1

    def _ec2(self, region: str):
        if region not in self._clients:
            boto3 = import_sdk("boto3", "AWS", "aws")
            config_cls = import_sdk("botocore.config", "AWS", "aws", "boto3").Config
            if self._session is None:
                self._session = boto3.session.Session()
            config = config_cls(
                retries={"mode": "standard", "total_max_attempts": 2}, connect_timeout=10, read_timeout=60,
                user_agent_extra="ftplan",
            )
            try:
                self._clients[region] = self._session.client(
                    "ec2", region_name=region, endpoint_url=self.endpoint_url, config=config
                )
            except Exception as exc:
                raise _mapped(exc, "building the EC2 client") from None
        return self._clients[region]

    def _ssh_cidr(self, request: InstanceRequest) -> str:
        if request.ssh_cidr:
            return validate_cidr(request.ssh_cidr)
        if self.ssh_cidr:
            return self.ssh_cidr
        return ssh_cidr_for(self.public_ip_lookup())

    def _zone_name(self, ec2, zone: str | None) -> str | None:
        """Catalogs name AWS zones by id (`use1-az4`, the same physical zone in every account); EC2 wants
        this account's name for it (`us-east-1b`)."""
        if not zone or not _ZONE_ID.match(zone):
            return zone
        zones = ec2.describe_availability_zones(ZoneIds=[zone])["AvailabilityZones"]
        if not zones:
            raise CapacityError(f"zone id {zone} is not available to this account", provider=self.name)
        return zones[0]["ZoneName"]

    def _instance_type(self, ec2, instance_type: str) -> dict[str, Any]:
        """DescribeInstanceTypes' record: architectures, and NetworkInfo.EfaSupported / EfaInfo."""
        types = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
        if not types:
            raise OfferUnavailable(f"{instance_type} is not offered in {ec2.meta.region_name}", provider=self.name)
        return types[0]

    def _image(self, ec2, image: str | None, arch: str) -> tuple[str, str]:
        if image and image.startswith("ami-"):
            images = ec2.describe_images(ImageIds=[image])["Images"]
        else:
            images = ec2.describe_images(
                Owners=[AMAZON_OWNER],
                Filters=[
                    {"Name": "name", "Values": [image or DLAMI_NAME]},
                    {"Name": "state", "Values": ["available"]},
                    {"Name": "architecture", "Values": [arch]},
                ],
            )["Images"]
        if not images:
            raise ProviderError(
                f"no {arch} AMI named '{image or DLAMI_NAME}' in region {ec2.meta.region_name}; "
                "pass an explicit image (ami-...)", provider=self.name,
            )
        newest = max(images, key=lambda i: i.get("CreationDate", ""))
        return newest["ImageId"], newest.get("RootDeviceName") or "/dev/sda1"

    def _default_vpc(self, ec2, region: str) -> str:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise ProviderError(
                f"region {region} has no default VPC; create one with `aws ec2 create-default-vpc --region {region}`",
                provider=self.name,
            )
        return vpcs[0]["VpcId"]

    def _describe_raw(self, ec2, instance_id: str) -> dict[str, Any] | None:
        try:
            reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        except Exception as exc:
            mapped = _mapped(exc, f"describing {instance_id}")
            if isinstance(mapped, InstanceGone):
                return None
            raise mapped from None
        instances = [i for r in reservations for i in r["Instances"]]
        return instances[0] if instances else None

def _apply(instance: Instance, raw: dict[str, Any]) -> None:
    """Copy EC2's view (state, addresses, lifetime) onto `instance`."""
    instance.state = instance_state(raw)
    instance.public_ip = raw.get("PublicIpAddress")
    instance.private_ip = raw.get("PrivateIpAddress") or instance.private_ip
    launched = raw.get("LaunchTime")
    if launched is not None and hasattr(launched, "timestamp"):
        instance.launched_at = launched.timestamp()
    if instance.state.is_gone:
        instance.ended_at = ended_at(raw) or instance.ended_at
    if instance.public_ip is None:
        instance.ssh = None


def instance_state(raw: dict[str, Any]) -> InstanceState:
    """EC2 state -> ftplan state; a spot instance reclaimed by AWS is PREEMPTED, not TERMINATED."""
    state = _STATES.get(raw.get("State", {}).get("Name", ""), InstanceState.UNKNOWN)
    reason = raw.get("StateReason", {}).get("Code", "")
    if state.is_gone and reason == "Server.SpotInstanceTermination":
        return InstanceState.PREEMPTED
    return state


def _validated_public_key(key: str) -> str:
    # EC2 answers garbage key material with an opaque error (moto: an HTML 500); catch it here.
    key = key.strip()
    if not _PUBKEY.match(key):
        raise ProviderError("the SSH public key is not in OpenSSH format ('ssh-ed25519 AAAA...')", provider="aws")
    return key


def _lifetime_user_data(max_lifetime_s: int) -> str:
    """A hard money cap that needs no launcher: with shutdown behaviour `terminate`, halting ends billing."""
    minutes = max(1, math.ceil(max_lifetime_s / 60))
    return f"#!/bin/bash\n# ftplan: maximum lifetime\nshutdown -h +{minutes} 'ftplan maximum lifetime reached'\n"
