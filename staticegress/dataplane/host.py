"""Node-level facts and settings: the uplink, kernel knobs, gratuitous ARP.

- `find_uplink`: the interface that holds the node's InternalIP, with its MTU;
- `prepare_sysctls`: a gateway forwards steered packets back out of the
  interface they came in on, which makes the kernel send ICMP redirects; a
  director that honoured one would cache a route around its gateway and leak
  with its node IP. Both directions are switched off. Replies arriving on the
  tunnel have a source reachable through the uplink, so strict reverse-path
  filtering would drop them: the tunnel gets loose mode;
- `send_garp`: after taking an egress IP, tell the segment at once (and a few
  more times) so neighbours and switches stop sending to the old owner.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from pyroute2 import AsyncIPRoute

from staticegress.dataplane.netns import NetnsRunner

log = logging.getLogger(__name__)

GARP_SCHEDULE = (0.0, 0.2, 0.5, 1.0, 2.0, 4.0)
"""Seconds after taking an IP at which to announce it."""


@dataclass(frozen=True)
class Uplink:
    """The interface that carries the node's InternalIP."""

    name: str
    mtu: int
    mac: str


async def find_uplink(ip: IPv4Address, *, netns: str | None = None) -> Uplink:
    async with AsyncIPRoute(netns=netns) if netns else AsyncIPRoute() as ipr:
        async for a in await ipr.get_addr(family=socket.AF_INET):
            if a.get("address") == str(ip):
                link = (await ipr.link("get", index=a["index"]))[0]
                return Uplink(
                    str(link.get("ifname")), int(link.get("mtu")), str(link.get("address"))
                )
    raise RuntimeError(f"no interface holds the node address {ip}")


def _write_sysctl(key: str, value: str) -> None:
    path = Path("/proc/sys") / key.replace(".", "/")
    if path.exists():
        path.write_text(value)


async def prepare_sysctls(runner: NetnsRunner, *, uplink: str, tunnel: str | None) -> None:
    def apply() -> None:
        for scope in ("all", "default", uplink):
            _write_sysctl(f"net.ipv4.conf.{scope}.send_redirects", "0")
            _write_sysctl(f"net.ipv4.conf.{scope}.accept_redirects", "0")
        _write_sysctl("net.ipv4.ip_forward", "1")
        if tunnel:
            _write_sysctl(f"net.ipv4.conf.{tunnel}.rp_filter", "2")
            # The tunnel carries IPv4 only; IPv6 autoconfiguration would only
            # send multicast that has nowhere to go.
            _write_sysctl(f"net.ipv6.conf.{tunnel}.disable_ipv6", "1")

    await runner.run(apply)


def _garp_frames(mac: bytes, ip: IPv4Address) -> list[bytes]:
    eth = b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
    frames = []
    for op, target_mac in ((1, b"\x00" * 6), (2, b"\xff" * 6)):
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op)
        arp += mac + ip.packed + target_mac + ip.packed
        frames.append(eth + arp)
    return frames


def _send_garp(ifname: str, mac_text: str, ip: IPv4Address) -> None:
    mac = bytes.fromhex(mac_text.replace(":", ""))
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        for frame in _garp_frames(mac, ip):
            s.send(frame)


async def announce(runner: NetnsRunner, uplink: Uplink, ip: IPv4Address) -> None:
    """Gratuitous ARP (request and reply forms) on the schedule; failures only log."""
    start = asyncio.get_running_loop().time()
    for at in GARP_SCHEDULE:
        delay = start + at - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await runner.run(lambda: _send_garp(uplink.name, uplink.mac, ip))
        except OSError as exc:
            log.warning("garp ip=%s dev=%s failed: %s", ip, uplink.name, exc)
            return
