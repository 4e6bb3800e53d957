"""The lab itself, in both CNI modes: nodes, scheduling, EndpointSlices, the
masquerade baseline, pod-to-pod traffic, and node failure."""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from e2e.labkit import Lab, pod_server, spread_deployment, staticegress, wait_for
from staticegress.lab import plan

pytestmark = pytest.mark.lab


def _node_ips(lab: Lab) -> dict[str, str]:
    return {p.name: str(p.underlay_ip) for p in plan.node_plans(lab.nodes)}


@pytest.fixture(scope="module")
def web(lab: Lab) -> list[dict[str, Any]]:
    """Three `web` pods, one per node, behind a Service."""
    lab.apply(spread_deployment("web", 3))
    lab.kubectl("expose", "deployment", "web", "--port", "80")
    return wait_for("3 Ready web pods", lambda: lab.ready_pods("app=web", 3), seconds=90)


def test_nodes_are_registered_and_ready(lab: Lab) -> None:
    nodes = {n["metadata"]["name"]: n for n in lab.get("nodes")["items"]}
    assert sorted(nodes) == ["node-1", "node-2", "node-3"]
    for p in plan.node_plans(3):
        node = nodes[p.name]
        assert node["spec"]["podCIDR"] == str(p.pod_cidr)
        addrs = {a["type"]: a["address"] for a in node["status"]["addresses"]}
        assert addrs["InternalIP"] == str(p.underlay_ip)
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready[0]["status"] == "True"


def test_deployment_pods_are_scheduled_addressed_and_ready(
    lab: Lab, web: list[dict[str, Any]]
) -> None:
    placed = {p["spec"]["nodeName"]: p for p in web}
    assert sorted(placed) == ["node-1", "node-2", "node-3"]
    for node, pod in placed.items():
        cidr = plan.node_by_name(node, 3).pod_cidr
        assert IPv4Address(pod["status"]["podIP"]) in cidr
        assert pod["status"]["hostIP"] == _node_ips(lab)[node]
        assert pod["status"]["phase"] == "Running"
        # The pod really exists as a namespace with that address.
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        out = lab.exec(f"{ns}/{name}", "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        assert f"{pod['status']['podIP']}/32" in out


def test_service_gets_an_endpointslice_with_the_pod_ips(
    lab: Lab, web: list[dict[str, Any]]
) -> None:
    want = sorted(p["status"]["podIP"] for p in web)

    def endpoints() -> list[str] | None:
        slices = lab.get("endpointslices", "-l", "kubernetes.io/service-name=web")["items"]
        got = sorted(
            a
            for s in slices
            for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready")
            for a in e["addresses"]
        )
        return got if got == want else None

    assert wait_for("EndpointSlice of web", endpoints, seconds=30) == want


def test_pods_reach_the_external_servers_masqueraded_as_their_node(
    lab: Lab, web: list[dict[str, Any]]
) -> None:
    ips = _node_ips(lab)
    for pod in web:
        target = f"default/{pod['metadata']['name']}"
        node_ip = ips[pod["spec"]["nodeName"]]
        assert lab.http_source(target, "203.0.113.10") == node_ip
        assert lab.http_source(target, "203.0.113.20") == node_ip
        assert lab.udp_echo(target, "hello") == f"{node_ip} hello"


def test_pod_to_pod_across_nodes_keeps_the_pod_ip(lab: Lab, web: list[dict[str, Any]]) -> None:
    client, server = web[0], web[1]
    assert client["spec"]["nodeName"] != server["spec"]["nodeName"]
    server_ip = server["status"]["podIP"]
    target = f"default/{client['metadata']['name']}"
    with pod_server(f"default/{server['metadata']['name']}", server_ip):
        seen = wait_for(
            "pod-to-pod HTTP",
            lambda: lab.http_source(target, server_ip, 8080) or None,
            seconds=15,
        )
        # No masquerade inside the cluster: the server sees the client pod itself.
        assert seen == client["status"]["podIP"]
        assert lab.udp_echo(target, "x", server_ip, 9001) == f"{client['status']['podIP']} x"


def test_deleted_pods_are_torn_down(lab: Lab) -> None:
    lab.apply(spread_deployment("gone", 2))
    pods = wait_for("2 Ready gone pods", lambda: lab.ready_pods("app=gone", 2), seconds=60)
    uids = [p["metadata"]["uid"] for p in pods]
    assert all(f"{plan.PREFIX}-pod-{u[:8]}" in _netns() for u in uids)
    lab.kubectl("delete", "deployment", "gone", "--wait=false")
    wait_for(
        "gone pods deleted", lambda: not lab.get("pods", "-l", "app=gone")["items"], seconds=60
    )
    wait_for(
        "pod namespaces removed",
        lambda: not any(f"{plan.PREFIX}-pod-{u[:8]}" in _netns() for u in uids),
        seconds=30,
    )


def _netns() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _renew_time(lab: Lab, node: str) -> dt.datetime:
    lease = lab.get("lease", "-n", "kube-node-lease", node)
    return dt.datetime.fromisoformat(lease["spec"]["renewTime"].replace("Z", "+00:00"))


def test_killed_node_stops_renewing_and_restore_brings_it_back(
    lab: Lab, web: list[dict[str, Any]]
) -> None:
    victim, witness = "node-3", "node-1"
    before = {n: _renew_time(lab, n) for n in (victim, witness)}
    staticegress("lab", "node", "kill", victim)
    try:
        # The node is gone from the underlay.
        ping = subprocess.run(
            ["ping", "-c", "1", "-W", "1", str(plan.node_by_name(victim, 3).underlay_ip)],
            capture_output=True,
        )
        assert ping.returncode != 0, "a killed node still answers on the underlay"
        status = staticegress("lab", "status").stdout
        assert "killed" in status
        frozen = _renew_time(lab, victim)
        time.sleep(4 * 2.0 + 1)  # four renewal periods of the lab kubelet
        assert _renew_time(lab, victim) == frozen, "a killed node's lease was renewed"
        assert _renew_time(lab, witness) > before[witness], "a live node's lease stood still"
    finally:
        staticegress("lab", "node", "restore", victim)
    wait_for(
        "the restored node to renew its lease",
        lambda: _renew_time(lab, victim) > frozen,
        seconds=30,
    )
    # The restored node's pod is reachable again and still masquerades as its node.
    pod = next(p for p in web if p["spec"]["nodeName"] == victim)
    target = f"default/{pod['metadata']['name']}"
    assert wait_for(
        "restored pod egress", lambda: lab.http_source(target) or None, seconds=20
    ) == str(plan.node_by_name(victim, 3).underlay_ip)
    assert IPv4Address(pod["status"]["podIP"]) in IPv4Network("10.244.3.0/24")
