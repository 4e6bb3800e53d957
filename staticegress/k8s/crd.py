"""Install the product's CRDs (StaticEgressIP, StaticEgressIPPool and
StaticEgressIPMembers) and wait until the API server serves them."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.k8s import manifests
from staticegress.k8s.client import REQUEST_TIMEOUT


class CRDNotEstablishedError(RuntimeError):
    """The API server did not accept a CRD's names or serve it in time."""


async def install_crd(api: client.ApiClient, *, wait_seconds: float = 60.0) -> dict[str, Any]:
    """Create or update every CRD, then wait until each is Established.

    Returns the served StaticEgressIP CRD. All are installed together because
    the manager, the agents and the admission policy read pools wherever they
    read StaticEgressIPs, and the agents read the manager's members.
    """
    bodies = manifests.crds()
    for body in bodies:
        await _apply(api, body)
    served = [
        await wait_established(api, body["metadata"]["name"], wait_seconds=wait_seconds)
        for body in bodies
    ]
    return served[0]


async def _apply(api: client.ApiClient, body: dict[str, Any]) -> None:
    ext = client.ApiextensionsV1Api(api)
    name = body["metadata"]["name"]
    try:
        await ext.create_custom_resource_definition(
            cast(Any, body), _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as exc:
        if exc.status != 409:
            raise
        current = await ext.read_custom_resource_definition(name, _request_timeout=REQUEST_TIMEOUT)
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        await ext.replace_custom_resource_definition(
            name, cast(Any, body), _request_timeout=REQUEST_TIMEOUT
        )


async def wait_established(
    api: client.ApiClient, name: str, *, wait_seconds: float = 60.0
) -> dict[str, Any]:
    """Poll the CRD until its Established condition is True."""
    ext = client.ApiextensionsV1Api(api)
    deadline = time.monotonic() + wait_seconds
    while True:
        crd = await ext.read_custom_resource_definition(name, _request_timeout=REQUEST_TIMEOUT)
        obj: dict[str, Any] = api.sanitize_for_serialization(crd)
        conditions = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
        if conditions.get("Established", {}).get("status") == "True":
            return obj
        names = conditions.get("NamesAccepted", {})
        if names.get("status") == "False":
            raise CRDNotEstablishedError(f"{name}: names not accepted: {names.get('message')}")
        if time.monotonic() > deadline:
            raise CRDNotEstablishedError(f"{name} not Established after {wait_seconds:.0f}s")
        await asyncio.sleep(0.2)
