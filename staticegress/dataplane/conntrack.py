"""Forget the connections of pods whose egress path changed.

The NAT decision for a connection is taken on its first packet and kept in
conntrack. When a pod's traffic switches between a remote gateway and this
node (its egress IP moved here or away), an existing flow would keep its old
binding (an identity SNAT where a real SNAT is now needed, or the reverse)
and stall. Deleting the pod's entries towards non-cluster addresses makes
the next packet take the new path; TCP flows resume (conntrack picks up
mid-stream connections), UDP flows simply start anew.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, ip_address

from pyroute2 import conntrack

log = logging.getLogger(__name__)


def flush_pods(pods: Iterable[IPv4Address], keep: Iterable[IPv4Network]) -> int:
    """Delete conntrack entries from `pods` to any address outside `keep`; return how many.
    Blocking: run it on the agent's netns thread."""
    keep = list(keep)
    removed = 0
    ct = conntrack.Conntrack()
    try:
        for pod in pods:
            wanted = conntrack.NFCTAttrTuple(saddr=str(pod))
            for entry in list(ct.dump_entries(tuple_orig=wanted)):
                try:
                    dst = ip_address(entry.tuple_orig.daddr)
                except (AttributeError, ValueError):
                    continue
                if any(dst in net for net in keep):
                    continue
                try:
                    ct.delete(entry)
                    removed += 1
                except Exception as exc:  # gone already, or refused: the flow times out
                    log.debug("conntrack delete for %s failed: %s", pod, exc)
    finally:
        ct.close()
    return removed
