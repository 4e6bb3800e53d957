"""What agents confirm they programmed, and the `Programmed` condition it implies. Pure.

Two halves that must agree on what a confirmation means:

- `agent_record` (run by each agent after a successful sync): which
  StaticEgressIPs this node programmed, at which generation, and which egress
  IPs it holds or withholds while fenced. Only objects relevant to the node
  are listed, so the record stays small whatever the cluster's size: those
  for which the node steers selected pods (director), SNATs pods (gateway),
  or is named on the status as the gateway of one of its egress IPs (even
  with no pod selected yet: the gateway must still confirm it holds the IP).
- `confirm_programmed` (run by the manager on the assignment results, before
  they are written): `Programmed=True` only when, for the object's current
  generation, the gateway of every egress IP has confirmed that generation
  and holds the IP (not fenced), and every director that lists the object
  has confirmed it too.

Invariants:
- A record never speaks for another node: the manager keys records by the
  node its record object is named after, and ignores records of nodes that
  no longer exist (their leftovers would otherwise block `True` forever).
- An object whose assignment already lacks a gateway, or is invalid, keeps
  the `Programmed=False` the assignment gave it: nothing an agent says can
  make a missing gateway programmed.
- Until the records have been listed at least once, the manager knows
  nothing; it keeps whatever `Programmed` the status already carries rather
  than flapping it on every leader change.

Limits: a director confirms the spec generation it applied, not which
gateway it steers to. A failover changes no generation, so directors are
not re-checked for it; the new gateway is (it must hold the IP). And the
manager does not watch pods, so it cannot wait for a director that has not
listed the object yet (a node whose first selected pod just arrived); it
waits for every director that lists the object at an older generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from staticegress.api.types import (
    Condition,
    EgressIPRef,
    IPAddress,
    IPNetwork,
    NodeName,
    StaticEgressIP,
)
from staticegress.model.assign import ConditionOut, PolicyResult
from staticegress.model.desired import DesiredState

PROGRAMMED = "Programmed"
MESSAGE_LIMIT = 1000
"""Characters of a condition message; the rest is cut with an ellipsis."""


@dataclass(frozen=True)
class AgentRecord:
    """One node's confirmation of what it has programmed.

    `applied` maps each relevant object to the generation last applied;
    `withheld` are egress IPs the status gives this node but that it does not
    hold because it is fenced; `owned` are those it holds on its uplink.
    """

    node: NodeName
    applied: Mapping[EgressIPRef, int] = field(default_factory=dict)
    fenced: bool = False
    withheld: frozenset[IPAddress] = frozenset()
    owned: frozenset[IPAddress] = frozenset()
    subnet: IPNetwork | None = None
    """The connected subnet of the node's uplink, as the agent sees it."""
    routers: frozenset[IPAddress] = frozenset()
    """The next hops of the node's default routes: never an egress IP."""


def agent_record(
    *,
    node: NodeName,
    policies: Iterable[StaticEgressIP],
    desired: DesiredState,
    withheld: frozenset[IPAddress],
    subnet: IPNetwork | None = None,
    routers: frozenset[IPAddress] = frozenset(),
) -> AgentRecord:
    """The record an agent publishes once `desired`, computed from `policies`, is applied."""
    active = {r.ref for r in desired.rules if r.steer or r.snat}
    applied: dict[EgressIPRef, int] = {}
    for pol in sorted(policies, key=lambda p: p.ref):
        gateway_here = any(a.gateway == node for a in pol.status.egress_ips)
        if pol.ref in active or gateway_here:
            applied[pol.ref] = pol.generation
    return AgentRecord(
        node=node,
        applied=applied,
        fenced=bool(withheld),
        withheld=frozenset(withheld),
        owned=frozenset(desired.owned),
        subnet=subnet,
        routers=routers,
    )


def previous_programmed(policies: Iterable[StaticEgressIP]) -> dict[EgressIPRef, ConditionOut]:
    """The `Programmed` condition each object's status carries now."""
    out: dict[EgressIPRef, ConditionOut] = {}
    for pol in policies:
        for c in pol.status.conditions:
            if c.type == PROGRAMMED:
                out[pol.ref] = _out(c)
    return out


def _out(c: Condition) -> ConditionOut:
    return ConditionOut(c.type, c.status, c.reason, c.message)


def confirm_programmed(
    results: Iterable[PolicyResult],
    *,
    records: Mapping[NodeName, AgentRecord] | None,
    previous: Mapping[EgressIPRef, ConditionOut],
) -> list[PolicyResult]:
    """`results` with `Programmed` decided from the agents' records.

    `records`: by node, only nodes that exist; None while the records have
    not been listed yet. `previous`: the condition each status carries now.
    """
    out = []
    for res in results:
        if not res.assignments or any(a.gateway is None for a in res.assignments):
            out.append(res)  # no gateway or invalid: the assignment's verdict stands
            continue
        if records is None:
            cond = previous.get(res.ref) or ConditionOut(
                PROGRAMMED, "Unknown", "AwaitingReports", "agent reports not listed yet"
            )
        else:
            cond = programmed_condition(res, records=records)
        out.append(_replace_condition(res, cond))
    return out


def _replace_condition(res: PolicyResult, cond: ConditionOut) -> PolicyResult:
    conditions = tuple(cond if c.type == PROGRAMMED else c for c in res.conditions)
    if all(c.type != PROGRAMMED for c in res.conditions):
        conditions += (cond,)
    return dataclasses.replace(res, conditions=conditions)


def programmed_condition(
    res: PolicyResult, *, records: Mapping[NodeName, AgentRecord]
) -> ConditionOut:
    """`Programmed` for one object whose every egress IP has a gateway.

    Reasons, the first that applies: `GatewayFenced` (a gateway withholds an
    egress IP), `AwaitingGateway` (a gateway has not confirmed this
    generation or does not hold the IP yet), `AwaitingDirectors` (a node
    steering the object's pods lists an older generation), else
    `AgentsConfirmed`.
    """
    gen = res.generation
    fenced: list[str] = []
    awaiting: list[str] = []
    for a in sorted(res.assignments, key=lambda a: (str(a.gateway), str(a.egress_ip))):
        gw = a.gateway
        if gw is None:  # excluded by the caller; keeps the type checker honest
            continue
        rec = records.get(gw)
        if rec is not None and a.egress_ip in rec.withheld:
            fenced.append(f"{gw} ({a.egress_ip})")
        elif rec is None or rec.applied.get(res.ref, 0) < gen or a.egress_ip not in rec.owned:
            awaiting.append(f"{gw} ({a.egress_ip})")
    gateways = {a.gateway for a in res.assignments}
    lagging = sorted(
        f"{node} (at {rec.applied[res.ref]})"
        for node, rec in records.items()
        if node not in gateways and res.ref in rec.applied and rec.applied[res.ref] < gen
    )
    if fenced:
        reason = "GatewayFenced"
    elif awaiting:
        reason = "AwaitingGateway"
    elif lagging:
        reason = "AwaitingDirectors"
    else:
        directors = sum(1 for n, r in records.items() if n not in gateways and res.ref in r.applied)
        return ConditionOut(
            PROGRAMMED,
            "True",
            "AgentsConfirmed",
            f"generation {gen} confirmed by every gateway and {directors} directors",
        )
    parts = []
    if fenced:
        parts.append("fenced gateways withhold " + ", ".join(fenced))
    if awaiting:
        parts.append(f"gateways not yet confirming generation {gen}: " + ", ".join(awaiting))
    if lagging:
        parts.append(f"directors behind generation {gen}: " + ", ".join(lagging))
    return ConditionOut(PROGRAMMED, "False", reason, _cut("; ".join(parts)))


def _cut(message: str) -> str:
    return message if len(message) <= MESSAGE_LIMIT else message[: MESSAGE_LIMIT - 3] + "..."
