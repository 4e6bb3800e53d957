"""Node-level facts and settings: the uplink, kernel knobs, gratuitous ARP.

- `find_uplink`: the interface that holds the node's InternalIP, with its MTU;
- `read_boot_time`: when the node's kernel booted, to tell the pod addresses
  kubelet reported this boot from stale ones (`staticegress.model.boot`);
- `prepare_sysctls`: a gateway forwards steered packets back out of the
  interface they came in on, which makes the kernel send ICMP redirects; a
  director that honoured one would cache a route around its gateway and leak
  with its node IP. Both directions are switched off. Replies arriving on the
  tunnel have a source reachable through the uplink, so strict reverse-path
  filtering would drop them: the tunnel gets loose mode;
- `restore_sysctls` (uninstall): puts back the redirect settings as they were
  before our first write since boot, kept in a small record file;
- `send_garp`: after taking an egress IP, tell the segment at once (and a few
  more times) so neighbours and switches stop sending to the old owner.

Where sysctls are written: a container's /proc/sys is read-only, whatever its
capabilities. The DaemonSet mounts the node's /proc/sys/net read-write at
/host/proc/sys/net (`--proc-sys=/host/proc/sys`): net sysctls resolve
against the network namespace of whoever opens them, which for a host-network
pod is the node's, and writing them takes CAP_NET_ADMIN, which the agent has.
A write that still fails is fine when the value already holds (a node
configured by its administrator); otherwise it is returned as a problem, for
the agent to report, never raised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from pyroute2 import AsyncIPRoute

from staticegress.dataplane.netns import NetnsRunner
from staticegress.render.netlink import address_label

log = logging.getLogger(__name__)

GARP_SCHEDULE = (0.0, 0.2, 0.5, 1.0, 2.0, 4.0)
"""Seconds after taking an IP at which to announce it."""


@dataclass(frozen=True)
class Uplink:
    """The interface that carries the node's InternalIP."""

    name: str
    mtu: int
    mac: str
    subnet: IPv4Network | None = None
    """The connected subnet of the node's InternalIP."""
    routers: frozenset[IPv4Address] = frozenset()
    """Next hops of the main table's IPv4 default routes: never an egress IP."""


async def find_uplink(ip: IPv4Address, *, netns: str | None = None) -> Uplink:
    async with AsyncIPRoute(netns=netns) if netns else AsyncIPRoute() as ipr:
        async for a in await ipr.get_addr(family=socket.AF_INET):
            if a.get("address") == str(ip):
                link = (await ipr.link("get", index=a["index"]))[0]
                routers = set()
                async for r in await ipr.get_routes(family=socket.AF_INET, table=254):
                    gw = r.get("gateway")
                    if r.get("dst_len") == 0 and gw:
                        routers.add(IPv4Address(str(gw)))
                return Uplink(
                    str(link.get("ifname")),
                    int(link.get("mtu")),
                    str(link.get("address")),
                    subnet=IPv4Network(f"{ip}/{a.get('prefixlen')}", strict=False),
                    routers=frozenset(routers),
                )
    raise RuntimeError(f"no interface holds the node address {ip}")


PROC_STAT = Path("/proc/stat")


def read_boot_time(path: Path = PROC_STAT) -> int:
    """The node's boot time in whole Unix seconds (`btime`). Raises `OSError`.

    The kernel's own figure: the same in every container of the node (and it
    follows the time namespace, which is how the lab's nodes boot on one
    kernel), whole seconds like the times kubelet writes, and derived from the
    current clock, so a clock stepped since the boot moves it with the clock."""
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "btime":
            return int(value)
    raise OSError(f"no btime in {path}")


ADDRESS_LABEL_SUFFIX = address_label("")
"""How our egress IPs' address label ends, whatever the uplink's name."""


async def labelled_uplinks(*, netns: str | None = None) -> list[str]:
    """Every link holding an address with our label: where egress IPs were
    added, for a cleanup that was not told the uplink."""
    async with AsyncIPRoute(netns=netns) if netns else AsyncIPRoute() as ipr:
        indexes = {
            int(a["index"])
            async for a in await ipr.get_addr(family=socket.AF_INET)
            if str(a.get("label") or "").endswith(ADDRESS_LABEL_SUFFIX)
        }
        names = [str((await ipr.link("get", index=i))[0].get("ifname")) for i in indexes]
    return sorted(names)


PROC_SYS = Path("/proc/sys")

Sysctl = tuple[str, ...]
"""A kernel setting as its path under /proc/sys, in components (`("net",
"ipv4", "ip_forward")`): an interface name may hold a dot (`eth0.100`), so the
dotted form cannot be split back safely."""


def _conf(scope: str, key: str, *, family: str = "ipv4") -> Sysctl:
    return ("net", family, "conf", scope, key)


def _key_text(key: Sysctl) -> str:
    return "/".join(key)


def sysctl_fix(root: Path) -> str:
    """What to do about settings the agent cannot write under `root`."""
    return (
        f"mount the node's /proc/sys/net read-write at {root / 'net'} and give the agent "
        "NET_ADMIN, or set them on the node"
    )


def _write_sysctl(root: Path, key: Sysctl, value: str) -> str | None:
    """Set `key` under `root` to `value`; None when it now holds (or this
    kernel has no such setting), else what is wrong (`sysctl_fix` says what
    to do about it)."""
    path = root.joinpath(*key)
    if not path.exists():
        return None
    try:
        path.write_text(value)
        return None
    except OSError as exc:
        try:
            current = path.read_text().strip()
        except OSError:
            current = "unreadable"
        if current == value:
            log.debug("sysctl %s already %s (not writable here: %s)", _key_text(key), value, exc)
            return None
        return f"cannot set {_key_text(key)} to {value} (it is {current}): {exc.strerror or exc}"


def _redirect_keys(uplink: str) -> list[Sysctl]:
    return [
        _conf(scope, key)
        for scope in ("all", "default", uplink)
        for key in ("send_redirects", "accept_redirects")
    ]


def _remember(root: Path, record: Path, keys: list[Sysctl]) -> None:
    """Add the current value of each key the record does not hold yet.

    The record lives on a tmpfs (/run): a reboot resets both the settings and
    the record, so it always holds the values from before our first write
    since boot."""
    try:
        known: dict[str, str] = json.loads(record.read_text())
    except FileNotFoundError:
        known = {}
    added = False
    for key in keys:
        path = root.joinpath(*key)
        if _key_text(key) not in known and path.exists():
            known[_key_text(key)] = path.read_text().strip()
            added = True
    if added:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, record)


async def prepare_sysctls(
    runner: NetnsRunner,
    *,
    uplink: str,
    tunnel: str | None,
    root: Path = PROC_SYS,
    record: Path | None = None,
) -> list[str]:
    """Apply the node settings we need; return the problems (empty: all hold).

    `record`: a file to keep the redirect settings' values from before our
    first write in, for `restore_sysctls`."""

    def apply() -> list[str]:
        if not root.joinpath("net", "ipv4").is_dir():
            return [
                f"{root / 'net' / 'ipv4'} does not exist: mount the node's /proc/sys/net "
                f"at {root / 'net'} (--proc-sys={root})"
            ]
        problems: list[str] = []
        if record is not None:
            try:
                _remember(root, record, _redirect_keys(uplink))
            except (OSError, ValueError) as exc:
                # Only uninstall needs it, and it must not stop the dataplane.
                log.warning("cannot record the sysctls in %s: %s", record, exc)
        wanted: list[tuple[Sysctl, str]] = [(k, "0") for k in _redirect_keys(uplink)]
        wanted.append((("net", "ipv4", "ip_forward"), "1"))
        if tunnel:
            wanted.append((_conf(tunnel, "rp_filter"), "2"))
            # The tunnel carries IPv4 only; IPv6 autoconfiguration would only
            # send multicast that has nowhere to go.
            wanted.append((_conf(tunnel, "disable_ipv6", family="ipv6"), "1"))
        for key, value in wanted:
            problem = _write_sysctl(root, key, value)
            if problem is not None:
                problems.append(problem)
        return problems

    return await runner.run(apply)


def restore_sysctls(*, root: Path = PROC_SYS, record: Path) -> list[str]:
    """Put back what `record` holds, then remove it; return what failed.

    ip_forward is not in the record and stays on: every Kubernetes node's pod
    networking needs it, whoever turned it on."""
    try:
        known: dict[str, str] = json.loads(record.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        return [f"cannot read the sysctl record {record}: {exc}"]
    failed = []
    for text, value in sorted(known.items()):
        problem = _write_sysctl(root, tuple(text.split("/")), value)
        if problem is not None:
            failed.append(problem)
        else:
            log.info("restored %s to %s", text, value)
    if not failed:
        record.unlink(missing_ok=True)
    return failed


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
