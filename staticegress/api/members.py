"""StaticEgressIPMembers: the manager's published selection, parsed and checked.

The manager alone watches every Pod, Service, EndpointSlice and Namespace
and decides which pods each rule selects. It publishes the result in small
objects, one or more per rule (at most `SHARD_SIZE` members each, like
EndpointSlices), in the product's namespace:

    apiVersion: staticegressips.io/v1alpha1
    kind: StaticEgressIPMembers
    metadata:
      name: <StaticEgressIP uid>-<rule index>-<shard>
      namespace: staticegress-system
      labels: {app.kubernetes.io/managed-by: staticegress-manager, ...}
    policy: {namespace: shop, name: web, uid: ...}
    rule: 0
    members: [{ip: 10.244.1.2, node: node-1}, ...]
    service: manual          # a Service without a selector that the rule names
    endpoints: [10.244.1.9]  # its endpoint addresses (the agents select their own pods among them)

Agents read these instead of every Pod of the cluster: a node keeps its own
pods and the selected pods of the others. What an agent reads here comes
from another component, so it is checked like any input: every address must
parse, and a shard whose policy uid is not the current object's (left from a
deleted namespace/name now reused) is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from staticegress.api.types import EgressIPRef, NodeName

MEMBERS_KIND = "StaticEgressIPMembers"
MEMBERS_PLURAL = "staticegressipmembers"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "staticegress-manager"
MEMBERS_SELECTOR = f"{MANAGED_BY}={MANAGER}"
"""The label selector agents and the manager watch these objects by."""
SHARD_SIZE = 1000
"""Members per object: about 40 KB, far below what one object may hold, and
small enough that one pod's change rewrites little."""

_NODE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True, order=True)
class Member:
    """One selected pod of one rule, as the manager publishes it."""

    ref: EgressIPRef
    rule: int
    ip: IPv4Address
    node: NodeName


@dataclass(frozen=True)
class MemberShard:
    """One published object, checked."""

    ref: EgressIPRef
    uid: str
    rule: int
    members: tuple[Member, ...]
    service: str | None = None
    endpoints: tuple[IPv4Address, ...] = ()


class InvalidShardError(ValueError):
    """A published object that does not hold what the manager writes."""


def parse_member_shard(obj: Mapping[str, Any]) -> MemberShard:
    """A published object, or `InvalidShardError` naming what is wrong."""
    policy = obj.get("policy")
    if not isinstance(policy, Mapping):
        raise InvalidShardError("policy: missing")
    ns, name, uid = (str(policy.get(k) or "") for k in ("namespace", "name", "uid"))
    if not (ns and name and uid):
        raise InvalidShardError("policy: namespace, name and uid are required")
    rule = obj.get("rule")
    if not isinstance(rule, int) or isinstance(rule, bool) or not 0 <= rule < 64:
        raise InvalidShardError(f"rule: {rule!r} is not a rule index")
    ref = EgressIPRef(ns, name)
    members: list[Member] = []
    for i, m in enumerate(obj.get("members") or []):
        if not isinstance(m, Mapping):
            raise InvalidShardError(f"members[{i}]: not an object")
        node = str(m.get("node") or "")
        if not _NODE.match(node):
            raise InvalidShardError(f"members[{i}].node: {node!r} is not a node name")
        members.append(Member(ref, rule, _address(m.get("ip"), f"members[{i}].ip"), NodeName(node)))
    service = obj.get("service")
    endpoints = tuple(
        _address(a, f"endpoints[{i}]") for i, a in enumerate(obj.get("endpoints") or [])
    )
    return MemberShard(
        ref=ref,
        uid=uid,
        rule=rule,
        members=tuple(members),
        service=str(service) if service else None,
        endpoints=endpoints,
    )


def _address(value: Any, where: str) -> IPv4Address:
    try:
        return IPv4Address(str(value))
    except ValueError:
        raise InvalidShardError(f"{where}: {value!r} is not an IPv4 address") from None
