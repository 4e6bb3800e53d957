"""compute_desired: one node's dataplane, derived from a cluster snapshot. Pure.

Roles, both possibly on the same node:
- director: for each rule, which of this node's pods are steered, towards
  which destinations, and where to: the gateway slot of their egress IP's
  owner, `local` when this node owns it, or `drop` when no gateway is known
  (fail closed: a selected pod never leaves with the node IP);
- gateway: which egress IPs this node owns, and which pod IPs (of any node)
  it SNATs to which of them.

Rules are evaluated in one global order, the same on every node: older
StaticEgressIP first, then namespace/name, then rule index. A pod that
several rules select towards the same destination follows the first.

An egress IP belongs to the oldest StaticEgressIP that lists it; a younger
one listing it too is in conflict and its pods for that IP fail closed. The
gateway of an egress IP is the node named on the owning object's status
(written by the manager), if that node exists and has an IPv4 InternalIP.

Determinism: every collection is sorted, so equal snapshots give equal
states, and `DesiredState` compares with `==`.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, collapse_addresses
from typing import Literal

from staticegress.api.core import Namespace, Node, Pod, Service
from staticegress.api.types import (
    EgressIPRef,
    EgressRule,
    IPAddress,
    LabelSelector,
    NodeName,
    StaticEgressIP,
)

Transport = Literal["direct", "vxlan"]
Steer = int | Literal["local", "drop"]
"""Where a local pod's matching traffic goes: a gateway slot, this node, or nowhere."""


@dataclass(frozen=True)
class Snapshot:
    """Everything the model reads, already parsed and validated."""

    policies: tuple[StaticEgressIP, ...]
    pods: tuple[Pod, ...]
    nodes: tuple[Node, ...]
    services: tuple[Service, ...] = ()
    namespaces: tuple[Namespace, ...] = ()
    endpoints: tuple[tuple[tuple[str, str], tuple[IPv4Address, ...]], ...] = ()
    """(namespace, service) -> addresses, for Services without a selector."""


@dataclass(frozen=True)
class AgentConfig:
    """Per-node settings that shape the desired state."""

    node: NodeName
    transport: Transport = "direct"
    cluster_cidrs: tuple[IPv4Network, ...] = ()
    """Ranges never steered besides what the Nodes reveal (pod ranges of CNIs
    that do not fill Node.spec.podCIDR, extra internal networks)."""
    max_slots: int = 63
    """Gateway slots the mark field can hold (0 means "not steered")."""


@dataclass(frozen=True)
class GatewayRoute:
    """A remote gateway this node steers to: its slot, name and underlay address."""

    slot: int
    node: NodeName
    ip: IPv4Address


@dataclass(frozen=True)
class RuleProgram:
    """One rule as this node programs it."""

    ref: EgressIPRef
    index: int
    destinations: tuple[IPv4Network, ...]
    excluded: tuple[IPv4Network, ...]
    """The rule's own exclusions; the cluster's ranges are in `DesiredState.cluster`."""
    steer: tuple[tuple[IPv4Address, Steer], ...]
    """This node's selected pods and where their traffic goes."""
    snat: tuple[tuple[IPv4Address, IPv4Address], ...]
    """Pod IP -> egress IP, for the pods whose egress IP this node owns."""

    @property
    def name(self) -> str:
        return f"{self.ref}#{self.index}"


@dataclass(frozen=True)
class Problem:
    """Something this node cannot program for a StaticEgressIP; becomes an Event."""

    ref: EgressIPRef
    reason: str
    message: str


@dataclass(frozen=True)
class DesiredState:
    """This node's whole dataplane. Every field is sorted."""

    rules: tuple[RuleProgram, ...] = ()
    gateways: tuple[GatewayRoute, ...] = ()
    """Remote gateways in use, one routing table each."""
    owned: tuple[IPv4Address, ...] = ()
    """Egress IPs this node holds on its uplink and answers ARP for."""
    cluster: tuple[IPv4Network, ...] = ()
    """Pod, node and configured ranges: never steered, whatever a rule says."""
    remote_pods: tuple[IPv4Address, ...] = ()
    """Selected pods on other nodes: forwarded traffic from them that this node
    does not SNAT is dropped, so a stale director never leaks through us."""
    return_routes: tuple[tuple[IPv4Address, IPv4Address], ...] = ()
    """vxlan transport: SNATed pod IP -> its director's underlay IP, for replies."""
    peers: tuple[tuple[NodeName, IPv4Address], ...] = ()
    """vxlan transport: nodes this one exchanges tunnel traffic with."""
    local_pod_ranges: tuple[IPv4Network, ...] = ()
    """This node's pod ranges (from its Node object)."""
    known_local_pods: tuple[IPv4Address, ...] = ()
    """Every pod IP on this node that the agent knows, selected or not."""
    held_destinations: tuple[IPv4Network, ...] = ()
    """All rules' destinations: traffic from a local pod IP the agent does not
    know yet, towards these, is held (dropped) until the agent has seen the pod.
    This closes the window in which a brand-new selected pod could leave with
    the node IP before its first sync."""
    problems: tuple[Problem, ...] = field(default=(), compare=False)

    @property
    def pods_steered(self) -> int:
        return sum(len(r.steer) for r in self.rules)

    @property
    def pods_snat(self) -> int:
        return sum(len(r.snat) for r in self.rules)


def _order(policies: Iterable[StaticEgressIP]) -> list[StaticEgressIP]:
    def key(p: StaticEgressIP) -> tuple[str, EgressIPRef]:
        created = p.created.isoformat() if p.created is not None else "~"
        return created, p.ref

    return sorted(policies, key=key)


def stable_bucket(pod: IPv4Address, buckets: int) -> int:
    """Spread pods over a rule's egress IPs, identically on every node and run."""
    return zlib.crc32(pod.packed) % buckets


class _PodIndex:
    """Pods by namespace and by (namespace, label, value): selecting with matchLabels
    starts from the smallest posting list instead of every pod, which keeps a
    resync linear in pods + rules rather than their product."""

    def __init__(self, pods: Iterable[Pod]) -> None:
        self.by_ns: dict[str, list[Pod]] = defaultdict(list)
        self.by_label: dict[tuple[str, str, str], list[Pod]] = defaultdict(list)
        self.by_ip: dict[IPv4Address, Pod] = {}
        for p in pods:
            self.by_ns[p.namespace].append(p)
            for k, v in p.labels:
                self.by_label[(p.namespace, k, v)].append(p)
            if p.ip is not None:
                self.by_ip[p.ip] = p

    def select(
        self, namespace: str, match: tuple[tuple[str, str], ...], sel: LabelSelector | None
    ) -> list[Pod]:
        """Pods of `namespace` whose labels include `match` and satisfy `sel.matches`."""
        if match:
            lists = [self.by_label.get((namespace, k, v), []) for k, v in match]
            candidates = min(lists, key=len)
        else:
            candidates = self.by_ns.get(namespace, [])
        return [p for p in candidates if sel is None or sel.matches(p.label_map)]


def _select(
    policy: StaticEgressIP,
    rule: EgressRule,
    *,
    index: _PodIndex,
    services: Mapping[tuple[str, str], Service],
    namespaces: Mapping[str, Namespace],
    endpoints: Mapping[tuple[str, str], tuple[IPv4Address, ...]],
) -> list[Pod]:
    ns = policy.ref.namespace
    if rule.service_name is not None:
        svc = services.get((ns, rule.service_name))
        if svc is None:
            return []
        if svc.selector is None:
            return [index.by_ip[a] for a in endpoints.get((ns, svc.name), ()) if a in index.by_ip]
        return index.select(ns, svc.selector, LabelSelector(match_labels=svc.selector))
    if rule.namespace_selector is None:
        chosen = [ns]
    else:
        nsel = rule.namespace_selector
        chosen = sorted(n.name for n in namespaces.values() if nsel.matches(dict(n.labels)))
    psel = rule.pod_selector
    match = psel.match_labels if psel is not None else ()
    out: list[Pod] = []
    for name in chosen:
        out += index.select(name, match, psel)
    return out


def assign_slots(
    gateways: Iterable[NodeName], previous: Mapping[NodeName, int], max_slots: int
) -> dict[NodeName, int]:
    """Give every gateway a slot, keeping the ones they had: a slot that moves
    would re-route in-flight traffic while nft and routes are being updated."""
    wanted = sorted(set(gateways))
    slots = {g: previous[g] for g in wanted if g in previous}
    free = (s for s in range(1, max_slots + 1) if s not in set(slots.values()))
    for g in wanted:
        if g not in slots:
            slot = next(free, None)
            if slot is None:
                break  # out of slots: the model turns these pods into drops
            slots[g] = slot
    return slots


def compute_desired(
    snapshot: Snapshot,
    config: AgentConfig,
    *,
    previous_slots: Mapping[NodeName, int] | None = None,
    withheld: frozenset[IPAddress] = frozenset(),
) -> DesiredState:
    """This node's desired dataplane for `snapshot`.

    `withheld`: egress IPs the status gives this node that it must not hold
    now (it fenced itself off after losing contact with its peers).
    """
    me = config.node
    nodes = {n.name: n for n in snapshot.nodes}
    pods = sorted(p for p in snapshot.pods if p.ip is not None and not p.host_network)
    index = _PodIndex(pods)
    services = {(s.namespace, s.name): s for s in snapshot.services}
    namespaces = {n.name: n for n in snapshot.namespaces}
    endpoints = dict(snapshot.endpoints)
    problems: list[Problem] = []

    cluster: list[IPv4Network] = list(config.cluster_cidrs)
    for n in nodes.values():
        cluster += n.pod_cidrs
        if n.internal_ip is not None:
            cluster.append(IPv4Network(n.internal_ip))

    # Who owns each egress IP, and which node is its gateway.
    policies = _order(snapshot.policies)
    owner: dict[IPAddress, EgressIPRef] = {}
    gateway_of: dict[IPAddress, NodeName] = {}
    for pol in policies:
        status = {a.egress_ip: a for a in pol.status.egress_ips}
        for rule in pol.spec.rules:
            for eip in rule.egress_ips:
                if not isinstance(eip, IPv4Address) or eip in owner:
                    continue
                owner[eip] = pol.ref
                entry = status.get(eip)
                gw = entry.gateway if entry is not None else None
                if gw == me and eip in withheld:
                    continue  # fenced: as if no gateway were known
                if gw is not None and gw in nodes and nodes[gw].internal_ip is not None:
                    gateway_of[eip] = gw

    # First pass: every rule's pod -> egress IP choice.
    chosen: list[tuple[StaticEgressIP, EgressRule, list[tuple[Pod, IPv4Address | None]]]] = []
    for pol in policies:
        for rule in pol.spec.rules:
            if rule.family != 4:
                problems.append(
                    Problem(
                        pol.ref,
                        "UnsupportedFamily",
                        f"rule {rule.index}: IPv6 rules are not programmed yet",
                    )
                )
                continue
            mine = [e for e in rule.egress_ips if isinstance(e, IPv4Address)]
            conflicted = [e for e in mine if owner.get(e) != pol.ref]
            usable = [e for e in mine if owner.get(e) == pol.ref and e in gateway_of]
            selected = _select(
                pol,
                rule,
                index=index,
                services=services,
                namespaces=namespaces,
                endpoints=endpoints,
            )
            picks = [
                (p, usable[stable_bucket(p.ip, len(usable))] if usable and p.ip else None)
                for p in selected
            ]
            local = sum(1 for p in selected if p.node == me)
            if local and conflicted:
                others = ", ".join(f"{e} (held by {owner[e]})" for e in conflicted)
                problems.append(
                    Problem(
                        pol.ref,
                        "EgressIPConflict",
                        f"rule {rule.index}: {others}; not used on {me}",
                    )
                )
            if local and not usable:
                problems.append(
                    Problem(
                        pol.ref,
                        "NoGateway",
                        f"rule {rule.index}: no egress IP has a known gateway; dropping the "
                        f"matching traffic of {local} pod(s) on {me} (fail closed)",
                    )
                )
            chosen.append((pol, rule, picks))

    remote_gws = sorted(
        {
            gateway_of[e]
            for _, _, picks in chosen
            for p, e in picks
            if p.node == me and e is not None and gateway_of[e] != me
        }
    )
    slots = assign_slots(remote_gws, previous_slots or {}, config.max_slots)

    programs: list[RuleProgram] = []
    remote: set[IPv4Address] = set()
    returns: dict[IPv4Address, IPv4Address] = {}
    peers: set[NodeName] = set()
    for pol, rule, picks in chosen:
        steer: list[tuple[IPv4Address, Steer]] = []
        snat: list[tuple[IPv4Address, IPv4Address]] = []
        for pod, picked in picks:
            assert pod.ip is not None
            gw = gateway_of.get(picked) if picked is not None else None
            if pod.node == me:
                target: Steer = "drop"
                if gw == me:
                    target = "local"
                elif gw is not None and gw in slots:
                    target = slots[gw]
                    peers.add(gw)
                steer.append((pod.ip, target))
            else:
                remote.add(pod.ip)
            if gw == me and picked is not None:
                snat.append((pod.ip, picked))
                director = nodes.get(pod.node) if pod.node else None
                if pod.node != me and director is not None and director.internal_ip:
                    returns[pod.ip] = director.internal_ip
                    peers.add(director.name)
        dests = tuple(
            collapse_addresses(n for n in rule.destinations if isinstance(n, IPv4Network))
        )
        excl = tuple(collapse_addresses(n for n in rule.excluded if isinstance(n, IPv4Network)))
        programs.append(
            RuleProgram(
                ref=pol.ref,
                index=rule.index,
                destinations=dests,
                excluded=excl,
                steer=tuple(sorted(dict(steer).items())),
                snat=tuple(sorted(dict(snat).items())),
            )
        )

    gateways = tuple(
        GatewayRoute(slot=s, node=g, ip=ip)
        for g, s in sorted(slots.items(), key=lambda kv: kv[1])
        if (ip := nodes[g].internal_ip) is not None
    )
    transport_vxlan = config.transport == "vxlan"
    own_node = nodes.get(me)
    all_dests = [n for r in programs for n in r.destinations] if programs else []
    return DesiredState(
        local_pod_ranges=own_node.pod_cidrs if own_node is not None and all_dests else (),
        known_local_pods=tuple(sorted(p.ip for p in pods if p.node == me and p.ip is not None))
        if all_dests
        else (),
        held_destinations=tuple(collapse_addresses(all_dests)),
        rules=tuple(programs),
        gateways=gateways,
        owned=tuple(
            sorted(e for e, g in gateway_of.items() if g == me and isinstance(e, IPv4Address))
        ),
        cluster=tuple(collapse_addresses(cluster)),
        remote_pods=tuple(sorted(remote)),
        return_routes=tuple(sorted(returns.items())) if transport_vxlan else (),
        peers=tuple(sorted((n, ip) for n in peers if (ip := nodes[n].internal_ip) is not None))
        if transport_vxlan
        else (),
        problems=tuple(problems),
    )
