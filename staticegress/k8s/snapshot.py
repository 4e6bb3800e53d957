"""Turn the reflectors' raw stores into one validated model Snapshot.

This is where cluster data crosses into the pure layers: every object is
parsed (addresses with `ipaddress`, StaticEgressIPs with the API's own
rules); what does not parse is left out and reported, never passed on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from staticegress.api.core import (
    endpoint_slice_addresses,
    parse_namespace,
    parse_node,
    parse_pod,
    parse_service,
)
from staticegress.api.v1alpha1 import InvalidSpecError, parse_static_egress_ip
from staticegress.model.desired import Snapshot

Store = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Invalid:
    """A StaticEgressIP that breaks the API's rules, with the parser's words."""

    ref: str
    generation: int
    error: str


def _parsed(store: Store, parse: Any) -> tuple[Any, ...]:
    return tuple(sorted(x for x in (parse(obj) for obj in store.values()) if x is not None))


def build_snapshot(
    *,
    policies: Store,
    pods: Store,
    nodes: Store,
    services: Store,
    namespaces: Store,
    slices: Store,
) -> tuple[Snapshot, list[Invalid]]:
    valid = []
    invalid: list[Invalid] = []
    for obj in policies.values():
        try:
            valid.append(parse_static_egress_ip(obj))
        except InvalidSpecError as exc:
            meta = obj.get("metadata") or {}
            invalid.append(Invalid(exc.ref, int(meta.get("generation") or 0), str(exc)))
    endpoints: dict[tuple[str, str], set[Any]] = {}
    for obj in slices.values():
        parsed = endpoint_slice_addresses(obj)
        if parsed is not None:
            endpoints.setdefault(parsed[0], set()).update(parsed[1])
    snap = Snapshot(
        policies=tuple(sorted(valid, key=lambda p: p.ref)),
        pods=_parsed(pods, parse_pod),
        nodes=_parsed(nodes, parse_node),
        services=_parsed(services, parse_service),
        namespaces=_parsed(namespaces, parse_namespace),
        endpoints=tuple(sorted((k, tuple(sorted(v))) for k, v in endpoints.items())),
    )
    return snap, sorted(invalid, key=lambda i: i.ref)
