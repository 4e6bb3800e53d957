"""One status entry per egress IP, even when several rules of one object list it.

The status list is a map keyed by egress IP: a second entry for one IP makes
the API server refuse the whole status (422 Duplicate value), so these tests
pin the model to exactly one entry per IP, and the agent's model to reading
it back for every rule that lists the IP.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from staticegress.api.core import parse_node
from staticegress.api.types import NodeName
from staticegress.api.v1alpha1 import parse_static_egress_ip
from staticegress.model.assign import assign_gateways, same_status, status_body

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
EIP = "192.0.2.7"
NODES = [
    parse_node(
        {
            "metadata": {
                "name": f"n{i}",
                "labels": {"staticegress.io/gateway": "true", "zone": "a" if i < 3 else "b"},
            },
            "status": {"addresses": [{"type": "InternalIP", "address": f"198.51.100.{10 + i}"}]},
        }
    )
    for i in range(1, 6)
]
ALL = frozenset(NodeName(f"n{i}") for i in range(1, 6))


def _pol(rules: list[dict[str, Any]], status: list[dict[str, Any]] | None = None) -> Any:
    return parse_static_egress_ip(
        {
            "metadata": {
                "namespace": "a",
                "name": "x",
                "creationTimestamp": "2026-11-01T00:00:00Z",
                "generation": 2,
            },
            "spec": {"rules": rules},
            "status": {"egressIPs": status or []},
        }
    )


def _rule(cidr: str, **extra: Any) -> dict[str, Any]:
    return {"egressip": EIP, "cidr": cidr, "pod-selector": {}, **extra}


def _run(pols: list[Any]) -> list[Any]:
    return assign_gateways(
        pols, nodes=[n for n in NODES if n], healthy=ALL, services=frozenset(), now=NOW
    )


def test_one_entry_per_egress_ip_when_two_rules_share_it() -> None:
    (res,) = _run([_pol([_rule("203.0.113.0/25"), _rule("203.0.113.128/25")])])
    (only,) = res.assignments
    assert str(only.egress_ip) == EIP
    assert only.gateway is not None
    assert (only.rule, only.rules) == (0, (0, 1))
    assert [e[1] for e in res.events] == ["GatewayAssigned"], "one Event per IP, not per rule"
    body = status_body(res, previous_conditions={}, now=NOW)
    keys = [e["egressIP"] for e in body["egressIPs"]]
    assert keys == [EIP]
    assert body["egressIPs"][0]["rule"] == 0
    assert body["egressIPs"][0]["rules"] == [0, 1]
    assert body["summary"]["egressIPs"] == EIP
    ready = {c["type"]: c for c in body["conditions"]}["Ready"]
    assert ready["status"] == "True"


def test_shared_ip_with_other_ips_keeps_first_listing_order_and_no_duplicates() -> None:
    rules = [
        {"egressips": ["192.0.2.1", EIP], "cidr": "203.0.113.0/25", "pod-selector": {}},
        {"egressips": [EIP, "192.0.2.2"], "cidr": "203.0.113.128/25", "pod-selector": {}},
    ]
    (res,) = _run([_pol(rules)])
    assert [str(a.egress_ip) for a in res.assignments] == ["192.0.2.1", EIP, "192.0.2.2"]
    assert {str(a.egress_ip): a.rules for a in res.assignments} == {
        "192.0.2.1": (0,),
        EIP: (0, 1),
        "192.0.2.2": (1,),
    }
    # Spreading still holds within each rule: the shared IP counts for both.
    gws = {str(a.egress_ip): a.gateway for a in res.assignments}
    assert gws["192.0.2.1"] != gws[EIP]
    assert gws["192.0.2.2"] != gws[EIP]


def test_shared_ip_needs_a_node_every_listing_rule_accepts() -> None:
    zone_a = {"gateway-selector": {"matchLabels": {"zone": "a"}}}
    (res,) = _run([_pol([_rule("203.0.113.0/25", **zone_a), _rule("203.0.113.128/25")])])
    (only,) = res.assignments
    assert only.gateway in {"n1", "n2"}, "rule 0 allows only zone a"
    zone_b = {"gateway-selector": {"matchLabels": {"zone": "b"}}}
    (res,) = _run([_pol([_rule("203.0.113.0/25", **zone_a), _rule("203.0.113.128/25", **zone_b)])])
    (only,) = res.assignments
    assert only.gateway is None, "no node is in both zones"
    degraded = {c.type: c for c in res.conditions}["Degraded"]
    assert degraded.reason == "NoEligibleGateway"


def test_shared_ip_status_is_stable_and_sticky() -> None:
    rules = [_rule("203.0.113.0/25"), _rule("203.0.113.128/25")]
    (first,) = _run([_pol(rules)])
    body = status_body(first, previous_conditions={}, now=NOW)
    # Read the written status back, as the next sync does.
    (again,) = _run([_pol(rules, status=body["egressIPs"])])
    assert again.events == ()
    prev = {c["type"]: c for c in body["conditions"]}
    assert same_status(status_body(again, previous_conditions=prev, now=NOW), body)


def test_agent_model_reads_the_shared_entry_for_both_rules() -> None:
    # The agent keys status entries by egress IP; with one entry it finds the
    # gateway for every rule that lists the IP.
    rules = [_rule("203.0.113.0/25"), _rule("203.0.113.128/25")]
    (res,) = _run([_pol(rules)])
    body = status_body(res, previous_conditions={}, now=NOW)
    pol = _pol(rules, status=body["egressIPs"])
    by_ip = {a.egress_ip: a for a in pol.status.egress_ips}
    for rule in pol.spec.rules:
        for eip in rule.egress_ips:
            assert by_ip[eip].gateway == res.assignments[0].gateway
    assert pol.status.egress_ips[0].rules == (0, 1)


def test_conflicting_shared_ip_is_reported_once() -> None:
    old = parse_static_egress_ip(
        {
            "metadata": {
                "namespace": "b",
                "name": "old",
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": {"rules": [_rule("198.51.100.0/24")]},
        }
    )
    young = _pol([_rule("203.0.113.0/25"), _rule("203.0.113.128/25")])
    res = {r.ref.name: r for r in _run([young, old])}
    (entry,) = res["x"].assignments
    assert entry.gateway is None
    degraded = {c.type: c for c in res["x"].conditions}["Degraded"]
    assert degraded.message.count("already claimed") == 1
