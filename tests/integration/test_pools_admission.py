"""The pool admission policy (deploy/admission/pools.yaml) and the tenants'
aggregated roles (deploy/rbac/tenants.yaml) on the real kube-apiserver.

The policy refuses what one pool and the object decide: an egress IP a pool
holds for other namespaces, and a namespace-selector reaching beyond the
object's namespace through a pool that grants no cross-namespace selection.
It admits what it cannot decide (an address in no pool). A namespace admin,
through the default `admin` role, manages StaticEgressIPs but neither pools
nor the status; a viewer reads them only.

Everything the module creates (policy, binding, roles, pools, namespaces) is
deleted at its end, so the session's other tests see a server without pools.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.pools import POOL_KIND, POOL_PLURAL, PoolMessages
from staticegress.api.v1alpha1 import API_VERSION, GROUP, KIND, PLURAL, VERSION
from staticegress.controlplane.cluster import ControlPlane
from staticegress.k8s import manifests
from staticegress.k8s.client import api_client
from tests.pool_admission_table import GRANT_CASES, NAMESPACE_LABELS, PINNED_CASES, SelectorCase

pytestmark = pytest.mark.controlplane

POLICY = "staticegress-pools"
NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass
class Tenancy:
    """The namespaces and pools of this module; `pool(role)` is a pool's name."""

    tag: str
    tenant_a: str
    tenant_b: str
    grants_ns: str
    pools: dict[str, str] = field(default_factory=dict)

    def pool(self, role: str) -> str:
        return self.pools[role]


# The pools, by role: (CIDRs, namespaceSelector, podNamespaceSelector).
# Addresses: pool-a 198.51.100.0/28, pool-b 198.51.100.16/28 and an IPv6
# range, cross 198.51.100.32/28, pinned 198.51.100.48/28, sentinel
# 198.51.100.64/32, one /32 per grant case from 198.51.100.128; 203.0.113.0/24
# is in no pool.
GRANT_IP_BASE = 128


def _pool_specs(t: Tenancy) -> list[tuple[str, dict[str, Any]]]:
    specs: list[tuple[str, dict[str, Any]]] = [
        (
            "a",
            {
                "cidrs": ["198.51.100.0/28"],
                "namespaceSelector": {"matchLabels": {NAME_LABEL: t.tenant_a}},
            },
        ),
        (
            "b",
            {
                "cidrs": ["198.51.100.16/28", "2001:db8:b::/64"],
                "namespaceSelector": {
                    "matchExpressions": [
                        {"key": NAME_LABEL, "operator": "In", "values": [t.tenant_b]}
                    ]
                },
            },
        ),
        (
            "cross",
            {
                "cidrs": ["198.51.100.32/28"],
                "namespaceSelector": {"matchLabels": {NAME_LABEL: t.tenant_a}},
                "podNamespaceSelector": {"matchLabels": {"team": "payments"}},
            },
        ),
        ("pinned", {"cidrs": ["198.51.100.48/28"], "namespaceSelector": {}}),
    ]
    for i, case in enumerate(GRANT_CASES):
        specs.append(
            (
                f"grant-{i}",
                {
                    "cidrs": [f"198.51.100.{GRANT_IP_BASE + i}/32"],
                    "namespaceSelector": case.for_namespace(t.grants_ns),
                },
            )
        )
    # Created last: once the policy sees it, it has seen every pool before
    # it (one watch of one resource delivers in order).
    specs.append(
        (
            "sentinel",
            {
                "cidrs": ["198.51.100.64/32"],
                "namespaceSelector": {"matchLabels": {NAME_LABEL: f"nobody-{t.tag}"}},
            },
        )
    )
    return specs


def _egress(
    ips: list[str],
    *,
    namespace_selector: dict[str, Any] | None = None,
    more_rules: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    family = ip_address(ips[0]).version
    rule: dict[str, Any] = {
        "egressips": ips,
        "cidr": "4.2.2.2/32" if family == 4 else "2001:4860::/32",
    }
    if namespace_selector is None:
        rule["service-name"] = "web"
    else:
        rule["namespace-selector"] = namespace_selector
        rule["pod-selector"] = {"matchLabels": {"app": "web"}}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": f"e-{uuid.uuid4().hex[:8]}"},
        "spec": {"rules": [*(more_rules or []), rule]},
    }


async def _create(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> Any:
    return await client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )


async def _refusal(call: Awaitable[Any]) -> str:
    """The admission policy's message for a refused request."""
    with pytest.raises(ApiException) as err:
        await call
    assert err.value.status in (403, 422), err.value.body
    message = str(json.loads(err.value.body)["message"])
    assert POLICY in message, message
    return message


async def _wait_until_refused(
    api: client.ApiClient, namespace: str, body: dict[str, Any], *, seconds: float = 60
) -> str:
    """Create `body` until the policy refuses it; delete what got through meanwhile."""
    deadline = time.monotonic() + seconds
    objects = client.CustomObjectsApi(api)
    while True:
        try:
            await _create(api, namespace, body)
        except ApiException as exc:
            if POLICY in str(exc.body):
                return str(json.loads(exc.body)["message"])
            raise
        await objects.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body["metadata"]["name"]
        )
        assert time.monotonic() < deadline, "the admission policy never took effect"
        await asyncio.sleep(0.3)


@pytest.fixture(scope="module")
async def tenancy(
    crd: dict[str, Any], api: client.ApiClient, kubectl: Callable[..., str]
) -> AsyncIterator[Tenancy]:
    tag = uuid.uuid4().hex[:6]
    t = Tenancy(
        tag=tag, tenant_a=f"tenant-a-{tag}", tenant_b=f"tenant-b-{tag}", grants_ns=f"grants-{tag}"
    )
    core = client.CoreV1Api(api)
    objects = client.CustomObjectsApi(api)
    admission = manifests.deploy_dir() / manifests.ADMISSION_FILE
    try:
        for name, labels in (
            (t.tenant_a, {}),
            (t.tenant_b, {}),
            (t.grants_ns, NAMESPACE_LABELS),
        ):
            await core.create_namespace({"metadata": {"name": name, "labels": labels}})
        kubectl("apply", "-f", str(admission))
        for role, spec in _pool_specs(t):
            name = f"{role}-{tag}"
            t.pools[role] = name
            await objects.create_cluster_custom_object(
                GROUP,
                VERSION,
                POOL_PLURAL,
                {
                    "apiVersion": API_VERSION,
                    "kind": POOL_KIND,
                    "metadata": {"name": name},
                    "spec": spec,
                },
            )
        message = await _wait_until_refused(api, t.tenant_a, _egress(["198.51.100.64"]))
        assert t.pool("sentinel") in message, message
        yield t
    finally:
        kubectl("delete", "-f", str(admission), "--ignore-not-found")
        for name in t.pools.values():
            try:
                await objects.delete_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        for name in (t.tenant_a, t.tenant_b, t.grants_ns):
            try:
                await core.delete_namespace(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


# ------------------------------------------------------- namespace grants


async def test_tenant_cannot_take_another_tenants_pooled_ip(
    tenancy: Tenancy, api: client.ApiClient
) -> None:
    t = tenancy
    for ip in ("198.51.100.17", "2001:db8:b::17"):
        message = await _refusal(_create(api, t.tenant_a, _egress([ip])))
        want = PoolMessages.namespace_not_granted(ip=ip, pool=t.pool("b"), namespace=t.tenant_a)
        assert want in message, message
    # Tenant B may: its pool grants its namespace.
    await _create(api, t.tenant_b, _egress(["198.51.100.17"]))
    await _create(api, t.tenant_b, _egress(["2001:db8:b::17"]))


async def test_tenant_uses_its_own_pool(tenancy: Tenancy, api: client.ApiClient) -> None:
    t = tenancy
    created = await _create(api, t.tenant_a, _egress(["198.51.100.1", "198.51.100.2"]))
    assert created["spec"]["rules"][0]["egressips"] == ["198.51.100.1", "198.51.100.2"]
    # And not from tenant B's namespace.
    message = await _refusal(_create(api, t.tenant_b, _egress(["198.51.100.1"])))
    assert (
        PoolMessages.namespace_not_granted(
            ip="198.51.100.1", pool=t.pool("a"), namespace=t.tenant_b
        )
        in message
    ), message


async def test_one_foreign_address_among_own_ones_is_refused(
    tenancy: Tenancy, api: client.ApiClient
) -> None:
    t = tenancy
    body = _egress(
        ["198.51.100.3"],
        more_rules=[
            {
                "egressips": ["198.51.100.4", "198.51.100.20"],
                "cidr": "4.2.2.2/32",
                "service-name": "x",
            }
        ],
    )
    message = await _refusal(_create(api, t.tenant_a, body))
    assert (
        PoolMessages.namespace_not_granted(
            ip="198.51.100.20", pool=t.pool("b"), namespace=t.tenant_a
        )
        in message
    ), message


async def test_an_address_in_no_pool_is_left_to_the_manager(
    tenancy: Tenancy, api: client.ApiClient
) -> None:
    # No evaluation sees it (each sees one pool); the manager reports NotInPool.
    await _create(api, tenancy.tenant_a, _egress(["203.0.113.9"]))
    await _create(api, tenancy.tenant_b, _egress(["2001:db8:ffff::9"]))


async def test_updates_are_judged_too(tenancy: Tenancy, api: client.ApiClient) -> None:
    t = tenancy
    objects = client.CustomObjectsApi(api)
    body = _egress(["198.51.100.5"])
    name = body["metadata"]["name"]
    await _create(api, t.tenant_a, body)
    patch = {"spec": {"rules": [{**body["spec"]["rules"][0], "egressips": ["198.51.100.21"]}]}}
    message = await _refusal(
        objects.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            t.tenant_a,
            PLURAL,
            name,
            patch,
            _content_type="application/merge-patch+json",
        )
    )
    assert t.pool("b") in message, message
    stored = await objects.get_namespaced_custom_object(GROUP, VERSION, t.tenant_a, PLURAL, name)
    assert stored["spec"]["rules"][0]["egressips"] == ["198.51.100.5"]


@pytest.mark.parametrize(
    ("index", "case"), list(enumerate(GRANT_CASES)), ids=[c.name for c in GRANT_CASES]
)
async def test_namespace_selector_semantics(
    index: int, case: SelectorCase, tenancy: Tenancy, api: client.ApiClient
) -> None:
    t = tenancy
    ip = f"198.51.100.{GRANT_IP_BASE + index}"
    pool = t.pool(f"grant-{index}")
    if case.expected:
        await _create(api, t.grants_ns, _egress([ip]))
    else:
        message = await _refusal(_create(api, t.grants_ns, _egress([ip])))
        assert (
            PoolMessages.namespace_not_granted(ip=ip, pool=pool, namespace=t.grants_ns) in message
        ), message


# ---------------------------------------------- cross-namespace selection


async def test_cross_namespace_selector_needs_the_pools_grant(
    tenancy: Tenancy, api: client.ApiClient
) -> None:
    t = tenancy
    message = await _refusal(
        _create(api, t.tenant_a, _egress(["198.51.100.6"], namespace_selector={}))
    )
    assert PoolMessages.cross_namespace(rule=0, namespace=t.tenant_a, pool=t.pool("a")) in message
    # The offending rule is named, not the first one.
    body = _egress(
        ["198.51.100.7"],
        namespace_selector={"matchLabels": {"team": "payments"}},
        more_rules=[{"egressip": "198.51.100.8", "cidr": "4.2.2.2/32", "service-name": "web"}],
    )
    message = await _refusal(_create(api, t.tenant_a, body))
    assert PoolMessages.cross_namespace(rule=1, namespace=t.tenant_a, pool=t.pool("a")) in message


async def test_selector_pinned_to_the_own_namespace_needs_no_grant(
    tenancy: Tenancy, api: client.ApiClient
) -> None:
    t = tenancy
    pinned = {"matchLabels": {NAME_LABEL: t.tenant_a}}
    await _create(api, t.tenant_a, _egress(["198.51.100.9"], namespace_selector=pinned))


async def test_pool_with_pod_namespace_selector_grants_cross_namespace_selection(
    tenancy: Tenancy, api: client.ApiClient
) -> None:
    t = tenancy
    await _create(
        api,
        t.tenant_a,
        _egress(["198.51.100.33"], namespace_selector={"matchLabels": {"team": "payments"}}),
    )
    # Which namespaces it reaches is the manager's to judge; admission only
    # asks for the grant, so even {} passes here.
    await _create(api, t.tenant_a, _egress(["198.51.100.34"], namespace_selector={}))


async def test_cross_namespace_selector_with_an_address_in_no_pool_is_left_to_the_manager(
    tenancy: Tenancy, api: client.ApiClient
) -> None:
    await _create(api, tenancy.tenant_a, _egress(["203.0.113.10"], namespace_selector={}))


@pytest.mark.parametrize("case", PINNED_CASES, ids=lambda c: c.name)
async def test_pinned_selector_semantics(
    case: SelectorCase, tenancy: Tenancy, api: client.ApiClient
) -> None:
    t = tenancy
    body = _egress(["198.51.100.49"], namespace_selector=case.for_namespace(t.tenant_a))
    if case.expected:
        await _create(api, t.tenant_a, body)
    else:
        message = await _refusal(_create(api, t.tenant_a, body))
        assert (
            PoolMessages.cross_namespace(rule=0, namespace=t.tenant_a, pool=t.pool("pinned"))
            in message
        ), message


# ------------------------------------------------------------------ RBAC


@pytest.fixture(scope="module")
async def tenant_roles(
    tenancy: Tenancy, api: client.ApiClient, kubectl: Callable[..., str]
) -> AsyncIterator[dict[str, str]]:
    """tenants.yaml applied; an admin and a viewer of tenant A, by the default roles."""
    roles = manifests.deploy_dir() / manifests.TENANT_ROLES_FILE
    rbac = client.RbacAuthorizationV1Api(api)
    users = {"admin": f"tenant-a-admin-{tenancy.tag}", "view": f"tenant-a-viewer-{tenancy.tag}"}
    kubectl("apply", "-f", str(roles))
    try:
        for role, user in users.items():
            await rbac.create_namespaced_role_binding(
                tenancy.tenant_a,
                {
                    "metadata": {"name": user},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": role,
                    },
                    "subjects": [
                        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}
                    ],
                },
            )
        yield users
    finally:
        # The RoleBindings go with the namespace.
        kubectl("delete", "-f", str(roles), "--ignore-not-found")


async def _as_user(control_plane: ControlPlane, user: str) -> client.ApiClient:
    path: Path = control_plane.kubeconfig_for_user(user)
    return await api_client(path)


async def _eventually_allowed(attempt: Callable[[], Awaitable[Any]], *, seconds: float = 60) -> Any:
    """Retry while RBAC says 403: the controller manager aggregates roles in a moment."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await attempt()
        except ApiException as exc:
            if exc.status != 403 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


async def test_namespace_admin_manages_static_egress_ips_but_not_pools(
    tenancy: Tenancy,
    tenant_roles: dict[str, str],
    control_plane: ControlPlane,
) -> None:
    t = tenancy
    admin = await _as_user(control_plane, tenant_roles["admin"])
    try:
        objects = client.CustomObjectsApi(admin)
        body = _egress(["198.51.100.10"])
        name = body["metadata"]["name"]
        await _eventually_allowed(lambda: _create(admin, t.tenant_a, body))
        got = await objects.get_namespaced_custom_object(GROUP, VERSION, t.tenant_a, PLURAL, name)
        assert got["metadata"]["name"] == name
        await objects.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            t.tenant_a,
            PLURAL,
            name,
            {"metadata": {"labels": {"owner": "tenant-a"}}},
            _content_type="application/merge-patch+json",
        )
        # The admission policy holds for the admin as for anyone.
        await _refusal(_create(admin, t.tenant_a, _egress(["198.51.100.22"])))
        # Only in its namespace.
        with pytest.raises(ApiException) as err:
            await _create(admin, t.tenant_b, _egress(["198.51.100.17"]))
        assert err.value.status == 403
        # Not the status: the manager alone writes it.
        with pytest.raises(ApiException) as err:
            await objects.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                t.tenant_a,
                PLURAL,
                name,
                {"status": {"egressIPs": [{"egressIP": "198.51.100.10", "gateway": "node-x"}]}},
                _content_type="application/merge-patch+json",
            )
        assert err.value.status == 403
        # No pool: which addresses a namespace may use is not the tenant's call.
        pool = {
            "apiVersion": API_VERSION,
            "kind": POOL_KIND,
            "metadata": {"name": f"mine-{t.tag}"},
            "spec": {"cidrs": ["198.51.100.16/28"], "namespaceSelector": {}},
        }
        for call in (
            lambda: objects.create_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, pool),
            lambda: objects.list_cluster_custom_object(GROUP, VERSION, POOL_PLURAL),
            lambda: objects.patch_cluster_custom_object(
                GROUP,
                VERSION,
                POOL_PLURAL,
                t.pool("b"),
                {"spec": {"namespaceSelector": {}}},
                _content_type="application/merge-patch+json",
            ),
        ):
            with pytest.raises(ApiException) as err:
                await call()
            assert err.value.status == 403
        await objects.delete_namespaced_custom_object(GROUP, VERSION, t.tenant_a, PLURAL, name)
    finally:
        await admin.close()


async def test_namespace_viewer_reads_but_does_not_write(
    tenancy: Tenancy,
    tenant_roles: dict[str, str],
    control_plane: ControlPlane,
    api: client.ApiClient,
) -> None:
    t = tenancy
    body = _egress(["198.51.100.11"])
    await _create(api, t.tenant_a, body)
    viewer = await _as_user(control_plane, tenant_roles["view"])
    try:
        objects = client.CustomObjectsApi(viewer)
        listed = await _eventually_allowed(
            lambda: objects.list_namespaced_custom_object(GROUP, VERSION, t.tenant_a, PLURAL)
        )
        assert body["metadata"]["name"] in [o["metadata"]["name"] for o in listed["items"]]
        await _eventually_allowed(
            lambda: objects.get_namespaced_custom_object_status(
                GROUP, VERSION, t.tenant_a, PLURAL, body["metadata"]["name"]
            )
        )
        for call in (
            lambda: _create(viewer, t.tenant_a, _egress(["198.51.100.12"])),
            lambda: objects.delete_namespaced_custom_object(
                GROUP, VERSION, t.tenant_a, PLURAL, body["metadata"]["name"]
            ),
            lambda: objects.list_cluster_custom_object(GROUP, VERSION, POOL_PLURAL),
        ):
            with pytest.raises(ApiException) as err:
                await call()
            assert err.value.status == 403
    finally:
        await viewer.close()
