"""Who is given which published object: the labels the manager puts on each
StaticEgressIPMembers object (`render.members`), the label key of a node
(`api.members.gateway_label`), and the earlier rules a gateway must know
(`model.desired.shadowing_rules`)."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from ipaddress import IPv4Address
from typing import Any

from staticegress.api.members import (
    ENDPOINTS_LABEL,
    MANAGED_BY,
    MANAGER,
    MEMBERS_SELECTOR,
    Member,
    agent_selectors,
    gateway_label,
)
from staticegress.api.types import EgressIPAssignment, NodeName, StaticEgressIP
from staticegress.api.v1alpha1 import parse_static_egress_ip
from staticegress.model.desired import shadowing_rules
from staticegress.render.members import (
    POLICY_UID_LABEL,
    member_readers,
    render_member_shards,
    same_content,
)

# A label key: an optional DNS-subdomain prefix (at most 253) and a name of
# at most 63 characters, alphanumeric at both ends.
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def _policy(
    name: str,
    rules: list[dict[str, Any]],
    status: list[dict[str, Any]],
    *,
    second: int = 0,
) -> StaticEgressIP:
    return parse_static_egress_ip(
        {
            "apiVersion": "staticegressips.io/v1alpha1",
            "kind": "StaticEgressIP",
            "metadata": {
                "namespace": "shop",
                "name": name,
                "uid": f"uid-{name}",
                "generation": 1,
                "creationTimestamp": f"2026-11-01T00:00:{second:02d}Z",
            },
            "spec": {"rules": rules},
            "status": {"egressIPs": status},
        }
    )


def _member(pol: StaticEgressIP, rule: int, ip: str, node: str) -> Member:
    return Member(pol.ref, rule, IPv4Address(ip), NodeName(node))


def _gw_nodes(body: dict[str, Any], nodes: list[str]) -> set[str]:
    labels = body["metadata"]["labels"]
    return {n for n in nodes if gateway_label(n) in labels}


NODES = ["node-a", "node-b", "node-c", "node-d", "node-e"]


def test_the_node_label_is_a_valid_key_for_any_node_name() -> None:
    assert gateway_label("node-1") == (
        "gw.staticegressips.io/35971be6e9bb024a895582fe0e42e04848a86da5"
    )
    longest = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 253 characters
    assert len(longest) == 253
    for node in ("node-1", longest):
        prefix, _, name = gateway_label(node).partition("/")
        assert _PREFIX.match(prefix)
        assert len(prefix) <= 253
        assert _LABEL_NAME.match(name)
        assert len(name) == 40
    assert gateway_label("node-1") != gateway_label("node-2")
    assert gateway_label("node-1") == gateway_label("node-1")  # every side computes it alike


def test_the_agents_watch_their_own_label_and_every_endpoints_object() -> None:
    gateway, endpoints = agent_selectors("node-1")
    assert gateway == f"{MEMBERS_SELECTOR},{gateway_label('node-1')}"
    assert endpoints == f"{MEMBERS_SELECTOR},{ENDPOINTS_LABEL}=true"


def test_members_objects_are_labelled_for_gateways_and_standbys_of_their_rule() -> None:
    pol = _policy(
        "web",
        [
            {"egressip": "198.51.100.1", "pod-selector": {}, "cidr": "203.0.113.0/24"},
            # Lists .2 (shared with rule 2) and .3.
            {
                "egressips": ["198.51.100.2", "198.51.100.3"],
                "pod-selector": {},
                "cidr": "192.0.2.0/24",
            },
            {"egressip": "198.51.100.2", "pod-selector": {}, "cidr": "198.18.0.0/16"},
        ],
        [
            {"egressIP": "198.51.100.1", "rule": 0, "gateway": "node-a", "standbys": ["node-b"]},
            {"egressIP": "198.51.100.2", "rules": [1, 2], "gateway": "node-c"},
            {"egressIP": "198.51.100.3", "rule": 1, "gateway": "node-d", "standbys": ["node-e"]},
        ],
    )
    members = [_member(pol, r, f"10.244.1.{r + 1}", "node-x") for r in (0, 1, 2)]
    bodies = render_member_shards([pol], members, {}, namespace="ns")
    assert {name: _gw_nodes(b, NODES) for name, b in bodies.items()} == {
        "uid-web-0-0": {"node-a", "node-b"},
        "uid-web-1-0": {"node-c", "node-d", "node-e"},
        "uid-web-2-0": {"node-c"},
    }
    for body in bodies.values():
        labels = body["metadata"]["labels"]
        assert labels[MANAGED_BY] == MANAGER
        assert labels[POLICY_UID_LABEL] == "uid-web"
        assert ENDPOINTS_LABEL not in labels
        assert all(v == "" for k, v in labels.items() if k.startswith("gw."))


def test_no_gateway_no_label() -> None:
    pol = _policy(
        "lonely",
        [{"egressip": "198.51.100.1", "pod-selector": {}, "cidr": "203.0.113.0/24"}],
        [{"egressIP": "198.51.100.1", "rule": 0, "reason": "NoEligibleGateway"}],
    )
    (body,) = render_member_shards(
        [pol], [_member(pol, 0, "10.244.1.2", "node-x")], {}, namespace="ns"
    ).values()
    assert set(body["metadata"]["labels"]) == {MANAGED_BY, POLICY_UID_LABEL}


def test_endpoints_go_in_objects_of_their_own_that_every_agent_watches() -> None:
    pol = _policy(
        "manual",
        [{"egressip": "198.51.100.1", "service-name": "db", "cidr": "203.0.113.0/24"}],
        [{"egressIP": "198.51.100.1", "rule": 0, "gateway": "node-a"}],
    )
    endpoints = {("shop", "db"): (IPv4Address("10.244.1.9"), IPv4Address("10.244.2.9"))}
    members = [_member(pol, 0, "10.244.1.9", "node-1"), _member(pol, 0, "10.244.2.9", "node-2")]
    bodies = render_member_shards([pol], members, endpoints, namespace="ns", shard_size=1)
    assert sorted(bodies) == [
        "uid-manual-0-0",
        "uid-manual-0-1",
        "uid-manual-0-endpoints-0",
        "uid-manual-0-endpoints-1",
    ]
    for name, body in bodies.items():
        labels = body["metadata"]["labels"]
        if "endpoints" in name:
            assert labels[ENDPOINTS_LABEL] == "true"
            assert not _gw_nodes(body, NODES)
            assert body["service"] == "db"
            assert len(body["endpoints"]) == 1
            assert "members" not in body
        else:
            assert ENDPOINTS_LABEL not in labels
            assert _gw_nodes(body, NODES) == {"node-a"}
            assert "service" not in body
            assert "endpoints" not in body


def test_a_new_assignment_relabels_before_and_after_its_status_lands() -> None:
    """node-a is the gateway and node-b its standby; then node-b takes over
    and node-c becomes the standby. Until the status says so, both views
    hold the members; once it does, node-a is dropped."""
    rules = [{"egressip": "198.51.100.1", "pod-selector": {}, "cidr": "203.0.113.0/24"}]
    before = _policy(
        "web",
        rules,
        [{"egressIP": "198.51.100.1", "rule": 0, "gateway": "node-a", "standbys": ["node-b"]}],
    )
    members = [_member(before, 0, "10.244.1.2", "node-x")]
    since = datetime(2026, 11, 1, tzinfo=UTC)
    moved = EgressIPAssignment(
        IPv4Address("198.51.100.1"),
        0,
        NodeName("node-b"),
        since,
        (NodeName("node-c"),),
        rules=(0,),
    )

    def render(pol: StaticEgressIP, assigned: Any = None) -> dict[str, Any]:
        (body,) = render_member_shards(
            [pol], members, {}, namespace="ns", assigned=assigned
        ).values()
        return body

    old = render(before)
    assert _gw_nodes(old, NODES) == {"node-a", "node-b"}
    pending = render(before, {before.ref: (moved,)})
    assert _gw_nodes(pending, NODES) == {"node-a", "node-b", "node-c"}
    after = dataclasses.replace(
        before, status=dataclasses.replace(before.status, egress_ips=(moved,))
    )
    new = render(after, {before.ref: (moved,)})
    assert _gw_nodes(new, NODES) == {"node-b", "node-c"}
    assert render(after) == new
    # The publisher compares labels: each relabel is a write, no change none.
    assert not same_content(old, pending)
    assert not same_content(pending, new)
    assert same_content(new, render(after))


def test_an_earlier_rule_that_shadows_goes_to_the_later_rules_holders() -> None:
    older = _policy(
        "older",
        [{"egressip": "198.51.100.1", "pod-selector": {}, "cidr": "203.0.113.0/24"}],
        [{"egressIP": "198.51.100.1", "rule": 0, "gateway": "node-a"}],
        second=1,
    )
    younger = _policy(
        "younger",
        [
            {"egressip": "198.51.100.2", "pod-selector": {}, "cidr": "203.0.113.128/25"},
            {"egressip": "198.51.100.3", "pod-selector": {}, "cidr": "192.0.2.0/24"},
        ],
        [
            {"egressIP": "198.51.100.2", "rule": 0, "gateway": "node-b", "standbys": ["node-c"]},
            {"egressIP": "198.51.100.3", "rule": 1, "gateway": "node-d"},
        ],
        second=2,
    )
    shared = [_member(p, 0, "10.244.1.2", "node-x") for p in (older, younger)]
    members = [*shared, _member(younger, 1, "10.244.1.2", "node-x")]
    o0, y0, y1 = (older.ref, 0), (younger.ref, 0), (younger.ref, 1)
    # older#0 takes 203.0.113.128/25 from younger#0 for the shared pod;
    # younger#1 reaches elsewhere, and a later rule never shadows an earlier one.
    assert shadowing_rules([younger, older], members) == {y0: frozenset({o0})}
    readers = member_readers([older, younger], members)
    assert readers == {
        o0: frozenset({"node-a", "node-b", "node-c"}),
        y0: frozenset({"node-b", "node-c"}),
        y1: frozenset({"node-d"}),
    }
    # Without a shared pod, nothing shadows.
    apart = [shared[0], _member(younger, 0, "10.244.1.3", "node-x")]
    assert shadowing_rules([older, younger], apart) == {}
    assert member_readers([older, younger], apart)[o0] == {"node-a"}


def test_shadowing_is_not_transitive() -> None:
    """r0 shadows r1 and r1 shadows r2, but r0 and r2 reach apart: r2's
    gateway needs r1, not r0."""
    rules = [
        {"egressip": "198.51.100.1", "pod-selector": {}, "cidr": "203.0.113.0/25"},
        {"egressip": "198.51.100.2", "pod-selector": {}, "cidrs": ["203.0.113.0/24"]},
        {"egressip": "198.51.100.3", "pod-selector": {}, "cidr": "203.0.113.128/26"},
    ]
    pol = _policy(
        "chain",
        rules,
        [
            {"egressIP": f"198.51.100.{i + 1}", "rule": i, "gateway": f"node-{'abc'[i]}"}
            for i in range(3)
        ],
    )
    members = [_member(pol, i, "10.244.1.2", "node-x") for i in range(3)]
    r0, r1, r2 = ((pol.ref, i) for i in range(3))
    assert shadowing_rules([pol], members) == {r1: frozenset({r0}), r2: frozenset({r1})}
    assert member_readers([pol], members) == {
        r0: frozenset({"node-a", "node-b"}),
        r1: frozenset({"node-b", "node-c"}),
        r2: frozenset({"node-c"}),
    }
