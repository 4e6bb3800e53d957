"""Turn the reflectors' raw stores into one validated model Snapshot.

This is where cluster data crosses into the pure layers: every object is
parsed (addresses with `ipaddress`, StaticEgressIPs with the API's own
rules); what does not parse is left out and reported, never passed on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from typing import Any

from staticegress.api.core import (
    endpoint_slice_addresses,
    parse_namespace,
    parse_node,
    parse_pod,
    parse_service,
)
from staticegress.api.members import (
    InvalidShardError,
    Member,
    MemberShard,
    member_order,
    parse_member_shard,
)
from staticegress.api.pools import EgressIPPool, parse_pool
from staticegress.api.types import EgressIPRef, StaticEgressIP
from staticegress.api.v1alpha1 import InvalidSpecError, parse_static_egress_ip
from staticegress.model.desired import Snapshot

Store = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Invalid:
    """A StaticEgressIP that breaks the API's rules, with the parser's words."""

    ref: EgressIPRef
    generation: int
    error: str
    """Every offending field and why, e.g. `spec.rules[0].egressip: must be ...`."""


class ParseCache:
    """Parsed objects by (key, resourceVersion): a resync re-parses only what changed.

    The API server gives every change a new resourceVersion, so an entry can
    never be stale; entries for objects no longer in the store are dropped on
    each build.
    """

    def __init__(self) -> None:
        self._kinds: dict[str, dict[tuple[str, str], Any]] = {}

    def parse_all(self, kind: str, store: Store, parse: Callable[[Any], Any]) -> list[Any]:
        old = self._kinds.get(kind, {})
        new: dict[tuple[str, str], Any] = {}
        out = []
        for key, obj in store.items():
            rv = str((obj.get("metadata") or {}).get("resourceVersion", ""))
            ck = (key, rv)
            value = old[ck] if rv and ck in old else parse(obj)
            new[ck] = value
            out.append(value)
        self._kinds[kind] = new
        return out


def _invalid(obj: Mapping[str, Any], exc: InvalidSpecError) -> Invalid:
    meta = obj.get("metadata") or {}
    ref = EgressIPRef(str(meta.get("namespace", "")), str(meta.get("name", "")))
    detail = "; ".join(f"{path}: {msg}" for path, msg in exc.errors)
    return Invalid(ref, int(meta.get("generation") or 0), detail)


def parse_policy(obj: Mapping[str, Any]) -> StaticEgressIP | Invalid:
    """A StaticEgressIP, or what is wrong with it: never an exception."""
    try:
        return parse_static_egress_ip(obj)
    except InvalidSpecError as exc:
        return _invalid(obj, exc)


def parse_pool_checked(obj: Mapping[str, Any]) -> EgressIPPool | Invalid:
    """A StaticEgressIPPool, or what is wrong with it (its ref has no namespace).
    An invalid pool grants nothing; the manager reports it on the pool's status."""
    try:
        return parse_pool(obj)
    except InvalidSpecError as exc:
        return _invalid(obj, exc)


def build_snapshot(
    *,
    policies: Store,
    pods: Store,
    nodes: Store,
    services: Store,
    namespaces: Store,
    slices: Store,
    pools: Store | None = None,
    cache: ParseCache | None = None,
) -> tuple[Snapshot, list[Invalid]]:
    cache = cache or ParseCache()

    def parsed(kind: str, store: Store, parse: Callable[[Any], Any]) -> tuple[Any, ...]:
        return tuple(sorted(x for x in cache.parse_all(kind, store, parse) if x is not None))

    results = cache.parse_all("policies", policies, parse_policy)
    valid = [r for r in results if not isinstance(r, Invalid)]
    invalid = [r for r in results if isinstance(r, Invalid)]
    endpoints = _endpoint_table(
        s for s in cache.parse_all("slices", slices, endpoint_slice_addresses) if s is not None
    )
    snap = Snapshot(
        policies=tuple(sorted(valid, key=lambda p: p.ref)),
        pods=parsed("pods", pods, parse_pod),
        nodes=parsed("nodes", nodes, parse_node),
        services=parsed("services", services, parse_service),
        namespaces=parsed("namespaces", namespaces, parse_namespace),
        endpoints=endpoints,
        pools=tuple(
            sorted(
                (
                    p
                    for p in cache.parse_all("pools", pools or {}, parse_pool_checked)
                    if isinstance(p, EgressIPPool)
                ),
                key=lambda p: p.name,
            )
        ),
    )
    return snap, sorted(invalid, key=lambda i: i.ref)


def published_selection(
    shards: Store, snapshot: Snapshot, *, cache: ParseCache | None = None
) -> tuple[Snapshot, int]:
    """`snapshot` with the manager's StaticEgressIPMembers as its `members` and
    `endpoints`, and how many objects were left out: unreadable ones, and those
    of an object that no longer exists under that uid (a deleted
    StaticEgressIP whose name was reused)."""
    cache = cache or ParseCache()
    uids = {p.ref: p.uid for p in snapshot.policies}
    members: set[Member] = set()
    served: list[tuple[tuple[str, str], tuple[IPv4Address, ...]]] = []
    dropped = 0
    for shard in cache.parse_all("members", shards, _parse_shard):
        if shard is None or uids.get(shard.ref) != shard.uid:
            dropped += 1
            continue
        members.update(shard.members)
        if shard.service:
            served.append(((shard.ref.namespace, shard.service), shard.endpoints))
    return replace(
        snapshot,
        members=tuple(sorted(members, key=member_order)),
        endpoints=_endpoint_table(served),
    ), dropped


def _endpoint_table(
    parts: Iterable[tuple[tuple[str, str], Iterable[IPv4Address]]],
) -> tuple[tuple[tuple[str, str], tuple[IPv4Address, ...]], ...]:
    """(namespace, service) -> its addresses, from parts that may repeat a service
    (several EndpointSlices, several published shards), sorted."""
    table: dict[tuple[str, str], set[IPv4Address]] = {}
    for key, addresses in parts:
        table.setdefault(key, set()).update(addresses)
    return tuple(sorted((k, tuple(sorted(v))) for k, v in table.items()))


def _parse_shard(obj: Mapping[str, Any]) -> MemberShard | None:
    try:
        return parse_member_shard(obj)
    except InvalidShardError:
        return None
