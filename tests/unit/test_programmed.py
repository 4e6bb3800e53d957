"""`Programmed` from agent records: gateways and directors confirming the generation,
fenced gateways, new generations, missing records; and what an agent's record lists."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address
from typing import Any

import pytest

from staticegress.api.core import parse_node
from staticegress.api.types import EgressIPAssignment, EgressIPRef, NodeName
from staticegress.api.v1alpha1 import parse_static_egress_ip
from staticegress.model.assign import ConditionOut, PolicyResult, assign_gateways
from staticegress.model.desired import DesiredState, RuleProgram
from staticegress.model.programmed import (
    AgentRecord,
    agent_record,
    confirm_programmed,
    previous_programmed,
)

REF = EgressIPRef("ns", "web")
OTHER = EgressIPRef("ns", "other")
IP1, IP2 = ip_address("198.51.100.200"), ip_address("198.51.100.201")
N = NodeName


def _result(gen: int = 4, gateways: tuple[str | None, ...] = ("gw1", "gw2")) -> PolicyResult:
    ips = (IP1, IP2)
    return PolicyResult(
        ref=REF,
        generation=gen,
        assignments=tuple(
            EgressIPAssignment(ips[i], 0, N(g) if g else None, None) for i, g in enumerate(gateways)
        ),
        conditions=(
            ConditionOut("Ready", "True", "GatewayAssigned", "every egress IP has a gateway"),
            ConditionOut("Programmed", "True", "GatewaysLive", "assignment only"),
            ConditionOut("Degraded", "False", "AsExpected", "no problems"),
        ),
    )


def _rec(
    node: str,
    gen: int | None = 4,
    *,
    owned: tuple[Any, ...] = (),
    withheld: tuple[Any, ...] = (),
) -> AgentRecord:
    return AgentRecord(
        node=N(node),
        applied={REF: gen} if gen is not None else {OTHER: 1},
        fenced=bool(withheld),
        withheld=frozenset(withheld),
        owned=frozenset(owned),
    )


GW1 = _rec("gw1", owned=(IP1,))
GW2 = _rec("gw2", owned=(IP2,))


@dataclass(frozen=True)
class Case:
    name: str
    records: list[AgentRecord]
    status: str
    reason: str
    mentions: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    gen: int = 4
    extra: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("all confirmed", [GW1, GW2, _rec("d1"), _rec("d2")], "True", "AgentsConfirmed"),
    Case("no directors yet", [GW1, GW2], "True", "AgentsConfirmed"),
    Case(
        "director newer than the manager's cache",
        [GW1, GW2, _rec("d1", 5)],
        "True",
        "AgentsConfirmed",
    ),
    Case(
        "a gateway has no record",
        [GW1, _rec("d1")],
        "False",
        "AwaitingGateway",
        mentions=("gw2 (198.51.100.201)",),
        absent=("gw1",),
    ),
    Case(
        "a gateway applied an older generation",
        [GW1, _rec("gw2", 3, owned=(IP2,))],
        "False",
        "AwaitingGateway",
        mentions=("gw2", "generation 4"),
    ),
    Case(
        "a gateway confirmed but does not hold the IP yet (just moved to it)",
        [GW1, _rec("gw2", owned=())],
        "False",
        "AwaitingGateway",
        mentions=("gw2",),
    ),
    Case(
        "a gateway lists only other objects",
        [GW1, _rec("gw2", None, owned=(IP2,))],
        "False",
        "AwaitingGateway",
        mentions=("gw2",),
    ),
    Case(
        "a director lags",
        [GW1, GW2, _rec("d1"), _rec("d2", 3)],
        "False",
        "AwaitingDirectors",
        mentions=("d2 (at 3)",),
        absent=("d1",),
    ),
    Case(
        "a node not steering the object is no director",
        [GW1, GW2, _rec("d3", None)],
        "True",
        "AgentsConfirmed",
    ),
    Case(
        "a fenced gateway",
        [GW1, _rec("gw2", withheld=(IP2,)), _rec("d1", 3)],
        "False",
        "GatewayFenced",
        mentions=("gw2 (198.51.100.201)", "d1 (at 3)"),
    ),
    Case(
        "fenced outranks awaiting",
        [_rec("gw1", 3, owned=(IP1,)), _rec("gw2", withheld=(IP2,))],
        "False",
        "GatewayFenced",
        mentions=("gw1", "gw2"),
    ),
    Case(
        "a new generation: everyone confirmed the previous one",
        [_rec("gw1", 4, owned=(IP1,)), _rec("gw2", 4, owned=(IP2,)), _rec("d1", 4)],
        "False",
        "AwaitingGateway",
        gen=5,
        mentions=("gw1", "gw2", "d1 (at 4)"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_programmed(case: Case) -> None:
    res = _result(case.gen)
    (out,) = confirm_programmed([res], records={r.node: r for r in case.records}, previous={})
    cond = {c.type: c for c in out.conditions}["Programmed"]
    assert (cond.status, cond.reason) == (case.status, case.reason), cond.message
    for text in case.mentions:
        assert text in cond.message
    for text in case.absent:
        assert text not in cond.message
    # Only Programmed is replaced; the other conditions and their order stay.
    assert [c.type for c in out.conditions] == ["Ready", "Programmed", "Degraded"]
    assert out.conditions[0] == res.conditions[0]
    assert out.conditions[2] == res.conditions[2]


def test_a_missing_gateway_keeps_the_assignment_verdict() -> None:
    res = _result(gateways=("gw1", None))
    missing = ConditionOut("Programmed", "False", "GatewayMissing", "dropped")
    res = PolicyResult(
        ref=res.ref,
        generation=res.generation,
        assignments=res.assignments,
        conditions=(missing,),
    )
    (out,) = confirm_programmed([res], records={N("gw1"): GW1}, previous={})
    assert out.conditions == (missing,)


def test_before_the_records_are_listed_the_status_keeps_its_condition() -> None:
    res = _result()
    before = ConditionOut("Programmed", "True", "AgentsConfirmed", "earlier verdict")
    (kept,) = confirm_programmed([res], records=None, previous={REF: before})
    assert {c.type: c for c in kept.conditions}["Programmed"] == before
    (fresh,) = confirm_programmed([res], records=None, previous={})
    prog = {c.type: c for c in fresh.conditions}["Programmed"]
    assert (prog.status, prog.reason) == ("Unknown", "AwaitingReports")


def test_spec_edit_turns_programmed_false_until_reconfirmed() -> None:
    """Through assign_gateways, as the manager runs it: True at generation 1,
    False after an edit, True again once the gateway and director confirm."""
    node = {
        "metadata": {"name": "gw1", "labels": {"staticegress.io/gateway": "true"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "198.51.100.11"}]},
    }
    nodes = [n for n in [parse_node(node)] if n is not None]

    def policy(gen: int) -> Any:
        return parse_static_egress_ip(
            {
                "metadata": {"namespace": "ns", "name": "web", "generation": gen},
                "spec": {
                    "rules": [
                        {"egressips": [str(IP1)], "cidr": "203.0.113.0/24", "pod-selector": {}}
                    ]
                },
                "status": {"egressIPs": [{"egressIP": str(IP1), "rule": 0, "gateway": "gw1"}]},
            }
        )

    def programmed(gen: int, records: list[AgentRecord]) -> str:
        results = assign_gateways(
            [policy(gen)],
            nodes=nodes,
            healthy=frozenset({N("gw1")}),
            services=frozenset(),
            now=dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
        )
        (out,) = confirm_programmed(results, records={r.node: r for r in records}, previous={})
        return {c.type: c.status for c in out.conditions}["Programmed"]

    assert programmed(1, []) == "False"
    assert programmed(1, [_rec("gw1", 1, owned=(IP1,)), _rec("d1", 1)]) == "True"
    assert programmed(2, [_rec("gw1", 1, owned=(IP1,)), _rec("d1", 1)]) == "False"
    assert programmed(2, [_rec("gw1", 2, owned=(IP1,)), _rec("d1", 1)]) == "False"
    assert programmed(2, [_rec("gw1", 2, owned=(IP1,)), _rec("d1", 2)]) == "True"


def test_previous_programmed_reads_the_status() -> None:
    pol = parse_static_egress_ip(
        {
            "metadata": {"namespace": "ns", "name": "web", "generation": 2},
            "spec": {
                "rules": [{"egressips": [str(IP1)], "cidr": "203.0.113.0/24", "pod-selector": {}}]
            },
            "status": {
                "conditions": [
                    {
                        "type": "Programmed",
                        "status": "False",
                        "reason": "AwaitingGateway",
                        "message": "m",
                        "lastTransitionTime": "2026-12-01T00:00:00Z",
                    }
                ]
            },
        }
    )
    assert previous_programmed([pol]) == {
        REF: ConditionOut("Programmed", "False", "AwaitingGateway", "m")
    }


def _policy(name: str, gen: int, gateway: str | None) -> Any:
    status = {"egressIPs": [{"egressIP": str(IP1), "rule": 0, "gateway": gateway}]}
    return parse_static_egress_ip(
        {
            "metadata": {"namespace": "ns", "name": name, "generation": gen},
            "spec": {
                "rules": [{"egressips": [str(IP1)], "cidr": "203.0.113.0/24", "pod-selector": {}}]
            },
            "status": status if gateway else {},
        }
    )


def _rule(ref: EgressIPRef, *, steer: bool = False, snat: bool = False) -> RuleProgram:
    pod = IPv4Address("10.244.1.5")
    return RuleProgram(
        ref=ref,
        index=0,
        destinations=(IPv4Network("203.0.113.0/24"),),
        excluded=(),
        steer=((pod, 1),) if steer else (),
        snat=((pod, IPv4Address(str(IP1))),) if snat else (),
    )


def test_agent_record_lists_only_objects_relevant_to_the_node() -> None:
    pols = [
        _policy("director", 7, None),
        _policy("gateway-no-pods", 3, "me"),
        _policy("snat", 2, None),
        _policy("elsewhere", 9, "other-node"),
        _policy("idle", 1, None),
    ]
    desired = DesiredState(
        rules=(
            _rule(EgressIPRef("ns", "director"), steer=True),
            _rule(EgressIPRef("ns", "snat"), snat=True),
            _rule(EgressIPRef("ns", "idle")),  # a rule with nothing programmed here
        ),
        owned=(IPv4Address("198.51.100.200"),),
    )
    rec = agent_record(node=N("me"), policies=pols, desired=desired, withheld=frozenset())
    assert dict(rec.applied) == {
        EgressIPRef("ns", "director"): 7,
        EgressIPRef("ns", "gateway-no-pods"): 3,
        EgressIPRef("ns", "snat"): 2,
    }
    assert rec.owned == frozenset({IP1})
    assert not rec.fenced
    fenced = agent_record(
        node=N("me"), policies=pols, desired=DesiredState(), withheld=frozenset({IP1})
    )
    assert fenced.fenced
    assert fenced.withheld == frozenset({IP1})
    assert fenced.owned == frozenset()
    # Still listed while fenced: the status names it the gateway.
    assert EgressIPRef("ns", "gateway-no-pods") in fenced.applied
