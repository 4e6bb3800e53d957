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
      labels:
        app.kubernetes.io/managed-by: staticegress-manager
        staticegressips.io/policy-uid: <StaticEgressIP uid>
        gw.staticegressips.io/<hash of a node name>: ""   # one per reader node
    policy: {namespace: shop, name: web, uid: ...}
    rule: 0
    members: [{ip: 10.244.1.2, node: node-1}, ...]

and, for a rule that names a Service without a selector:

    metadata:
      name: <StaticEgressIP uid>-<rule index>-endpoints-<shard>
      labels: {..., staticegressips.io/endpoints: "true"}
    policy: {namespace: shop, name: web, uid: ...}
    rule: 0
    service: manual          # a Service without a selector that the rule names
    endpoints: [10.244.1.9]  # its endpoint addresses (the agents select their own pods among them)

A rule's endpoint addresses go in objects of their own (`service` and
`endpoints`, no members), apart from its members, because the two have
different readers:
- a director selects its own pods itself, so it needs no members at all, only
  the endpoint addresses of the Services without a selector that rules name:
  every agent watches the objects labelled `ENDPOINTS_LABEL=true` (few and
  small);
- a gateway SNATs the members of the rules whose egress IPs it owns, and a
  standby must hold them before a failover needs them (a failover must not
  wait for a watch to list): the manager labels each members object with
  `gateway_label(node)` for every node that is the gateway or a standby of
  one of its rule's egress IPs (and for the readers of the later rules it
  shadows, see `render.members`), and each agent watches its own label. A
  selected pod's change thus reaches the few nodes that may SNAT it, not
  every node.

Agents read these instead of every Pod of the cluster: a node keeps its own
pods and the selected pods of the rules it may SNAT for. What an agent reads
here comes from another component, so it is checked like any input: every
address must parse, and a shard whose policy uid is not the current object's
(left from a deleted namespace/name now reused) is ignored.
"""

from __future__ import annotations

import hashlib
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
GATEWAY_LABEL_PREFIX = "gw.staticegressips.io/"
ENDPOINTS_LABEL = "staticegressips.io/endpoints"
"""Set to "true" on the objects that carry a Service's endpoint addresses."""
SHARD_SIZE = 1000
"""Members per object: about 40 KB, far below what one object may hold, and
small enough that one pod's change rewrites little."""

_NODE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def gateway_label(node: str) -> str:
    """The label key that hands an object to the agent of `node`.

    A label name holds 63 characters and a node name up to 253, so the node
    is named by the first 40 hex digits of its name's SHA-256: a collision
    between two nodes is out of reach (160 bits), and would only give a node
    members it does not need."""
    return GATEWAY_LABEL_PREFIX + hashlib.sha256(node.encode()).hexdigest()[:40]


def agent_selectors(node: str) -> tuple[str, str]:
    """The label selectors of the two watches the agent of `node` keeps: the
    members objects labelled for it, and every endpoints object."""
    return (
        f"{MEMBERS_SELECTOR},{gateway_label(node)}",
        f"{MEMBERS_SELECTOR},{ENDPOINTS_LABEL}=true",
    )


@dataclass(frozen=True, order=True)
class Member:
    """One selected pod of one rule, as the manager publishes it."""

    ref: EgressIPRef
    rule: int
    ip: IPv4Address
    node: NodeName


def member_order(m: Member) -> tuple[str, str, int, int, str]:
    """`Member`'s own order, as plain values: the generated comparison runs
    field by field in Python, and sorting the thousands of members of a
    selection with it took a fifth of the manager's selection and of an
    agent's model time."""
    return (m.ref.namespace, m.ref.name, m.rule, int(m.ip), m.node)


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
