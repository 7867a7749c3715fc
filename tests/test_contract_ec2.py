"""Contract: every EC2 call the AWS adapter makes, over a whole run (create with EC2's consistency lag, spot,
IPv6 source, wait, console host keys, ssh rule update, terminate, gc listing and deletion), is validated
against EC2's own machine-readable definition: botocore's service model (ec2 2016-11-15), with
`botocore.validate.ParamValidator` for shapes and types, and the model's enums (which the validator skips).

The calls are captured with botocore's own event hook `provide-client-params.ec2.*` on the adapter's clients,
i.e. exactly the parameters the adapter handed to boto3."""

from __future__ import annotations

import pytest
import test_provider_aws as _aws
from botocore.validate import ParamValidator
from test_provider_aws import CALLER_IP, request

from ftplan.providers.aws import AWSProvider

moto_server, moto = _aws.moto_server, _aws.moto


def _enum_errors(shape, value, path: str) -> list[str]:
    if shape is None or value is None:
        return []
    if shape.type_name == "string" and getattr(shape, "enum", None):
        return [] if value in shape.enum else [f"{path}={value!r} not in {shape.enum}"]
    if shape.type_name == "structure" and isinstance(value, dict):
        return [e for k, v in value.items() for e in _enum_errors(shape.members.get(k), v, f"{path}.{k}")]
    if shape.type_name == "list" and isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _enum_errors(shape.member, v, f"{path}[{i}]")]
    if shape.type_name == "map" and isinstance(value, dict):
        return [e for k, v in value.items() for e in _enum_errors(shape.value, v, f"{path}[{k}]")]
    return []


@pytest.fixture
def captured(moto):
    provider = AWSProvider(region="us-east-1", endpoint_url=moto.url, public_ip_lookup=lambda: CALLER_IP,
                           poll_interval_s=0.01, teardown_wait_s=2)
    calls: list[tuple[str, dict, object]] = []

    def capture(params, model, **_):
        calls.append((model.name, dict(params), model))

    provider._ec2("us-east-1").meta.events.register("provide-client-params.ec2", capture)
    return provider, calls


def test_every_ec2_call_of_a_whole_run_validates_against_botocores_model(captured, moto):
    provider, calls = captured
    moto.lag("RunInstances", DescribeInstances=1, TerminateInstances=1)
    moto.lag("CreateSecurityGroup", AuthorizeSecurityGroupIngress=1)
    inst = provider.create(request(spot=True))
    provider.wait_ready(inst, timeout_s=30)
    provider.describe(inst)
    provider.published_host_keys(inst)
    provider.allow_ssh_from(inst, "2001:db8::/48")
    provider.allow_ssh_from(inst, "198.51.100.0/24")
    provider.list_instances("r-7f3a9c")
    provider.terminate(inst)
    leftover = provider.create(request(run_id="r-second", zone=None))
    for res in provider.list_side_resources():
        if res["run_id"] == "r-second":
            try:
                provider.delete_side_resource(res)
            except Exception:  # noqa: BLE001 - the group is in use until the instance goes; only shapes matter
                pass
    provider.terminate(leftover)

    validator = ParamValidator()
    problems = []
    for name, params, model in calls:
        report = validator.validate(params, model.input_shape)
        if report.has_errors():
            problems.append(f"{name}: {report.generate_report()}")
        problems += [f"{name}: {e}" for e in _enum_errors(model.input_shape, params, name)]
    operations = {name for name, _, _ in calls}
    assert problems == []
    # The run really exercised the calls that matter (including the retried ones and the ssh rule update).
    assert {"ImportKeyPair", "CreateSecurityGroup", "AuthorizeSecurityGroupIngress", "RunInstances",
            "DescribeInstances", "TerminateInstances", "GetConsoleOutput", "RevokeSecurityGroupIngress",
            "DescribeSecurityGroups", "DeleteSecurityGroup", "DeleteKeyPair", "DescribeKeyPairs",
            "DescribeInstanceTypes", "DescribeImages", "DescribeVpcs"} <= operations
    assert sum(1 for n, _, _ in calls if n == "AuthorizeSecurityGroupIngress") >= 3


def test_the_validator_would_catch_a_malformed_call():
    """The check above can fail: the same validator rejects an IPv6 source put where EC2 wants IPv4 names."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("ec2").operation_model("AuthorizeSecurityGroupIngress")
    bad = {"GroupId": "sg-1", "IpPermissions": [{"IpProtocol": "tcp", "FromPort": "22",
                                                  "Ipv6Ranges": [{"CidrIp": "2001:db8::/48"}]}]}
    assert ParamValidator().validate(bad, model.input_shape).has_errors()
    spot = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    assert _enum_errors(spot.input_shape, {"InstanceMarketOptions": {"MarketType": "spot-ish"}}, "RunInstances")
