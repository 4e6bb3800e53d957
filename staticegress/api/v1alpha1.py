"""Parse `staticegressips.io/v1alpha1` objects into the frozen internal types.

This is the validation edge. The API server already enforces the CRD's schema
and CEL rules; this module applies the same rules again because the agent and
the manager must never trust what they read (an older CRD, a stored object that
predates a rule, a hand-edited etcd). The messages are the CRD's messages word
for word, and `tests/cases/validation.yaml` holds one table of good and bad
objects that both the API-server tests and the parser tests run, so the two
sets of rules cannot drift apart.

Errors name the offending field in the API server's own path notation, e.g.
`spec.rules[0].egressip: must be a valid IP address, such as 192.0.2.10`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from ipaddress import IPv6Address, ip_address, ip_network
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from staticegress.api.types import (
    Condition,
    EgressIPAssignment,
    EgressIPRef,
    EgressRule,
    IPAddress,
    IPNetwork,
    LabelRequirement,
    LabelSelector,
    NodeName,
    StaticEgressIP,
    StaticEgressIPSpec,
    StaticEgressIPStatus,
)

GROUP = "staticegressips.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "StaticEgressIP"
PLURAL = "staticegressips"

MAX_RULES = 64
MAX_EGRESS_IPS = 16
MAX_CIDRS = 64
MAX_SELECTOR_ITEMS = 32
MAX_SELECTOR_VALUES = 64


class Messages:
    """The human-readable rule messages, identical to the CRD's CEL messages."""

    IP = "must be a valid IP address, such as 192.0.2.10"
    IP_USABLE = (
        "must be a unicast address usable as a source, "
        "not unspecified, loopback, multicast, broadcast or link-local"
    )
    SERVICE_NAME = (
        "must be a Service name (DNS-1035 label: lower-case letters, digits and '-', "
        "starting with a letter, ending with a letter or digit)"
    )
    CIDR = "must be a CIDR such as 203.0.113.0/24"
    CIDR_HOST_BITS = "must have no host bits set after the prefix length"
    LABEL_VALUE = (
        "must be a label value (at most 63 letters, digits, '-', '_' or '.', "
        "beginning and ending with a letter or digit)"
    )
    LABEL_KEYS = "keys must be label keys such as app or example.com/tier"
    LABEL_KEY = "must be a label key such as app or example.com/tier"
    OPERATOR_VALUES = "operators In and NotIn need values; Exists and DoesNotExist take none"
    ONE_EGRESS_FORM = "a rule needs egress IPs: set either egressip or egressips, not both"
    ONE_CIDR_FORM = "a rule needs destinations: set either cidr or cidrs, not both"
    SELECTS_PODS = "a rule must select pods: set service-name, pod-selector or namespace-selector"
    SERVICE_ALONE = "service-name cannot be combined with pod-selector or namespace-selector"
    ONE_FAMILY = (
        "egress IPs and CIDRs of a rule must all be of one IP family (all IPv4 or all IPv6)"
    )
    DUPLICATE = "Duplicate value"


_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
# Go's netip, which backs the API server's isIP/isCIDR, accepts only decimal
# prefix lengths without leading zeros; Python also takes "/255.0.0.0" and a
# bare address, so the prefix is checked by hand first.
_PREFIX_LEN = re.compile(r"0|[1-9][0-9]{0,2}")


class InvalidSpecError(ValueError):
    """A StaticEgressIP that breaks the API's rules; `errors` names every bad field."""

    def __init__(self, ref: str, errors: Sequence[tuple[str, str]]) -> None:
        self.ref = ref
        self.errors = tuple(errors)
        lines = "; ".join(f"{path}: {msg}" for path, msg in self.errors)
        super().__init__(f"{ref}: {lines}")


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("staticegress", message)


def _parse_ip(value: str) -> IPAddress:
    # The API server refuses zones and IPv4-mapped IPv6 addresses; Python
    # accepts both, so they are refused here explicitly.
    if "%" in value:
        raise _fail(Messages.IP)
    try:
        addr = ip_address(value)
    except ValueError:
        raise _fail(Messages.IP) from None
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        raise _fail(Messages.IP)
    return addr


def _check_egress_ip(value: str) -> str:
    addr = _parse_ip(value)
    broadcast = addr.version == 4 and int(addr) == 0xFFFFFFFF
    if (
        addr.is_unspecified
        or addr.is_loopback
        or addr.is_multicast
        or addr.is_link_local
        or broadcast
    ):
        raise _fail(Messages.IP_USABLE)
    return value


def _parse_cidr(value: str) -> IPNetwork:
    addr_part, slash, bits = value.partition("/")
    if not slash or not _PREFIX_LEN.fullmatch(bits):
        raise _fail(Messages.CIDR)
    _parse_ip_for_cidr(addr_part)
    try:
        ip_network(value, strict=False)
    except ValueError:
        raise _fail(Messages.CIDR) from None
    try:
        return ip_network(value, strict=True)
    except ValueError:
        raise _fail(Messages.CIDR_HOST_BITS) from None


def _parse_ip_for_cidr(value: str) -> None:
    try:
        _parse_ip(value)
    except PydanticCustomError:
        raise _fail(Messages.CIDR) from None


def _check_cidr(value: str) -> str:
    _parse_cidr(value)
    return value


def _check_service_name(value: str) -> str:
    if not _DNS1035.fullmatch(value):
        raise _fail(Messages.SERVICE_NAME)
    return value


def _check_label_key(value: str) -> str:
    if not _LABEL_KEY.fullmatch(value):
        raise _fail(Messages.LABEL_KEY)
    return value


def _check_label_value(value: str) -> str:
    if not _LABEL_VALUE.fullmatch(value):
        raise _fail(Messages.LABEL_VALUE)
    return value


def _check_label_map(value: dict[str, str]) -> dict[str, str]:
    if not all(len(k) <= 253 and _LABEL_KEY.fullmatch(k) for k in value):
        raise _fail(Messages.LABEL_KEYS)
    return value


def _unique(values: list[str]) -> list[str]:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise _fail(f'{Messages.DUPLICATE}: "{v}"')
        seen.add(v)
    return values


EgressIPStr = Annotated[str, Field(max_length=39), AfterValidator(_check_egress_ip)]
CIDRStr = Annotated[str, Field(max_length=43), AfterValidator(_check_cidr)]
LabelValueStr = Annotated[str, Field(max_length=63), AfterValidator(_check_label_value)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _LabelRequirementIn(_Strict):
    key: Annotated[str, Field(max_length=253), AfterValidator(_check_label_key)]
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: Annotated[list[Annotated[str, Field(max_length=63)]], Field(max_length=64)] | None = (
        None
    )

    @model_validator(mode="after")
    def _values_fit_operator(self) -> _LabelRequirementIn:
        has_values = bool(self.values)
        if has_values != (self.operator in ("In", "NotIn")):
            raise _fail(Messages.OPERATOR_VALUES)
        return self


class _LabelSelectorIn(_Strict):
    matchLabels: (  # noqa: N815 - the Kubernetes field name
        Annotated[
            dict[str, LabelValueStr],
            Field(max_length=MAX_SELECTOR_ITEMS),
            AfterValidator(_check_label_map),
        ]
        | None
    ) = None
    matchExpressions: (  # noqa: N815 - the Kubernetes field name
        Annotated[list[_LabelRequirementIn], Field(max_length=MAX_SELECTOR_ITEMS)] | None
    ) = None

    def to_selector(self) -> LabelSelector:
        return LabelSelector(
            match_labels=tuple(sorted((self.matchLabels or {}).items())),
            match_expressions=tuple(
                LabelRequirement(key=r.key, operator=r.operator, values=tuple(r.values or ()))
                for r in self.matchExpressions or ()
            ),
        )


class _RuleIn(_Strict):
    egressip: EgressIPStr | None = None
    egressips: (
        Annotated[
            list[EgressIPStr],
            Field(min_length=1, max_length=MAX_EGRESS_IPS),
            AfterValidator(_unique),
        ]
        | None
    ) = None
    service_name: (
        Annotated[str, Field(max_length=63), AfterValidator(_check_service_name)] | None
    ) = Field(default=None, alias="service-name")
    cidr: CIDRStr | None = None
    cidrs: (
        Annotated[list[CIDRStr], Field(min_length=1, max_length=MAX_CIDRS), AfterValidator(_unique)]
        | None
    ) = None
    excluded_cidrs: (
        Annotated[list[CIDRStr], Field(max_length=MAX_CIDRS), AfterValidator(_unique)] | None
    ) = Field(default=None, alias="excluded-cidrs")
    namespace_selector: _LabelSelectorIn | None = Field(default=None, alias="namespace-selector")
    pod_selector: _LabelSelectorIn | None = Field(default=None, alias="pod-selector")
    gateway_selector: _LabelSelectorIn | None = Field(default=None, alias="gateway-selector")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> _RuleIn:
        # Same order as the CRD's rule-level CEL rules; the first broken one is
        # reported, which is enough to tell the user what to fix.
        if (self.egressip is None) == (self.egressips is None):
            raise _fail(Messages.ONE_EGRESS_FORM)
        if (self.cidr is None) == (self.cidrs is None):
            raise _fail(Messages.ONE_CIDR_FORM)
        selectors = self.pod_selector is not None or self.namespace_selector is not None
        if self.service_name is None and not selectors:
            raise _fail(Messages.SELECTS_PODS)
        if self.service_name is not None and selectors:
            raise _fail(Messages.SERVICE_ALONE)
        families = {a.version for a in self.egress_ips()}
        families |= {n.version for n in self.destinations() + self.excluded()}
        if len(families) > 1:
            raise _fail(Messages.ONE_FAMILY)
        return self

    def egress_ips(self) -> tuple[IPAddress, ...]:
        raw = [self.egressip] if self.egressip is not None else list(self.egressips or ())
        return tuple(_parse_ip(v) for v in raw)

    def destinations(self) -> tuple[IPNetwork, ...]:
        raw = [self.cidr] if self.cidr is not None else list(self.cidrs or ())
        return tuple(_parse_cidr(v) for v in raw)

    def excluded(self) -> tuple[IPNetwork, ...]:
        return tuple(_parse_cidr(v) for v in self.excluded_cidrs or ())

    def to_rule(self, index: int) -> EgressRule:
        def sel(s: _LabelSelectorIn | None) -> LabelSelector | None:
            return None if s is None else s.to_selector()

        return EgressRule(
            index=index,
            egress_ips=self.egress_ips(),
            destinations=self.destinations(),
            excluded=self.excluded(),
            service_name=self.service_name,
            namespace_selector=sel(self.namespace_selector),
            pod_selector=sel(self.pod_selector),
            gateway_selector=sel(self.gateway_selector),
        )


class _SpecIn(_Strict):
    rules: Annotated[list[_RuleIn], Field(min_length=1, max_length=MAX_RULES)]


class _AssignmentIn(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    egressIP: EgressIPStr  # noqa: N815 - the Kubernetes field name
    rule: int = 0
    rules: list[int] = []
    gateway: str | None = None
    since: datetime | None = None
    standbys: list[str] = []
    pool: str | None = None
    reason: str | None = None


class _ConditionIn(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    lastTransitionTime: datetime  # noqa: N815 - the Kubernetes field name
    observedGeneration: int | None = None  # noqa: N815 - the Kubernetes field name


class _StatusIn(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    observedGeneration: int | None = None  # noqa: N815 - the Kubernetes field name
    egressIPs: list[_AssignmentIn] = []  # noqa: N815 - the Kubernetes field name
    conditions: list[_ConditionIn] = []

    def to_status(self) -> StaticEgressIPStatus:
        return StaticEgressIPStatus(
            observed_generation=self.observedGeneration,
            egress_ips=tuple(
                EgressIPAssignment(
                    egress_ip=_parse_ip(a.egressIP),
                    rule=a.rule,
                    gateway=NodeName(a.gateway) if a.gateway else None,
                    since=a.since,
                    standbys=tuple(NodeName(s) for s in a.standbys),
                    rules=tuple(a.rules),
                    pool=a.pool,
                    reason=a.reason,
                )
                for a in self.egressIPs
            ),
            conditions=tuple(
                Condition(
                    type=c.type,
                    status=c.status,
                    reason=c.reason,
                    message=c.message,
                    last_transition_time=c.lastTransitionTime,
                    observed_generation=c.observedGeneration,
                )
                for c in self.conditions
            ),
        )


_MAP_FIELDS = frozenset({"matchLabels"})


def _api_path(loc: tuple[int | str, ...]) -> str:
    """Render a pydantic location the way the API server names fields."""
    out = ""
    previous: int | str = ""
    for part in loc:
        # List indexes and map keys are both written in brackets.
        if isinstance(part, int) or previous in _MAP_FIELDS:
            out += f"[{part}]"
        elif not out:
            out = part
        else:
            out += f".{part}"
        previous = part
    return out


def _errors(prefix: tuple[str, ...], exc: ValidationError) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        # Union members and the annotated-validator wrapper add location parts
        # that are not field names; keep only what the user wrote.
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or not _is_type_tag(p))
        errors.append((_api_path(prefix + loc), err["msg"]))
    return errors


def _is_type_tag(part: str) -> bool:
    return part.startswith(("function-", "list[", "dict[", "str", "int")) or part in (
        "_LabelSelectorIn",
        "_LabelRequirementIn",
        "_RuleIn",
    )


def parse_spec(spec: Any, *, ref: str = "spec") -> StaticEgressIPSpec:
    """Validate a raw `spec` mapping; raise `InvalidSpecError` naming each bad field."""
    try:
        parsed = _SpecIn.model_validate(spec, by_alias=True)
    except ValidationError as exc:
        raise InvalidSpecError(ref, _errors(("spec",), exc)) from None
    return StaticEgressIPSpec(rules=tuple(r.to_rule(i) for i, r in enumerate(parsed.rules)))


def parse_status(status: Any) -> StaticEgressIPStatus:
    """Parse the status subresource; an unreadable status counts as none written yet."""
    if not isinstance(status, Mapping):
        return StaticEgressIPStatus()
    try:
        return _StatusIn.model_validate(status).to_status()
    except (ValidationError, PydanticCustomError):
        return StaticEgressIPStatus()


def parse_static_egress_ip(obj: Mapping[str, Any]) -> StaticEgressIP:
    """Parse a whole StaticEgressIP object as read from the API server.

    Raises `InvalidSpecError` when the spec breaks the API's rules; the status
    never makes an object invalid.
    """
    meta = obj.get("metadata") or {}
    ref = EgressIPRef(namespace=str(meta.get("namespace", "")), name=str(meta.get("name", "")))
    if obj.get("apiVersion") not in (None, API_VERSION) or obj.get("kind") not in (None, KIND):
        raise InvalidSpecError(
            str(ref), [("apiVersion", f"must be {API_VERSION} with kind {KIND}")]
        )
    spec = parse_spec(obj.get("spec"), ref=str(ref))
    return StaticEgressIP(
        ref=ref,
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation", 0) or 0),
        spec=spec,
        status=parse_status(obj.get("status")),
        created=_timestamp(meta.get("creationTimestamp")),
    )


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
