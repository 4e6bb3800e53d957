"""Pools, pure: who owns an egress IP, how far a rule reaches, what is never an egress
IP; and what the manager's assignment and an agent's dataplane make of it."""

from __future__ import annotations

import datetime as dt
from ipaddress import IPv4Address, ip_address, ip_network
from typing import Any

from staticegress.api.core import parse_namespace, parse_node, parse_pod, parse_service
from staticegress.api.pools import EgressIPPool, parse_pool
from staticegress.api.types import EgressIPRef, NodeName
from staticegress.api.v1alpha1 import parse_static_egress_ip
from staticegress.k8s.agentreport import decode, encode
from staticegress.model.assign import assign_gateways, owned_gateways
from staticegress.model.desired import AgentConfig, Snapshot, compute_desired
from staticegress.model.pools import (
    CROSS_NAMESPACE_DENIED,
    FORBIDDEN_ADDRESS,
    NAMESPACE_NOT_GRANTED,
    NOT_IN_POOL,
    forbidden_addresses,
    judge_tenancy,
    pool_usage,
    trusted_routers,
)
from staticegress.model.programmed import AgentRecord

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
OLD = "2026-11-01T00:00:00Z"
NEW = "2026-11-20T00:00:00Z"
NAMESPACES = {
    "tenant-a": {"kubernetes.io/metadata.name": "tenant-a", "tenant": "a"},
    "tenant-b": {"kubernetes.io/metadata.name": "tenant-b", "tenant": "b"},
    "shared": {"kubernetes.io/metadata.name": "shared", "tier": "shared"},
}
NODES = [
    parse_node(
        {
            "metadata": {
                "name": f"node-{i}",
                "labels": {"staticegress.io/gateway": "true", "zone": "a" if i < 3 else "b"},
            },
            "spec": {"podCIDR": f"10.244.{i}.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": f"198.51.100.{1 + i}"}]},
        }
    )
    for i in range(1, 5)
]
ALL = frozenset(NodeName(f"node-{i}") for i in range(1, 5))


def _pool(name: str, cidrs: list[str], namespaces: dict[str, Any], **more: Any) -> EgressIPPool:
    return parse_pool(
        {
            "apiVersion": "staticegressips.io/v1alpha1",
            "kind": "StaticEgressIPPool",
            "metadata": {"name": name, "generation": 1},
            "spec": {"cidrs": cidrs, "namespaceSelector": namespaces, **more},
        }
    )


def _pol(ns: str, name: str, ips: list[str], *, created: str = OLD, **rule: Any) -> Any:
    body = {"egressips": ips, "cidr": "203.0.113.0/24", "pod-selector": {}, **rule}
    return parse_static_egress_ip(
        {
            "metadata": {"namespace": ns, "name": name, "creationTimestamp": created},
            "spec": {"rules": [body]},
        }
    )


POOL_A = _pool("pool-a", ["198.51.100.200/30"], {"matchLabels": {"tenant": "a"}})
POOL_B = _pool("pool-b", ["198.51.100.208/30"], {"matchLabels": {"tenant": "b"}})


def _judge(pols: list[Any], pools: list[EgressIPPool], **kw: Any) -> Any:
    kw.setdefault("require_pool", True)
    return judge_tenancy(pols, pools=pools, namespaces=NAMESPACES, **kw)


def _assign(pols: list[Any], tenancy: Any) -> dict[str, Any]:
    results = assign_gateways(
        pols,
        nodes=[n for n in NODES if n],
        healthy=ALL,
        services=frozenset(),
        now=NOW,
        tenancy=tenancy,
    )
    return {str(r.ref): r for r in results}


def test_a_tenant_cannot_take_another_tenants_pooled_ip_whichever_is_older() -> None:
    for a_created, b_created in ((OLD, NEW), (NEW, OLD)):
        thief = _pol("tenant-a", "thief", ["198.51.100.209"], created=a_created)
        owner = _pol("tenant-b", "owner", ["198.51.100.209"], created=b_created)
        tenancy = _judge([thief, owner], [POOL_A, POOL_B])
        ip = ip_address("198.51.100.209")
        assert tenancy.owners[ip] == owner.ref
        assert tenancy.claim(thief.ref, ip).refused == NAMESPACE_NOT_GRANTED
        assert "pool-b" in tenancy.claim(thief.ref, ip).message
        out = _assign([thief, owner], tenancy)
        (mine,) = out["tenant-b/owner"].assignments
        assert mine.gateway is not None
        assert mine.pool == "pool-b"
        (theirs,) = out["tenant-a/thief"].assignments
        assert theirs.gateway is None
        assert theirs.reason == NAMESPACE_NOT_GRANTED
        ready = out["tenant-a/thief"].conditions[0]
        assert (ready.status, ready.reason) == ("False", NAMESPACE_NOT_GRANTED)
        assert "tenant-a" in ready.message
        assert any(e[1] == NAMESPACE_NOT_GRANTED for e in out["tenant-a/thief"].events)


def test_an_ip_in_no_pool_is_refused_unless_pools_are_optional() -> None:
    pol = _pol("tenant-a", "stray", ["192.0.2.77"])
    ip = ip_address("192.0.2.77")
    strict = _judge([pol], [POOL_A])
    assert ip not in strict.owners
    assert strict.claim(pol.ref, ip).refused == NOT_IN_POOL
    (a,) = _assign([pol], strict)["tenant-a/stray"].assignments
    assert (a.gateway, a.reason) == (None, NOT_IN_POOL)
    relaxed = _judge([pol], [POOL_A], require_pool=False)
    assert relaxed.owners[ip] == pol.ref
    assert relaxed.claim(pol.ref, ip).granted
    (a,) = _assign([pol], relaxed)["tenant-a/stray"].assignments
    assert a.gateway is not None
    assert a.pool is None


def test_a_pool_reserves_what_it_holds_even_when_pools_are_optional() -> None:
    pol = _pol("tenant-a", "thief", ["198.51.100.209"])
    tenancy = _judge([pol], [POOL_B], require_pool=False)
    assert tenancy.claim(pol.ref, ip_address("198.51.100.209")).refused == NAMESPACE_NOT_GRANTED


def test_forbidden_addresses_are_refused_inside_a_pool_and_nobody_inherits_them() -> None:
    wide = _pool("wide", ["198.51.100.0/24"], {})
    routers = trusted_routers(
        [
            (
                "node-1",
                IPv4Address("198.51.100.2"),
                ip_network("198.51.100.0/24"),
                [ip_address("198.51.100.1")],
            )
        ]
    )
    forbidden = forbidden_addresses(
        node_addresses=[(n.name, a) for n in NODES if n for a in n.addresses], routers=routers
    )
    first = _pol("tenant-a", "router", ["198.51.100.1"])
    second = _pol("tenant-b", "router-too", ["198.51.100.1"], created=NEW)
    node = _pol("tenant-a", "node", ["198.51.100.3"])
    tenancy = _judge([first, second, node], [wide], forbidden=forbidden)
    router_claim = tenancy.claim(first.ref, ip_address("198.51.100.1"))
    assert router_claim.refused == FORBIDDEN_ADDRESS
    assert "default gateway of node node-1" in router_claim.message
    node_claim = tenancy.claim(node.ref, ip_address("198.51.100.3"))
    assert node_claim.refused == FORBIDDEN_ADDRESS
    assert "node node-2" in node_claim.message
    # The oldest granted claimant keeps it: a younger one does not inherit it.
    assert tenancy.owners[ip_address("198.51.100.1")] == first.ref
    out = _assign([first, second, node], tenancy)
    assert all(a.gateway is None for r in out.values() for a in r.assignments)
    (a,) = out["tenant-b/router-too"].assignments
    assert a.reason == FORBIDDEN_ADDRESS


def test_reported_routers_count_only_inside_the_reporting_nodes_subnet() -> None:
    me = IPv4Address("198.51.100.2")
    got = trusted_routers(
        [
            ("honest", me, ip_network("198.51.100.0/24"), [ip_address("198.51.100.1")]),
            ("outside", me, ip_network("198.51.100.0/24"), [ip_address("203.0.113.10")]),
            ("not-mine", me, ip_network("192.0.2.0/24"), [ip_address("192.0.2.1")]),
            ("too-wide", me, ip_network("198.0.0.0/8"), [ip_address("198.51.100.7")]),
            ("no-node-ip", None, ip_network("198.51.100.0/24"), [ip_address("198.51.100.9")]),
        ]
    )
    assert got == [("honest", ip_address("198.51.100.1"))]


def test_cross_namespace_selection_needs_the_pools_grant() -> None:
    everyone = {"service-name": None, "namespace-selector": {}, "pod-selector": {}}
    pol = _pol("tenant-a", "wide", ["198.51.100.201"], **everyone)
    tenancy = _judge([pol], [POOL_A])
    rule = pol.spec.rules[0]
    assert tenancy.reach[(pol.ref, 0)] == frozenset({"tenant-a"})
    assert not tenancy.allows_namespace(pol.ref, rule, "tenant-b")
    (denial,) = tenancy.denials[pol.ref]
    assert "shared, tenant-b" in denial
    result = _assign([pol], tenancy)["tenant-a/wide"]
    degraded = next(c for c in result.conditions if c.type == "Degraded")
    assert degraded.reason == CROSS_NAMESPACE_DENIED

    granting = _pool(
        "pool-a",
        ["198.51.100.200/30"],
        {"matchLabels": {"tenant": "a"}},
        podNamespaceSelector={"matchLabels": {"tier": "shared"}},
    )
    tenancy = _judge([pol], [granting])
    assert tenancy.reach[(pol.ref, 0)] == frozenset({"tenant-a", "shared"})
    assert tenancy.allows_namespace(pol.ref, rule, "shared")
    assert not tenancy.allows_namespace(pol.ref, rule, "tenant-b")


def test_the_pools_node_selector_limits_the_gateways() -> None:
    zoned = _pool("zoned", ["198.51.100.200/30"], {}, nodeSelector={"matchLabels": {"zone": "b"}})
    pols = [_pol("tenant-a", "x", ["198.51.100.200", "198.51.100.201", "198.51.100.202"])]
    out = _assign(pols, _judge(pols, [zoned]))
    gateways = {a.gateway for a in out["tenant-a/x"].assignments}
    assert gateways <= {"node-3", "node-4"}
    assert None not in gateways
    nowhere = _pool("zoned", ["198.51.100.200/30"], {}, nodeSelector={"matchLabels": {"zone": "c"}})
    out = _assign(pols, _judge(pols, [nowhere]))
    assert {a.reason for a in out["tenant-a/x"].assignments} == {"NoEligibleGateway"}
    assert "pool zoned limits its gateways" in out["tenant-a/x"].conditions[0].message


def test_pool_usage_counts_the_owners_addresses() -> None:
    pols = [
        _pol("tenant-a", "x", ["198.51.100.200", "198.51.100.201"]),
        _pol("tenant-a", "y", ["198.51.100.201"], created=NEW),
        _pol("tenant-b", "z", ["198.51.100.202"]),
    ]
    usage = pool_usage([POOL_A, POOL_B], _judge(pols, [POOL_A, POOL_B]))
    assert (usage["pool-a"].total, usage["pool-a"].used, usage["pool-a"].free) == (4, 2, 2)
    assert usage["pool-a"].users == (EgressIPRef("tenant-a", "x"),)
    assert (usage["pool-b"].used, usage["pool-b"].free) == (0, 4)


# --------------------------------------------------------------- the agent's side


def _pod(ns: str, name: str, node: str, ip: str) -> Any:
    return parse_pod(
        {
            "metadata": {"namespace": ns, "name": name, "labels": {"app": "client"}},
            "spec": {"nodeName": node},
            "status": {"podIP": ip},
        }
    )


def _snapshot(pols: list[Any], pools: list[EgressIPPool], gateway: str = "node-2") -> Snapshot:
    with_status = [
        parse_static_egress_ip(
            {
                "metadata": {
                    "namespace": p.ref.namespace,
                    "name": p.ref.name,
                    "creationTimestamp": p.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                },
                "spec": {
                    "rules": [
                        {
                            "egressips": [str(e) for e in r.egress_ips],
                            "cidr": "203.0.113.0/24",
                            "pod-selector": {},
                            **(
                                {"namespace-selector": {}}
                                if r.namespace_selector is not None
                                else {}
                            ),
                        }
                        for r in p.spec.rules
                    ]
                },
                "status": {
                    "egressIPs": [
                        {"egressIP": str(e), "rule": 0, "gateway": gateway}
                        for r in p.spec.rules
                        for e in r.egress_ips
                    ]
                },
            }
        )
        for p in pols
    ]
    return Snapshot(
        policies=tuple(with_status),
        pods=(
            _pod("tenant-a", "a1", "node-1", "10.244.1.10"),
            _pod("tenant-b", "b1", "node-1", "10.244.1.11"),
        ),
        nodes=tuple(n for n in NODES if n),
        namespaces=tuple(
            n
            for n in (
                parse_namespace({"metadata": {"name": k, "labels": v}})
                for k, v in NAMESPACES.items()
            )
            if n
        ),
        pools=tuple(pools),
    )


def _steer(desired: Any) -> dict[str, Any]:
    return {str(ip): t for r in desired.rules for ip, t in r.steer}


def test_an_agent_follows_the_pools_for_ownership() -> None:
    thief = _pol("tenant-a", "thief", ["198.51.100.209"], created=OLD)
    owner = _pol("tenant-b", "owner", ["198.51.100.209"], created=NEW)
    snap = _snapshot([thief, owner], [POOL_A, POOL_B])
    gw = compute_desired(snap, AgentConfig(node=NodeName("node-2"), require_pool=True))
    assert gw.owned == (IPv4Address("198.51.100.209"),)
    # Only tenant-b's pod is SNATed to it; tenant-a's pod is not.
    assert {str(p) for r in gw.rules for p, _ in r.snat} == {"10.244.1.11"}
    director = compute_desired(snap, AgentConfig(node=NodeName("node-1"), require_pool=True))
    steer = _steer(director)
    assert steer["10.244.1.11"] != "drop"
    assert steer["10.244.1.10"] == "drop"  # the refused claim fails closed, on its own pods
    reasons = {(str(p.ref), p.reason) for p in director.problems}
    assert ("tenant-a/thief", NAMESPACE_NOT_GRANTED) in reasons
    assert ("tenant-a/thief", "EgressIPConflict") not in reasons


def test_an_agent_never_lets_a_refused_rule_reach_another_namespace() -> None:
    wide = _pol("tenant-a", "wide", ["192.0.2.77"], **{"namespace-selector": {}})
    snap = _snapshot([wide], [POOL_A])
    director = compute_desired(snap, AgentConfig(node=NodeName("node-1"), require_pool=True))
    steer = _steer(director)
    assert "10.244.1.11" not in steer, "another tenant's pod must be untouched"
    assert steer["10.244.1.10"] == "drop"
    # Without pools required, the same rule reaches everywhere (the opt-out).
    relaxed = compute_desired(snap, AgentConfig(node=NodeName("node-1"), require_pool=False))
    assert set(_steer(relaxed)) == {"10.244.1.10", "10.244.1.11"}


def test_shrinking_a_pool_withdraws_the_ip_on_the_gateway() -> None:
    pol = _pol("tenant-a", "x", ["198.51.100.201"])
    config = AgentConfig(node=NodeName("node-2"), require_pool=True)
    before = compute_desired(_snapshot([pol], [POOL_A]), config)
    assert before.owned == (IPv4Address("198.51.100.201"),)
    shrunk = _pool("pool-a", ["198.51.100.200/32"], {"matchLabels": {"tenant": "a"}})
    after = compute_desired(_snapshot([pol], [shrunk]), config)
    assert after.owned == ()
    assert all(not r.snat for r in after.rules)


def test_overlapping_pools_must_all_grant_as_the_admission_policy_judges() -> None:
    ip = ip_address("198.51.100.201")
    everyone = _pool(
        "everyone", ["198.51.100.200/29"], {}, nodeSelector={"matchLabels": {"zone": "a"}}
    )
    pol = _pol("tenant-a", "x", [str(ip)])
    both = _judge([pol], [POOL_A, everyone])
    assert both.claim(pol.ref, ip).granted
    (a,) = _assign([pol], both)["tenant-a/x"].assignments
    assert a.gateway in {"node-1", "node-2"}, "the gateway must match every holder's nodeSelector"
    other = _pol("tenant-b", "y", [str(ip)])
    refused = _judge([other], [POOL_A, everyone]).claim(other.ref, ip)
    assert refused.refused == NAMESPACE_NOT_GRANTED
    assert refused.message == (
        "egress IP 198.51.100.201 is in StaticEgressIPPool pool-a, "
        "which does not grant namespace tenant-b"
    )


def test_the_cluster_addresses_are_read_from_nodes_and_services() -> None:
    node = parse_node(
        {
            "metadata": {"name": "n"},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": "198.51.100.11"},
                    {"type": "ExternalIP", "address": "2001:db8::11"},
                    {"type": "Hostname", "address": "n"},
                ]
            },
        }
    )
    assert node is not None
    assert node.addresses == (ip_address("198.51.100.11"), ip_address("2001:db8::11"))
    svc = parse_service(
        {
            "metadata": {"namespace": "ns", "name": "lb"},
            "spec": {"loadBalancerIP": "192.0.2.5", "externalIPs": ["192.0.2.6"]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}, {"hostname": "x"}]}},
        }
    )
    assert svc is not None
    assert [str(a) for a in svc.load_balancer_ips] == ["192.0.2.5", "192.0.2.6", "192.0.2.7"]
    forbidden = forbidden_addresses(
        load_balancer_ips=[("ns/lb", a) for a in svc.load_balancer_ips],
        service_ranges=[ip_network("10.96.0.0/16")],
        pod_ranges=[("node n", ip_network("10.244.1.0/24"))],
    )
    assert forbidden.why(ip_address("192.0.2.6")) == "a LoadBalancer IP of Service ns/lb"
    assert forbidden.why(ip_address("10.96.3.4")) == "the service range 10.96.0.0/16"
    assert forbidden.why(ip_address("10.244.1.9")) == "the pod range 10.244.1.0/24 (node n)"
    assert forbidden.why(ip_address("192.0.2.8")) is None


def test_the_agents_report_carries_its_subnet_and_routers() -> None:
    record = AgentRecord(
        node=NodeName("n"),
        subnet=ip_network("198.51.100.0/24"),
        routers=frozenset({ip_address("198.51.100.1")}),
    )
    back = decode(NodeName("n"), encode(record))
    assert back.subnet == record.subnet
    assert back.routers == record.routers
    assert decode(NodeName("n"), encode(AgentRecord(node=NodeName("n")))).subnet is None


def test_the_grants_follow_the_owner_whatever_order_the_claimants_come_in() -> None:
    owner = _pol("tenant-b", "owner", ["198.51.100.209"], created=OLD)
    thief = _pol("tenant-a", "thief", ["198.51.100.209"], created=NEW)
    tenancy = _judge([owner, thief], [POOL_A, POOL_B])
    results = list(_assign([owner, thief], tenancy).values())
    ip = ip_address("198.51.100.209")
    for ordered in (results, results[::-1]):
        gateways = owned_gateways(ordered, tenancy.owners)
        assert gateways[ip] is not None, "a refused claimant cleared the owner's grant"
        assert gateways[ip] == next(a.gateway for a in results[0].assignments)
