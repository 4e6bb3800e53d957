"""render_member_shards: the manager's selection as StaticEgressIPMembers bodies. Pure.

One object per rule and per `SHARD_SIZE` members, and, for a rule naming a
Service without a selector, one per `SHARD_SIZE` of its endpoint addresses
(`staticegress.api.members` describes the shapes and who reads which).
Names are derived from the StaticEgressIP's uid, the rule index and the shard
number, and members are sorted, so equal selections give equal bodies: the
publisher writes only what differs, and a pod that comes or goes rewrites the
one shard that holds it, not the whole rule. A rule that selects nothing has
no members object (and a Service without a selector with no endpoints no
endpoints object).

Labels are part of the content: a members object carries
`gateway_label(node)` for every node in `member_readers`, so when a gateway
or standby changes, the objects are relabelled (and compare unequal until
they are), and the agents' label-selected watches move them from the nodes
that lost the role to those that gained it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address
from typing import Any

from staticegress.api.members import (
    ENDPOINTS_LABEL,
    MANAGED_BY,
    MANAGER,
    MEMBERS_KIND,
    SHARD_SIZE,
    Member,
    gateway_label,
)
from staticegress.api.types import EgressIPAssignment, EgressIPRef, NodeName, StaticEgressIP
from staticegress.api.v1alpha1 import GROUP, VERSION
from staticegress.model.desired import RuleKey, shadowing_rules

Json = dict[str, Any]

POLICY_UID_LABEL = "staticegressips.io/policy-uid"


def member_readers(
    policies: Iterable[StaticEgressIP],
    members: Iterable[Member],
    *,
    assigned: Mapping[EgressIPRef, Iterable[EgressIPAssignment]] | None = None,
) -> dict[RuleKey, frozenset[NodeName]]:
    """Per rule, the nodes whose agents must hold its members: the gateway and
    the standbys of each egress IP the rule lists, as the status says and as
    `assigned` (the manager's newer assignment, not written yet) says: during
    a change both the old and the new holders keep the members, so none is
    ever without them while the other view is still in force. Then the
    readers of each rule also read the earlier rules that shadow it
    (`shadowing_rules`): without them a gateway would SNAT more than
    first-match gives it."""
    policies = list(policies)
    roles: dict[RuleKey, set[NodeName]] = defaultdict(set)
    for pol in policies:
        views: list[Iterable[EgressIPAssignment]] = [pol.status.egress_ips]
        if assigned is not None and pol.ref in assigned:
            views.append(assigned[pol.ref])
        for view in views:
            for a in view:
                nodes = {n for n in (a.gateway, *a.standbys) if n}
                for index in a.rules or (a.rule,):
                    roles[(pol.ref, index)].update(nodes)
    readers = {k: set(v) for k, v in roles.items()}
    # From the direct roles only: a rule's pieces depend on the earlier rules
    # that shadow it, never on what shadows those.
    for later, earlier in shadowing_rules(policies, members).items():
        for rule in earlier:
            readers.setdefault(rule, set()).update(roles.get(later, ()))
    return {k: frozenset(v) for k, v in sorted(readers.items()) if v}


def render_member_shards(
    policies: Iterable[StaticEgressIP],
    members: Iterable[Member],
    endpoints: Mapping[tuple[str, str], tuple[IPv4Address, ...]],
    *,
    namespace: str,
    assigned: Mapping[EgressIPRef, Iterable[EgressIPAssignment]] | None = None,
    shard_size: int = SHARD_SIZE,
) -> dict[str, Json]:
    """Every object to publish, by name. `assigned`: see `member_readers`."""
    policies = list(policies)
    members = list(members)
    readers = member_readers(policies, members, assigned=assigned)
    by_rule: dict[RuleKey, list[Member]] = defaultdict(list)
    for m in members:
        by_rule[(m.ref, m.rule)].append(m)
    out: dict[str, Json] = {}

    def body(pol: StaticEgressIP, index: int, name: str, labels: Json) -> Json:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": MEMBERS_KIND,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {MANAGED_BY: MANAGER, POLICY_UID_LABEL: pol.uid, **labels},
            },
            "policy": {"namespace": pol.ref.namespace, "name": pol.ref.name, "uid": pol.uid},
            "rule": index,
        }

    for pol in policies:
        for rule in pol.spec.rules:
            key = (pol.ref, rule.index)
            chosen = sorted(by_rule.get(key, ()), key=lambda m: (int(m.ip), m.node))
            holders = {gateway_label(n): "" for n in sorted(readers.get(key, ()))}
            for page, start in enumerate(range(0, len(chosen), shard_size)):
                name = f"{pol.uid}-{rule.index}-{page}"
                part = chosen[start : start + shard_size]
                out[name] = body(pol, rule.index, name, holders) | {
                    "members": [{"ip": str(m.ip), "node": m.node} for m in part]
                }
            svc = rule.service_name
            addresses = sorted(endpoints.get((pol.ref.namespace, svc), ())) if svc else []
            for page, start in enumerate(range(0, len(addresses), shard_size)):
                name = f"{pol.uid}-{rule.index}-endpoints-{page}"
                out[name] = body(pol, rule.index, name, {ENDPOINTS_LABEL: "true"}) | {
                    "service": svc,
                    "endpoints": [str(a) for a in addresses[start : start + shard_size]],
                }
    return out


def same_content(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether a stored object already holds what a rendered one says, labels
    included (they decide which agents see it)."""
    keys = ("policy", "rule", "members", "service", "endpoints")
    labels_a = (a.get("metadata") or {}).get("labels") or {}
    labels_b = (b.get("metadata") or {}).get("labels") or {}
    return labels_a == labels_b and all((a.get(k) or None) == (b.get(k) or None) for k in keys)
