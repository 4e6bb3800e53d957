"""Frozen internal types for StaticEgressIP objects, built on `ipaddress` types.

Everything past the parsing edge (`staticegress.api.v1alpha1`) works with these
types only: never raw dicts, never raw address strings. They are immutable,
hashable and ordered the way the CR listed them, so the pure layers can compare
whole snapshots with `==`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal, NewType

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

NodeName = NewType("NodeName", str)
"""The name of a Kubernetes Node object."""

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


@dataclass(frozen=True, order=True)
class EgressIPRef:
    """Names one StaticEgressIP object: `namespace/name`."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class LabelRequirement:
    """One `matchExpressions` entry of a standard label selector."""

    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Tell whether `labels` satisfy this requirement, as Kubernetes defines it."""
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return labels.get(self.key) in self.values
        # NotIn also matches objects that lack the key, as in Kubernetes.
        return labels.get(self.key) not in self.values


@dataclass(frozen=True)
class LabelSelector:
    """A standard label selector. The empty selector matches everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[LabelRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Tell whether an object with `labels` is selected."""
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.match_expressions
        )


@dataclass(frozen=True)
class EgressRule:
    """One rule: which pods, towards which destinations, through which egress IPs.

    Both the original form (`egressip`, `cidr`) and the extended one
    (`egressips`, `cidrs`, ...) parse into this single type.
    """

    index: int
    """Position of the rule in `spec.rules`, for messages and status."""
    egress_ips: tuple[IPAddress, ...]
    """Source addresses the selected traffic leaves with, in the order listed."""
    destinations: tuple[IPNetwork, ...]
    """Destination ranges the rule captures."""
    excluded: tuple[IPNetwork, ...] = ()
    """Ranges carved out of `destinations`."""
    service_name: str | None = None
    """Selects the pods behind this Service in the CR's namespace."""
    namespace_selector: LabelSelector | None = None
    """Selects namespaces; absent means the CR's own namespace."""
    pod_selector: LabelSelector | None = None
    """Selects pods by label in the selected namespaces; absent means all of them."""
    gateway_selector: LabelSelector | None = None
    """Restricts which nodes may own this rule's egress IPs; absent means the default."""

    @property
    def family(self) -> int:
        """4 or 6: the API guarantees every address of a rule shares one family."""
        return self.egress_ips[0].version


@dataclass(frozen=True)
class StaticEgressIPSpec:
    """The validated spec: at least one rule."""

    rules: tuple[EgressRule, ...]


@dataclass(frozen=True)
class EgressIPAssignment:
    """Status entry: which node owns one egress IP, and since when.

    One entry per egress IP of an object, however many of its rules list it.
    """

    egress_ip: IPAddress
    rule: int
    """The first rule (index in spec.rules) that lists the egress IP."""
    gateway: NodeName | None
    since: datetime | None
    standbys: tuple[NodeName, ...] = ()
    rules: tuple[int, ...] = ()
    """Every rule that lists the egress IP, in order (empty when only `rule` is known)."""
    pool: str | None = None
    """The StaticEgressIPPool that granted the address, when one did."""
    reason: str | None = None
    """Why the address has no gateway, when it has none (NotInPool, ...)."""


@dataclass(frozen=True)
class Condition:
    """A standard status condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    last_transition_time: datetime
    observed_generation: int | None = None


@dataclass(frozen=True)
class StaticEgressIPStatus:
    """What the manager last wrote on the status subresource."""

    observed_generation: int | None = None
    egress_ips: tuple[EgressIPAssignment, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class StaticEgressIP:
    """One parsed, validated StaticEgressIP object."""

    ref: EgressIPRef
    uid: str
    generation: int
    spec: StaticEgressIPSpec
    status: StaticEgressIPStatus = field(default_factory=StaticEgressIPStatus)
    created: datetime | None = None
    """creationTimestamp: the older object wins an egress IP both claim."""
