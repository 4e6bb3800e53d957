"""The published selection: an agent that watches only its own pods and takes
the other nodes' selected pods from the manager's publication programs what
it programs when it sees every pod.

Each node is given only the objects its two watches select (the members
objects labelled for it, and every endpoints object), so it knows fewer
remote pods than a node that sees everything: its guard (`remote_pods`)
lists the members of the rules whose egress IPs it is the gateway or a
standby of (and of the earlier rules that shadow those). Everything else is
the same."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from staticegress.api.members import agent_selectors
from staticegress.api.types import EgressIPRef, NodeName
from staticegress.k8s.snapshot import published_selection
from staticegress.model.desired import (
    DesiredState,
    Snapshot,
    compute_desired,
    select_members,
)
from staticegress.render.members import render_member_shards
from tests import scenario

NAMESPACE = "staticegress-system"


def _selects(selector: str, labels: Mapping[str, str]) -> bool:
    """A label selector of `key=value` and `key` (exists) terms, as the API
    server reads it."""
    for term in selector.split(","):
        key, eq, value = term.partition("=")
        if (labels.get(key) != value) if eq else (key not in labels):
            return False
    return True


def _published(full: Snapshot, *, shard_size: int = 1000) -> dict[str, dict[str, Any]]:
    """What the manager publishes for `full`, keyed like the agents' stores."""
    members, endpoints = select_members(full, require_pool=False)
    bodies = render_member_shards(
        full.policies, members, dict(endpoints), namespace=NAMESPACE, shard_size=shard_size
    )
    return {f"{NAMESPACE}/{name}": body for name, body in bodies.items()}


def _given_to(node: str, published: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The objects the agent of `node` holds: those either of its watches selects."""
    return {
        key: obj
        for key, obj in published.items()
        if any(_selects(sel, obj["metadata"]["labels"]) for sel in agent_selectors(node))
    }


def _published_view(
    full: Snapshot, node: str, shards: Mapping[str, dict[str, Any]] | None = None
) -> Snapshot:
    """`node`'s snapshot in published mode: its own pods, and the objects it is given."""
    given = _given_to(node, _published(full)) if shards is None else shards
    own = dataclasses.replace(full, pods=tuple(p for p in full.pods if p.node == node))
    view, dropped = published_selection(given, own)
    assert dropped == 0
    return view


def _roles(full: Snapshot, node: str) -> set[tuple[EgressIPRef, int]]:
    """The rules listing an egress IP whose status names `node` as its gateway
    or a standby."""
    return {
        (pol.ref, index)
        for pol in full.policies
        for a in pol.status.egress_ips
        if node in (a.gateway, *a.standbys)
        for index in a.rules or (a.rule,)
    }


def _remote_members(full: Snapshot, node: str, rules: set[tuple[EgressIPRef, int]]) -> set[str]:
    members, _ = select_members(full, require_pool=False)
    return {str(m.ip) for m in members if m.node != node and (m.ref, m.rule) in rules}


def _but_the_guard(d: DesiredState) -> DesiredState:
    return dataclasses.replace(d, remote_pods=())


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


def _with_standbys(snap: Snapshot) -> Snapshot:
    """`snap` with standbys on the statuses: node-2 for the billing and manual
    rules' egress IPs, node-3 for frontend's."""
    standbys = {"frontend": ("node-3",), "billing": ("node-2",), "manual": ("node-2",)}
    policies = []
    for pol in snap.policies:
        entries = tuple(
            dataclasses.replace(
                a, standbys=tuple(NodeName(n) for n in standbys.get(pol.ref.name, ()))
            )
            for a in pol.status.egress_ips
        )
        status = dataclasses.replace(pol.status, egress_ips=entries)
        policies.append(dataclasses.replace(pol, status=status))
    return dataclasses.replace(snap, policies=tuple(policies))


@pytest.mark.parametrize("standbys", [False, True])
@pytest.mark.parametrize("node", ["node-1", "node-2", "node-3"])
@pytest.mark.parametrize("transport", ["direct", "vxlan"])
def test_the_published_view_programs_what_the_full_view_does(
    node: str, transport: str, standbys: bool
) -> None:
    full, config = _mixed(node)
    if standbys:
        full = _with_standbys(full)
    config = dataclasses.replace(config, transport=transport)
    want = compute_desired(full, config)
    got = compute_desired(_published_view(full, node), config)
    assert _but_the_guard(got) == _but_the_guard(want)
    # The guard: exactly the other nodes' members of this node's gateway and
    # standby rules (none of these rules shadows another).
    assert {str(ip) for ip in got.remote_pods} == _remote_members(full, node, _roles(full, node))
    assert set(got.remote_pods) <= set(want.remote_pods)
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


def test_a_node_with_no_role_knows_no_remote_member_but_steers_as_before() -> None:
    """node-2 gateways nothing of billing or manual: without standbys it holds
    none of their members, with them it holds them all."""
    full, config = _mixed("node-2")
    local = compute_desired(full, config)
    alone = compute_desired(_published_view(full, "node-2"), config)
    assert {str(ip) for ip in alone.remote_pods} == {"10.244.1.2"}  # frontend's, its gateway
    assert {"10.244.3.7", "10.244.1.9"} <= {str(ip) for ip in local.remote_pods}
    standby = compute_desired(_published_view(_with_standbys(full), "node-2"), config)
    assert {"10.244.3.7", "10.244.1.9"} <= {str(ip) for ip in standby.remote_pods}


@pytest.mark.parametrize("node", ["node-1", "node-2", "node-3"])
def test_overlapping_rules_through_the_publication(node: str) -> None:
    full, config = scenario.overlapping(node)
    want = compute_desired(full, config)
    got = compute_desired(_published_view(full, node), config)
    assert _but_the_guard(got) == _but_the_guard(want)
    # node-1 SNATs the younger rule's pods, the older rule shadows it (same
    # pods, overlapping destinations): node-1 is given the older rule too.
    shadowing = {(EgressIPRef("default", "older"), 0)} if node == "node-1" else set()
    rules = _roles(full, node) | shadowing
    assert {str(ip) for ip in got.remote_pods} == _remote_members(full, node, rules)


def test_a_gateway_without_the_shadowing_rule_would_snat_too_much() -> None:
    """Why the older rule's members go to the younger rule's gateway: without
    them it SNATs web-3's traffic to 203.0.113.0/25, which first-match gives
    to the older rule (and its gateway, node-2)."""
    full, config = scenario.overlapping("node-1")
    given = _given_to("node-1", _published(full))
    older = {k for k, o in given.items() if o["policy"]["name"] == "older"}
    assert older  # given, by the label of the younger rule's gateway
    without = {k: o for k, o in given.items() if k not in older}
    wrong = compute_desired(_published_view(full, "node-1", without), config)
    right = compute_desired(full, config)
    assert wrong.snat_pieces != right.snat_pieces
    web3, older_reach = IPv4Address("10.244.3.2"), IPv4Network("203.0.113.0/25")
    assert any(ip == web3 and n.overlaps(older_reach) for ip, n, _ in wrong.snat_pieces)
    assert not any(ip == web3 and n.overlaps(older_reach) for ip, n, _ in right.snat_pieces)


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


_CIDRS = (
    "0.0.0.0/0",
    "192.0.2.0/24",
    "203.0.113.0/24",
    "203.0.113.0/25",
    "203.0.113.128/25",
    "203.0.113.64/26",
    "203.0.113.10/32",
)


def _random_cluster(rng: random.Random) -> dict[str, Any]:
    """Four nodes, a dozen pods, up to four objects of up to three rules whose
    selectors and destinations often overlap, most egress IPs with a gateway
    and standbys."""
    nodes = [f"node-{i}" for i in (1, 2, 3, 4)]
    pods = []
    for i in range(12):
        n = rng.choice(nodes)
        labels = {"app": rng.choice("abc"), "tier": rng.choice("xy")}
        pods.append(
            {"namespace": "default", "name": f"p{i}", "node": n, "ip": f"10.244.{n[-1]}.{i + 2}"}
            | {"labels": labels}
        )
    policies, last = [], 100
    for k in range(rng.randint(1, 4)):
        rules: list[dict[str, Any]] = []
        status = []
        for r in range(rng.randint(1, 3)):
            last += 1
            eip = f"198.51.100.{last}"
            match = rng.choice([{"app": rng.choice("abc")}, {"tier": rng.choice("xy")}, {}])
            rule: dict[str, Any] = {"egressip": eip, "pod-selector": {"matchLabels": match}}
            rule["cidrs"] = rng.sample(_CIDRS, rng.randint(1, 2))
            if rng.random() < 0.3:
                rule["excluded-cidrs"] = ["203.0.113.0/27"]
            rules.append(rule)
            if rng.random() < 0.85:
                gw = rng.choice(nodes)
                standbys = rng.sample([n for n in nodes if n != gw], rng.randint(0, 2))
                status.append({"egressIP": eip, "gateway": gw, "standbys": standbys, "rules": [r]})
        meta = {"namespace": "default", "name": f"pol{k}", "uid": f"u{k}"}
        meta["creationTimestamp"] = f"2026-11-01T00:00:{k:02d}Z"
        policies.append(
            {"metadata": meta, "spec": {"rules": rules}, "status": {"egressIPs": status}}
        )
    return {
        "nodes": [
            {"name": n, "ip": f"198.51.100.1{n[-1]}", "podCIDR": f"10.244.{n[-1]}.0/24"}
            for n in nodes
        ],
        "namespaces": [{"name": "default"}],
        "pods": pods,
        "staticegressips": policies,
    }


@pytest.mark.parametrize("seed", range(100))
def test_random_clusters_program_alike_through_the_publication(seed: int) -> None:
    """Overlapping selectors and destinations in every combination: each node,
    given only its labelled objects, programs what it would see everything,
    but for its guard, which lists the members of exactly the rules it is
    given (its gateway and standby rules and the earlier rules that shadow
    them), every one of its gateway and standby rules among them."""
    rng = random.Random(seed)
    data = _random_cluster(rng)
    full = scenario.snapshot(data)
    given_rules = {
        (o["policy"]["namespace"], o["policy"]["name"], o["rule"], node)
        for node in ("node-1", "node-2", "node-3", "node-4")
        for o in _given_to(node, _published(full)).values()
        if o.get("members")
    }
    selecting = {(m.ref, m.rule) for m in select_members(full, require_pool=False)[0]}
    for node in ("node-1", "node-2", "node-3", "node-4"):
        config = dataclasses.replace(scenario.config(data | {"node": node}), transport="vxlan")
        want = compute_desired(full, config)
        got = compute_desired(_published_view(full, node), config)
        assert _but_the_guard(got) == _but_the_guard(want)
        rules = {(EgressIPRef(ns, name), rule) for ns, name, rule, n in given_rules if n == node}
        assert _roles(full, node) & selecting <= rules
        assert {str(ip) for ip in got.remote_pods} == _remote_members(full, node, rules)


def test_members_sort_by_plain_values_in_their_own_order() -> None:
    """The manager's selection and the agent's snapshot sort thousands of
    members by plain values; the order must be `Member`'s own (refs, then
    rule, address and node), so that both see the same result either way."""
    from staticegress.api.members import Member, member_order

    rnd = random.Random(7)
    members = {
        Member(
            EgressIPRef(rnd.choice(["a", "b", "kube"]), rnd.choice(["x", "y", "x-1"])),
            rnd.randrange(3),
            IPv4Address(rnd.choice(["10.0.0.9", "10.0.0.10", "9.255.0.1", "10.0.1.2"])),
            NodeName(rnd.choice(["node-1", "node-10", "node-2"])),
        )
        for _ in range(300)
    }
    assert sorted(members, key=member_order) == sorted(members)
