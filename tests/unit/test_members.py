"""The published selection: an agent that watches only its own pods and takes
the other nodes' selected pods from the manager's publication programs exactly
what it programs when it sees every pod."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from staticegress.model.desired import Snapshot, compute_desired, select_members
from tests import scenario


def _published_view(full: Snapshot, node: str) -> Snapshot:
    members, endpoints = select_members(full, require_pool=False)
    return dataclasses.replace(
        full,
        pods=tuple(p for p in full.pods if p.node == node),
        endpoints=endpoints,
        members=members,
    )


def _mixed(node: str) -> tuple[Snapshot, Any]:
    data = scenario.load("mixed")
    data["node"] = node
    # A Service without a selector whose endpoints are a pod on node-1 and one
    # on node-3: selected through the published endpoint addresses.
    data["services"].append({"namespace": "default", "name": "manual", "selector": None})
    data["staticegressips"].append(
        {
            "metadata": {
                "namespace": "default",
                "name": "manual",
                "creationTimestamp": "2026-11-06T00:00:00Z",
                "uid": "u9",
            },
            "spec": {
                "rules": [
                    {
                        "egressip": "198.51.100.209",
                        "service-name": "manual",
                        "cidr": "203.0.113.200/32",
                    }
                ]
            },
            "status": {"egressIPs": [{"egressIP": "198.51.100.209", "gateway": "node-3"}]},
        }
    )
    snap = scenario.snapshot(data)
    slices = (
        ("default", "manual"),
        (*(p.ip for p in snap.pods if p.name in ("bill-2", "bill-1")),),
    )
    return dataclasses.replace(snap, endpoints=(slices,)), scenario.config(data)  # type: ignore[arg-type]


@pytest.mark.parametrize("node", ["node-1", "node-2", "node-3"])
@pytest.mark.parametrize("transport", ["direct", "vxlan"])
def test_the_published_view_programs_what_the_full_view_does(node: str, transport: str) -> None:
    full, config = _mixed(node)
    config = dataclasses.replace(config, transport=transport)
    want = compute_desired(full, config)
    got = compute_desired(_published_view(full, node), config)
    assert got == want
    assert want.steer_pieces or want.snat_pieces  # the scenario does program something here
    if node == "node-1":  # its pod behind the Service without a selector is steered
        assert any(
            str(ip) == "10.244.1.9" and str(n) == "203.0.113.200/32"
            for ip, n, _ in got.steer_pieces
        )
    if node == "node-3":  # the gateway of that Service's egress IP SNATs both of its pods
        assert {str(ip) for ip, _, e in got.snat_pieces if str(e) == "198.51.100.209"} == {
            "10.244.1.9",
            "10.244.3.7",
        }


@pytest.mark.parametrize("node", ["node-1", "node-2", "node-3"])
def test_overlapping_rules_through_the_publication(node: str) -> None:
    full, config = scenario.overlapping(node)
    assert compute_desired(_published_view(full, node), config) == compute_desired(full, config)


def test_without_the_publication_a_gateway_knows_no_remote_member() -> None:
    """The publication is the only source of other nodes' pods: an empty one
    means nothing to SNAT for them (and so their traffic is dropped here)."""
    full, config = _mixed("node-1")
    view = dataclasses.replace(_published_view(full, "node-1"), members=())
    got = compute_desired(view, config)
    assert not any(ip.packed[2] != 1 for ip, *_ in got.snat_pieces)
    assert compute_desired(full, config).remote_pods != got.remote_pods


def test_members_name_each_pod_with_its_node_and_rule() -> None:
    full, _ = _mixed("node-1")
    members, endpoints = select_members(full, require_pool=False)
    billing = {(str(m.ip), m.node) for m in members if m.ref.name == "billing"}
    assert billing == {("10.244.3.7", "node-3"), ("10.244.1.9", "node-1")}
    assert {k for k, _ in endpoints} == {("default", "manual")}
    assert all(m.rule == 0 for m in members)


def test_a_published_object_is_checked_like_any_input() -> None:
    from staticegress.api.members import InvalidShardError, parse_member_shard

    good = {
        "policy": {"namespace": "shop", "name": "web", "uid": "u1"},
        "rule": 2,
        "members": [{"ip": "10.244.1.2", "node": "node-1"}],
        "service": "manual",
        "endpoints": ["10.244.1.9"],
    }
    shard = parse_member_shard(good)
    assert (shard.rule, [str(m.ip) for m in shard.members], shard.service) == (
        2,
        ["10.244.1.2"],
        "manual",
    )
    for bad, why in (
        ({"members": [{"ip": "10.244.1.300", "node": "node-1"}]}, "members[0].ip"),
        ({"members": [{"ip": "2001:db8::1", "node": "node-1"}]}, "members[0].ip"),
        ({"members": [{"ip": "10.244.1.2", "node": "Node 1"}]}, "members[0].node"),
        ({"endpoints": ["nowhere"]}, "endpoints[0]"),
        ({"rule": 64}, "rule"),
        ({"rule": True}, "rule"),
        ({"policy": {"namespace": "shop", "name": "web"}}, "policy"),
    ):
        with pytest.raises(InvalidShardError, match=why.replace("[", r"\[").replace("]", r"\]")):
            parse_member_shard({**good, **bad})
