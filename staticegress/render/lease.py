"""The kernel-enforced ownership lease: nftables tables that let a node use an
egress IP only while its grant lasts. Pure.

Two small tables, one for IP packets and one for ARP, each with the same two
sets:
- `egress_ips`: for IP packets, the egress IPs this node may be asked to
  hold (the status names it, or it still has the address); for ARP, every
  egress IP of the cluster, so a stale address left on the node (after a
  crash) is never announced without a grant; rewritten on every sync;
- `held`: the IPs it holds a grant for, each element with a timeout equal to
  what is left of its grant. Only the grant path writes it; the kernel
  removes an element when its timeout runs out, with no user-space action.

    table arp staticegress_lease {
      chain gate { type filter hook output priority filter; policy accept;
        arp saddr ip @egress_ips arp saddr ip != @held drop }   # no ARP answers
    }
    table ip staticegress_lease {
      chain gate_in { type filter hook prerouting priority raw; policy accept;
        ip daddr @egress_ips ip daddr != @held drop }            # nothing to it
      chain gate_out { type filter hook postrouting priority srcnat + 10; policy accept;
        ip saddr @egress_ips ip saddr != @held drop }            # nothing from it,
    }                                                            # SNATed included

These tables live apart from `table ip staticegress`, which every sync
replaces whole: replacing would reset the timed elements. A sync re-creates
them idempotently (add table, add set, add chain, flush chain, add rule), so
a table removed behind our back comes back with an empty `held` set: a node
that lost its lease table drops, it never answers with a stale grant.

nft's JSON takes element timeouts in whole seconds, so grants are renewed
with the text syntax. Every renewal states `expires` as well as `timeout`:
re-adding an element with the *same* timeout leaves its expiry running down
(the kernel sees nothing to update), while an explicit `expires` sets it,
longer or shorter (both checked in the integration tests). A release re-adds
the element expiring in 1 ms, which cannot fail the way deleting an element
that already expired would.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address
from typing import Any

from staticegress.api.types import IPAddress

LEASE_TABLE = "staticegress_lease"
FAMILIES = ("ip", "arp")

Json = dict[str, Any]


def _set(family: str, name: str, *, timeout: bool, comment: str) -> Json:
    body: Json = {
        "family": family,
        "table": LEASE_TABLE,
        "name": name,
        "type": "ipv4_addr",
        "comment": comment,
    }
    if timeout:
        body["flags"] = ["timeout"]
    return {"add": {"set": body}}


def _match(left: Json, right: str, *, negate: bool = False) -> Json:
    return {"match": {"op": "!=" if negate else "==", "left": left, "right": right}}


def _gate(family: str, chain: str, left: Json, comment: str) -> list[Json]:
    ref = {"family": family, "table": LEASE_TABLE, "chain": chain}
    return [
        {"flush": {"chain": {"family": family, "table": LEASE_TABLE, "name": chain}}},
        {
            "add": {
                "rule": {
                    **ref,
                    "expr": [
                        _match(left, "@egress_ips"),
                        _match(left, "@held", negate=True),
                        {"counter": None},
                        {"drop": None},
                    ],
                    "comment": comment,
                }
            }
        },
    ]


def render_lease_tables(
    egress_ips: Iterable[IPAddress], *, arp_ips: Iterable[IPAddress] = ()
) -> list[Json]:
    """Commands that create the lease tables if missing, restore their rules,
    and set `egress_ips` (`egress_ips` for IP, those plus `arp_ips` for ARP),
    leaving `held` as it is. Goes in the sync's batch."""
    ip_v4 = sorted(ip for ip in set(egress_ips) if isinstance(ip, IPv4Address))
    arp_v4 = sorted(ip for ip in set(egress_ips) | set(arp_ips) if isinstance(ip, IPv4Address))
    cmds: list[Json] = []
    for family in FAMILIES:
        v4 = arp_v4 if family == "arp" else ip_v4
        table = {"family": family, "name": LEASE_TABLE}
        cmds += [
            {"add": {"table": {**table, "comment": "staticegress: egress IP ownership lease"}}},
            _set(family, "held", timeout=True, comment="egress IPs with a live grant"),
            _set(family, "egress_ips", timeout=False, comment="egress IPs this node may hold"),
            {"flush": {"set": {"family": family, "table": LEASE_TABLE, "name": "egress_ips"}}},
        ]
        if v4:
            cmds.append(
                {
                    "add": {
                        "element": {
                            "family": family,
                            "table": LEASE_TABLE,
                            "name": "egress_ips",
                            "elem": [str(ip) for ip in v4],
                        }
                    }
                }
            )
    arp_saddr = {"payload": {"protocol": "arp", "field": "saddr ip"}}
    cmds += [
        {
            "add": {
                "chain": {
                    "family": "arp",
                    "table": LEASE_TABLE,
                    "name": "gate",
                    "type": "filter",
                    "hook": "output",
                    "prio": 0,
                    "policy": "accept",
                }
            }
        },
        *_gate("arp", "gate", arp_saddr, "no ARP for an egress IP without a live grant"),
    ]
    for chain, hook, prio, fld, comment in (
        ("gate_in", "prerouting", -300, "daddr", "nothing to an egress IP without a live grant"),
        ("gate_out", "postrouting", 110, "saddr", "nothing from an egress IP without a grant"),
    ):
        cmds.append(
            {
                "add": {
                    "chain": {
                        "family": "ip",
                        "table": LEASE_TABLE,
                        "name": chain,
                        "type": "filter",
                        "hook": hook,
                        "prio": prio,
                        "policy": "accept",
                    }
                }
            }
        )
        cmds += _gate("ip", chain, {"payload": {"protocol": "ip", "field": fld}}, comment)
    return cmds


def delete_lease_tables() -> list[Json]:
    """Remove both lease tables, whether or not they exist."""
    out: list[Json] = []
    for family in FAMILIES:
        table = {"family": family, "name": LEASE_TABLE}
        out += [{"add": {"table": table}}, {"delete": {"table": table}}]
    return out


def render_held(held: Mapping[IPAddress, float], released: Iterable[IPAddress]) -> str:
    """nft text that sets `held`: each IP with its remaining seconds, and the
    released ones with a 1 ms timeout (gone at once). Empty when nothing to do."""
    elems = [
        f"{ip} timeout {ms}ms expires {ms}ms"
        for ip, left in sorted(held.items(), key=lambda kv: str(kv[0]))
        if isinstance(ip, IPv4Address) and (ms := max(1, int(left * 1000)))
    ]
    elems += [
        f"{ip} timeout 1ms expires 1ms"
        for ip in sorted(set(released) - set(held), key=str)
        if isinstance(ip, IPv4Address)
    ]
    if not elems:
        return ""
    body = ", ".join(elems)
    return "\n".join(f"add element {family} {LEASE_TABLE} held {{ {body} }}" for family in FAMILIES)
