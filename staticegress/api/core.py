"""Parse the Kubernetes core objects the agent reads into small frozen types.

Only the fields the model needs survive; every address is parsed with
`ipaddress` here, so nothing downstream ever handles a raw address string (an
unparsed string could reach nftables, which would take it for a host name and
try to resolve it). An object that does not parse is skipped, never trusted:
each parser returns None for it.

Pods that are ending stay pods until their network is gone. A pod being
deleted (deletionTimestamp set) still runs through its grace period, and even
a pod that has finished (phase Succeeded or Failed) keeps its network
namespace, and so its address, until the kubelet tears the sandbox down: the
kernel still sends for it meanwhile (FIN and RST of its last connections,
retransmissions). Dropping such a pod at the first sign of its end would
either hold those packets (its IP is no longer known) or leak them (its
selection is gone). So `parse_pod` keeps it, marked `terminating` or
`finished`, and lets go only when the object is removed, or when the pod
reports its sandbox gone (condition PodReadyToStartContainers=False on an
ending pod: the kubelet tore its network down). An ending pod's address may
then be reused by a new pod: the model gives an address to a live pod over
an ending one.

A pod's address is only as fresh as the kubelet's last report of its
sandbox: kubelet writes podIPs together with the sandbox's status (after a
reboot, every pod of the node shows its pre-reboot address until kubelet
writes its status again).
`Pod.sandbox_since` is when kubelet last reported the sandbox up, for the
agent to tell this boot's addresses from stale ones
(`staticegress.model.boot`).

EndpointSlice endpoints count whatever their conditions: a terminating
endpoint is a pod that still sends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
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
    terminating: bool = False
    """Deletion requested (deletionTimestamp set): still running its grace period."""
    finished: bool = False
    """Phase Succeeded or Failed: its containers are done, its sandbox may not be."""
    sandbox_since: int | None = None
    """Since when kubelet reports this pod's sandbox up, in Unix seconds: the
    lastTransitionTime of its PodReadyToStartContainers condition while True.
    Without that condition (kubelets that do not write it), the latest start of
    any of its containers, which runs in the sandbox the same report's podIPs
    belong to. None: no report says the sandbox is up (the condition is False,
    or neither is there)."""

    @property
    def ending(self) -> bool:
        """On its way out: its address may be taken over by a new pod."""
        return self.terminating or self.finished

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True, order=True)
class Node:
    name: NodeName
    internal_ip: IPv4Address | None
    pod_cidrs: tuple[IPv4Network, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    addresses: tuple[IPAddress, ...] = ()
    """Every address the Node reports (InternalIP, ExternalIP; both families):
    never an egress IP."""


@dataclass(frozen=True, order=True)
class Service:
    namespace: str
    name: str
    selector: tuple[tuple[str, str], ...] | None
    """None for a Service without a selector: its endpoints are managed by hand."""
    load_balancer_ips: tuple[IPAddress, ...] = ()
    """LoadBalancer ingress IPs, the requested loadBalancerIP and externalIPs: in
    use by the Service, so never an egress IP."""


@dataclass(frozen=True, order=True)
class Namespace:
    name: str
    labels: tuple[tuple[str, str], ...] = ()


def _condition(status: Mapping[str, Any], kind: str) -> str | None:
    for c in status.get("conditions") or []:
        if isinstance(c, Mapping) and c.get("type") == kind:
            return str(c.get("status"))
    return None


def _seconds(value: Any) -> int | None:
    """An RFC 3339 time (`2026-12-03T07:20:39Z`) as whole Unix seconds."""
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    if t.tzinfo is None:
        return None  # the API server always writes a zone: anything else is not its
    return math.floor(t.timestamp())


_CONTAINER_STATUSES = (
    "initContainerStatuses",
    "containerStatuses",
    "ephemeralContainerStatuses",
)


def _sandbox_since(status: Mapping[str, Any]) -> int | None:
    """See `Pod.sandbox_since`."""
    for c in status.get("conditions") or []:
        if isinstance(c, Mapping) and c.get("type") == "PodReadyToStartContainers":
            return _seconds(c.get("lastTransitionTime")) if c.get("status") == "True" else None
    starts: list[int] = []
    for key in _CONTAINER_STATUSES:
        for cs in status.get(key) or []:
            state = cs.get("state") if isinstance(cs, Mapping) else None
            if not isinstance(state, Mapping):
                continue
            for phase in ("running", "terminated"):
                detail = state.get(phase)
                started = _seconds(detail.get("startedAt")) if isinstance(detail, Mapping) else None
                if started is not None:
                    starts.append(started)
    return max(starts, default=None)


def parse_pod(obj: Mapping[str, Any]) -> Pod | None:
    """A pod, ending ones included; None for one whose network is gone, or malformed."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if not meta.get("name") or not meta.get("namespace"):
        return None
    terminating = bool(meta.get("deletionTimestamp"))
    finished = status.get("phase") in ("Succeeded", "Failed")
    if (terminating or finished) and _condition(status, "PodReadyToStartContainers") == "False":
        return None  # its sandbox, and with it its address, is gone
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
        terminating=terminating,
        finished=finished,
        sandbox_since=_sandbox_since(status),
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
    every = {
        a
        for a in (_ip(x.get("address")) for x in addrs if x.get("type") in _NODE_ADDRESS_TYPES)
        if a is not None
    }
    return Node(
        name=NodeName(str(meta["name"])),
        internal_ip=internal,
        pod_cidrs=tuple(v4),
        labels=_labels(meta),
        addresses=tuple(sorted(every, key=lambda a: (a.version, int(a)))),
    )


_NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP")


def parse_service(obj: Mapping[str, Any]) -> Service | None:
    meta = obj.get("metadata") or {}
    if not meta.get("name") or not meta.get("namespace"):
        return None
    spec = obj.get("spec") or {}
    selector = spec.get("selector")
    ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    raw = [
        *(i.get("ip") for i in ingress if isinstance(i, Mapping)),
        spec.get("loadBalancerIP"),
        *(spec.get("externalIPs") or []),
    ]
    in_use = {a for a in map(_ip, raw) if a is not None}
    return Service(
        namespace=str(meta["namespace"]),
        name=str(meta["name"]),
        selector=tuple(sorted((str(k), str(v)) for k, v in selector.items()))
        if isinstance(selector, Mapping) and selector
        else None,
        load_balancer_ips=tuple(sorted(in_use, key=lambda a: (a.version, int(a)))),
    )


def parse_service_cidr(obj: Mapping[str, Any]) -> tuple[IPNetwork, ...]:
    """The ranges of one ServiceCIDR (`networking.k8s.io/v1`); unreadable ones dropped."""
    cidrs = (obj.get("spec") or {}).get("cidrs") or []
    return tuple(n for n in map(_net, cidrs) if n is not None)


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
        out += [a for a in map(_ip, ep.get("addresses") or []) if isinstance(a, IPv4Address)]
    return (str(meta["namespace"]), str(service)), tuple(sorted(set(out)))
