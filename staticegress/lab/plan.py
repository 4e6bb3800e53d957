"""The lab's address and naming plan: pure values, no I/O.

Everything the lab creates is named from here, so `lab down` and the tests
can find all of it. Only documentation ranges face "outside":

- underlay L2 segment 198.51.100.0/24 (a bridge in its own namespace):
  .1 the router/external host, .2 the host (where the API server listens),
  .10+i node i; .200 and up are left for egress IPs;
- external servers 203.0.113.10 and 203.0.113.20 on the router;
- pods 10.244.i.0/24 on node i (cluster range 10.244.0.0/16), services
  10.96.0.0/16: private, and never routed beyond the lab's namespaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

CNI = Literal["host-gw", "vxlan"]
CNIS: tuple[CNI, ...] = ("host-gw", "vxlan")

PREFIX = "selab"
"""Every network namespace, host link and state path of the lab starts with this."""

STATE_DIR = Path("/run/selab")
"""Not under /run/staticegress: a real-runtime node binds its own directory over
that path, which the product's agent uses on every node."""

UNDERLAY = IPv4Network("198.51.100.0/24")
ROUTER_IP = IPv4Address("198.51.100.1")
HOST_IP = IPv4Address("198.51.100.2")
SERVER_IPS = (IPv4Address("203.0.113.10"), IPv4Address("203.0.113.20"))
HTTP_PORT = 80
UDP_PORT = 9000

CLUSTER_CIDR = IPv4Network("10.244.0.0/16")
SERVICE_CIDR = IPv4Network("10.96.0.0/16")

POD_GATEWAY = IPv4Address("169.254.1.1")
"""The pods' next hop: answered by the node through proxy ARP, as some CNIs do."""

LAB_VXLAN = "lab-vxlan"
LAB_VXLAN_ID = 1
LAB_VXLAN_PORT = 8472
"""The lab CNI's overlay, flannel-like; the product's own tunnel uses other values."""
VXLAN_MTU = 1450

VTEP_ANNOTATION = "lab.staticegress.io/vtep-mac"
LAB_LABEL = "lab.staticegress.io/node"

MAX_NODES = 50

NS_UNDERLAY = f"{PREFIX}-ul"
NS_EXTERNAL = f"{PREFIX}-ext"
HOST_LINK = f"{PREFIX}-host"
BRIDGE = "br0"


@dataclass(frozen=True)
class NodePlan:
    """One lab node: its names and addresses."""

    index: int

    @property
    def name(self) -> str:
        return f"node-{self.index}"

    @property
    def netns(self) -> str:
        return f"{PREFIX}-{self.name}"

    @property
    def underlay_ip(self) -> IPv4Address:
        return UNDERLAY.network_address + 10 + self.index

    @property
    def bridge_port(self) -> str:
        """The node's port on the underlay bridge; down = cable pulled."""
        return f"ul-{self.name}"

    @property
    def pod_cidr(self) -> IPv4Network:
        return IPv4Network(f"10.244.{self.index}.0/24")

    @property
    def vtep_ip(self) -> IPv4Address:
        """The node's address on the lab overlay (vxlan mode), as flannel uses .0."""
        return self.pod_cidr.network_address


def node_plans(count: int) -> tuple[NodePlan, ...]:
    if not 1 <= count <= MAX_NODES:
        raise ValueError(f"--nodes must be between 1 and {MAX_NODES}")
    return tuple(NodePlan(i) for i in range(1, count + 1))


def node_by_name(name: str, count: int) -> NodePlan:
    for plan in node_plans(count):
        if plan.name == name:
            return plan
    raise KeyError(name)


def pod_netns(uid: str) -> str:
    return f"{PREFIX}-pod-{uid[:8]}"


def pod_veth(uid: str) -> str:
    """Host-side veth name, at most 15 characters."""
    return f"ve{uid[:8]}"
