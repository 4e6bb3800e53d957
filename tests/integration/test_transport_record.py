"""The cluster's transport record against the real API server, as the agent's own
identity with the deployed RBAC: two agents that detect different transports
converge on one, the disagreeing one reports it on its Node, and the agent can
do nothing else with ConfigMaps."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.agent.transport import NODE_EVENT_NAMESPACE, choose_transport
from staticegress.controlplane.cluster import ControlPlane
from staticegress.dataplane.transport import KEY_TRANSPORT, RECORD_NAME, Transport
from staticegress.k8s.client import api_client

pytestmark = pytest.mark.controlplane

NS = "staticegress-system"
DEPLOY = Path(__file__).parents[2] / "deploy"


@pytest.fixture(scope="module")
def agent_kubeconfig(control_plane: ControlPlane, kubectl: Callable[..., str]) -> Path:
    kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"))
    kubectl("apply", "-f", str(DEPLOY / "rbac" / "agent.yaml"))
    return control_plane.kubeconfig_for_service_account(NS, "staticegress-agent")


async def _delete_record(api: client.ApiClient) -> None:
    with contextlib.suppress(ApiException):
        await client.CoreV1Api(api).delete_namespaced_config_map(RECORD_NAME, NS)


@pytest.fixture
async def agent_api(
    api: client.ApiClient, agent_kubeconfig: Path
) -> AsyncIterator[client.ApiClient]:
    await _delete_record(api)
    c = await api_client(agent_kubeconfig)
    try:
        yield c
    finally:
        await c.close()
        await _delete_record(api)


def detects(t: Transport) -> Callable[[], Awaitable[tuple[Transport, str]]]:
    async def detect() -> tuple[Transport, str]:
        await asyncio.sleep(0)
        return t, f"test: {t}"

    return detect


async def test_two_agents_converge_on_one_transport(
    api: client.ApiClient, agent_api: client.ApiClient
) -> None:
    node_a, node_b = "conv-a", "conv-b"
    a, b = await asyncio.gather(
        choose_transport(
            agent_api,
            node=node_a,
            node_uid="",
            namespace=NS,
            flag="auto",
            detect=detects("direct"),
        ),
        choose_transport(
            agent_api,
            node=node_b,
            node_uid="",
            namespace=NS,
            flag="auto",
            detect=detects("vxlan"),
        ),
    )
    assert a.transport == b.transport, "two nodes with two transports drop each other's traffic"
    cm = await client.CoreV1Api(api).read_namespaced_config_map(RECORD_NAME, NS)
    assert cm.data[KEY_TRANSPORT] == a.transport
    first, follower = (a, b) if a.source == "first" else (b, a)
    assert (first.source, follower.source) == ("first", "cluster")
    assert first.mismatch is None
    assert follower.mismatch is not None
    loser = node_b if follower is b else node_a
    events = await client.CoreV1Api(api).list_namespaced_event(
        NODE_EVENT_NAMESPACE, field_selector=f"involvedObject.name={loser}"
    )
    assert [e.reason for e in events.items] == ["TransportMismatch"]

    # A third agent, later, follows the record too.
    c = await choose_transport(
        agent_api,
        node="conv-c",
        node_uid="",
        namespace=NS,
        flag="auto",
        detect=detects(first.transport),
    )
    assert (c.transport, c.source, c.mismatch) == (first.transport, "cluster", None)


async def test_operator_record_decides(api: client.ApiClient, agent_api: client.ApiClient) -> None:
    await client.CoreV1Api(api).create_namespaced_config_map(
        NS, {"metadata": {"name": RECORD_NAME}, "data": {KEY_TRANSPORT: "vxlan"}}
    )
    d = await choose_transport(
        agent_api, node="op-a", node_uid="", namespace=NS, flag="auto", detect=detects("vxlan")
    )
    assert (d.transport, d.source, d.mismatch) == ("vxlan", "cluster", None)
    assert "operator" in d.reason


async def test_agent_may_only_read_and_create_the_record(agent_api: client.ApiClient) -> None:
    core = client.CoreV1Api(agent_api)
    await core.create_namespaced_config_map(
        NS, {"metadata": {"name": RECORD_NAME}, "data": {KEY_TRANSPORT: "direct"}}
    )
    assert (await core.read_namespaced_config_map(RECORD_NAME, NS)).data == {
        KEY_TRANSPORT: "direct"
    }
    forbidden: list[Callable[[], Awaitable[object]]] = [
        lambda: core.patch_namespaced_config_map(
            RECORD_NAME, NS, {"data": {KEY_TRANSPORT: "vxlan"}}
        ),
        lambda: core.delete_namespaced_config_map(RECORD_NAME, NS),
        lambda: core.list_namespaced_config_map(NS),
        lambda: core.read_namespaced_config_map("kube-root-ca.crt", NS),
    ]
    for call in forbidden:
        with pytest.raises(ApiException) as exc:
            await call()
        assert exc.value.status == 403
