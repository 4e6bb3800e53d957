"""The StaticEgressIP CRD against a real kube-apiserver: installation, the seed form,
the shared validation table, the status subresource and the printer columns."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.v1alpha1 import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    parse_static_egress_ip,
)
from staticegress.k8s import manifests
from tests.validation_table import INVALID, VALID, Case

pytestmark = pytest.mark.controlplane


def _obj(spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name or f"x-{uuid.uuid4().hex[:8]}"},
        "spec": spec,
    }


async def _create(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> Any:
    return await client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict"
    )


async def test_crd_is_established_with_names_and_subresources(crd: dict[str, Any]) -> None:
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert crd["spec"]["scope"] == "Namespaced"
    assert "segip" in crd["spec"]["names"]["shortNames"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:3] == ["Egress IPs", "Gateways", "Ready"]
    assert "Age" in columns


async def test_seed_example_applies_unchanged_and_round_trips(
    crd: dict[str, Any], namespace: str, kubectl: Callable[..., str], api: client.ApiClient
) -> None:
    seed = manifests.deploy_dir() / "examples" / "seed.yaml"
    kubectl("apply", "-n", namespace, "-f", str(seed))
    stored = await client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "frontend"
    )
    # The API server keeps the seed's spec exactly as written: nothing pruned,
    # nothing defaulted.
    assert stored["spec"] == yaml.safe_load(seed.read_text())["spec"]
    parsed = parse_static_egress_ip(stored)
    (rule,) = parsed.spec.rules
    assert str(rule.egress_ips[0]) == "100.137.146.100"
    assert str(rule.destinations[0]) == "4.2.2.2/32"
    assert rule.service_name == "frontend"
    assert parsed.generation == 1
    assert parsed.uid == stored["metadata"]["uid"]


async def test_extended_example_applies(
    crd: dict[str, Any], namespace: str, kubectl: Callable[..., str], api: client.ApiClient
) -> None:
    ext = manifests.deploy_dir() / "examples" / "extended.yaml"
    kubectl("apply", "-n", namespace, "-f", str(ext))
    stored = await client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "billing-partners"
    )
    rule = parse_static_egress_ip(stored).spec.rules[0]
    assert [str(i) for i in rule.egress_ips] == ["198.51.100.200", "198.51.100.201"]
    assert [str(e) for e in rule.excluded] == ["203.0.113.128/25"]


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.name)
async def test_api_server_accepts_valid_table_entries(
    case: Case, crd: dict[str, Any], namespace: str, api: client.ApiClient
) -> None:
    created = await _create(api, namespace, _obj(case.spec))
    assert created["spec"] == case.spec
    # Whatever the server accepts, the parser must accept too.
    parse_static_egress_ip(created)


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.name)
async def test_api_server_rejects_invalid_table_entries(
    case: Case, crd: dict[str, Any], namespace: str, api: client.ApiClient
) -> None:
    with pytest.raises(ApiException) as err:
        await _create(api, namespace, _obj(case.spec))
    assert err.value.status in (400, 422), err.value.body
    body = json.loads(err.value.body)
    text = body["message"]
    assert case.server_message is not None
    assert case.field is not None
    assert case.server_message in text, text
    assert case.field in text, text


async def test_status_subresource_merge_patch(
    crd: dict[str, Any], namespace: str, api: client.ApiClient
) -> None:
    objects = client.CustomObjectsApi(api)
    body = _obj(
        {
            "rules": [
                {"egressip": "198.51.100.200", "service-name": "web", "cidr": "203.0.113.0/24"}
            ]
        },
        name="web",
    )
    await _create(api, namespace, body)
    status = {
        "status": {
            "observedGeneration": 1,
            "egressIPs": [
                {
                    "egressIP": "198.51.100.200",
                    "rule": 0,
                    "gateway": "node-b",
                    "since": "2026-12-01T10:00:00Z",
                    "standbys": ["node-c"],
                }
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "GatewayAssigned",
                    "message": "all egress IPs have a gateway",
                    "lastTransitionTime": "2026-12-01T10:00:00Z",
                }
            ],
        }
    }
    patched = await objects.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "web",
        status,
        _content_type="application/merge-patch+json",
    )
    assert patched["status"]["egressIPs"][0]["gateway"] == "node-b"
    # A status write must not bump the spec's generation.
    assert patched["metadata"]["generation"] == 1
    parsed = parse_static_egress_ip(patched).status
    assert parsed.egress_ips[0].gateway == "node-b"
    assert parsed.egress_ips[0].standbys == ("node-c",)
    assert parsed.conditions[0].reason == "GatewayAssigned"
    # Writing status through the main resource is ignored by the API server.
    body = await objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "web")
    body["status"]["egressIPs"][0]["gateway"] = "intruder"
    replaced = await objects.replace_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "web", body
    )
    assert replaced["status"]["egressIPs"][0]["gateway"] == "node-b"


async def test_status_is_validated_too(
    crd: dict[str, Any], namespace: str, api: client.ApiClient
) -> None:
    objects = client.CustomObjectsApi(api)
    await _create(
        api,
        namespace,
        _obj(
            {
                "rules": [
                    {"egressip": "198.51.100.200", "service-name": "web", "cidr": "203.0.113.0/24"}
                ]
            },
            name="web",
        ),
    )
    bad = {
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "Maybe",
                    "reason": "X",
                    "message": "",
                    "lastTransitionTime": "2026-12-01T10:00:00Z",
                }
            ]
        }
    }
    with pytest.raises(ApiException) as err:
        await objects.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            "web",
            bad,
            _content_type="application/merge-patch+json",
        )
    assert err.value.status == 422
    assert "status.conditions[0].status" in err.value.body


async def test_kubectl_get_shows_printer_columns(
    crd: dict[str, Any], namespace: str, api: client.ApiClient, kubectl: Callable[..., str]
) -> None:
    await _create(
        api,
        namespace,
        _obj(
            {
                "rules": [
                    {
                        "egressips": ["198.51.100.200", "198.51.100.201"],
                        "service-name": "web",
                        "cidr": "203.0.113.0/24",
                    }
                ]
            },
            name="web",
        ),
    )
    await client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "web",
        {
            "status": {
                "summary": {
                    "egressIPs": "198.51.100.200,198.51.100.201",
                    "gateways": "node-a,node-b",
                },
                "egressIPs": [
                    {"egressIP": "198.51.100.200", "gateway": "node-a"},
                    {"egressIP": "198.51.100.201", "gateway": "node-b"},
                ],
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "GatewayAssigned",
                        "message": "ok",
                        "lastTransitionTime": "2026-12-01T10:00:00Z",
                    }
                ],
            }
        },
        _content_type="application/merge-patch+json",
    )
    out = kubectl("get", "staticegressips", "-n", namespace)
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "EGRESS", "IPS", "GATEWAYS", "READY", "AGE"]
    assert row.split()[:4] == ["web", "198.51.100.200,198.51.100.201", "node-a,node-b", "True"]
    # The short name works and the wide view adds the reason.
    wide = kubectl("get", "segip", "-n", namespace, "-o", "wide")
    assert "GatewayAssigned" in wide
