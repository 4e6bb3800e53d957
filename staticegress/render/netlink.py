"""render_netlink: a DesiredState as the routing objects the agent owns. Pure.

Ownership is visible in the kernel, so a restarted agent can find leftovers
without a state file:
- policy rules and routes carry protocol `ROUTE_PROTO` (ours alone);
- routes live in tables `table_base + slot` and `table_base` (return path);
- neighbours and FDB entries live on our own tunnel link only;
- egress IPs carry the address label `<uplink>:se`.

Routing, per remote gateway slot S:

    ip rule  fwmark S<<SHIFT/SLOTS lookup BASE+S priority PRIO      proto ROUTE_PROTO
    ip route default via GW dev UPLINK onlink table BASE+S          (direct)
    ip route default via GW dev segress0 onlink table BASE+S        (vxlan)
    ip rule  to GW/32 lookup main priority PRIO-1                   (vxlan)

The last rule keeps the tunnel's own outer packets, which inherit the inner
packet's mark, out of the tunnel (they would loop). On a gateway with the
vxlan transport, replies are sent back through the tunnel:

    ip rule  fwmark RETURN/RETURN lookup BASE priority PRIO
    ip route POD/32 via DIRECTOR dev segress0 onlink table BASE
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from staticegress.model.desired import DesiredState
from staticegress.render.nft import DEFAULT_MARKS, TUNNEL, MarkLayout, vtep_mac

ROUTE_PROTO = 210
"""The rtnetlink protocol number that marks our rules and routes."""
MAIN_TABLE = 254
VXLAN_ID = 4097
VXLAN_PORT = 4790
VXLAN_OVERHEAD = 50
TUNNEL_ADDRESS = IPv4Address("169.254.77.77")


@dataclass(frozen=True, order=True)
class RuleSpec:
    priority: int
    table: int
    fwmark: int | None = None
    fwmask: int | None = None
    dst: IPv4Network | None = None


@dataclass(frozen=True, order=True)
class RouteSpec:
    table: int
    dst: IPv4Network
    gateway: IPv4Address
    dev: str
    onlink: bool = True


@dataclass(frozen=True, order=True)
class NeighSpec:
    ip: IPv4Address
    mac: str


@dataclass(frozen=True, order=True)
class FdbSpec:
    mac: str
    dst: IPv4Address


@dataclass(frozen=True)
class TunnelSpec:
    """Our VXLAN link: the immutable attributes decide whether it must be recreated."""

    name: str
    vni: int
    port: int
    local: IPv4Address
    mac: str
    mtu: int
    underlay: str
    address: IPv4Address = TUNNEL_ADDRESS
    """A link-scoped address on the tunnel: without any address, the kernel's
    reverse-path filter rejects every packet arriving on it, even in loose mode."""


@dataclass(frozen=True)
class NetlinkSpec:
    """Every routing object this node should have, each collection sorted."""

    rules: tuple[RuleSpec, ...]
    routes: tuple[RouteSpec, ...]
    tunnel: TunnelSpec | None
    neighbours: tuple[NeighSpec, ...]
    fdb: tuple[FdbSpec, ...]
    addresses: tuple[IPv4Address, ...]
    uplink: str


@dataclass(frozen=True)
class RoutingConfig:
    """Numbers and names the routing uses; flags set them, defaults suit most clusters."""

    uplink: str
    uplink_ip: IPv4Address
    uplink_mtu: int = 1500
    table_base: int = 7300
    rule_priority: int = 100
    marks: MarkLayout = DEFAULT_MARKS


def render_netlink(desired: DesiredState, *, transport: str, cfg: RoutingConfig) -> NetlinkSpec:
    """The rules, routes, tunnel, neighbours, FDB entries and addresses we want."""
    vxlan = transport == "vxlan"
    rules: list[RuleSpec] = []
    routes: list[RouteSpec] = []
    dev = TUNNEL if vxlan else cfg.uplink
    for gw in desired.gateways:
        table = cfg.table_base + gw.slot
        rules.append(
            RuleSpec(
                priority=cfg.rule_priority,
                table=table,
                fwmark=cfg.marks.slot_mark(gw.slot),
                fwmask=cfg.marks.slot_mask,
            )
        )
        routes.append(RouteSpec(table=table, dst=IPv4Network("0.0.0.0/0"), gateway=gw.ip, dev=dev))
        if vxlan:
            rules.append(
                RuleSpec(priority=cfg.rule_priority - 1, table=MAIN_TABLE, dst=IPv4Network(gw.ip))
            )
    if vxlan and desired.return_routes:
        rules.append(
            RuleSpec(
                priority=cfg.rule_priority,
                table=cfg.table_base,
                fwmark=cfg.marks.return_bit,
                fwmask=cfg.marks.return_bit,
            )
        )
        for pod, director in desired.return_routes:
            routes.append(
                RouteSpec(table=cfg.table_base, dst=IPv4Network(pod), gateway=director, dev=TUNNEL)
            )
    tunnel = None
    neighbours: list[NeighSpec] = []
    fdb: list[FdbSpec] = []
    if vxlan:
        tunnel = TunnelSpec(
            name=TUNNEL,
            vni=VXLAN_ID,
            port=VXLAN_PORT,
            local=cfg.uplink_ip,
            mac=vtep_mac(cfg.uplink_ip),
            mtu=cfg.uplink_mtu - VXLAN_OVERHEAD,
            underlay=cfg.uplink,
        )
        for _, ip in desired.peers:
            neighbours.append(NeighSpec(ip=ip, mac=vtep_mac(ip)))
            fdb.append(FdbSpec(mac=vtep_mac(ip), dst=ip))
    return NetlinkSpec(
        rules=tuple(sorted(set(rules))),
        routes=tuple(sorted(set(routes))),
        tunnel=tunnel,
        neighbours=tuple(sorted(set(neighbours))),
        fdb=tuple(sorted(set(fdb))),
        addresses=desired.owned,
        uplink=cfg.uplink,
    )


def address_label(uplink: str) -> str:
    """The label our egress IPs carry: `<uplink>:se`, within the kernel's 15 characters."""
    return f"{uplink[:12]}:se"
