"""Make the kernel's routing objects match a NetlinkSpec, touching only what we own.

Reconciliation follows one pattern for every kind of object: list what
exists (scoped to what we own: our rule/route protocol, our tunnel link, our
address label), add what is missing first, then remove what is no longer
wanted, one object at a time. A failure is logged and the rest goes on; the
caller gets every failure back and schedules a full resync.

The tunnel link is compared on its immutable attributes (VNI, port, local
address, underlay device, learning off); a link that differs is recreated,
with the reason logged. Its MAC and MTU are set in place.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from staticegress.render.netlink import (
    ROUTE_PROTO,
    NetlinkSpec,
    RouteSpec,
    RuleSpec,
    TunnelSpec,
    address_label,
)
from staticegress.render.nft import TUNNEL

log = logging.getLogger(__name__)

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04


@dataclass
class ApplyResult:
    """What one reconciliation changed and what failed."""

    added: int = 0
    removed: int = 0
    errors: list[str] | None = None
    new_addresses: tuple[IPv4Address, ...] = ()

    def fail(self, what: str, exc: Exception) -> None:
        self.errors = [*(self.errors or []), f"{what}: {exc}"]
        log.warning("netlink %s failed: %s", what, exc)


class NetlinkApplier:
    """Owns our rules, routes, tunnel link, neighbours, FDB entries and egress addresses."""

    def __init__(self, *, netns: str | None = None) -> None:
        self.netns = netns

    def _ipr(self) -> AsyncIPRoute:
        return AsyncIPRoute(netns=self.netns) if self.netns else AsyncIPRoute()

    # ------------------------------------------------------------------ read

    @staticmethod
    async def _actual_rules(ipr: AsyncIPRoute) -> dict[RuleSpec, Any]:
        out: dict[RuleSpec, Any] = {}
        async for r in await ipr.get_rules(family=socket.AF_INET):
            if r.get("protocol") != ROUTE_PROTO:
                continue
            dst = r.get("dst")
            spec = RuleSpec(
                priority=int(r.get("priority") or 0),
                table=int(r.get("table") or r["table"]),
                fwmark=r.get("fwmark"),
                fwmask=r.get("fwmask") if r.get("fwmark") is not None else None,
                dst=IPv4Network(f"{dst}/{r['dst_len']}") if dst else None,
            )
            out[spec] = r
        return out

    @staticmethod
    async def _actual_routes(ipr: AsyncIPRoute, names: dict[int, str]) -> dict[RouteSpec, Any]:
        out: dict[RouteSpec, Any] = {}
        async for r in await ipr.route("dump", family=socket.AF_INET):
            if r.get("proto") != ROUTE_PROTO:
                continue
            dst = r.get("dst") or "0.0.0.0"
            gw = r.get("gateway")
            spec = RouteSpec(
                table=int(r.get("table") or r["table"]),
                dst=IPv4Network(f"{dst}/{r['dst_len']}"),
                gateway=IPv4Address(gw) if gw else IPv4Address("0.0.0.0"),
                dev=names.get(int(r.get("oif") or 0), ""),
                onlink=bool(r["flags"] & RTNH_F_ONLINK),
            )
            out[spec] = r
        return out

    @staticmethod
    async def _link_names(ipr: AsyncIPRoute) -> dict[int, str]:
        return {int(link["index"]): str(link.get("ifname")) async for link in await ipr.get_links()}

    # --------------------------------------------------------------- tunnel

    async def _ensure_tunnel(self, ipr: AsyncIPRoute, spec: TunnelSpec, res: ApplyResult) -> int:
        underlay = (await ipr.link_lookup(ifname=spec.underlay) or [None])[0]
        if underlay is None:
            raise RuntimeError(f"underlay device {spec.underlay} not found")
        found = await ipr.link_lookup(ifname=spec.name)
        if found:
            link = (await ipr.link("get", index=found[0]))[0]
            reason = _incompatible(link, spec, underlay)
            if reason is None:
                idx = int(found[0])
                if link.get("address") != spec.mac or link.get("mtu") != spec.mtu:
                    await ipr.link("set", index=idx, address=spec.mac, mtu=spec.mtu)
                if link.get("state") != "up":
                    await ipr.link("set", index=idx, state="up")
                await self._ensure_tunnel_address(ipr, idx, spec)
                return idx
            log.info("tunnel %s recreated: %s", spec.name, reason)
            await ipr.link("del", index=found[0])
            res.removed += 1
        await ipr.link(
            "add",
            ifname=spec.name,
            kind="vxlan",
            vxlan_id=spec.vni,
            vxlan_port=spec.port,
            vxlan_local=str(spec.local),
            vxlan_link=underlay,
            vxlan_learning=0,
            address=spec.mac,
            mtu=spec.mtu,
        )
        idx = int((await ipr.link_lookup(ifname=spec.name))[0])
        await ipr.link("set", index=idx, state="up")
        await self._ensure_tunnel_address(ipr, idx, spec)
        res.added += 1
        return idx

    @staticmethod
    async def _ensure_tunnel_address(ipr: AsyncIPRoute, idx: int, spec: TunnelSpec) -> None:
        have = [
            a.get("address") async for a in await ipr.get_addr(index=idx, family=socket.AF_INET)
        ]
        if str(spec.address) not in have:
            await ipr.addr("add", index=idx, address=str(spec.address), prefixlen=32, scope=253)

    # ----------------------------------------------------------------- apply

    async def apply(self, spec: NetlinkSpec, *, phase: str) -> ApplyResult:
        """`phase="add"`: create what is missing (before nft changes);
        `phase="finish"`: egress addresses, then remove what is stale."""
        res = ApplyResult()
        async with self._ipr() as ipr:
            if phase == "add":
                await self._add_phase(ipr, spec, res)
            else:
                await self._finish_phase(ipr, spec, res)
        return res

    async def _add_phase(self, ipr: AsyncIPRoute, spec: NetlinkSpec, res: ApplyResult) -> None:
        tunnel_idx = None
        if spec.tunnel is not None:
            try:
                tunnel_idx = await self._ensure_tunnel(ipr, spec.tunnel, res)
            except (NetlinkError, RuntimeError) as exc:
                res.fail(f"tunnel {spec.tunnel.name}", exc)
        if tunnel_idx is not None:
            for n in spec.neighbours:
                await _try(
                    res,
                    f"neigh {n.ip}",
                    ipr.neigh(
                        "replace",
                        dst=str(n.ip),
                        lladdr=n.mac,
                        ifindex=tunnel_idx,
                        state=NUD_PERMANENT,
                    ),
                )
            for f in spec.fdb:
                await _try(
                    res,
                    f"fdb {f.mac}",
                    ipr.fdb(
                        "replace",
                        ifindex=tunnel_idx,
                        lladdr=f.mac,
                        dst=str(f.dst),
                        state=NUD_PERMANENT,
                        flags=NTF_SELF,
                    ),
                )
        names = await self._link_names(ipr)
        index = {v: k for k, v in names.items()}
        have_routes = await self._actual_routes(ipr, names)
        for r in spec.routes:
            if r in have_routes:
                continue
            oif = index.get(r.dev)
            if oif is None:
                res.fail(f"route {r.dst} table {r.table}", RuntimeError(f"no device {r.dev}"))
                continue
            await _try(
                res,
                f"route {r.dst} table {r.table}",
                ipr.route(
                    "replace",
                    dst=str(r.dst),
                    gateway=str(r.gateway),
                    oif=oif,
                    table=r.table,
                    proto=ROUTE_PROTO,
                    flags=RTNH_F_ONLINK if r.onlink else 0,
                ),
            )
            res.added += 1
        have_rules = await self._actual_rules(ipr)
        for rule in spec.rules:
            if rule in have_rules:
                continue
            kwargs: dict[str, Any] = {
                "priority": rule.priority,
                "table": rule.table,
                "protocol": ROUTE_PROTO,
            }
            if rule.fwmark is not None:
                kwargs.update(fwmark=rule.fwmark, fwmask=rule.fwmask)
            if rule.dst is not None:
                kwargs.update(dst=str(rule.dst.network_address), dst_len=rule.dst.prefixlen)
            await _try(res, f"rule {rule}", ipr.rule("add", **kwargs))
            res.added += 1

    async def _finish_phase(self, ipr: AsyncIPRoute, spec: NetlinkSpec, res: ApplyResult) -> None:
        # Addresses: the egress IPs we own, labelled so we find them again.
        uplink = (await ipr.link_lookup(ifname=spec.uplink) or [None])[0]
        if uplink is not None:
            label = address_label(spec.uplink)
            have = {
                IPv4Address(a.get("address")): a
                async for a in await ipr.get_addr(index=uplink, family=socket.AF_INET)
                if a.get("label") == label and a["prefixlen"] == 32
            }
            new = []
            for ip in spec.addresses:
                if ip not in have:
                    ok = await _try(
                        res,
                        f"address {ip}",
                        ipr.addr("add", index=uplink, address=str(ip), prefixlen=32, label=label),
                    )
                    if ok:
                        new.append(ip)
                        res.added += 1
            res.new_addresses = tuple(new)
            for ip in sorted(set(have) - set(spec.addresses)):
                if await _try(
                    res,
                    f"remove address {ip}",
                    ipr.addr("del", index=uplink, address=str(ip), prefixlen=32),
                ):
                    res.removed += 1
        elif spec.addresses:
            res.fail("addresses", RuntimeError(f"uplink {spec.uplink} not found"))

        for rule, msg in (await self._actual_rules(ipr)).items():
            if rule not in spec.rules and await _try(
                res, f"remove rule {rule}", ipr.rule("del", **_rule_key(msg))
            ):
                res.removed += 1
        names = await self._link_names(ipr)
        for route, msg in (await self._actual_routes(ipr, names)).items():
            if route not in spec.routes and await _try(
                res,
                f"remove route {route.dst}",
                ipr.route(
                    "del",
                    dst=msg.get("dst") or "0.0.0.0",
                    dst_len=msg["dst_len"],
                    table=msg.get("table") or msg["table"],
                    proto=ROUTE_PROTO,
                ),
            ):
                res.removed += 1

        tunnel = (await ipr.link_lookup(ifname=TUNNEL) or [None])[0]
        if tunnel is not None and spec.tunnel is None:
            if await _try(res, f"remove link {TUNNEL}", ipr.link("del", index=tunnel)):
                res.removed += 1
        elif tunnel is not None:
            want_n = {n.ip for n in spec.neighbours}
            async for n in await ipr.get_neighbours(ifindex=tunnel, family=socket.AF_INET):
                ip = n.get("dst")
                if (
                    ip
                    and IPv4Address(ip) not in want_n
                    and await _try(
                        res, f"remove neigh {ip}", ipr.neigh("del", dst=ip, ifindex=tunnel)
                    )
                ):
                    res.removed += 1
            want_f = {f.mac for f in spec.fdb}
            async for f in await ipr.fdb("dump", ifindex=tunnel):
                mac = f.get("lladdr")
                if (
                    f.get("dst")
                    and mac not in want_f
                    and await _try(
                        res,
                        f"remove fdb {mac}",
                        ipr.fdb("del", ifindex=tunnel, lladdr=mac, dst=f.get("dst")),
                    )
                ):
                    res.removed += 1

    async def cleanup(self, uplink: str | None) -> ApplyResult:
        """Remove everything we own (uninstall, or a node that no longer runs us)."""
        empty = NetlinkSpec(
            rules=(),
            routes=(),
            tunnel=None,
            neighbours=(),
            fdb=(),
            addresses=(),
            uplink=uplink or "",
        )
        return await self.apply(empty, phase="finish")

    async def link_info(self, name: str) -> dict[str, Any] | None:
        async with self._ipr() as ipr:
            found = await ipr.link_lookup(ifname=name)
            if not found:
                return None
            link = (await ipr.link("get", index=found[0]))[0]
            return {
                "mtu": link.get("mtu"),
                "address": link.get("address"),
                "vni": link.get(("linkinfo", "data", "vxlan_id")),
                "port": link.get(("linkinfo", "data", "vxlan_port")),
            }


def _rule_key(msg: Any) -> dict[str, Any]:
    key: dict[str, Any] = {
        "priority": msg.get("priority"),
        "table": msg.get("table"),
        "protocol": ROUTE_PROTO,
    }
    if msg.get("fwmark") is not None:
        key.update(fwmark=msg.get("fwmark"), fwmask=msg.get("fwmask"))
    if msg.get("dst"):
        key.update(dst=msg.get("dst"), dst_len=msg["dst_len"])
    return key


def _incompatible(link: Any, spec: TunnelSpec, underlay: int) -> str | None:
    kind = link.get(("linkinfo", "kind"))
    if kind != "vxlan":
        return f"it is a {kind} link, not vxlan"
    checks = {
        "vni": (link.get(("linkinfo", "data", "vxlan_id")), spec.vni),
        "port": (link.get(("linkinfo", "data", "vxlan_port")), spec.port),
        "local": (link.get(("linkinfo", "data", "vxlan_local")), str(spec.local)),
        "underlay": (link.get(("linkinfo", "data", "vxlan_link")), underlay),
        "learning": (link.get(("linkinfo", "data", "vxlan_learning")), 0),
    }
    for name, (have, want) in checks.items():
        if have != want:
            return f"{name} is {have}, want {want}"
    return None


async def _try(res: ApplyResult, what: str, op: Awaitable[Any]) -> bool:
    try:
        await op
    except NetlinkError as exc:
        if exc.code == errno.EEXIST and what.startswith(("rule", "address")):
            return False  # already there: a concurrent change or a stale read
        if exc.code in (errno.ENOENT, errno.ESRCH) and what.startswith("remove"):
            return False  # already gone
        res.fail(what, exc)
        return False
    return True
