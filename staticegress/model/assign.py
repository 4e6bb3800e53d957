"""assign_gateways: which node owns each egress IP, and the status that says so. Pure.

Recomputed whole from (policies with their current status, nodes, health)
on every change; the manager diffs the result against what the objects say
and writes only what differs.

Rules, in order:
1. an egress IP belongs to the oldest StaticEgressIP whose claim to it a pool
   grants (`staticegress.model.pools`, then namespace/name); younger
   claimants get no gateway for it (conflict), refused claims neither, and an
   owner whose address is forbidden neither (each with its reason);
2. candidates are the nodes matching the rule's gateway-selector, or else
   carrying the default gateway label, and the granting pool's nodeSelector;
   only healthy ones are eligible; an IP
   that several rules of one object list needs a node every one of them
   accepts, since it has a single gateway whichever rule's traffic it carries;
3. sticky: the current owner keeps the IP while it is eligible;
4. otherwise eligible nodes are ranked by a hash of (egress IP, node)
   (rendezvous hashing: stable, evenly spread, a node joining or leaving
   moves nothing else), preferring nodes no other IP of the rule uses;
5. the next two ranked nodes are the standbys.

Invariant: a result holds exactly one assignment per egress IP of its object,
in the order the IPs first appear in the rules. `rule` is the first rule that
lists the IP and `rules` every one; the status list is a map keyed by egress
IP, and a second entry for one IP would make the API server refuse the whole
status.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from staticegress.api.core import Node
from staticegress.api.pools import EgressIPPool
from staticegress.api.types import (
    EgressIPAssignment,
    EgressIPRef,
    EgressRule,
    IPAddress,
    NodeName,
    StaticEgressIP,
)
from staticegress.model.pools import REFUSALS, Tenancy, oldest_first, unrestricted

DEFAULT_GATEWAY_LABEL = ("staticegress.io/gateway", "true")


@dataclass(frozen=True)
class ConditionOut:
    type: str
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class PolicyResult:
    """The status one StaticEgressIP should carry."""

    ref: EgressIPRef
    generation: int
    assignments: tuple[EgressIPAssignment, ...]
    conditions: tuple[ConditionOut, ...]
    events: tuple[tuple[str, str, str], ...] = field(default=(), compare=False)
    """(type, reason, message) to record because of this change."""


def rank(egress_ip: IPAddress, nodes: Iterable[NodeName]) -> list[NodeName]:
    """Nodes in rendezvous-hash order for `egress_ip`."""

    def score(node: NodeName) -> bytes:
        return hashlib.sha256(f"{egress_ip}|{node}".encode()).digest()

    return sorted(nodes, key=score)


def _candidates(
    rule: EgressRule,
    nodes: Iterable[Node],
    default_label: tuple[str, str],
    pools: tuple[EgressIPPool, ...] = (),
) -> list[NodeName]:
    out = []
    for n in nodes:
        labels = dict(n.labels)
        if any(p.node_selector and not p.node_selector.matches(labels) for p in pools):
            continue
        if rule.gateway_selector is not None:
            if rule.gateway_selector.matches(labels):
                out.append(n.name)
        elif labels.get(default_label[0]) == default_label[1]:
            out.append(n.name)
    return sorted(out)


def assign_gateways(
    policies: Iterable[StaticEgressIP],
    *,
    nodes: Iterable[Node],
    healthy: frozenset[NodeName],
    services: frozenset[tuple[str, str]],
    now: datetime,
    default_label: tuple[str, str] = DEFAULT_GATEWAY_LABEL,
    accepting: frozenset[NodeName] | None = None,
    tenancy: Tenancy | None = None,
) -> list[PolicyResult]:
    """The desired status of every policy, in global rule order.

    `healthy`: nodes that may keep the egress IPs they have. `accepting`: the
    subset that may take new ones (its agent answers); None means all healthy.
    `tenancy`: what the pools decide; None judges nothing (every claim granted)."""
    nodes = list(nodes)

    ordered = oldest_first(policies)
    if tenancy is None:
        tenancy = unrestricted(ordered)
    owner = tenancy.owners

    results = []
    for pol in ordered:
        current = {a.egress_ip: a for a in pol.status.egress_ips}
        # One status entry per egress IP even when several rules list it: the
        # status list is a map keyed by egress IP, so a second entry for the
        # same IP makes the API server refuse the whole status.
        listed_by: dict[IPAddress, list[EgressRule]] = {}
        for rule in pol.spec.rules:
            for eip in rule.egress_ips:
                listed_by.setdefault(eip, []).append(rule)
        assignments: list[EgressIPAssignment] = []
        events: list[tuple[str, str, str]] = []
        problems: list[tuple[str, str]] = []
        used: dict[int, set[NodeName]] = {r.index: set() for r in pol.spec.rules}
        for rule in pol.spec.rules:
            if (
                rule.service_name is not None
                and (pol.ref.namespace, rule.service_name) not in services
            ):
                problems.append(
                    (
                        "ServiceNotFound",
                        f"rule {rule.index}: Service "
                        f"{pol.ref.namespace}/{rule.service_name} does not exist",
                    )
                )
        for message in tenancy.denials.get(pol.ref, ()):
            problems.append(("CrossNamespaceDenied", message))
        for eip, rules in listed_by.items():
            indexes = tuple(r.index for r in rules)
            old = current.get(eip)
            claim = tenancy.claim(pol.ref, eip)
            if claim.refused is not None:
                problems.append((claim.refused, claim.message))
                if old is None or old.reason != claim.refused:
                    events.append(("Warning", claim.refused, claim.message))
                assignments.append(
                    EgressIPAssignment(
                        eip, indexes[0], None, None, rules=indexes, reason=claim.refused
                    )
                )
                continue
            if owner.get(eip) != pol.ref:
                problems.append(
                    ("EgressIPConflict", f"{eip} is already claimed by {owner.get(eip)}")
                )
                assignments.append(
                    EgressIPAssignment(
                        eip, indexes[0], None, None, rules=indexes, reason="EgressIPConflict"
                    )
                )
                continue
            # The IP has one gateway whichever rule's traffic it carries, so
            # that node must be allowed by every rule listing it, and by the
            # pool that granted it.
            pools = tenancy.granted_by.get(eip, ())
            allowed = set.intersection(
                *(set(_candidates(r, nodes, default_label, pools)) for r in rules)
            )
            eligible = sorted(n for n in allowed if n in healthy)
            ranked = rank(eip, eligible)
            if old is not None and old.gateway in eligible:
                gw: NodeName | None = old.gateway
            else:
                taken = set().union(*(used[i] for i in indexes))
                takers = [n for n in ranked if accepting is None or n in accepting]
                fresh = [n for n in takers if n not in taken]
                pick = fresh or takers
                gw = pick[0] if pick else None
            if gw is None:
                limiting = [p.name for p in pools if p.node_selector]
                limit = f" (pool {', '.join(limiting)} limits its gateways)" if limiting else ""
                problems.append(
                    (
                        "NoEligibleGateway",
                        f"{eip}: no healthy node is eligible as its gateway{limit}",
                    )
                )
                if old is None or old.gateway is not None:
                    events.append(
                        ("Warning", "NoEligibleGateway", f"{eip} has no eligible gateway{limit}")
                    )
                assignments.append(
                    EgressIPAssignment(
                        eip,
                        indexes[0],
                        None,
                        None,
                        rules=indexes,
                        pool=claim.pool,
                        reason="NoEligibleGateway",
                    )
                )
                continue
            for i in indexes:
                used[i].add(gw)
            since = old.since if old is not None and old.gateway == gw else now
            if old is None or old.gateway is None:
                via = f" (granted by pool {claim.pool})" if claim.pool else ""
                events.append(("Normal", "GatewayAssigned", f"{eip} -> {gw}{via}"))
            elif old.gateway != gw:
                events.append(
                    ("Warning", "GatewayFailover", f"{eip} moved from {old.gateway} to {gw}")
                )
            standbys = tuple(n for n in ranked if n != gw)[:2]
            assignments.append(
                EgressIPAssignment(
                    eip, indexes[0], gw, since, standbys, rules=indexes, pool=claim.pool
                )
            )
        results.append(
            PolicyResult(
                ref=pol.ref,
                generation=pol.generation,
                assignments=tuple(assignments),
                conditions=_conditions(assignments, problems),
                events=tuple(events),
            )
        )
    return results


def _conditions(
    assignments: list[EgressIPAssignment], problems: list[tuple[str, str]]
) -> tuple[ConditionOut, ...]:
    missing = [a for a in assignments if a.gateway is None]
    if missing:
        reason = next(
            (r for r, _ in problems if r in (*REFUSALS, "EgressIPConflict", "NoEligibleGateway")),
            "NoEligibleGateway",
        )
        why = next((m for r, m in problems if r == reason), "")
        ready = ConditionOut(
            "Ready",
            "False",
            reason,
            f"{len(missing)} of {len(assignments)} egress IPs have no gateway"
            + (f": {why}" if why else ""),
        )
    else:
        ready = ConditionOut("Ready", "True", "GatewayAssigned", "every egress IP has a gateway")
    programmed = ConditionOut(
        "Programmed",
        "True" if not missing else "False",
        "GatewaysLive" if not missing else "GatewayMissing",
        "every assigned gateway answers heartbeats"
        if not missing
        else "traffic of pods whose egress IP has no gateway is dropped",
    )
    if problems:
        degraded = ConditionOut(
            "Degraded", "True", problems[0][0], "; ".join(m for _, m in problems)[:1000]
        )
    else:
        degraded = ConditionOut("Degraded", "False", "AsExpected", "no problems")
    return ready, programmed, degraded


def invalid_result(ref: EgressIPRef, generation: int, error: str) -> PolicyResult:
    """The status of an object whose spec breaks the API's rules."""
    return PolicyResult(
        ref=ref,
        generation=generation,
        assignments=(),
        conditions=(
            ConditionOut("Ready", "False", "InvalidSpec", error[:1000]),
            ConditionOut("Programmed", "False", "InvalidSpec", "nothing is programmed"),
            ConditionOut("Degraded", "True", "InvalidSpec", error[:1000]),
        ),
    )


def owned_gateways(
    results: Iterable[PolicyResult], owners: Mapping[IPAddress, EgressIPRef]
) -> dict[IPAddress, NodeName | None]:
    """Each egress IP's gateway as its owner's result gives it: what the grants
    follow. Only the owner speaks for an address; another claimant's entry (a
    conflict or a refused claim, never with a gateway) must not clear it, in
    whatever order the results come."""
    return {
        a.egress_ip: a.gateway
        for r in results
        for a in r.assignments
        if owners.get(a.egress_ip) == r.ref
    }


def _ts(t: datetime | None) -> str | None:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t is not None else None


def conditions_body(
    conditions: Iterable[ConditionOut],
    *,
    generation: int,
    previous_conditions: Mapping[str, Mapping[str, Any]],
    now: datetime,
) -> list[dict[str, Any]]:
    """Conditions as a status carries them; a condition whose status did not
    change keeps its transition time."""
    out = []
    for c in conditions:
        prev = previous_conditions.get(c.type)
        kept = prev.get("lastTransitionTime") if prev and prev.get("status") == c.status else None
        out.append(
            {
                "type": c.type,
                "status": c.status,
                "reason": c.reason,
                "message": c.message,
                "observedGeneration": generation,
                "lastTransitionTime": kept or _ts(now),
            }
        )
    return out


def status_body(
    result: PolicyResult,
    *,
    previous_conditions: Mapping[str, Mapping[str, Any]],
    now: datetime,
) -> dict[str, Any]:
    """The status subresource for `result`, keeping transition times that did not change."""
    conditions = conditions_body(
        result.conditions,
        generation=result.generation,
        previous_conditions=previous_conditions,
        now=now,
    )
    entries = []
    for a in result.assignments:
        entry: dict[str, Any] = {
            "egressIP": str(a.egress_ip),
            "rule": a.rule,
            "rules": list(a.rules or (a.rule,)),
        }
        if a.gateway is not None:
            entry["gateway"] = a.gateway
            entry["since"] = _ts(a.since)
        if a.standbys:
            entry["standbys"] = list(a.standbys)
        if a.pool is not None:
            entry["pool"] = a.pool
        if a.reason is not None:
            entry["reason"] = a.reason
        entries.append(entry)
    return {
        "observedGeneration": result.generation,
        "egressIPs": entries,
        "summary": {
            "egressIPs": ",".join(str(a.egress_ip) for a in result.assignments)[:1024],
            "gateways": ",".join(a.gateway or "-" for a in result.assignments)[:4096],
        },
        "conditions": conditions,
    }


def gateway_candidates(
    policies: Iterable[StaticEgressIP],
    *,
    nodes: Iterable[Node],
    default_label: tuple[str, str] = DEFAULT_GATEWAY_LABEL,
) -> frozenset[NodeName]:
    """Every node that could become a gateway: one carrying the default gateway
    label (ready for the next rule without a gateway-selector) or matching some
    rule's gateway-selector. Only these need heartbeats."""
    nodes = list(nodes)
    out = {n.name for n in nodes if dict(n.labels).get(default_label[0]) == default_label[1]}
    for pol in policies:
        for rule in pol.spec.rules:
            if rule.gateway_selector is not None:
                out.update(_candidates(rule, nodes, default_label))
    return frozenset(out)


def same_status(
    body: Mapping[str, Any],
    current: Mapping[str, Any],
    keys: tuple[str, ...] = ("observedGeneration", "egressIPs", "summary"),
) -> bool:
    """Whether `current` already says what `body` would write: equal in `keys`
    and in the conditions, apart from their transition times (kept on purpose)."""
    if any(body.get(k) != current.get(k) for k in keys):
        return False
    strip = ("lastTransitionTime",)
    a = [{k: v for k, v in c.items() if k not in strip} for c in body.get("conditions") or []]
    b = [{k: v for k, v in c.items() if k not in strip} for c in current.get("conditions") or []]
    return a == b
