"""Parse the Kubernetes core objects the agent reads into small frozen types.

Only the fields the model needs survive; every address is parsed with
`ipaddress` here, so nothing downstream ever handles a raw address string (an
unparsed string could reach nftables, which would take it for a host name and
try to resolve it). An object that does not parse is skipped, never trusted:
each parser returns None for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from typing import Any

from staticegress.api.types import IPAddress, IPNetwork, NodeName


def _labels(meta: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    raw = meta.get("labels") or {}
    if not isinstance(raw, Mapping):
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in raw.items()))


def _ip(value: Any) -> IPAddress | None:
    if not isinstance(value, str) or "%" in value:
        return None
    try:
        return ip_address(value)
    except ValueError:
        return None


def _net(value: Any) -> IPNetwork | None:
    if not isinstance(value, str) or "/" not in value:
        return None
    try:
        return ip_network(value, strict=False)
    except ValueError:
        return None


@dataclass(frozen=True, order=True)
class Pod:
    """A pod as the model sees it."""

    namespace: str
    name: str
    node: NodeName | None
    ip: IPv4Address | None
    """The pod's IPv4 address once the CNI gave it one (IPv6 is not steered yet)."""
    labels: tuple[tuple[str, str], ...] = ()
    host_network: bool = False

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True, order=True)
class Node:
    name: NodeName
    internal_ip: IPv4Address | None
    pod_cidrs: tuple[IPv4Network, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, order=True)
class Service:
    namespace: str
    name: str
    selector: tuple[tuple[str, str], ...] | None
    """None for a Service without a selector: its endpoints are managed by hand."""


@dataclass(frozen=True, order=True)
class Namespace:
    name: str
    labels: tuple[tuple[str, str], ...] = ()


def parse_pod(obj: Mapping[str, Any]) -> Pod | None:
    """A live pod; None for one that is terminating, finished or malformed."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if not meta.get("name") or not meta.get("namespace"):
        return None
    if meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    ips = [status.get("podIP")] + [p.get("ip") for p in status.get("podIPs") or []]
    v4 = next((a for a in map(_ip, ips) if isinstance(a, IPv4Address)), None)
    node = spec.get("nodeName")
    return Pod(
        namespace=str(meta["namespace"]),
        name=str(meta["name"]),
        node=NodeName(str(node)) if node else None,
        ip=v4,
        labels=_labels(meta),
        host_network=bool(spec.get("hostNetwork")),
    )


def parse_node(obj: Mapping[str, Any]) -> Node | None:
    meta = obj.get("metadata") or {}
    if not meta.get("name"):
        return None
    spec = obj.get("spec") or {}
    addrs = (obj.get("status") or {}).get("addresses") or []
    internal = next(
        (
            a
            for a in (_ip(x.get("address")) for x in addrs if x.get("type") == "InternalIP")
            if isinstance(a, IPv4Address)
        ),
        None,
    )
    cidrs = [spec.get("podCIDR"), *(spec.get("podCIDRs") or [])]
    v4 = sorted({n for n in map(_net, cidrs) if isinstance(n, IPv4Network)})
    return Node(
        name=NodeName(str(meta["name"])),
        internal_ip=internal,
        pod_cidrs=tuple(v4),
        labels=_labels(meta),
    )


def parse_service(obj: Mapping[str, Any]) -> Service | None:
    meta = obj.get("metadata") or {}
    if not meta.get("name") or not meta.get("namespace"):
        return None
    selector = (obj.get("spec") or {}).get("selector")
    return Service(
        namespace=str(meta["namespace"]),
        name=str(meta["name"]),
        selector=tuple(sorted((str(k), str(v)) for k, v in selector.items()))
        if isinstance(selector, Mapping) and selector
        else None,
    )


def parse_namespace(obj: Mapping[str, Any]) -> Namespace | None:
    meta = obj.get("metadata") or {}
    if not meta.get("name"):
        return None
    return Namespace(name=str(meta["name"]), labels=_labels(meta))


def endpoint_slice_addresses(
    obj: Mapping[str, Any],
) -> tuple[tuple[str, str], tuple[IPv4Address, ...]] | None:
    """(namespace, service name) and the IPv4 addresses of one EndpointSlice."""
    meta = obj.get("metadata") or {}
    service = (meta.get("labels") or {}).get("kubernetes.io/service-name")
    if not service or not meta.get("namespace") or obj.get("addressType") != "IPv4":
        return None
    out: list[IPv4Address] = []
    for ep in obj.get("endpoints") or []:
        if (ep.get("conditions") or {}).get("terminating"):
            continue
        out += [a for a in map(_ip, ep.get("addresses") or []) if isinstance(a, IPv4Address)]
    return (str(meta["namespace"]), str(service)), tuple(sorted(set(out)))
