"""Choose the transport from how the CNI routes pods between nodes.

`direct` needs pod IPs routable on the underlay: a gateway must be able to
send replies straight back to a pod on another node. That is the case when
this node routes every other node's pod range through its uplink via that
node's own address (host-gw, Calico or kube-router without encapsulation).
Anything else (an overlay device such as flannel.1, a tunnel, no route, or
no pod ranges published on the Node objects at all) means `vxlan`, our own
tunnel, which works whatever the CNI does.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Literal

from pyroute2 import AsyncIPRoute

from staticegress.api.core import Node
from staticegress.api.types import NodeName

Transport = Literal["direct", "vxlan"]


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
