"""When `ftplan attach` may touch the SSH rule, and when not (AWS adapter against moto's EC2 server).

The rule changes only when sshd does not answer AND this machine's address left the rule's range; a
machine that answers, or one unreachable for another reason, keeps its rule and nobody is asked.
"""

from __future__ import annotations

import pytest
from test_provider_aws import _session_ec2, ec2, moto, moto_server, request  # noqa: F401  (fixtures)

from ftplan.planner.errors import UserError
from ftplan.planner.launch.ssh_firewall import reopen_if_moved
from ftplan.providers.aws import AWSProvider
from ftplan.providers.base import SSHEndpoint


@pytest.fixture
def where(moto):  # noqa: F811
    here = {"ip": "198.51.100.9"}
    provider = AWSProvider(region="us-east-1", endpoint_url=moto.url, public_ip_lookup=lambda: here["ip"],
                           poll_interval_s=0.01, teardown_wait_s=2)
    inst = provider.create(request(ssh_cidr="198.51.100.0/24"))
    inst.ssh = SSHEndpoint("192.0.2.10", 22, "ubuntu")
    yield provider, inst, here
    provider.terminate(inst)


def _sources(ec2_client, inst) -> list[str]:
    perms = ec2_client.describe_security_groups(GroupIds=[inst.extra["security_group_id"]])["SecurityGroups"][0]
    return sorted(r["CidrIp"] for p in perms["IpPermissions"] if p.get("FromPort") == 22 for r in p["IpRanges"])


def _never_asked(question: str) -> bool:
    raise AssertionError(f"asked although nothing needed changing: {question}")


def test_unreachable_but_still_inside_the_range_keeps_the_rule(where, ec2):  # noqa: F811
    provider, inst, _ = where
    assert reopen_if_moved(provider, inst, update_firewall=None, confirm=_never_asked, probe=lambda h, p: False) is None
    assert _sources(ec2, inst) == ["198.51.100.0/24"]


def test_reachable_after_a_move_keeps_the_rule(where, ec2):  # noqa: F811
    provider, inst, here = where
    here["ip"] = "203.0.113.9"
    assert reopen_if_moved(provider, inst, update_firewall=None, confirm=_never_asked, probe=lambda h, p: True) is None
    assert _sources(ec2, inst) == ["198.51.100.0/24"]


def test_moved_and_no_terminal_to_ask_is_an_error_that_says_how_to_agree(where, ec2):  # noqa: F811
    provider, inst, here = where
    here["ip"] = "203.0.113.9"
    with pytest.raises(UserError, match="--update-firewall to allow 203.0.113.9/32"):
        reopen_if_moved(provider, inst, update_firewall=None, confirm=None, probe=lambda h, p: False)
    assert _sources(ec2, inst) == ["198.51.100.0/24"]


def test_a_configured_range_that_covers_the_new_address_is_used_instead_of_a_32(where, ec2):  # noqa: F811
    provider, inst, here = where
    here["ip"] = "203.0.113.9"
    new = reopen_if_moved(provider, inst, update_firewall=True, probe=lambda h, p: False, wanted_cidr="203.0.113.0/24")
    assert new == "203.0.113.0/24" and _sources(ec2, inst) == ["203.0.113.0/24"]
    assert inst.extra["ssh_cidr"] == "203.0.113.0/24"
