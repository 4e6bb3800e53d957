"""render_ruleset: a DesiredState as our private nftables table and its guard table,
in libnftables JSON. Pure.

The batch deletes and recreates `table ip staticegress` (and
`staticegress_guard`) in one transaction (add, delete, add, contents): a batch
the kernel refuses leaves the previous tables untouched. The agent applies it
whole only when it does not know what the kernel holds; every other sync
changes the kernel in place, from the difference between this batch and the
last (staticegress.render.nftdiff), because a packet crossing a replacement
can miss the new sets. What a packet walks does not grow with rules or
pods: the model resolved rule order, exclusions and the rules' overlaps into
disjoint pod . destination pieces (`DesiredState.steer_pieces`,
`snat_pieces`); pods with the same pieces form a class, and a packet costs one
hash lookup (its source pod's class, or nothing: the exit for every pod no
rule selects) and one lookup in its class's interval map, as small as its own
pod's rules. The number of classes (chains and maps in the table) grows with
the distinct rule combinations and egress-IP picks, never with pods.

The table, as nft prints it:

    table ip staticegress {
      set cluster_ranges        { type ipv4_addr; flags interval }  # never steered
      map steer_pods            { type ipv4_addr : verdict }  # local pod -> jump steer_class_K
      map steer_class_K_dst     { type ipv4_addr : verdict; flags interval }
                                # destination -> goto steer_to_gateway_S / accept / drop
      map snat_pods             { type ipv4_addr : verdict }  # pod -> jump snat_class_K
      map snat_class_K_dst      { type ipv4_addr : verdict; flags interval }
                                # destination -> goto snat_to_EIP
      set remote_selected_pods  { type ipv4_addr }

      chain steer_to_gateway_S {          # one per remote gateway slot S
        meta mark set meta mark & ~SLOTS | S << SHIFT
      }
      chain snat_to_EIP {                 # one per egress IP this node owns (dots as _)
        ct mark set ct mark | RETURN snat ip to EIP
      }
      chain steer_class_K {               # one per class of local pods (snat_class_K alike);
                                          # K: a digest of the class's pieces, stable across syncs
        ip daddr != @cluster_ranges ip daddr vmap @steer_class_K_dst
      }
      chain prerouting {                  # after kube-proxy's DNAT: services are resolved
        type filter hook prerouting priority dstnat + 10; policy accept;
        ip saddr @local_pod_ranges ip saddr != @known_local_pods
          ip daddr @held_destinations ip daddr != @cluster_ranges drop   # not seen yet: hold
        ip saddr vmap @steer_pods         # jump: an unmatched destination comes back
        ct direction reply ct mark & RETURN == RETURN meta mark set meta mark | RETURN  # vxlan
      }
      chain forward {                     # vxlan: fit TCP into the tunnel's MTU
        type filter hook forward priority mangle; policy accept;
        oifname "segress0" tcp flags syn / syn,rst tcp option maxseg size set rt mtu
      }
      chain postrouting {                 # just before the CNI's masquerade (srcnat)
        type nat hook postrouting priority srcnat - 1; policy accept;
        meta mark & SLOTS != 0 snat ip to ip saddr     # director: keep the pod IP
        ip saddr vmap @snat_pods          # gateway
        iifname "segress0" fib saddr type != local drop  # tunnel traffic we did not SNAT
        ip saddr @remote_selected_pods ip daddr != @cluster_ranges drop
        ip saddr @remote_pod_ranges ip daddr @steered_destinations
          ip daddr != @cluster_ranges drop   # a remote pod too new to know: never masquerade
      }
    }

    table ip staticegress_guard {         # its own table: it outlives ours being removed
      set egress_ips            { type ipv4_addr }
      set cluster_ranges        { type ipv4_addr; flags interval }
      set pods                  { type ipv4_addr }  # every pod steered or SNATed here
      map pod_classes           { type ipv4_addr : verdict }  # pod -> jump guard_class_K
      set guard_class_K_dst     { type ipv4_addr; flags interval }  # one per class
      chain guard_class_K { ct original ip daddr @guard_class_K_dst drop }
      chain guard {                       # after every SNAT and MASQUERADE (srcnat + 10)
        type filter hook postrouting priority srcnat + 10; policy accept;
        ct direction original ct status snat ct original ip saddr @pods
          ip saddr != @egress_ips ip saddr != @pods
          ct original ip daddr != @cluster_ranges ct original ip saddr vmap @pod_classes
      }
    }

Why each piece:
- the identity SNAT at srcnat-1 binds the connection's NAT before the CNI's
  MASQUERADE at srcnat can rewrite the pod IP; `accept` would not stop a
  later nat chain;
- marks use a field of our own (`MarkLayout`) and keep every other bit, so
  kube-proxy's and the CNI's marks survive;
- the guards make a gateway that is not (or no longer) responsible for a pod
  drop its traffic instead of forwarding it, where the CNI's masquerade would
  send it out with this node's IP.
- nat chains only see a connection's first packet: a connection that began
  before its pod was selected (the pod was known and not selected yet, the
  object came later, our table was briefly gone) keeps the masquerade it got
  then, and would go on leaving with the node's IP even once steered. The
  guard looks at what NAT did, on every packet: a selected pod's connection
  whose source was rewritten to anything but an egress IP, towards a
  destination a rule steers it for, is dropped (an identity SNAT rewrites
  nothing, so steered traffic passes). The agent then deletes such
  connections (dataplane.conntrack), so they start anew on the right path.
  The guard is a table of its own, applied in the same transaction: while
  ours is gone (removed behind our back, until the agent restores it), the
  CNI masquerades the selected pods' new connections, and the guard drops
  them. Its cost per packet is one line and a class's chain, whatever the
  number of rules.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, collapse_addresses
from typing import Any

from staticegress.model.desired import DesiredState, Steer

TABLE = "staticegress"
GUARD_TABLE = "staticegress_guard"
FAMILY = "ip"
TUNNEL = "segress0"

Json = dict[str, Any]

CLASS_DIGEST = 12
"""Hex digits of a class's name: 48 bits, so two classes of one node never
share a name (a node has at most a few thousand classes)."""


@dataclass(frozen=True)
class MarkLayout:
    """Which packet-mark bits are ours: a gateway slot field and a return bit."""

    slot_mask: int = 0x3F000000
    return_bit: int = 0x40000000

    @property
    def shift(self) -> int:
        return (self.slot_mask & -self.slot_mask).bit_length() - 1

    @property
    def max_slots(self) -> int:
        return self.slot_mask >> self.shift

    def slot_mark(self, slot: int) -> int:
        if not 1 <= slot <= self.max_slots:
            raise ValueError(f"slot {slot} outside 1..{self.max_slots}")
        return slot << self.shift


DEFAULT_MARKS = MarkLayout()


def _elem(net: IPv4Network) -> Any:
    if net.prefixlen == 32:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _field(name: str) -> Json:
    return {"payload": {"protocol": "ip", "field": name}}


def _in_set(field: str, name: str, *, negate: bool = False) -> Json:
    return {"match": {"op": "!=" if negate else "==", "left": _field(field), "right": f"@{name}"}}


def _mark_and(mask: int) -> Json:
    return {"&": [{"meta": {"key": "mark"}}, mask]}


def _set(
    name: str,
    comment: str,
    elems: list[Any],
    *,
    interval: bool,
    table: str = TABLE,
) -> Json:
    body: Json = {
        "family": FAMILY,
        "table": table,
        "name": name,
        "type": "ipv4_addr",
        "comment": comment[:128],
    }
    if interval:
        body["flags"] = ["interval"]
    if elems:
        body["elem"] = elems
    return {"add": {"set": body}}


def _range_set(name: str, comment: str, nets: Iterable[IPv4Network], *, table: str = TABLE) -> Json:
    return _set(name, comment, [_elem(n) for n in nets], interval=True, table=table)


def _addr_set(name: str, comment: str, addrs: Iterable[IPv4Address], *, table: str = TABLE) -> Json:
    return _set(name, comment, [str(a) for a in addrs], interval=False, table=table)


def _classes(
    kind: str, pieces: Iterable[tuple[IPv4Address, IPv4Network, str]], verdicts: Mapping[str, Json]
) -> list[Json]:
    """Pods that share the same pieces (destination -> verdict) form a class: a
    verdict map from pod to its class's chain (`<kind>_pods`, one hash lookup),
    and per class a chain with one interval map (`<kind>_class_K`). A packet
    costs a hash lookup and a lookup in a map as small as its own pod's rules,
    whatever the number of pods and rules; the number of classes grows with
    the distinct rule combinations (and egress-IP picks), not with pods.
    `jump`, not `goto`: a destination outside its pieces returns to the base
    chain, whose later rules (the guards) still apply.

    `pieces` come in the model's order (by pod, then destination) and name
    their verdict by a token of `verdicts`, so that a pod's key is built
    without formatting anything: at 10,000 pods this ran once per piece."""
    by_pod: dict[IPv4Address, list[tuple[IPv4Network, str]]] = defaultdict(list)
    for ip, net, token in pieces:
        by_pod[ip].append((net, token))
    keyed = {ip: tuple(entries) for ip, entries in by_pod.items()}
    # A class is named after its content, so a class keeps its name (and its
    # map, untouched) from one sync to the next while other classes come and
    # go: syncs change the kernel in place (staticegress.render.nftdiff).
    content = {key: tuple(sorted(key)) for key in set(keyed.values())}
    classes = {
        key: _digest(";".join(f"{net}={token}" for net, token in entries))
        for key, entries in content.items()
    }
    cmds: list[Json] = []
    for k, entries in sorted({classes[key]: entries for key, entries in content.items()}.items()):
        name = f"{kind}_class_{k}"
        cmds.append(_chain(name))
        cmds.append(
            _map(
                f"{name}_dst",
                f"{kind}: destination -> verdict for the pods of class {k}",
                [[_elem(net), verdicts[token]] for net, token in entries],
                interval=True,
            )
        )
        cmds.append(
            _rule(
                name,
                _in_set("daddr", "cluster_ranges", negate=True),
                {"vmap": {"key": _field("daddr"), "data": f"@{name}_dst"}},
            )
        )
    cmds.append(
        _map(
            f"{kind}_pods",
            f"{kind}: pod -> its class",
            [
                [str(ip), {"jump": {"target": f"{kind}_class_{classes[key]}"}}]
                for ip, key in sorted(keyed.items())
            ],
            interval=False,
        )
    )
    return cmds


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:CLASS_DIGEST]


def _map(name: str, comment: str, elems: list[Any], *, interval: bool, table: str = TABLE) -> Json:
    body: Json = {
        "family": FAMILY,
        "table": table,
        "name": name,
        "type": "ipv4_addr",
        "map": "verdict",
        "comment": comment[:128],
    }
    if interval:
        body["flags"] = ["interval"]
    if elems:
        body["elem"] = elems
    return {"add": {"map": body}}


def _chain(name: str, *, table: str = TABLE, **hook: Any) -> Json:
    return {"add": {"chain": {"family": FAMILY, "table": table, "name": name, **hook}}}


def _rule(chain: str, *expr: Json, comment: str | None = None, table: str = TABLE) -> Json:
    body: Json = {"family": FAMILY, "table": table, "chain": chain, "expr": list(expr)}
    if comment:
        body["comment"] = comment[:128]
    return {"add": {"rule": body}}


def _drop_rule(chain: str, *matches: Json, comment: str, table: str = TABLE) -> Json:
    """Count and drop what `matches` select: traffic that must not leave unSNATed."""
    return _rule(chain, *matches, {"counter": None}, {"drop": None}, comment=comment, table=table)


def _replace_table(name: str, *, keep: bool = True) -> list[Json]:
    """add + delete (+ add): deleting a table that does not exist would fail the
    batch; adding it first makes the delete always valid. `keep`: add it anew."""
    table = {"family": FAMILY, "name": name}
    cmds: list[Json] = [{"add": {"table": table}}, {"delete": {"table": table}}]
    if keep:
        comment = "staticegress: owned by the staticegress agent"
        cmds.append({"add": {"table": {**table, "comment": comment}}})
    return cmds


def _verdict(target: Steer) -> Json:
    if target == "drop":
        return {"drop": None}
    if target == "local":
        # The gateway is this node: no steering; postrouting SNATs it here.
        return {"accept": None}
    return {"goto": {"target": f"steer_to_gateway_{target}"}}


def render_ruleset(
    desired: DesiredState, *, transport: str, marks: MarkLayout = DEFAULT_MARKS
) -> Json:
    """Our table and the guard table as one libnftables JSON batch."""
    cmds: list[Json] = [
        {"metainfo": {"json_schema_version": 1}},
        *_replace_table(TABLE),
        _range_set(
            "cluster_ranges",
            "pod, node and configured cluster ranges: never steered",
            desired.cluster,
        ),
        _addr_set("remote_selected_pods", "selected pods on other nodes", desired.remote_pods),
    ]
    # Verdict-map elements jump to these chains, so they must exist before the maps.
    for gw in desired.gateways:
        name = f"steer_to_gateway_{gw.slot}"
        cmds.append(_chain(name))
        value = {"|": [_mark_and(0xFFFFFFFF & ~marks.slot_mask), marks.slot_mark(gw.slot)]}
        cmds.append(
            _rule(
                name,
                {"mangle": {"key": {"meta": {"key": "mark"}}, "value": value}},
                comment=f"gateway {gw.node} {gw.ip}",
            )
        )

    # The SNAT verdicts jump to one chain per egress IP this node SNATs to.
    snat_chain = {
        eip: f"snat_to_{str(eip).replace('.', '_')}"
        for eip in sorted({e for *_, e in desired.snat_pieces})
    }
    for eip, name in snat_chain.items():
        cmds.append(_chain(name))
        cmds.append(
            _rule(
                name,
                {
                    "mangle": {
                        "key": {"ct": {"key": "mark"}},
                        "value": {"|": [{"ct": {"key": "mark"}}, marks.return_bit]},
                    }
                },
                {"snat": {"addr": str(eip)}},
                comment=f"egress IP {eip}",
            )
        )
    rules_pre: list[Json] = []
    if desired.steer_pieces:
        targets = {str(t): t for *_, t in desired.steer_pieces}
        cmds += _classes(
            "steer",
            ((ip, net, str(t)) for ip, net, t in desired.steer_pieces),
            {token: _verdict(t) for token, t in targets.items()},
        )
        rules_pre.append(
            _rule(
                "prerouting",
                {"vmap": {"key": _field("saddr"), "data": "@steer_pods"}},
                comment="steer selected pods",
            )
        )
    rules_post: list[Json] = []
    if desired.snat_pieces:
        cmds += _classes(
            "snat",
            ((ip, net, str(eip)) for ip, net, eip in desired.snat_pieces),
            {str(eip): {"goto": {"target": chain}} for eip, chain in snat_chain.items()},
        )
        rules_post.append(
            _rule(
                "postrouting",
                {"vmap": {"key": _field("saddr"), "data": "@snat_pods"}},
                comment="SNAT to the egress IPs we own",
            )
        )

    cmds.append(_chain("prerouting", type="filter", hook="prerouting", prio=-90, policy="accept"))
    if desired.local_pod_ranges and desired.held_destinations:
        cmds += [
            _range_set("local_pod_ranges", "this node's pod ranges", desired.local_pod_ranges),
            _addr_set(
                "known_local_pods", "every local pod the agent has seen", desired.known_local_pods
            ),
            _range_set(
                "held_destinations",
                "destinations of the rules that could select a pod not seen yet",
                desired.held_destinations,
            ),
            _drop_rule(
                "prerouting",
                _in_set("saddr", "local_pod_ranges"),
                _in_set("saddr", "known_local_pods", negate=True),
                _in_set("daddr", "held_destinations"),
                _in_set("daddr", "cluster_ranges", negate=True),
                comment="a pod the agent has not seen yet: hold it until it is known",
            ),
        ]
    cmds += rules_pre
    if transport == "vxlan":
        ret = marks.return_bit
        cmds.append(
            _rule(
                "prerouting",
                {"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "reply"}},
                {
                    "match": {
                        "op": "==",
                        "left": {"&": [{"ct": {"key": "mark"}}, ret]},
                        "right": ret,
                    }
                },
                {
                    "mangle": {
                        "key": {"meta": {"key": "mark"}},
                        "value": {"|": [{"meta": {"key": "mark"}}, ret]},
                    }
                },
                comment="replies to what we SNATed go back through the tunnel",
            )
        )
        cmds.append(_chain("forward", type="filter", hook="forward", prio=-150, policy="accept"))
        cmds.append(
            _rule(
                "forward",
                {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": TUNNEL}},
                {
                    "match": {
                        "op": "==",
                        "left": {
                            "&": [
                                {"payload": {"protocol": "tcp", "field": "flags"}},
                                ["syn", "rst"],
                            ]
                        },
                        "right": "syn",
                    }
                },
                {
                    "mangle": {
                        "key": {"tcp option": {"name": "maxseg", "field": "size"}},
                        "value": {"rt": {"key": "mtu"}},
                    }
                },
                comment="clamp MSS to the tunnel MTU",
            )
        )

    cmds.append(_chain("postrouting", type="nat", hook="postrouting", prio=99, policy="accept"))
    cmds.append(
        _rule(
            "postrouting",
            {"match": {"op": "!=", "left": _mark_and(marks.slot_mask), "right": 0}},
            {"snat": {"addr": _field("saddr")}},
            comment="steered: keep the pod IP past the CNI masquerade",
        )
    )
    cmds += rules_post
    if transport == "vxlan":
        cmds.append(
            _drop_rule(
                "postrouting",
                {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": TUNNEL}},
                # The tunnel's own outer packets also show the tunnel as their
                # input device here; they come from a local address.
                {
                    "match": {
                        "op": "!=",
                        "left": {"fib": {"result": "type", "flags": ["saddr"]}},
                        "right": "local",
                    }
                },
                comment="tunnel traffic this node does not SNAT",
            )
        )
    if desired.remote_pods:
        cmds.append(
            _drop_rule(
                "postrouting",
                _in_set("saddr", "remote_selected_pods"),
                _in_set("daddr", "cluster_ranges", negate=True),
                comment="a remote selected pod this node does not SNAT",
            )
        )
    if desired.remote_pod_ranges and desired.steered_destinations:
        cmds += [
            _range_set("remote_pod_ranges", "other nodes' pod ranges", desired.remote_pod_ranges),
            _range_set(
                "steered_destinations",
                "where any rule could steer traffic",
                desired.steered_destinations,
            ),
            _drop_rule(
                "postrouting",
                _in_set("saddr", "remote_pod_ranges"),
                _in_set("daddr", "steered_destinations"),
                _in_set("daddr", "cluster_ranges", negate=True),
                comment="a remote pod this node does not SNAT, maybe one it does not know yet",
            ),
        ]
    cmds += render_guard(desired)
    return {"nftables": cmds}


def _ct(key: str) -> Json:
    return {"ct": {"key": key, "dir": "original"}}


def _guarded(desired: DesiredState) -> dict[IPv4Address, list[IPv4Network]]:
    """Pod -> the destinations its traffic must not leave for with another
    address: every piece this node steers (any verdict) or SNATs for it,
    collapsed (so a pod's pieces never overlap). The cluster's ranges are
    matched apart, so that `0.0.0.0/0` stays one piece per pod."""
    out: dict[IPv4Address, list[IPv4Network]] = defaultdict(list)
    for ip, net, _ in (*desired.steer_pieces, *desired.snat_pieces):
        out[ip].append(net)
    # Pods of one class have the same pieces: collapse each distinct list once.
    collapsed: dict[tuple[IPv4Network, ...], list[IPv4Network]] = {}
    guarded: dict[IPv4Address, list[IPv4Network]] = {}
    for ip, nets in sorted(out.items()):
        key = tuple(nets)
        if key not in collapsed:
            collapsed[key] = list(collapse_addresses(nets))
        guarded[ip] = collapsed[key]
    return guarded


def render_guard(desired: DesiredState) -> list[Json]:
    """The guard table, in its own table so that it survives ours being removed
    (see the module's docstring): a selected pod's connection whose source NAT
    chose an address other than an egress IP, towards a destination a rule
    steers it for, is dropped on every packet. Rendered whole and applied in
    place, like ours.

    Pods with the same guarded destinations form a class, as in our table: a
    map from pod to its class's chain, and per class a small interval set.
    One concatenated pod . destination interval set would do the same with
    one lookup, but the kernel's set type for it (pipapo) removes an element
    in time proportional to the set's size: at 10,000 pods, a sync removing a
    few hundred pods' pieces held a CPU for a minute (a soft lockup that
    stalled every agent on the machine), where a class's set is small."""
    guarded = _guarded(desired)
    if not guarded:
        return _replace_table(GUARD_TABLE, keep=False)
    g = GUARD_TABLE
    classes = {
        key: _digest(";".join(map(str, key))) for key in {tuple(n) for n in guarded.values()}
    }
    cmds: list[Json] = [
        *_replace_table(g),
        _addr_set("egress_ips", "every listed egress IP", desired.egress_ips, table=g),
        _range_set("cluster_ranges", "never steered", desired.cluster, table=g),
        _addr_set("pods", "every pod this node steers or SNATs", guarded, table=g),
    ]
    for key, k in sorted(classes.items(), key=lambda kv: kv[1]):
        name = f"guard_class_{k}"
        cmds += [
            _chain(name, table=g),
            _range_set(f"{name}_dst", f"where the pods of class {k} are steered", key, table=g),
            _drop_rule(
                name,
                {"match": {"op": "==", "left": _ct("ip daddr"), "right": f"@{name}_dst"}},
                comment="a selected pod's connection NATed to another address",
                table=g,
            ),
        ]
    cmds += [
        _map(
            "pod_classes",
            "pod -> the class of its guarded destinations",
            [
                [str(ip), {"jump": {"target": f"guard_class_{classes[tuple(nets)]}"}}]
                for ip, nets in guarded.items()
            ],
            interval=False,
            table=g,
        ),
        _chain("guard", table=g, type="filter", hook="postrouting", prio=110, policy="accept"),
        _rule(
            "guard",
            {"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "original"}},
            {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "snat"}},
            # A hash lookup first: connections of pods nothing guards leave here.
            {"match": {"op": "==", "left": _ct("ip saddr"), "right": "@pods"}},
            _in_set("saddr", "egress_ips", negate=True),
            # An identity SNAT that had to remap a port sets the status too;
            # its address is still the pod's own.
            _in_set("saddr", "pods", negate=True),
            {"match": {"op": "!=", "left": _ct("ip daddr"), "right": "@cluster_ranges"}},
            {"vmap": {"key": _ct("ip saddr"), "data": "@pod_classes"}},
            comment="a selected pod's connection NATed to another address: its class decides",
            table=g,
        ),
    ]
    return cmds


def delete_table_batch() -> Json:
    """Remove our tables, whether or not they exist."""
    return {"nftables": [c for t in (TABLE, GUARD_TABLE) for c in _replace_table(t, keep=False)]}


def vtep_mac(ip: IPv4Address) -> str:
    """The tunnel MAC of the node at `ip`: derived, so no node needs to publish it.
    0x0e marks a locally administered unicast address."""
    return "0e:e9:" + ":".join(f"{b:02x}" for b in ip.packed)
