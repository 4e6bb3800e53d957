"""render_member_shards: the manager's selection as StaticEgressIPMembers bodies. Pure.

One object per rule and per `SHARD_SIZE` members (`staticegress.api.members`
describes the shape). Names are derived from the StaticEgressIP's uid, the
rule index and the shard number, and members are sorted, so equal selections
give equal bodies: the publisher writes only what differs, and a pod that
comes or goes rewrites the one shard that holds it, not the whole rule. A
rule that selects nothing has no object (and a Service without a selector
with no endpoints neither).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address
from typing import Any

from staticegress.api.members import (
    MANAGED_BY,
    MANAGER,
    MEMBERS_KIND,
    SHARD_SIZE,
    Member,
)
from staticegress.api.types import EgressIPRef, StaticEgressIP
from staticegress.api.v1alpha1 import GROUP, VERSION

Json = dict[str, Any]

POLICY_UID_LABEL = "staticegressips.io/policy-uid"


def render_member_shards(
    policies: Iterable[StaticEgressIP],
    members: Iterable[Member],
    endpoints: Mapping[tuple[str, str], tuple[IPv4Address, ...]],
    *,
    namespace: str,
    shard_size: int = SHARD_SIZE,
) -> dict[str, Json]:
    """Every object to publish, by name."""
    by_rule: dict[tuple[EgressIPRef, int], list[Member]] = defaultdict(list)
    for m in members:
        by_rule[(m.ref, m.rule)].append(m)
    out: dict[str, Json] = {}
    for pol in policies:
        for rule in pol.spec.rules:
            chosen = sorted(by_rule.get((pol.ref, rule.index), ()), key=lambda m: (m.ip, m.node))
            svc = rule.service_name
            addresses = sorted(endpoints.get((pol.ref.namespace, svc), ())) if svc else []
            pages = max(
                (len(chosen) + shard_size - 1) // shard_size,
                (len(addresses) + shard_size - 1) // shard_size,
            )
            for page in range(pages):
                part = slice(page * shard_size, (page + 1) * shard_size)
                name = f"{pol.uid}-{rule.index}-{page}"
                body: Json = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": MEMBERS_KIND,
                    "metadata": {
                        "name": name,
                        "namespace": namespace,
                        "labels": {MANAGED_BY: MANAGER, POLICY_UID_LABEL: pol.uid},
                    },
                    "policy": {
                        "namespace": pol.ref.namespace,
                        "name": pol.ref.name,
                        "uid": pol.uid,
                    },
                    "rule": rule.index,
                    "members": [{"ip": str(m.ip), "node": m.node} for m in chosen[part]],
                }
                if addresses:
                    body["service"] = svc
                    body["endpoints"] = [str(a) for a in addresses[part]]
                out[name] = body
    return out


def same_content(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether a stored object already holds what a rendered one says."""
    keys = ("policy", "rule", "members", "service", "endpoints")
    labels_a = (a.get("metadata") or {}).get("labels") or {}
    labels_b = (b.get("metadata") or {}).get("labels") or {}
    return labels_a == labels_b and all((a.get(k) or None) == (b.get(k) or None) for k in keys)
