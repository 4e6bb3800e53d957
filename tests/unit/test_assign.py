"""assign_gateways: stickiness, spreading, health, conflicts, conditions, events."""

from __future__ import annotations

import datetime as dt
from typing import Any

from staticegress.api.core import parse_node
from staticegress.api.types import NodeName
from staticegress.api.v1alpha1 import parse_static_egress_ip
from staticegress.model.assign import assign_gateways, rank, status_body

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
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


def _pol(
    name: str,
    ips: list[str],
    *,
    created: str = "2026-11-01T00:00:00Z",
    status: list[dict[str, Any]] | None = None,
    **rule: Any,
) -> Any:
    return parse_static_egress_ip(
        {
            "metadata": {
                "namespace": "ns",
                "name": name,
                "creationTimestamp": created,
                "generation": 3,
            },
            "spec": {
                "rules": [{"egressips": ips, "cidr": "203.0.113.0/24", "pod-selector": {}, **rule}]
            },
            "status": {"egressIPs": status or []},
        }
    )


def _gw(result: Any) -> dict[str, str | None]:
    return {str(a.egress_ip): a.gateway for a in result.assignments}


def _run(pols: list[Any], healthy: frozenset[NodeName] = ALL, **kw: Any) -> list[Any]:
    return assign_gateways(
        pols,
        nodes=[n for n in NODES if n],
        healthy=healthy,
        services=frozenset({("ns", "web")}),
        now=NOW,
        **kw,
    )


def test_fresh_assignment_spreads_a_rules_ips_over_distinct_nodes() -> None:
    (res,) = _run([_pol("a", ["192.0.2.1", "192.0.2.2", "192.0.2.3"])])
    gws = _gw(res)
    assert len(set(gws.values())) == 3
    assert [c.status for c in res.conditions] == ["True", "True", "False"]
    assert {e[1] for e in res.events} == {"GatewayAssigned"}
    for a in res.assignments:
        assert a.gateway not in a.standbys
        assert len(a.standbys) == 2


def test_deterministic() -> None:
    assert _run([_pol("a", ["192.0.2.1", "192.0.2.2"])]) == _run(
        [_pol("a", ["192.0.2.1", "192.0.2.2"])]
    )


def test_sticky_while_healthy_and_moves_when_not() -> None:
    ranked = rank("192.0.2.1", sorted(ALL))  # type: ignore[arg-type]
    not_first = ranked[2]
    status = [{"egressIP": "192.0.2.1", "gateway": not_first, "since": "2026-11-01T00:00:00Z"}]
    (res,) = _run([_pol("a", ["192.0.2.1"], status=status)])
    assert _gw(res) == {"192.0.2.1": not_first}, "a healthy owner must keep its IP"
    assert res.assignments[0].since == dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    assert res.events == ()
    (moved,) = _run([_pol("a", ["192.0.2.1"], status=status)], healthy=ALL - {not_first})
    assert _gw(moved)["192.0.2.1"] == next(n for n in ranked if n != not_first)
    assert moved.assignments[0].since == NOW
    assert [e[1] for e in moved.events] == ["GatewayFailover"]


def test_recovered_node_gets_nothing_back() -> None:
    status = [{"egressIP": "192.0.2.1", "gateway": "n2", "since": "2026-11-01T00:00:00Z"}]
    (res,) = _run([_pol("a", ["192.0.2.1"], status=status)])
    assert _gw(res) == {"192.0.2.1": "n2"}


def test_gateway_selector_restricts_candidates() -> None:
    (res,) = _run(
        [
            _pol(
                "a",
                ["192.0.2.1", "192.0.2.2"],
                **{"gateway-selector": {"matchLabels": {"zone": "b"}}},
            )
        ]
    )
    chosen = set(_gw(res).values())
    assert chosen <= {"n3", "n4", "n5"}
    assert len(chosen) == 2


def test_no_eligible_gateway() -> None:
    (res,) = _run([_pol("a", ["192.0.2.1"])], healthy=frozenset())
    assert _gw(res) == {"192.0.2.1": None}
    ready = {c.type: c for c in res.conditions}["Ready"]
    assert (ready.status, ready.reason) == ("False", "NoEligibleGateway")
    assert [e[1] for e in res.events] == ["NoEligibleGateway"]


def test_conflict_goes_to_the_younger_object() -> None:
    old = _pol("old", ["192.0.2.1"], created="2026-01-01T00:00:00Z")
    young = _pol("young", ["192.0.2.1"], created="2026-06-01T00:00:00Z")
    res = {r.ref.name: r for r in _run([young, old])}
    assert _gw(res["old"])["192.0.2.1"] is not None
    assert _gw(res["young"]) == {"192.0.2.1": None}
    degraded = {c.type: c for c in res["young"].conditions}["Degraded"]
    assert (degraded.status, degraded.reason) == ("True", "EgressIPConflict")


def test_missing_service_is_reported() -> None:
    pol = parse_static_egress_ip(
        {
            "metadata": {"namespace": "ns", "name": "s"},
            "spec": {
                "rules": [
                    {"egressip": "192.0.2.9", "service-name": "gone", "cidr": "203.0.113.0/24"}
                ]
            },
        }
    )
    (res,) = _run([pol])
    degraded = {c.type: c for c in res.conditions}["Degraded"]
    assert degraded.reason == "ServiceNotFound"


def test_status_body_keeps_transition_times_and_summarises() -> None:
    (res,) = _run([_pol("a", ["192.0.2.1", "192.0.2.2"])])
    prev = {
        "Ready": {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    }
    body = status_body(res, previous_conditions=prev, now=NOW)
    cond = {c["type"]: c for c in body["conditions"]}
    assert cond["Ready"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert cond["Degraded"]["lastTransitionTime"] == "2026-12-01T12:00:00Z"
    assert body["observedGeneration"] == 3
    assert body["summary"]["egressIPs"] == "192.0.2.1,192.0.2.2"
    assert body["summary"]["gateways"].count(",") == 1
