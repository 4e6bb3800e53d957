"""Forget the connections of pods whose egress path changed.

The NAT decision for a connection is taken on its first packet and kept in
conntrack. When a pod's traffic switches between a remote gateway and this
node (its egress IP moved here or away), an existing flow would keep its old
binding (an identity SNAT where a real SNAT is now needed, or the reverse)
and stall. Deleting the pod's entries towards non-cluster addresses makes
the next packet take the new path; TCP flows resume (conntrack picks up
mid-stream connections), UDP flows simply start anew.

The same holds for a connection a pod began before it was steered at all
(known and not selected yet, or while our table was briefly gone): it kept
the CNI's masquerade, which the guard table now drops on every
packet. `flush_misnated` deletes exactly those, so they start anew steered.
"""

from __future__ import annotations

import functools
import itertools
import logging
import platform
from collections.abc import Callable, Collection, Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, ip_address

from pyroute2 import conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

log = logging.getLogger(__name__)

FILTERED_DUMP_MAX = 64
"""Up to this many pods, each pod's entries are dumped apart, filtered by the
kernel on their original source (CTA_FILTER, Linux 5.8 and later). Decoding
an entry costs about a millisecond of Python: one dump of a busy node's whole
table, for the one or two pods a change usually concerns, cost seconds of
CPU that the agent's other threads waited for. A kernel walk per pod costs
far less. Beyond this many pods, or on an older kernel (which ignores the
filter, so that each pod's dump would decode the whole table), one dump of
the whole table."""

FILTER_SINCE = (5, 8)
"""The first kernel whose conntrack dumps filter on the original tuple."""


@functools.cache
def _kernel_filters() -> bool:
    """Whether this kernel filters conntrack dumps (by its release number: a
    kernel that ignores the filter says nothing, and the library filters
    again on its side, so it cannot be seen from the results)."""
    release = platform.release()
    try:
        major, minor = (int(part) for part in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= FILTER_SINCE


def _entries(ct: conntrack.Conntrack, srcs: Collection[str]) -> Iterable[conntrack.ConntrackEntry]:
    """The entries whose original source may be one of `srcs` (a superset)."""
    if len(srcs) > FILTERED_DUMP_MAX or not _kernel_filters():
        whole: Iterable[conntrack.ConntrackEntry] = ct.dump_entries()
        return whole
    return itertools.chain.from_iterable(
        ct.dump_entries(tuple_orig=NFCTAttrTuple(saddr=src)) for src in sorted(srcs)
    )


def _delete(
    ct: conntrack.Conntrack,
    entries: Iterable[conntrack.ConntrackEntry],
    keep: list[IPv4Network],
    wanted: Callable[[conntrack.ConntrackEntry], bool],
) -> int:
    """Delete the `wanted` entries towards any address outside `keep`; how many."""
    removed = 0
    for entry in list(entries):
        try:
            if not wanted(entry):
                continue
            dst = ip_address(entry.tuple_orig.daddr)
        except (AttributeError, TypeError, ValueError):
            continue
        if any(dst in net for net in keep):
            continue
        try:
            ct.delete(entry)
            removed += 1
        except Exception as exc:  # gone already, or refused: it times out (or stays dropped)
            log.debug("conntrack delete for %s failed: %s", entry.tuple_orig.saddr, exc)
    return removed


def flush_destinations(keep_by_pod: Mapping[IPv4Address, Iterable[IPv4Network]]) -> int:
    """Delete the conntrack entries of each pod towards any address outside its
    own kept ranges; return how many. A dump per pod, filtered in the kernel,
    or one of the whole table for many pods (`FILTERED_DUMP_MAX`). Blocking:
    run it on the agent's netns thread."""
    if not keep_by_pod:
        return 0
    keep = {str(ip): list(nets) for ip, nets in keep_by_pod.items()}

    def wanted(entry: conntrack.ConntrackEntry) -> bool:
        nets = keep.get(entry.tuple_orig.saddr)
        if nets is None:
            return False
        dst = ip_address(entry.tuple_orig.daddr)
        return not any(dst in net for net in nets)

    ct = conntrack.Conntrack()
    try:
        return _delete(ct, _entries(ct, keep), [], wanted)
    finally:
        ct.close()


IPS_SRC_NAT = 1 << 4
"""conntrack's status bit for a connection whose source NAT changed its address
(an identity SNAT leaves it clear)."""


def flush_misnated(
    pods: Collection[IPv4Address], allowed: Collection[IPv4Address], keep: Iterable[IPv4Network]
) -> int:
    """Delete the connections of `pods`, towards any address outside `keep`,
    whose source NAT rewrote the pod's address to one not in `allowed` (the
    egress IPs): the masquerade a connection got before its pod was steered.
    Dumps as `flush_destinations` does; return how many were deleted.
    Blocking: run it on the agent's netns thread."""
    if not pods:
        return 0
    srcs = {str(p) for p in pods}
    ok = {str(a) for a in allowed}

    def misnated(entry: conntrack.ConntrackEntry) -> bool:
        # An identity SNAT that had to remap the port also sets the status bit:
        # its address is still the pod's own, and that connection is steered.
        src = entry.tuple_orig.saddr
        return (
            src in srcs
            and bool(int(entry.status or 0) & IPS_SRC_NAT)
            and entry.tuple_reply.daddr not in ok
            and entry.tuple_reply.daddr != src
        )

    ct = conntrack.Conntrack()
    try:
        return _delete(ct, _entries(ct, srcs), list(keep), misnated)
    finally:
        ct.close()
