"""judge_tenancy: which StaticEgressIP may use which egress IP, and how far its rules reach. Pure.

An egress IP is a credential: external firewalls trust it. So an object's claim
to one is honoured only when an administrator granted it, through a
cluster-scoped `StaticEgressIPPool` that holds the address and whose
`namespaceSelector` matches the object's namespace. Both the manager and every
agent run this same function over the same inputs, so they agree on the two
things that decide who is affected by an object:

- **ownership**: an egress IP belongs to the oldest object (then namespace/name)
  whose claim is *granted*. A refused claim never owns, so an older object of
  tenant A cannot take tenant B's pooled address, whatever their ages;
- **reach**: a rule selects pods in its own namespace, and in other namespaces
  only where every pool that granted the rule's egress IPs allows it through
  `podNamespaceSelector`. A rule without any granted egress IP reaches only its
  own namespace: a refused object must not affect anyone else's pods.

Claims are judged in this order, the first that applies wins:
1. `ForbiddenAddress`: the address is one of the cluster's own (a node's
   address, a pod or service range, a router, a LoadBalancer IP), whatever a
   pool says. Only the manager knows all of these; it passes them in.
2. Pools hold the address and every one of them grants the namespace: granted
   (the status names the first by name). Overlapping pools must all agree,
   and the gateways must match all their nodeSelectors: the admission policy
   judges one pool at a time and needs every judgement to pass, so this is
   the rule both can apply alike.
3. `NamespaceNotGranted`: pools hold the address but not all of them grant the
   namespace. This holds even where unpooled addresses are allowed: a pool
   reserves what it holds.
4. `NotInPool`: no pool holds it, and pools are required (the default).
5. Otherwise (pools optional, for single-tenant clusters): granted without a pool.

A forbidden address keeps its owner (so a younger claimant does not inherit
it); the owner is simply not given a gateway for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from staticegress.api.pools import EgressIPPool, PoolMessages, pool_size
from staticegress.api.types import EgressIPRef, EgressRule, IPAddress, IPNetwork, StaticEgressIP

NOT_IN_POOL = "NotInPool"
NAMESPACE_NOT_GRANTED = "NamespaceNotGranted"
FORBIDDEN_ADDRESS = "ForbiddenAddress"
CROSS_NAMESPACE_DENIED = "CrossNamespaceDenied"
REFUSALS = (FORBIDDEN_ADDRESS, NAMESPACE_NOT_GRANTED, NOT_IN_POOL)


@dataclass(frozen=True)
class Forbidden:
    """Addresses that are never an egress IP, each with why: `(range, what it is)`."""

    ranges: tuple[tuple[IPNetwork, str], ...] = ()

    def why(self, ip: IPAddress) -> str | None:
        """What `ip` is, when it is forbidden; None when it may be an egress IP."""
        for net, what in self.ranges:
            if ip.version == net.version and ip in net:
                return what
        return None


def forbidden_addresses(
    *,
    node_addresses: Iterable[tuple[str, IPAddress]] = (),
    pod_ranges: Iterable[tuple[str, IPNetwork]] = (),
    service_ranges: Iterable[IPNetwork] = (),
    routers: Iterable[tuple[str, IPAddress]] = (),
    load_balancer_ips: Iterable[tuple[str, IPAddress]] = (),
    extra: Iterable[IPNetwork] = (),
) -> Forbidden:
    """The cluster's own addresses, described for a status message. Sorted, so
    equal inputs give equal results; the first description of a range wins."""
    out: dict[IPNetwork, str] = {}

    def host(ip: IPAddress) -> IPNetwork:
        return IPv4Network(ip) if ip.version == 4 else IPv6Network(ip)

    for node, ip in sorted(node_addresses, key=lambda x: (x[1].version, x[1], x[0])):
        out.setdefault(host(ip), f"an address of node {node}")
    for node, ip in sorted(routers, key=lambda x: (x[1].version, x[1], x[0])):
        out.setdefault(host(ip), f"the default gateway of node {node}'s subnet")
    for svc, ip in sorted(load_balancer_ips, key=lambda x: (x[1].version, x[1], x[0])):
        out.setdefault(host(ip), f"a LoadBalancer IP of Service {svc}")
    for what, net in sorted(pod_ranges, key=lambda x: (x[1].version, x[1], x[0])):
        out.setdefault(net, f"the pod range {net} ({what})")
    for net in sorted(service_ranges, key=lambda n: (n.version, n)):
        out.setdefault(net, f"the service range {net}")
    for net in sorted(extra, key=lambda n: (n.version, n)):
        out.setdefault(net, f"the reserved range {net} (--forbidden-cidr)")
    return Forbidden(tuple(out.items()))


@dataclass(frozen=True)
class Claim:
    """How one object's claim to one egress IP was judged."""

    pool: str | None = None
    """The granting pool; None when refused or when granted without a pool."""
    refused: str | None = None
    """A reason from REFUSALS, or None when granted."""
    message: str = ""

    @property
    def granted(self) -> bool:
        return self.refused is None


@dataclass(frozen=True)
class Tenancy:
    """Everything the pools decide for one snapshot."""

    claims: Mapping[tuple[EgressIPRef, IPAddress], Claim] = field(default_factory=dict)
    owners: Mapping[IPAddress, EgressIPRef] = field(default_factory=dict)
    """Each egress IP's owner: the oldest object whose claim to it is granted by a
    pool (a forbidden address keeps the owner the pools give it)."""
    reach: Mapping[tuple[EgressIPRef, int], frozenset[str] | None] = field(default_factory=dict)
    """(object, rule index) -> the namespaces that rule may select pods in; None
    means any. Only for rules with a namespace-selector."""
    granted_by: Mapping[IPAddress, tuple[EgressIPPool, ...]] = field(default_factory=dict)
    """Owned egress IP -> the pools that granted it, whose nodeSelectors limit its gateways."""
    denials: Mapping[EgressIPRef, tuple[str, ...]] = field(default_factory=dict)
    """Messages about rules whose namespace-selector reaches namespaces it may not."""

    def claim(self, ref: EgressIPRef, ip: IPAddress) -> Claim:
        return self.claims.get((ref, ip), Claim())

    def allows_namespace(self, ref: EgressIPRef, rule: EgressRule, namespace: str) -> bool:
        """Whether `rule` of `ref` may select pods in `namespace`."""
        if namespace == ref.namespace:
            return True
        allowed = self.reach.get((ref, rule.index))
        return allowed is None or namespace in allowed


def unrestricted(policies: Iterable[StaticEgressIP]) -> Tenancy:
    """No pools in play: every claim granted, the oldest claimant owns, reach
    unlimited. What a caller that judges nothing (a test of another concern) gets."""
    return judge_tenancy(policies, pools=(), namespaces={}, require_pool=False)


def oldest_first(policies: Iterable[StaticEgressIP]) -> list[StaticEgressIP]:
    """The global order of objects, the same on every node and in the manager:
    older first (creationTimestamp), then namespace/name."""

    def key(p: StaticEgressIP) -> tuple[str, EgressIPRef]:
        return (p.created.isoformat() if p.created is not None else "~", p.ref)

    return sorted(policies, key=key)


def judge_tenancy(
    policies: Iterable[StaticEgressIP],
    *,
    pools: Iterable[EgressIPPool],
    namespaces: Mapping[str, Mapping[str, str]],
    require_pool: bool,
    forbidden: Forbidden = Forbidden(),
) -> Tenancy:
    """Judge every claim of every object. `namespaces`: name -> labels of every
    namespace the caller knows (a namespace it does not know grants nothing)."""
    pools = sorted(pools, key=lambda p: p.name)
    ordered = oldest_first(policies)
    claims: dict[tuple[EgressIPRef, IPAddress], Claim] = {}
    owners: dict[IPAddress, EgressIPRef] = {}
    granting: dict[tuple[EgressIPRef, IPAddress], tuple[EgressIPPool, ...]] = {}
    for pol in ordered:
        ns_labels = namespaces.get(pol.ref.namespace)
        for rule in pol.spec.rules:
            for ip in rule.egress_ips:
                if (pol.ref, ip) in claims:
                    continue
                holders = [p for p in pools if p.holds(ip)]
                refusing = [
                    p
                    for p in holders
                    if ns_labels is None or not p.namespace_selector.matches(ns_labels)
                ]
                grants = holders if holders and not refusing else []
                what = forbidden.why(ip)
                if grants:
                    granting[(pol.ref, ip)] = tuple(grants)
                    owners.setdefault(ip, pol.ref)
                elif not holders and not require_pool:
                    owners.setdefault(ip, pol.ref)
                if what is not None:
                    claim = Claim(
                        refused=FORBIDDEN_ADDRESS,
                        message=f"{ip} is {what}: never an egress IP, whatever a pool holds",
                    )
                elif grants:
                    claim = Claim(pool=grants[0].name)
                elif holders:
                    claim = Claim(
                        refused=NAMESPACE_NOT_GRANTED,
                        message=PoolMessages.namespace_not_granted(
                            ip=ip,
                            pool=", ".join(p.name for p in refusing),
                            namespace=pol.ref.namespace,
                        ),
                    )
                elif require_pool:
                    claim = Claim(
                        refused=NOT_IN_POOL,
                        message=f"{ip} is in no StaticEgressIPPool: an administrator must "
                        "create a pool that holds it and grants this namespace",
                    )
                else:
                    claim = Claim()
                claims[(pol.ref, ip)] = claim

    reach: dict[tuple[EgressIPRef, int], frozenset[str] | None] = {}
    denials: dict[EgressIPRef, list[str]] = {}
    for pol in ordered:
        for rule in pol.spec.rules:
            if rule.namespace_selector is None:
                continue
            allowed = _rule_reach(pol, rule, claims, granting, namespaces)
            reach[(pol.ref, rule.index)] = allowed
            if allowed is None:
                continue
            beyond = sorted(
                name
                for name, labels in namespaces.items()
                if name != pol.ref.namespace
                and name not in allowed
                and rule.namespace_selector.matches(labels)
            )
            if beyond:
                shown = ", ".join(beyond[:5]) + (
                    f" and {len(beyond) - 5} more" if beyond[5:] else ""
                )
                denials.setdefault(pol.ref, []).append(
                    f"rule {rule.index}: its namespace-selector reaches {shown} beyond "
                    f"{pol.ref.namespace}; no pool of its egress IPs grants that "
                    "(spec.podNamespaceSelector), so it selects pods there not at all"
                )
    return Tenancy(
        claims=claims,
        owners=owners,
        reach=reach,
        granted_by={ip: granting[(ref, ip)] for ip, ref in owners.items() if (ref, ip) in granting},
        denials={ref: tuple(msgs) for ref, msgs in denials.items()},
    )


def _rule_reach(
    pol: StaticEgressIP,
    rule: EgressRule,
    claims: Mapping[tuple[EgressIPRef, IPAddress], Claim],
    granting: Mapping[tuple[EgressIPRef, IPAddress], tuple[EgressIPPool, ...]],
    namespaces: Mapping[str, Mapping[str, str]],
) -> frozenset[str] | None:
    """The namespaces a rule's pods may come from: its own, plus those every pool
    behind its granted egress IPs opens to it. A pool-less grant (pools optional)
    restricts nothing; no granted egress IP at all means its own namespace only."""
    granted = [ip for ip in rule.egress_ips if claims[(pol.ref, ip)].granted]
    pools = [p for ip in granted for p in granting.get((pol.ref, ip), ())]
    if granted and not pools:
        return None
    if not granted or any(p.pod_namespace_selector is None for p in pools):
        return frozenset({pol.ref.namespace})
    return frozenset(
        name
        for name, labels in namespaces.items()
        if name == pol.ref.namespace
        or all(
            p.pod_namespace_selector is not None and p.pod_namespace_selector.matches(labels)
            for p in pools
        )
    )


@dataclass(frozen=True)
class PoolUsage:
    """One pool's addresses: how many it holds and how many an owner uses through it."""

    total: int
    used: int
    users: tuple[EgressIPRef, ...] = ()

    @property
    def free(self) -> int:
        return max(0, self.total - self.used)


def pool_usage(pools: Iterable[EgressIPPool], tenancy: Tenancy) -> dict[str, PoolUsage]:
    """Used and free counts of every pool, from the owners' granted claims."""
    used: dict[str, set[IPAddress]] = {}
    users: dict[str, set[EgressIPRef]] = {}
    for ip, ref in tenancy.owners.items():
        claim = tenancy.claim(ref, ip)
        if claim.pool is not None and claim.granted:
            used.setdefault(claim.pool, set()).add(ip)
            users.setdefault(claim.pool, set()).add(ref)
    return {
        p.name: PoolUsage(
            total=pool_size(p.cidrs),
            used=len(used.get(p.name, ())),
            users=tuple(sorted(users.get(p.name, ()))),
        )
        for p in pools
    }


def trusted_routers(
    reports: Iterable[tuple[str, IPAddress | None, IPNetwork | None, Iterable[IPAddress]]],
) -> list[tuple[str, IPAddress]]:
    """The default gateways the agents reported that the manager believes.

    `reports`: (node, its InternalIP from its Node object, the subnet its agent
    reported, the routers it reported). A router counts only when it lies in
    the reported subnet, that subnet holds the node's own InternalIP, and the
    subnet is no wider than a /16 (IPv4) or /48 (IPv6): a node that lies can
    make addresses near itself unusable, never far away, never usable.
    """
    out: list[tuple[str, IPAddress]] = []
    for node, internal, subnet, routers in reports:
        if internal is None or subnet is None or internal.version != subnet.version:
            continue
        if internal not in subnet or subnet.prefixlen < (16 if subnet.version == 4 else 48):
            continue
        out += [(node, r) for r in routers if r.version == subnet.version and r in subnet]
    return sorted(out, key=lambda x: (x[1].version, x[1], x[0]))
