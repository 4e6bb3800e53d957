"""compute_desired on scenarios: director, gateway, fail-closed, conflicts, slots."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from staticegress.api.types import NodeName
from staticegress.model.desired import (
    AgentConfig,
    DesiredState,
    assign_slots,
    compute_desired,
    stable_bucket,
)
from tests import scenario


def _by_rule(desired: DesiredState, attr: str) -> dict[str, dict[str, Any]]:
    return {
        r.name: {str(k): (str(v) if isinstance(v, IPv4Address) else v) for k, v in getattr(r, attr)}
        for r in desired.rules
        if getattr(r, attr)
    }


def test_mixed_scenario_matches_expectations() -> None:
    data = scenario.load("mixed")
    desired = compute_desired(scenario.snapshot(data), scenario.config(data))
    want = data["expect"]
    assert _by_rule(desired, "steer") == {
        k: {ip: v for ip, v in m.items()} for k, m in want["steer"].items()
    }
    assert _by_rule(desired, "snat") == want["snat"]
    assert [str(a) for a in desired.owned] == want["owned"]
    assert {g.node: g.slot for g in desired.gateways} == want["gateways"]
    assert [str(a) for a in desired.remote_pods] == want["remote_pods"]
    assert [str(n) for n in desired.cluster] == want["cluster"]
    assert [p.reason for p in desired.problems] == want["problems"]


def test_unselected_hostnetwork_and_pending_pods_are_never_programmed() -> None:
    data = scenario.load("mixed")
    desired = compute_desired(scenario.snapshot(data), scenario.config(data))
    steered = {str(ip) for r in desired.rules for ip, _ in r.steer}
    assert "10.244.1.3" not in _by_rule(desired, "steer").get("default/frontend#0", {})
    assert "198.51.100.11" not in steered  # host-network pod: its IP is the node's


def test_gateway_node_view() -> None:
    data = scenario.load("mixed")
    data["node"] = "node-2"
    desired = compute_desired(scenario.snapshot(data), scenario.config(data))
    assert [str(a) for a in desired.owned] == ["198.51.100.200"]
    snat = _by_rule(desired, "snat")["default/frontend#0"]
    assert snat == {"10.244.1.2": "198.51.100.200", "10.244.2.2": "198.51.100.200"}
    # Its own frontend pod goes out locally, SNATed here.
    assert _by_rule(desired, "steer")["default/frontend#0"] == {"10.244.2.2": "local"}
    assert desired.gateways == ()
    # The conflicting younger object's pods are never SNATed to the IP it lost.
    assert "default/thief#0" not in _by_rule(desired, "snat")


def test_vxlan_transport_adds_return_routes_and_peers() -> None:
    data = scenario.load("mixed")
    data["node"] = "node-2"
    desired = compute_desired(scenario.snapshot(data), scenario.config(data, "vxlan"))
    assert [(str(p), str(d)) for p, d in desired.return_routes] == [("10.244.1.2", "198.51.100.11")]
    assert [n for n, _ in desired.peers] == ["node-1"]
    direct = compute_desired(scenario.snapshot(data), scenario.config(data, "direct"))
    assert direct.return_routes == ()
    assert direct.peers == ()


def test_deterministic_and_order_independent() -> None:
    data = scenario.load("mixed")
    a = compute_desired(scenario.snapshot(data), scenario.config(data))
    data["pods"].reverse()
    data["staticegressips"].reverse()
    data["nodes"].reverse()
    b = compute_desired(scenario.snapshot(data), scenario.config(data))
    assert a == b


def test_gateway_that_is_not_a_node_fails_closed() -> None:
    data = scenario.load("mixed")
    data["staticegressips"][0]["status"]["egressIPs"][0]["gateway"] = "node-9"
    desired = compute_desired(scenario.snapshot(data), scenario.config(data))
    assert _by_rule(desired, "steer")["default/frontend#0"] == {"10.244.1.2": "drop"}
    assert desired.gateways == ()


def test_several_egress_ips_spread_pods_and_skip_ones_without_gateway() -> None:
    data = scenario.load("mixed")
    rule = data["staticegressips"][0]["spec"]["rules"][0]
    del rule["egressip"]
    rule["egressips"] = ["198.51.100.200", "198.51.100.210"]
    data["pods"] += [
        {
            "namespace": "default",
            "name": f"fe-x{i}",
            "node": "node-1",
            "ip": f"10.244.1.{100 + i}",
            "labels": {"app": "frontend"},
        }
        for i in range(20)
    ]
    data["staticegressips"][0]["status"]["egressIPs"].append(
        {"egressIP": "198.51.100.210", "gateway": "node-3"}
    )
    desired = compute_desired(scenario.snapshot(data), scenario.config(data))
    targets = set(_by_rule(desired, "steer")["default/frontend#0"].values())
    assert targets == {1, 2}, "pods should be spread over both gateways"
    # Without a gateway for .210, every pod uses .200 rather than failing closed.
    data["staticegressips"][0]["status"]["egressIPs"].pop()
    desired = compute_desired(scenario.snapshot(data), scenario.config(data))
    assert set(_by_rule(desired, "steer")["default/frontend#0"].values()) == {1}


def test_slots_are_sticky() -> None:
    prev = {NodeName("b"): 1, NodeName("c"): 2}
    slots = assign_slots([NodeName("a"), NodeName("c")], prev, 63)
    assert slots == {"c": 2, "a": 1}
    assert assign_slots([NodeName(f"n{i}") for i in range(5)], {}, 3) == {"n0": 1, "n1": 2, "n2": 3}


def test_out_of_slots_fails_closed() -> None:
    data = scenario.load("mixed")
    snap = scenario.snapshot(data)
    desired = compute_desired(snap, AgentConfig(node=NodeName("node-1"), max_slots=0))
    assert _by_rule(desired, "steer")["default/frontend#0"] == {"10.244.1.2": "drop"}


@pytest.mark.parametrize("buckets", [1, 2, 3, 7])
def test_stable_bucket_is_stable_and_in_range(buckets: int) -> None:
    ips = [IPv4Address("10.244.0.0") + i for i in range(200)]
    first = [stable_bucket(ip, buckets) for ip in ips]
    assert first == [stable_bucket(ip, buckets) for ip in ips]
    assert set(first) == set(range(buckets))


def test_cluster_cidrs_from_config_are_excluded() -> None:
    data = scenario.load("mixed")
    cfg = AgentConfig(node=NodeName("node-1"), cluster_cidrs=(IPv4Network("100.64.0.0/10"),))
    desired = compute_desired(scenario.snapshot(data), cfg)
    assert IPv4Network("100.64.0.0/10") in desired.cluster


def test_empty_snapshot_gives_empty_state() -> None:
    data = {"node": "node-1", "nodes": [], "pods": []}
    desired = compute_desired(scenario.snapshot(data), scenario.config(data))
    assert desired == DesiredState()


def test_a_gateway_guards_every_remote_pod_range_not_only_the_pods_it_knows() -> None:
    """A director can learn of a new pod before the gateway does; the gateway must
    drop that pod's steered traffic, not let the CNI masquerade it with its own IP."""
    data = scenario.load("mixed")
    data["node"] = "node-2"
    desired = compute_desired(scenario.snapshot(data), scenario.config(data))
    assert [str(n) for n in desired.remote_pod_ranges] == ["10.244.1.0/24", "10.244.3.0/24"]
    assert IPv4Network("10.244.2.0/24") not in desired.remote_pod_ranges
    assert [str(n) for n in desired.steered_destinations] == ["0.0.0.0/0"]
    # Without any rule there is nothing to steer and nothing to guard.
    data["staticegressips"] = []
    quiet = compute_desired(scenario.snapshot(data), scenario.config(data))
    assert quiet.remote_pod_ranges == ()
    assert quiet.steered_destinations == ()
