"""Refuse to run on an eBPF dataplane that bypasses netfilter.

Everything we program lives in netfilter (our nftables table: marks, the
identity SNAT, the gateway's SNAT, the fail-closed drops) and in policy
routing. Two dataplanes move pod traffic past both, in tc or XDP programs
that redirect packets between devices without the host's stack seeing them:

- Cilium with kube-proxy replacement and BPF host routing: its programs on
  the node's uplink (`cil_from_netdev`, `cil_to_netdev`) forward and
  masquerade pod traffic themselves;
- Calico's eBPF dataplane: its programs on every host interface do the same,
  and it creates the `bpfin.cali`/`bpfout.cali` pair (`bpfnatin`/`bpfnatout`
  in older releases) for its NAT.

Steering there would silently do nothing, or worse, half of it: a selected
pod's traffic would leave with the node's address while we report success.
So the agent refuses, loudly, and names the fix.

What is looked at, all readable with the agent's own privileges:
- the node's link names (netlink);
- the tc BPF filters on the uplink's clsact ingress and egress hooks, by the
  name their loader gave them (netlink);
- an XDP program on the uplink (netlink);
- Cilium's pinned tcx links for the uplink, under
  `<bpffs>/cilium/devices/<uplink>/links/` (newer kernels attach with tcx,
  which tc's netlink dump does not show; the bpf() syscall, which would,
  needs privileges the agent does not have).

Cilium without programs on the uplink (its iptables-based host routing) is
accepted: pod traffic then goes through the host's stack and our table.
The decision is `refusal`, a pure function of the gathered `NodeFacts`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

BPFFS = Path("/sys/fs/bpf")

CALICO_BPF_LINKS = frozenset({"bpfin.cali", "bpfout.cali", "bpfnatin", "bpfnatout"})
"""Links Calico creates only in its eBPF dataplane (and removes when it leaves it)."""
CILIUM_LINKS = frozenset({"cilium_host", "cilium_net"})

CILIUM_PROGRAM_MARKS = ("cil_", "from-netdev", "to-netdev", "bpf_host", "bpf_netdev")
"""Substrings of the names Cilium's loaders give their tc programs and filters
(`cil_from_netdev-eth0` today; `bpf_netdev_eth0.o:[from-netdev]` from the
iproute2-based loader of older releases)."""
CALICO_PROGRAM_MARKS = ("cali", "calico")

CLSACT_INGRESS = 0xFFFFFFF2
CLSACT_EGRESS = 0xFFFFFFF3


@dataclass(frozen=True)
class NodeFacts:
    """What the node shows of the dataplanes that run on it."""

    links: frozenset[str]
    """Every link name in the node's network namespace."""
    uplink: str
    tc_programs: tuple[str, ...] = ()
    """Names of the tc BPF filters on the uplink (ingress and egress)."""
    xdp: bool = False
    """An XDP program is attached to the uplink."""
    pinned_links: tuple[str, ...] = ()
    """Cilium's pinned tcx links for the uplink (names of the pins)."""


def _marked(names: tuple[str, ...], marks: tuple[str, ...]) -> list[str]:
    return [n for n in names if any(m in n.lower() for m in marks)]


def refusal(facts: NodeFacts) -> str | None:
    """Why this node cannot be programmed, naming the fix; None: it can."""
    calico_links = sorted(facts.links & CALICO_BPF_LINKS)
    calico_programs = _marked(facts.tc_programs, CALICO_PROGRAM_MARKS)
    if calico_links or calico_programs:
        seen = []
        if calico_links:
            seen.append(f"links {', '.join(calico_links)}")
        if calico_programs:
            seen.append(f"tc programs {', '.join(calico_programs)} on {facts.uplink}")
        return (
            f"Calico's eBPF dataplane is active on this node ({'; '.join(seen)}); it forwards pod "
            "traffic past netfilter, where staticegress steers and SNATs. Switch Calico to "
            "its iptables or nftables dataplane (Installation spec.calicoNetwork."
            "linuxDataplane), or do not run staticegress on this cluster"
        )
    if facts.links & CILIUM_LINKS:
        found = _marked(facts.tc_programs, CILIUM_PROGRAM_MARKS) + [
            f"{p} (tcx)" for p in _marked(facts.pinned_links, CILIUM_PROGRAM_MARKS)
        ]
        if facts.xdp:
            found.append("an XDP program")
        if found:
            return (
                f"Cilium runs BPF programs on the uplink {facts.uplink} ({', '.join(found)}): "
                "with kube-proxy replacement and BPF host routing it forwards and masquerades "
                "pod traffic past netfilter, where staticegress steers and SNATs. Run Cilium "
                "with kubeProxyReplacement=false, bpf.hostLegacyRouting=true and "
                "bpf.masquerade=false, or do not run staticegress on this cluster"
            )
    return None


async def gather(uplink: str, *, netns: str | None = None, bpffs: Path = BPFFS) -> NodeFacts:
    """Read the node's links, the uplink's tc and XDP programs, and Cilium's pins."""
    async with AsyncIPRoute(netns=netns) if netns else AsyncIPRoute() as ipr:
        links: dict[str, int] = {}
        xdp = False
        async for link in await ipr.get_links():
            name = str(link.get("ifname"))
            links[name] = int(link["index"])
            if name == uplink:
                attached = link.get(("xdp", "IFLA_XDP_ATTACHED"))
                xdp = bool(link.get(("xdp", "IFLA_XDP_PROG_ID")) or attached)
        programs: list[str] = []
        if uplink in links:
            for parent in (CLSACT_INGRESS, CLSACT_EGRESS):
                async for f in await ipr.get_filters(index=links[uplink], parent=parent):
                    name = f.get(("options", "TCA_BPF_NAME"))
                    if f.get("kind") == "bpf" and name:
                        programs.append(str(name))
    # Cilium names a device's directory after it, dots made dashes.
    pins = bpffs / "cilium" / "devices" / uplink.replace(".", "-") / "links"
    try:
        pinned = tuple(sorted(p.name for p in pins.iterdir()))
    except OSError:
        pinned = ()
    return NodeFacts(
        links=frozenset(links),
        uplink=uplink,
        tc_programs=tuple(programs),
        xdp=xdp,
        pinned_links=pinned,
    )


async def check(uplink: str, *, netns: str | None = None, bpffs: Path = BPFFS) -> str | None:
    """`refusal` for this node; a failure to look is logged and not a refusal."""
    try:
        facts = await gather(uplink, netns=netns, bpffs=bpffs)
    except (OSError, NetlinkError) as exc:
        log.warning("cannot check for an eBPF dataplane on %s: %s", uplink, exc)
        return None
    return refusal(facts)
