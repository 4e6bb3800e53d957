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

That order is resolved here, not in the kernel: for each pod, the rules that
select it are cut into disjoint destination pieces (a rule keeps what its
destinations less its exclusions cover and no earlier rule took), and the
render looks a packet up by pod, then by destination among that pod's
pieces (`staticegress.render.nft`). A packet pays the same whatever the
number of rules or pods; pods selected by the same rules share one
computation of their pieces.

An egress IP belongs to the oldest StaticEgressIP whose claim to it a pool
grants (`staticegress.model.pools`, the same judgement the manager makes); a
younger one listing it too, or one whose claim is refused, is in conflict and
its pods for that IP fail closed. A rule's namespace-selector reaches other
namespaces only as far as the pools of its egress IPs allow: a refused object
never touches another tenant's pods. The gateway of an egress IP is the node
named on the owning object's status (written by the manager), if that node
exists and has an IPv4 InternalIP.

New pods: the hold. A pod's first packets can race the agent: the CNI gives
it an address before the agent has seen the Pod. Traffic from a local pod
address the agent does not know, towards a held destination, is dropped
until the agent knows the pod. All the agent can know about such a pod is its
address, so the criterion is about rules, not pods: a rule is *open* when a
pod it has not seen could turn out to be selected by it:
- a rule with a pod or namespace selector (none means the object's own
  namespace): any new pod may carry matching labels;
- a rule naming a Service with a selector: likewise;
- a rule naming a Service without a selector: only pods whose addresses are
  in its EndpointSlices, which the agent does see, so it is open only while
  one of those addresses is in this node's pod ranges and not a known pod;
- a rule naming a Service that does not exist selects nothing now; when the
  Service appears the agent recomputes, like any other change;
- an IPv6 rule is not programmed at all.
The held destinations are the union of the open rules' destinations minus
their own exclusions (the cluster's ranges are never held either). No open
rule, or no pod range on this Node, means no hold at all, so a node where no
rule could select a new pod never drops anything for an unseen pod.

Ending pods: a pod being deleted or finished stays a pod (see
`staticegress.api.core`): it stays known and keeps its steering and its SNAT
until its object is removed, so its last packets are neither held nor leaked.
If a live pod has the same address as an ending one (the address was
reused), only the live one counts.

Determinism: every collection is sorted, so equal snapshots give equal
states, and `DesiredState` compares with `==`.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, collapse_addresses
from typing import Literal

from staticegress.api.core import Namespace, Node, Pod, Service
from staticegress.api.members import Member, member_order
from staticegress.api.pools import EgressIPPool
from staticegress.api.types import (
    EgressIPRef,
    EgressRule,
    IPAddress,
    IPNetwork,
    LabelSelector,
    NodeName,
    StaticEgressIP,
)
from staticegress.model.pools import Tenancy, judge_tenancy, oldest_first

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
    pools: tuple[EgressIPPool, ...] = ()
    members: tuple[Member, ...] | None = None
    """The manager's published selection (`select_members`), or None. When
    given, `pods` need only hold this node's own pods: this node selects its
    own pods itself (at once, and the hold works as without it), and learns
    the selected pods of other nodes from here. Only the rules it may SNAT for
    are needed (those of the egress IPs it is the gateway or a standby of,
    and the earlier rules that shadow them: `shadowing_rules`); the others'
    members only widen the guard (`DesiredState.remote_pods`). `endpoints`
    then come from the publication too."""


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
    require_pool: bool = False
    """Honour only egress IPs a StaticEgressIPPool grants (the deployed default;
    False here so that model tests of other concerns need no pools)."""


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
    """Per rule: which pods it selects here (accounting, reports); the
    dataplane is rendered from the resolved pieces below."""
    steer_pieces: tuple[tuple[IPv4Address, IPv4Network, Steer], ...] = ()
    """Local pod . destination piece -> where its traffic goes. A pod's pieces
    are disjoint and carry the first selecting rule's verdict; the cluster's
    ranges are matched apart (so `0.0.0.0/0` stays one piece)."""
    snat_pieces: tuple[tuple[IPv4Address, IPv4Network, IPv4Address], ...] = ()
    """Pod (of any node) . destination piece -> the egress IP this node SNATs
    it to: the pieces whose first selecting rule picked an egress IP we own."""
    gateways: tuple[GatewayRoute, ...] = ()
    """Remote gateways in use, one routing table each."""
    owned: tuple[IPv4Address, ...] = ()
    """Egress IPs this node holds on its uplink and answers ARP for."""
    named: tuple[IPv4Address, ...] = ()
    """Egress IPs the status gives this node, held or not: the lease tables gate
    them, and the grant path renews only these."""
    egress_ips: tuple[IPv4Address, ...] = ()
    """Every egress IP any StaticEgressIP lists: this node answers ARP for none
    of them without a live grant, not even for a stale address left behind."""
    cluster: tuple[IPv4Network, ...] = ()
    """Pod, node and configured ranges: never steered, whatever a rule says."""
    remote_pods: tuple[IPv4Address, ...] = ()
    """Selected pods on other nodes that this node knows of (with the published
    selection, the members of the rules it may SNAT for): forwarded traffic
    from them that this node does not SNAT is dropped, so a stale director
    never leaks through us. The pods it does not know of are covered, towards
    steered destinations, by `remote_pod_ranges`."""
    remote_pod_ranges: tuple[IPv4Network, ...] = ()
    """Other nodes' pod ranges. With `steered_destinations`: forwarded traffic from
    a remote pod this node does not SNAT is dropped, also from a pod too new for
    this node to know. A director can learn of a pod before its gateway does
    (after a reboot, pods come back with new IPs), and without this the CNI's
    masquerade would send those first packets out with the gateway's IP."""
    steered_destinations: tuple[IPv4Network, ...] = ()
    """Where any rule could steer traffic: every rule's destinations minus its
    exclusions (the cluster's ranges are excluded where it is matched)."""
    return_routes: tuple[tuple[IPv4Address, IPv4Address], ...] = ()
    """vxlan transport: SNATed pod IP -> its director's underlay IP, for replies."""
    peers: tuple[tuple[NodeName, IPv4Address], ...] = ()
    """vxlan transport: nodes this one exchanges tunnel traffic with."""
    local_pod_ranges: tuple[IPv4Network, ...] = ()
    """This node's pod ranges (from its Node object)."""
    known_local_pods: tuple[IPv4Address, ...] = ()
    """Every pod IP on this node that the agent knows, selected or not."""
    held_destinations: tuple[IPv4Network, ...] = ()
    """The destinations of every rule that could select a pod the agent has not
    seen (see the module's docstring), minus each rule's exclusions: traffic
    from a local pod IP the agent does not know yet, towards these, is held
    (dropped) until the agent has seen the pod. This closes the window in which
    a brand-new selected pod could leave with the node IP before its first sync."""
    problems: tuple[Problem, ...] = field(default=(), compare=False)

    @property
    def pods_steered(self) -> int:
        return sum(len(r.steer) for r in self.rules)

    @property
    def pods_snat(self) -> int:
        return sum(len(r.snat) for r in self.rules)


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


class _Selector:
    """Which pods of a snapshot each rule selects."""

    def __init__(self, snapshot: Snapshot, tenancy: Tenancy) -> None:
        self.pods = _live_claims(
            p for p in snapshot.pods if p.ip is not None and not p.host_network
        )
        self.index = _PodIndex(self.pods)
        self.services = {(s.namespace, s.name): s for s in snapshot.services}
        self.namespaces = {n.name: n for n in snapshot.namespaces}
        self.endpoints = dict(snapshot.endpoints)
        self.tenancy = tenancy

    def select(self, policy: StaticEgressIP, rule: EgressRule) -> list[Pod]:
        return _select(
            policy,
            rule,
            index=self.index,
            services=self.services,
            namespaces=self.namespaces,
            endpoints=self.endpoints,
            tenancy=self.tenancy,
        )


def _tenancy(snapshot: Snapshot, require_pool: bool) -> tuple[list[StaticEgressIP], Tenancy]:
    policies = oldest_first(snapshot.policies)
    return policies, judge_tenancy(
        policies,
        pools=snapshot.pools,
        namespaces={n.name: dict(n.labels) for n in snapshot.namespaces},
        require_pool=require_pool,
    )


def select_members(
    snapshot: Snapshot, *, require_pool: bool
) -> tuple[tuple[Member, ...], tuple[tuple[tuple[str, str], tuple[IPv4Address, ...]], ...]]:
    """Every pod every IPv4 rule selects, on every node (the manager publishes
    this), and the endpoint addresses of the Services without a selector that
    rules name (the agents select their own pods among those)."""
    policies, tenancy = _tenancy(snapshot, require_pool)
    selector = _Selector(snapshot, tenancy)
    members: set[Member] = set()
    named: set[tuple[str, str]] = set()
    for pol in policies:
        for rule in pol.spec.rules:
            if rule.family != 4:
                continue
            for pod in selector.select(pol, rule):
                if pod.ip is not None and pod.node is not None:
                    members.add(Member(pol.ref, rule.index, pod.ip, pod.node))
            svc = selector.services.get((pol.ref.namespace, rule.service_name or ""))
            if svc is not None and svc.selector is None:
                named.add((svc.namespace, svc.name))
    endpoints = tuple((k, v) for k, v in sorted(selector.endpoints.items()) if k in named)
    return tuple(sorted(members, key=member_order)), endpoints


RuleKey = tuple[EgressIPRef, int]
"""A rule: its StaticEgressIP and its index in spec.rules."""


def shadowing_rules(
    policies: Iterable[StaticEgressIP], members: Iterable[Member]
) -> dict[RuleKey, frozenset[RuleKey]]:
    """Per rule, the earlier rules (in the global order) that select one of its
    pods and reach some destination it reaches too.

    A gateway SNATs a pod's traffic only where the rule whose egress IP it
    owns is the pod's first match: for each pod, its rule's reach less the
    reach of every earlier rule that selects it (`first_match_pieces`). So a
    node that SNATs a rule's pods, or may soon, needs the members of these
    rules as well, and of no other: an earlier rule whose reach is disjoint
    takes nothing from this one, and later rules take nothing at all."""
    order: dict[RuleKey, int] = {}
    reach: dict[RuleKey, tuple[IPv4Network, ...]] = {}
    for pol in oldest_first(policies):
        for rule in pol.spec.rules:
            if rule.family == 4:
                key = (pol.ref, rule.index)
                order[key] = len(order)
                reach[key] = _reach(rule)
    by_pod: dict[IPv4Address, set[RuleKey]] = defaultdict(set)
    for m in members:
        if (m.ref, m.rule) in order:
            by_pod[m.ip].add((m.ref, m.rule))
    # Pods selected alike share one set of rules: each distinct set is looked
    # at once, so many rules with one selector cost their pairs, not pods x pairs.
    alike = {frozenset(rules) for rules in by_pod.values() if len(rules) > 1}
    pairs: set[tuple[RuleKey, RuleKey]] = set()
    for rules in alike:
        ranked = sorted(rules, key=order.__getitem__)
        for i, later in enumerate(ranked):
            pairs.update((earlier, later) for earlier in ranked[:i])
    out: dict[RuleKey, set[RuleKey]] = defaultdict(set)
    for earlier, later in pairs:
        if any(a.overlaps(b) for a in reach[earlier] for b in reach[later]):
            out[later].add(earlier)
    return {k: frozenset(v) for k, v in sorted(out.items())}


def _select(
    policy: StaticEgressIP,
    rule: EgressRule,
    *,
    index: _PodIndex,
    services: Mapping[tuple[str, str], Service],
    namespaces: Mapping[str, Namespace],
    endpoints: Mapping[tuple[str, str], tuple[IPv4Address, ...]],
    tenancy: Tenancy,
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
        chosen = sorted(
            n.name
            for n in namespaces.values()
            if nsel.matches(dict(n.labels)) and tenancy.allows_namespace(policy.ref, rule, n.name)
        )
    psel = rule.pod_selector
    match = psel.match_labels if psel is not None else ()
    out: list[Pod] = []
    for name in chosen:
        out += index.select(name, match, psel)
    return out


def _live_claims(pods: Iterable[Pod]) -> list[Pod]:
    """Pods, less the ending ones whose address a live pod now has: the address
    was released and reused, and it is the live pod that sends from it."""
    by_ip: dict[IPv4Address | None, list[Pod]] = defaultdict(list)
    for p in pods:
        by_ip[p.ip].append(p)

    def rank(p: Pod) -> int:
        return 2 if p.finished else 1 if p.terminating else 0

    out: list[Pod] = []
    for same in by_ip.values():
        best = min(rank(p) for p in same)
        out += [p for p in same if rank(p) == best]
    return sorted(out)


def subtract(nets: Iterable[IPv4Network], excluded: Iterable[IPv4Network]) -> list[IPv4Network]:
    """`nets` without the addresses of `excluded`."""
    out = list(collapse_addresses(nets))
    for ex in collapse_addresses(excluded):
        rest: list[IPv4Network] = []
        for n in out:
            if n.subnet_of(ex):
                continue
            rest += n.address_exclude(ex) if ex.subnet_of(n) else [n]
        out = rest
    return list(collapse_addresses(out))


def _open_to_unseen_pods(
    policy: StaticEgressIP,
    rule: EgressRule,
    *,
    services: Mapping[tuple[str, str], Service],
    endpoints: Mapping[tuple[str, str], tuple[IPv4Address, ...]],
    local_ranges: tuple[IPv4Network, ...],
    known: frozenset[IPv4Address],
) -> bool:
    """Whether a local pod the agent has not seen could be selected by `rule`."""
    if rule.family != 4:
        return False
    if rule.service_name is None:
        return True
    svc = services.get((policy.ref.namespace, rule.service_name))
    if svc is None:
        return False
    if svc.selector is not None:
        return True
    return any(
        a not in known and any(a in r for r in local_ranges)
        for a in endpoints.get((svc.namespace, svc.name), ())
    )


def first_match_pieces(
    reach: tuple[tuple[IPv4Network, ...], ...],
) -> tuple[tuple[IPv4Network, ...], ...]:
    """Per rule, in order, the part of its reach (destinations less its
    exclusions) that no earlier rule covers: what first-match gives it."""
    taken: list[IPv4Network] = []
    out: list[tuple[IPv4Network, ...]] = []
    for nets in reach:
        won = tuple(subtract(nets, taken)) if taken else tuple(collapse_addresses(nets))
        out.append(won)
        taken += won
    return tuple(out)


def _reach(rule: EgressRule) -> tuple[IPv4Network, ...]:
    return _reach_of(rule.destinations, rule.excluded)


@lru_cache(maxsize=16384)
def _reach_of(
    destinations: tuple[IPNetwork, ...], excluded: tuple[IPNetwork, ...]
) -> tuple[IPv4Network, ...]:
    """The IPv4 destinations less the exclusions. Cached: every sync resolves
    every rule, and rules rarely change (at 1,000 rules this was a fifth of a
    sync's model time)."""
    return tuple(
        subtract(
            (n for n in destinations if isinstance(n, IPv4Network)),
            (n for n in excluded if isinstance(n, IPv4Network)),
        )
    )


@lru_cache(maxsize=16384)
def _collapsed(nets: tuple[IPNetwork, ...]) -> tuple[IPv4Network, ...]:
    """The IPv4 ranges of `nets`, collapsed (cached like `_reach_of`)."""
    return tuple(collapse_addresses(n for n in nets if isinstance(n, IPv4Network)))


def _ip_order(entry: tuple[IPv4Address, object]) -> int:
    return int(entry[0])


def _piece_key(entry: tuple[IPv4Address, IPv4Network, object]) -> tuple[int, int, int]:
    ip, net, _ = entry
    return (int(ip), int(net.network_address), net.prefixlen)


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
    granted: frozenset[IPAddress] | None = None,
) -> DesiredState:
    """This node's desired dataplane for `snapshot`.

    `withheld`: egress IPs the status gives this node that it must not hold
    now. `granted`: when given, the IPs this node holds a live grant for; an
    IP the status gives it without one is withheld too (staticegress.model.ownership).
    """
    me = config.node
    nodes = {n.name: n for n in snapshot.nodes}
    problems: list[Problem] = []

    cluster: list[IPv4Network] = list(config.cluster_cidrs)
    for n in nodes.values():
        cluster += n.pod_cidrs
        if n.internal_ip is not None:
            cluster.append(IPv4Network(n.internal_ip))

    # Who owns each egress IP, and which node is its gateway.
    policies, tenancy = _tenancy(snapshot, config.require_pool)
    selector = _Selector(snapshot, tenancy)
    pods, services, endpoints = selector.pods, selector.services, selector.endpoints
    # Published: other nodes' selected pods, by rule (this node's own are selected here).
    remote_members: dict[tuple[EgressIPRef, int], list[Pod]] | None = None
    if snapshot.members is not None:
        remote_members = defaultdict(list)
        for m in snapshot.members:
            if m.node != me:
                # Nameless: only its address and node count, and formatting
                # thousands of addresses per sync was a sixth of its time.
                remote_members[(m.ref, m.rule)].append(
                    Pod(namespace=m.ref.namespace, name="", node=m.node, ip=m.ip)
                )
    owner = tenancy.owners
    listed = {e for pol in policies for r in pol.spec.rules for e in r.egress_ips}
    gateway_of: dict[IPAddress, NodeName] = {}
    named: list[IPv4Address] = []
    unheld: set[IPAddress] = set()
    seen: set[IPAddress] = set()
    for pol in policies:
        status = {a.egress_ip: a for a in pol.status.egress_ips}
        for rule in pol.spec.rules:
            for eip in rule.egress_ips:
                if not isinstance(eip, IPv4Address) or owner.get(eip) != pol.ref or eip in seen:
                    continue
                seen.add(eip)
                entry = status.get(eip)
                gw = entry.gateway if entry is not None else None
                if gw == me:
                    named.append(eip)
                    if eip in withheld or (granted is not None and eip not in granted):
                        # No live grant: its traffic is dropped here, but pods
                        # keep choosing it, so nothing re-buckets onto another
                        # egress IP (and stays there in conntrack) meanwhile.
                        unheld.add(eip)
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
            refused = [e for e in mine if not tenancy.claim(pol.ref, e).granted]
            conflicted = [e for e in mine if owner.get(e) != pol.ref and e not in refused]
            usable = [e for e in mine if owner.get(e) == pol.ref and e in gateway_of]
            selected = selector.select(pol, rule)
            if remote_members is not None:
                selected = [p for p in selected if p.node == me]
                selected += remote_members.get((pol.ref, rule.index), [])
            picks = [
                (p, usable[stable_bucket(p.ip, len(usable))] if usable and p.ip else None)
                for p in selected
            ]
            local = sum(1 for p in selected if p.node == me)
            for e in refused if local else ():
                claim = tenancy.claim(pol.ref, e)
                problems.append(
                    Problem(
                        pol.ref,
                        claim.refused or "Refused",
                        f"rule {rule.index}: {claim.message}; not used on {me}",
                    )
                )
            if local and conflicted:
                others = ", ".join(f"{e} (held by {owner.get(e)})" for e in conflicted)
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
    # Pod -> the rules selecting it, in order: (position, local verdict, SNAT address).
    by_pod: dict[IPv4Address, dict[int, tuple[Steer | None, IPv4Address | None]]] = defaultdict(
        dict
    )
    for k, (pol, rule, picks) in enumerate(chosen):
        steer: list[tuple[IPv4Address, Steer]] = []
        snat: list[tuple[IPv4Address, IPv4Address]] = []
        for pod, picked in picks:
            assert pod.ip is not None
            gw = gateway_of.get(picked) if picked is not None else None
            if picked in unheld:
                gw = None  # ours, without a live grant: drop, never SNAT
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
            # Every selecting rule counts, also where another gateway SNATs: a
            # gateway SNATs exactly what first-match would have sent it.
            by_pod[pod.ip].setdefault(
                k, (target if pod.node == me else None, picked if gw == me else None)
            )
            if gw == me and picked is not None:
                snat.append((pod.ip, picked))
                director = nodes.get(pod.node) if pod.node else None
                if pod.node != me and director is not None and director.internal_ip:
                    returns[pod.ip] = director.internal_ip
                    peers.add(director.name)
        programs.append(
            RuleProgram(
                ref=pol.ref,
                index=rule.index,
                destinations=_collapsed(rule.destinations),
                excluded=_collapsed(rule.excluded),
                steer=tuple(sorted(dict(steer).items(), key=_ip_order)),
                snat=tuple(sorted(dict(snat).items(), key=_ip_order)),
            )
        )

    reach = [_reach(rule) for _, rule, _ in chosen]
    steer_pieces: list[tuple[IPv4Address, IPv4Network, Steer]] = []
    snat_pieces: list[tuple[IPv4Address, IPv4Network, IPv4Address]] = []
    resolved: dict[tuple[int, ...], tuple[tuple[IPv4Network, ...], ...]] = {}
    for pod_ip, entries in sorted(by_pod.items(), key=_ip_order):
        if all(v is None and e is None for v, e in entries.values()):
            continue  # a remote pod whose traffic this node never SNATs
        order = tuple(sorted(entries))
        won = resolved.get(order)
        if won is None:
            won = resolved[order] = first_match_pieces(tuple(reach[k] for k in order))
        for k, pieces in zip(order, won, strict=True):
            verdict, snat_to = entries[k]
            for net in pieces:
                if verdict is not None:
                    steer_pieces.append((pod_ip, net, verdict))
                if snat_to is not None:
                    snat_pieces.append((pod_ip, net, snat_to))

    gateways = tuple(
        GatewayRoute(slot=s, node=g, ip=ip)
        for g, s in sorted(slots.items(), key=lambda kv: kv[1])
        if (ip := nodes[g].internal_ip) is not None
    )
    transport_vxlan = config.transport == "vxlan"
    own_node = nodes.get(me)
    local_ranges = own_node.pod_cidrs if own_node is not None else ()
    known = frozenset(p.ip for p in pods if p.node == me and p.ip is not None)
    held: list[IPv4Network] = []
    for pol in policies:
        for rule in pol.spec.rules:
            if local_ranges and _open_to_unseen_pods(
                pol,
                rule,
                services=services,
                endpoints=endpoints,
                local_ranges=local_ranges,
                known=known,
            ):
                held += _reach(rule)
    steered = list(collapse_addresses(n for nets in reach for n in nets))
    remote_ranges = (
        collapse_addresses(r for n in nodes.values() if n.name != me for r in n.pod_cidrs)
        if steered
        else ()
    )
    return DesiredState(
        remote_pod_ranges=tuple(remote_ranges),
        steered_destinations=tuple(steered),
        local_pod_ranges=local_ranges if held else (),
        known_local_pods=tuple(sorted(known)) if held else (),
        held_destinations=tuple(collapse_addresses(held)),
        rules=tuple(programs),
        steer_pieces=tuple(sorted(steer_pieces, key=_piece_key)),
        snat_pieces=tuple(sorted(snat_pieces, key=_piece_key)),
        gateways=gateways,
        owned=tuple(
            sorted(
                e
                for e, g in gateway_of.items()
                if g == me and isinstance(e, IPv4Address) and e not in unheld
            )
        ),
        named=tuple(sorted(named)),
        egress_ips=tuple(sorted(e for e in listed if isinstance(e, IPv4Address))),
        cluster=tuple(collapse_addresses(cluster)),
        remote_pods=tuple(sorted(remote)),
        return_routes=tuple(sorted(returns.items())) if transport_vxlan else (),
        peers=tuple(sorted((n, ip) for n in peers if (ip := nodes[n].internal_ip) is not None))
        if transport_vxlan
        else (),
        problems=tuple(problems),
    )
