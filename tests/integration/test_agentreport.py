"""Agent reports against the real API server, with the identities deploy/rbac gives:
the agent writes its record, the manager lists and watches it back; the agent can
neither read Leases nor write any but report Leases (the managers' leader Lease
least of all); the manager reads Leases in its namespace only."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import ip_address
from pathlib import Path

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.types import EgressIPRef, NodeName
from staticegress.controlplane.cluster import ControlPlane
from staticegress.k8s.agentreport import (
    LABEL_SELECTOR,
    LeaseReportWriter,
    lease_name,
    records_from_store,
)
from staticegress.k8s.client import api_client
from staticegress.k8s.reflector import Reflector
from staticegress.model.programmed import AgentRecord

pytestmark = pytest.mark.controlplane

NS = "staticegress-system"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


async def _eventually(
    attempt: Callable[[], Awaitable[object]], *, allowed: tuple[int, ...], seconds: float = 15
) -> object:
    """Retry while the API answers one of `allowed` (RBAC and admission caches settle)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await attempt()
        except ApiException as exc:
            if exc.status not in allowed or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def identities(control_plane: ControlPlane, kubectl: Callable[..., str]) -> tuple[Path, Path]:
    """The agent's and the manager's kubeconfigs, as the lab mints them."""
    kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"))
    kubectl("apply", "-f", str(DEPLOY / "rbac" / "agent.yaml"))
    kubectl("apply", "-f", str(DEPLOY / "rbac" / "manager.yaml"))
    agent = control_plane.kubeconfig_for_service_account(NS, "staticegress-agent")
    manager = control_plane.kubeconfig_for_service_account(NS, "staticegress-manager")
    return agent, manager


@pytest.fixture
async def clients(
    identities: tuple[Path, Path],
) -> AsyncIterator[tuple[client.ApiClient, client.ApiClient]]:
    agent = await api_client(identities[0])
    manager = await api_client(identities[1])
    try:
        yield agent, manager
    finally:
        await agent.close()
        await manager.close()


def _record(node: NodeName, gen: int, *, fenced: bool = False) -> AgentRecord:
    ip = ip_address("198.51.100.200")
    return AgentRecord(
        node=node,
        applied={EgressIPRef("ns", "web"): gen, EgressIPRef("other", "db"): 1},
        fenced=fenced,
        withheld=frozenset({ip}) if fenced else frozenset(),
        owned=frozenset() if fenced else frozenset({ip}),
    )


async def test_agent_writes_its_record_and_the_manager_watches_it(
    api: client.ApiClient, clients: tuple[client.ApiClient, client.ApiClient]
) -> None:
    agent, manager = clients
    node = NodeName(f"it-{uuid.uuid4().hex[:8]}")
    writer = LeaseReportWriter(agent, namespace=NS, node=node)
    coord = client.CoordinationV1Api(manager)
    reflector = Reflector(
        name="agentreports",
        list_fn=coord.list_namespaced_lease,
        list_args=(NS,),
        list_kwargs={"label_selector": LABEL_SELECTOR},
    )
    task = asyncio.create_task(reflector.run())
    try:
        # First write creates the Lease, the next ones patch it.
        await _eventually(lambda: writer.write(_record(node, 1)), allowed=(403,))
        await asyncio.wait_for(reflector.synced.wait(), 15)
        for want in (_record(node, 1), _record(node, 2, fenced=True), _record(node, 3)):
            await writer.write(want)
            deadline = time.monotonic() + 10
            while records_from_store(reflector.store, nodes=[node]).get(node) != want:
                assert time.monotonic() < deadline, f"manager never saw {want}"
                await asyncio.sleep(0.05)
        lease = await client.CoordinationV1Api(api).read_namespaced_lease(lease_name(node), NS)
        assert lease.spec.holder_identity == node
        assert lease.metadata.labels["app.kubernetes.io/component"] == ("staticegress-agent-report")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.CoordinationV1Api(api).delete_namespaced_lease(lease_name(node), NS)


async def test_agent_cannot_read_leases_nor_write_other_than_reports(
    api: client.ApiClient, clients: tuple[client.ApiClient, client.ApiClient]
) -> None:
    agent, _ = clients
    coord = client.CoordinationV1Api(agent)
    admin = client.CoordinationV1Api(api)
    tag = uuid.uuid4().hex[:8]

    # The admission policy takes a moment to load: wait until it refuses a
    # Lease that is not a report (cleaning up any that got through meanwhile).
    stray = f"not-a-report-{tag}"
    deadline = time.monotonic() + 15
    refused: ApiException | None = None
    while refused is None:
        try:
            await coord.create_namespaced_lease(NS, {"metadata": {"name": stray}})
        except ApiException as exc:
            if "report" in str(exc.body):  # refused by the policy, not by RBAC
                refused = exc
                break
        else:
            await admin.delete_namespaced_lease(stray, NS)
        assert time.monotonic() < deadline, "the agent may create any Lease"
        await asyncio.sleep(0.2)
    assert refused.status in (403, 422), refused
    assert "report" in str(refused.body)

    # The managers' leader Lease: the agent may not take or change it.
    leader = f"staticegress-manager-{tag}"
    await admin.create_namespaced_lease(
        NS, {"metadata": {"name": leader}, "spec": {"holderIdentity": "manager-1"}}
    )
    try:
        with pytest.raises(ApiException) as err:
            await coord.patch_namespaced_lease(
                leader,
                NS,
                {"spec": {"holderIdentity": "agent"}},
                _content_type="application/merge-patch+json",
            )
        assert err.value.status in (403, 422)
        got = await admin.read_namespaced_lease(leader, NS)
        assert got.spec.holder_identity == "manager-1"
    finally:
        await admin.delete_namespaced_lease(leader, NS)

    for call in (
        lambda: coord.list_namespaced_lease(NS),
        lambda: coord.read_namespaced_lease(lease_name(NodeName("x")), NS),
        lambda: coord.delete_namespaced_lease(lease_name(NodeName("x")), NS),
        lambda: coord.create_namespaced_lease(
            "default", {"metadata": {"name": lease_name(NodeName(tag))}}
        ),
    ):
        with pytest.raises(ApiException) as err:
            await call()
        assert err.value.status == 403


async def test_manager_reads_leases_of_its_namespace_only(
    clients: tuple[client.ApiClient, client.ApiClient],
) -> None:
    _, manager = clients
    coord = client.CoordinationV1Api(manager)
    await _eventually(
        lambda: coord.list_namespaced_lease(NS, label_selector=LABEL_SELECTOR), allowed=(403,)
    )
    with pytest.raises(ApiException) as err:
        await coord.list_namespaced_lease("default")
    assert err.value.status == 403
    with pytest.raises(ApiException) as err:
        await coord.list_lease_for_all_namespaces()
    assert err.value.status == 403
