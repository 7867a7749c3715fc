"""Contracts from the providers' own machine-readable definitions.

GCP: every request body the adapter sent over a whole run (firewall insert and patch, instance insert for
n1+T4 on demand and a4 Spot) parses as google-cloud-compute's `compute_v1` type with unknown fields refused,
and every enum-valued field holds a member of compute_v1's enum.
RunPod: every GraphQL document the adapter sent validates against the schema (tests/fakes/runpod_graphql.py,
written from RunPod's GraphQL spec, graphql-spec.runpod.io), and the reads are the SDK's own query text
(`runpod.api.queries.pods.generate_pod_query`), so what is sent is what the SDK would send."""

from __future__ import annotations

import json

import graphql
import pytest
from fakes.gcp_compute import FakeCompute
from fakes.runpod_graphql import SCHEMA
from fakes.runpod_graphql import fake_runpod as _fake_runpod
from google.cloud import compute_v1
from test_provider_gcp import TOKEN, make_provider
from test_provider_gcp import request as gcp_request
from test_provider_runpod import _provider as runpod_provider
from test_provider_runpod import _request as runpod_request

fake_runpod = _fake_runpod

# (message type, field path, enum) for every enum-valued field the adapter sets.
GCP_ENUMS = [
    (compute_v1.Instance, ("scheduling", "provisioningModel"), compute_v1.Scheduling.ProvisioningModel),
    (compute_v1.Instance, ("scheduling", "onHostMaintenance"), compute_v1.Scheduling.OnHostMaintenance),
    (compute_v1.Instance, ("scheduling", "instanceTerminationAction"), compute_v1.Scheduling.InstanceTerminationAction),
    (compute_v1.Firewall, ("direction",), compute_v1.Firewall.Direction),
]


@pytest.fixture
def gcp_fake():
    server = FakeCompute(valid_tokens={TOKEN}).start()
    yield server
    server.stop()


def _at(body: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(body, dict) or key not in body:
            return None
        body = body[key]
    return body


def test_every_gcp_body_is_a_compute_v1_message(gcp_fake):
    provider = make_provider(gcp_fake)
    on_demand = provider.create(gcp_request())
    spot = provider.create(gcp_request(run_id="r-a4", instance_type="a4-highgpu-8g", gpu="B200", gpu_count=8,
                                       spot=True))
    provider.allow_ssh_from(on_demand, "203.0.113.0/24")
    for inst in (on_demand, spot):
        provider.terminate(inst)

    sent = [(r.path, r.body) for r in gcp_fake.requests if r.body]
    kinds = {"/instances": compute_v1.Instance, "/firewalls": compute_v1.Firewall}
    checked = 0
    for path, body in sent:
        key = next((k for k in kinds if path.endswith(k) or "/firewalls/" in path and k == "/firewalls"), None)
        if key is None:
            continue
        kinds[key].from_json(json.dumps(body), ignore_unknown_fields=False)  # raises on an unknown field
        for message, field_path, enum in GCP_ENUMS:
            value = _at(body, field_path)
            if message is kinds[key] and value is not None:
                assert value in enum.__members__, (path, field_path, value)
        for nic in body.get("networkInterfaces", []):
            for ac in nic.get("accessConfigs", []):
                assert ac["type"] in compute_v1.AccessConfig.Type.__members__
        checked += 1
    assert checked == 5  # two firewall inserts, one firewall patch, two instance inserts


def test_compute_v1_refuses_an_unknown_field():
    with pytest.raises(Exception, match="no field named"):
        compute_v1.Instance.from_json(json.dumps({"name": "x", "bootDiskType": "pd-balanced"}),
                                      ignore_unknown_fields=False)


def test_every_runpod_document_validates_and_reads_are_the_sdks_text(fake_runpod):
    from runpod.api.queries.pods import generate_pod_query

    p = runpod_provider(fake_runpod)
    on_demand = p.create(runpod_request(run_id="od", cloud_type="COMMUNITY"))
    spot = p.create(runpod_request(run_id="sp", gpu="A100-80GB", spot=True))
    p.wait_ready(on_demand, timeout_s=5)
    p.list_instances()
    for inst in (on_demand, spot):
        p.terminate(inst)

    assert fake_runpod.queries
    for query in fake_runpod.queries:
        assert graphql.validate(SCHEMA, graphql.parse(query)) == [], query
    assert generate_pod_query(on_demand.id) in fake_runpod.queries
    ops = {graphql.parse(q).definitions[0].selection_set.selections[0].name.value for q in fake_runpod.queries}
    assert {"podFindAndDeployOnDemand", "podRentInterruptable", "pod", "gpuTypes", "podTerminate", "myself"} <= ops


def test_the_runpod_schema_refuses_an_unknown_input_field():
    bad = 'mutation { podRentInterruptable(input: { bidPerGpu: 1.0, maxBid: 2.0 }) { id } }'
    assert graphql.validate(SCHEMA, graphql.parse(bad))
