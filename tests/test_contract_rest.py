"""Contracts for the REST providers, whose maintainers ship no client package: JSON Schemas of the fields the
adapters send and read, written from the providers' API references, checked against what a whole run sent
(and what the fakes answered, so the fakes speak the documented wire format too).

Lambda: Lambda Cloud API OpenAPI spec v1.10.0 (https://cloud.lambda.ai/api/v1/docs; mirrored in
api-evangelist/lambda-labs openapi/lambda-labs-instances-api-openapi.yml and ...-ssh-keys-api-openapi.yml):
LaunchRequest, AddSSHKeyRequest, TerminateRequest, Instance, InstanceStatus.
Paperspace: the v1 API's types as generated into Paperspace's own CLI (github.com/Paperspace/cli
api/openapi.ts @c7bdd42): `machines-create`, `startupScripts-create`, `osTemplates-list`, `machines-get`.
`additionalProperties: false` on request bodies encodes "send only documented fields"."""

from __future__ import annotations

import jsonschema
import pytest
from fakes.lambda_api import fake_lambda as _fake_lambda
from fakes.paperspace_api import fake_paperspace as _fake_paperspace
from test_provider_lambda import _provider as lambda_provider
from test_provider_lambda import _request as lambda_request
from test_provider_paperspace import _provider as paperspace_provider
from test_provider_paperspace import _request as paperspace_request

fake_lambda, fake_paperspace = _fake_lambda, _fake_paperspace

LAMBDA_LAUNCH = {
    "type": "object", "additionalProperties": False,
    "required": ["region_name", "instance_type_name", "ssh_key_names"],
    "properties": {
        "region_name": {"type": "string"},
        "instance_type_name": {"type": "string"},
        "ssh_key_names": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
        "file_system_names": {"type": "array", "items": {"type": "string"}},
        "hostname": {"type": ["string", "null"]},
        "name": {"type": ["string", "null"], "maxLength": 64},
        "image": {"anyOf": [
            {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}, "additionalProperties": False},
            {"type": "object", "required": ["family"], "properties": {"family": {"type": "string"}},
             "additionalProperties": False}]},
        "user_data": {"type": "string"},
        "tags": {"type": "array", "items": {
            "type": "object", "required": ["key", "value"], "additionalProperties": False,
            "properties": {"key": {"type": "string", "pattern": "^[a-z][a-z0-9-:]+$", "maxLength": 55},
                           "value": {"type": "string", "maxLength": 128}}}},
    },
}
LAMBDA_ADD_KEY = {"type": "object", "additionalProperties": False, "required": ["name"],
                  "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64},
                                 "public_key": {"type": "string"}}}
LAMBDA_TERMINATE = {"type": "object", "additionalProperties": False, "required": ["instance_ids"],
                    "properties": {"instance_ids": {"type": "array", "items": {"type": "string"}}}}
LAMBDA_INSTANCE_READ = {  # the fields the adapter reads from an Instance
    "type": "object", "required": ["id", "status"],
    "properties": {
        "id": {"type": "string"}, "name": {"type": ["string", "null"]}, "ip": {"type": ["string", "null"]},
        "status": {"enum": ["booting", "active", "unhealthy", "terminated", "terminating", "preempted"]},
        "region": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        "instance_type": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        "tags": {"type": "array", "items": {"type": "object", "required": ["key", "value"]}},
    },
}

PAPERSPACE_MACHINE_CREATE = {
    "type": "object", "additionalProperties": False,
    "required": ["diskSize", "machineType", "name", "region", "templateId"],
    "properties": {
        "accessorIds": {"type": "array", "items": {"type": "string"}},
        "autoShutdownEnabled": {"type": "boolean"}, "autoShutdownForce": {"type": "boolean"},
        "autoShutdownTimeout": {"type": "number"}, "autoSnapshotEnabled": {"type": "boolean"},
        "autoSnapshotFrequency": {"enum": ["hourly", "daily", "weekly", "monthly"]},
        "autoSnapshotSaveCount": {"type": "number"}, "diskSize": {"type": "number"},
        "emailPassword": {"type": "boolean"}, "enableNvlink": {"type": "boolean"},
        "machineType": {"type": "string"}, "name": {"type": "string"}, "networkId": {"type": "string"},
        "publicIpType": {"enum": ["static", "dynamic", "none"]}, "region": {"type": "string"},
        "restorePointEnabled": {"type": "boolean"}, "restorePointFrequency": {"enum": ["shutdown"]},
        "startOnCreate": {"type": "boolean"}, "startupScriptId": {"type": "string"},
        "takeInitialSnapshot": {"type": "boolean"}, "templateId": {"type": "string"},
    },
}
PAPERSPACE_SCRIPT_CREATE = {"type": "object", "additionalProperties": False, "required": ["name", "script"],
                            "properties": {"isRunOnce": {"type": "boolean"}, "name": {"type": "string"},
                                           "script": {"type": "string"}}}
PAPERSPACE_TEMPLATES_READ = {
    "type": "object", "required": ["hasMore", "items"],
    "properties": {"hasMore": {"type": "boolean"}, "nextPage": {"type": ["string", "null"]}, "items": {
        "type": "array", "items": {
            "type": "object", "required": ["id", "name", "operatingSystemLabel", "availableMachineTypes"],
            "properties": {"availableMachineTypes": {"type": "array", "items": {
                "type": "object", "required": ["isAvailable", "machineTypeLabel"],
                "properties": {"isAvailable": {"type": "boolean"}, "machineTypeLabel": {"type": "string"}}}}}}}},
}
PAPERSPACE_MACHINE_READ = {
    "type": "object", "required": ["id", "name", "state", "machineType", "region"],
    "properties": {"state": {"enum": ["off", "starting", "stopping", "restarting", "serviceready", "ready",
                                      "upgrading", "provisioning"]},
                   "publicIp": {"type": ["string", "null"]}},
}


def test_lambda_requests_and_answers_match_the_spec(fake_lambda):
    import httpx

    p = lambda_provider(fake_lambda)
    inst = p.create(lambda_request())
    p.wait_ready(inst, timeout_s=5)
    p.terminate(inst)
    sent = {"/ssh-keys": LAMBDA_ADD_KEY, "/instance-operations/launch": LAMBDA_LAUNCH,
            "/instance-operations/terminate": LAMBDA_TERMINATE}
    checked = 0
    for path, schema in sent.items():
        for body in fake_lambda.calls("POST", path):
            jsonschema.validate(body, schema)
            checked += 1
    assert checked == 3
    p2 = lambda_provider(fake_lambda)
    live = p2.create(lambda_request(run_id="read"))
    answer = httpx.get(f"{fake_lambda.url}/instances/{live.id}",
                       headers={"Authorization": f"Bearer {fake_lambda.api_key}"}).json()["data"]
    jsonschema.validate(answer, LAMBDA_INSTANCE_READ)
    p2.terminate(live)


def test_paperspace_requests_and_answers_match_the_v1_types(fake_paperspace):
    import httpx

    p = paperspace_provider(fake_paperspace)
    inst = p.create(paperspace_request(disk_gib=120))
    p.wait_ready(inst, timeout_s=5)
    for body in fake_paperspace.calls("POST", "/machines"):
        jsonschema.validate(body, PAPERSPACE_MACHINE_CREATE)
    for body in fake_paperspace.calls("POST", "/startup-scripts"):
        jsonschema.validate(body, PAPERSPACE_SCRIPT_CREATE)
    auth = {"Authorization": f"Bearer {fake_paperspace.api_key}"}
    jsonschema.validate(httpx.get(f"{fake_paperspace.url}/os-templates", headers=auth).json(),
                        PAPERSPACE_TEMPLATES_READ)
    jsonschema.validate(httpx.get(f"{fake_paperspace.url}/machines/{inst.id}", headers=auth).json(),
                        PAPERSPACE_MACHINE_READ)
    p.terminate(inst)


def test_the_schemas_refuse_an_undocumented_field():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "s", "script": "#!/bin/sh", "description": "x"}, PAPERSPACE_SCRIPT_CREATE)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"region_name": "r", "instance_type_name": "t", "ssh_key_names": ["a", "b"]},
                            LAMBDA_LAUNCH)
