"""The StaticEgressIPPool CRD against a real kube-apiserver: installation with
the StaticEgressIP CRD, the shared pool validation table, the status
subresource and the printer columns; and the StaticEgressIP status fields
that name a pool or a reason."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.pools import POOL_KIND, POOL_PLURAL, parse_pool
from staticegress.api.v1alpha1 import API_VERSION, GROUP, KIND, PLURAL, VERSION
from staticegress.k8s import manifests
from staticegress.k8s.crd import wait_established
from tests.pool_validation_table import POOL_INVALID, POOL_VALID
from tests.validation_table import Case

pytestmark = pytest.mark.controlplane


def _pool(spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": POOL_KIND,
        "metadata": {"name": name or f"p-{uuid.uuid4().hex[:8]}"},
        "spec": spec,
    }


@pytest.fixture
async def pools(api: client.ApiClient) -> AsyncIterator[list[str]]:
    """Names of the pools a test creates; each is deleted afterwards."""
    names: list[str] = []
    yield names
    objects = client.CustomObjectsApi(api)
    for name in names:
        try:
            await objects.delete_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise


async def _create(api: client.ApiClient, body: dict[str, Any], pools: list[str]) -> Any:
    pools.append(body["metadata"]["name"])
    return await client.CustomObjectsApi(api).create_cluster_custom_object(
        GROUP, VERSION, POOL_PLURAL, body, field_validation="Strict"
    )


async def test_install_crd_installs_both_and_returns_the_static_egress_ip_one(
    crd: dict[str, Any], api: client.ApiClient
) -> None:
    assert crd["spec"]["names"]["kind"] == KIND
    pool = await wait_established(api, "staticegressippools.staticegressips.io", wait_seconds=5)
    conditions = {c["type"]: c["status"] for c in pool["status"]["conditions"]}
    assert conditions["NamesAccepted"] == "True"
    assert pool["spec"]["scope"] == "Cluster"
    assert pool["spec"]["group"] == GROUP
    names = pool["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (
        POOL_KIND,
        POOL_PLURAL,
        "staticegressippool",
    )
    assert names["shortNames"] == ["seippool"]
    (version,) = pool["spec"]["versions"]
    assert version["name"] == VERSION
    assert version["subresources"] == {"status": {}}
    columns = [(c["name"], c["jsonPath"]) for c in version["additionalPrinterColumns"]]
    assert columns == [
        ("CIDRs", ".spec.cidrs"),
        ("Used", ".status.used"),
        ("Free", ".status.free"),
        ("Age", ".metadata.creationTimestamp"),
    ]


@pytest.mark.parametrize("case", POOL_VALID, ids=lambda c: c.name)
async def test_api_server_accepts_valid_pools(
    case: Case, crd: dict[str, Any], api: client.ApiClient, pools: list[str]
) -> None:
    created = await _create(api, _pool(case.spec), pools)
    assert created["spec"] == case.spec
    # Whatever the server accepts, the parser must accept too.
    parse_pool(created)


@pytest.mark.parametrize("case", POOL_INVALID, ids=lambda c: c.name)
async def test_api_server_rejects_invalid_pools(
    case: Case, crd: dict[str, Any], api: client.ApiClient, pools: list[str]
) -> None:
    with pytest.raises(ApiException) as err:
        await _create(api, _pool(case.spec), pools)
    assert err.value.status in (400, 422), err.value.body
    text = json.loads(err.value.body)["message"]
    assert case.server_message is not None
    assert case.field is not None
    assert case.server_message in text, text
    assert case.field in text, text


async def test_example_pool_applies_and_round_trips(
    crd: dict[str, Any], kubectl: Callable[..., str], api: client.ApiClient, pools: list[str]
) -> None:
    path = manifests.deploy_dir() / "examples" / "pool.yaml"
    written = yaml.safe_load(path.read_text())
    pools.append(written["metadata"]["name"])
    kubectl("apply", "-f", str(path))
    stored = await client.CustomObjectsApi(api).get_cluster_custom_object(
        GROUP, VERSION, POOL_PLURAL, written["metadata"]["name"]
    )
    assert stored["spec"] == written["spec"]
    pool = parse_pool(stored)
    assert [str(c) for c in pool.cidrs] == ["100.137.146.100/30"]
    assert pool.generation == 1


async def test_pool_status_counts_and_printer_columns(
    crd: dict[str, Any], kubectl: Callable[..., str], api: client.ApiClient, pools: list[str]
) -> None:
    objects = client.CustomObjectsApi(api)
    name = f"p-{uuid.uuid4().hex[:8]}"
    await _create(
        api,
        _pool({"cidrs": ["198.51.100.200/29"], "namespaceSelector": {}}, name=name),
        pools,
    )
    status = {
        "status": {
            "observedGeneration": 1,
            "total": 8,
            "used": 3,
            "free": 5,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Valid",
                    "message": "ok",
                    "lastTransitionTime": "2026-12-01T10:00:00Z",
                }
            ],
        }
    }
    patched = await objects.patch_cluster_custom_object_status(
        GROUP, VERSION, POOL_PLURAL, name, status, _content_type="application/merge-patch+json"
    )
    assert (patched["status"]["used"], patched["status"]["free"]) == (3, 5)
    assert patched["metadata"]["generation"] == 1
    # The largest count a pool reports, 2^53, fits the schema.
    await objects.patch_cluster_custom_object_status(
        GROUP,
        VERSION,
        POOL_PLURAL,
        name,
        {"status": {"total": 2**53, "used": 0, "free": 2**53}},
        _content_type="application/merge-patch+json",
    )
    with pytest.raises(ApiException) as err:
        await objects.patch_cluster_custom_object_status(
            GROUP,
            VERSION,
            POOL_PLURAL,
            name,
            {"status": {"used": -1}},
            _content_type="application/merge-patch+json",
        )
    assert err.value.status == 422
    assert "status.used" in err.value.body
    await objects.patch_cluster_custom_object_status(
        GROUP,
        VERSION,
        POOL_PLURAL,
        name,
        {"status": {"total": 8, "used": 3, "free": 5}},
        _content_type="application/merge-patch+json",
    )
    # Status written through the main resource is ignored.
    body = await objects.get_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, name)
    body["status"]["used"] = 0
    replaced = await objects.replace_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, name, body)
    assert replaced["status"]["used"] == 3

    out = kubectl("get", "seippool", name)
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "CIDRS", "USED", "FREE", "AGE"]
    cells = row.split()
    assert cells[0] == name
    assert "198.51.100.200/29" in cells[1]
    assert cells[2:4] == ["3", "5"]


async def test_static_egress_ip_status_names_pool_and_reason(
    crd: dict[str, Any], namespace: str, api: client.ApiClient
) -> None:
    objects = client.CustomObjectsApi(api)
    await objects.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": "web"},
            "spec": {
                "rules": [
                    {
                        "egressips": ["198.51.100.200", "203.0.113.7"],
                        "service-name": "web",
                        "cidr": "4.2.2.2/32",
                    }
                ]
            },
        },
    )
    entries = [
        {"egressIP": "198.51.100.200", "rule": 0, "gateway": "node-a", "pool": "tenant-a"},
        {"egressIP": "203.0.113.7", "rule": 0, "reason": "NotInPool"},
    ]
    patched = await objects.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "web",
        {"status": {"egressIPs": entries}},
        _content_type="application/merge-patch+json",
    )
    # Nothing pruned: both fields are in the schema.
    assert patched["status"]["egressIPs"] == entries
    for field, value, limit in (("pool", "p" * 254, 253), ("reason", "R" * 65, 64)):
        bad = {"egressIP": "203.0.113.7", field: value}
        with pytest.raises(ApiException) as err:
            await objects.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                "web",
                {"status": {"egressIPs": [bad]}},
                _content_type="application/merge-patch+json",
            )
        assert err.value.status == 422
        assert f"status.egressIPs[0].{field}" in err.value.body
        assert f"may not be more than {limit} bytes" in err.value.body, err.value.body
