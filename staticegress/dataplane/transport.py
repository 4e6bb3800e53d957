"""Choose the transport, once for the whole cluster.

Detection. `direct` needs pod IPs routable on the underlay: a gateway must be
able to send replies straight back to a pod on another node. That is the case
when this node routes every other node's pod range through its uplink via
that node's own address (host-gw, Calico or kube-router without
encapsulation). Anything else (an overlay device such as flannel.1, a
tunnel, no route, or no pod ranges published on the Node objects at all)
means `vxlan`, our own tunnel, which works whatever the CNI does.

Decision. Every node must use the same transport: a director that tunnels
to a gateway without the tunnel (or the reverse) has its traffic dropped.
Each node's own detection can differ (one node starts before the CNI has
installed its routes), so detection only proposes; `decide_transport`
settles it through one cluster-wide record (the agent keeps it in a
ConfigMap in its namespace):
- the record, if it exists, is the cluster's transport: an operator may
  write it by hand (without `decidedBy`) to choose; an agent wrote it
  otherwise;
- with no record, the node detects and creates the record; creating is
  atomic, so when several nodes race, the first write wins and the others
  read it back and follow it;
- an explicit `--transport direct|vxlan` on a node overrides the record for
  that node (and records its value if there is no record yet);
- a node whose own detection (or flag) disagrees with the record says so
  (`TransportDecision.mismatch`, which the agent logs and reports as an
  Event on its Node) but, in auto mode, follows the record.
The decision is taken when an agent starts; changing the record takes effect
as each agent restarts.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from pyroute2 import AsyncIPRoute

from staticegress.api.core import Node
from staticegress.api.types import NodeName

Transport = Literal["direct", "vxlan"]
TransportFlag = Literal["auto", "direct", "vxlan"]
TRANSPORTS: tuple[Transport, ...] = ("direct", "vxlan")

RECORD_NAME = "staticegress-transport"
"""The cluster's record: a ConfigMap of this name in the agent's namespace."""
KEY_TRANSPORT = "transport"
KEY_DECIDED_BY = "decidedBy"
KEY_REASON = "reason"


class TransportStore(Protocol):
    """Where the cluster's decision is kept."""

    async def get(self) -> Mapping[str, str] | None:
        """The record's data; None when there is none."""
        ...

    async def create(self, data: Mapping[str, str]) -> bool:
        """Create the record atomically; False if one exists already."""
        ...


class TransportRecordError(ValueError):
    """The record names no known transport (an operator's typo)."""


@dataclass(frozen=True)
class TransportDecision:
    """What a node uses and why."""

    transport: Transport
    source: Literal["flag", "cluster", "first"]
    """`flag`: this node's --transport; `cluster`: the record; `first`: this node
    wrote the record from its own detection."""
    reason: str
    mismatch: str | None = None
    """Set when this node's own view differs from the cluster's record."""


def _origin(record: Mapping[str, str]) -> str:
    who = record.get(KEY_DECIDED_BY)
    if not who:
        return "set by the operator"
    return f"recorded by {who}: {record.get(KEY_REASON) or 'no reason given'}"


def parse_record(record: Mapping[str, str]) -> Transport:
    value = (record.get(KEY_TRANSPORT) or "").strip()
    for t in TRANSPORTS:
        if value == t:
            return t
    raise TransportRecordError(
        f"{RECORD_NAME}: {KEY_TRANSPORT}={value!r} is none of {', '.join(TRANSPORTS)}"
    )


async def decide_transport(
    store: TransportStore,
    *,
    node: str,
    flag: TransportFlag,
    detect: Callable[[], Awaitable[tuple[Transport, str]]],
    attempts: int = 3,
) -> TransportDecision:
    """This node's transport under the cluster's record (see the module docstring).

    Raises `TransportRecordError` in auto mode when the record is unreadable:
    guessing could split the cluster, so the caller waits for it to be fixed.
    Store errors propagate for the caller to retry.
    """
    record = await store.get()
    if flag != "auto":
        if record is None:
            data = {KEY_TRANSPORT: flag, KEY_DECIDED_BY: node, KEY_REASON: f"--transport={flag}"}
            if await store.create(data):
                return TransportDecision(flag, "flag", "--transport flag; recorded for the cluster")
            record = await store.get()
        mismatch = None
        if record is not None:
            try:
                theirs = parse_record(record)
            except TransportRecordError as exc:
                mismatch = f"--transport={flag} on {node}; the cluster's record is invalid: {exc}"
            else:
                if theirs != flag:
                    mismatch = (
                        f"--transport={flag} on {node} overrides the cluster's {theirs} "
                        f"({_origin(record)})"
                    )
        return TransportDecision(flag, "flag", "--transport flag", mismatch)

    detected, why = await detect()
    for _ in range(attempts):
        if record is None:
            data = {KEY_TRANSPORT: detected, KEY_DECIDED_BY: node, KEY_REASON: why}
            if await store.create(data):
                return TransportDecision(detected, "first", f"first to decide: {why}")
            # Another node won the race: read what it recorded.
            record = await store.get()
            continue
        theirs = parse_record(record)
        mismatch = None
        if theirs != detected:
            mismatch = (
                f"{node} detects {detected} ({why}) but follows the cluster's {theirs} "
                f"({_origin(record)})"
            )
        reason = f"the cluster's record, {_origin(record)}"
        return TransportDecision(theirs, "cluster", reason, mismatch)
    raise RuntimeError(f"{RECORD_NAME} was created and deleted {attempts} times while deciding")


async def detect_transport(
    nodes: Iterable[Node], *, me: NodeName, uplink: str, netns: str | None = None
) -> tuple[Transport, str]:
    """("direct" | "vxlan", reason)."""
    peers = [n for n in nodes if n.name != me and n.pod_cidrs and n.internal_ip is not None]
    if not peers:
        return "vxlan", "no other node publishes a pod range"
    async with AsyncIPRoute(netns=netns) if netns else AsyncIPRoute() as ipr:
        names = {
            int(link["index"]): str(link.get("ifname")) async for link in await ipr.get_links()
        }
        for node in peers:
            probe = node.pod_cidrs[0].network_address + 1
            routes = await ipr.route("get", dst=str(probe), family=socket.AF_INET)
            if not isinstance(routes, list):
                routes = [r async for r in routes]
            route = routes[0]
            dev = names.get(int(route.get("oif") or 0), "?")
            gw = route.get("gateway")
            if dev != uplink or gw != str(node.internal_ip):
                return "vxlan", (
                    f"pods of {node.name} ({node.pod_cidrs[0]}) are routed via "
                    f"{dev} {gw or 'without a gateway'}, not via {node.internal_ip}"
                )
    return "direct", f"every node's pod range is routed via its address on {uplink}"
