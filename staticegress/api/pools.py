"""Parse `StaticEgressIPPool` objects, the administrator's grants of egress IPs.

A pool is cluster-scoped and only a cluster administrator writes it. It holds
ranges of addresses (`spec.cidrs`) and says who may use them: the namespaces
whose StaticEgressIPs may take its addresses (`namespaceSelector`), the nodes
that may be gateways for them (`nodeSelector`), and the namespaces whose pods
a StaticEgressIP using them may select beyond its own (`podNamespaceSelector`).

Like `staticegress.api.v1alpha1`, this is a validation edge: it applies the
CRD's rules again (deploy/crd/staticegressips.io_staticegressippools.yaml)
with the CRD's messages word for word, and `tests/cases/pool_validation.yaml`
holds one table that both the API server and this parser judge.

It also holds the Python twins of the admission policy's judgements
(deploy/admission/pools.yaml) that can be made from an object and one pool
alone: whether a namespace-selector is pinned to its own namespace, and the
policy's messages, so the manager, which judges everything again with the
whole cluster in view, can give the same verdicts in the same words.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Network, IPv6Network, collapse_addresses
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError

from staticegress.api.types import IPAddress, IPNetwork, LabelSelector
from staticegress.api.v1alpha1 import (
    API_VERSION,
    CIDRStr,
    InvalidSpecError,
    _errors,
    _LabelSelectorIn,
    _parse_cidr,
    _Strict,
    _timestamp,
    _unique,
)

POOL_KIND = "StaticEgressIPPool"
POOL_PLURAL = "staticegressippools"

MAX_POOL_CIDRS = 64

POOL_SIZE_LIMIT = 2**53
"""`pool_size` saturates here: the largest integer every JSON client (and
kubectl's columns) reads exactly. Only IPv6 pools wider than a /75 reach it."""

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
"""The label the API server sets on every namespace to the namespace's name."""


class _PoolSpecIn(_Strict):
    cidrs: Annotated[
        list[CIDRStr],
        Field(min_length=1, max_length=MAX_POOL_CIDRS),
        AfterValidator(_unique),
    ]
    namespaceSelector: _LabelSelectorIn  # noqa: N815 - the Kubernetes field name
    nodeSelector: _LabelSelectorIn | None = None  # noqa: N815 - the Kubernetes field name
    podNamespaceSelector: _LabelSelectorIn | None = None  # noqa: N815 - the Kubernetes field name


@dataclass(frozen=True)
class EgressIPPool:
    """One parsed, validated StaticEgressIPPool."""

    name: str
    uid: str
    generation: int
    cidrs: tuple[IPNetwork, ...]
    """The ranges the pool holds, in the order listed; a /32 or /128 is one address."""
    namespace_selector: LabelSelector
    """Namespaces whose StaticEgressIPs may use the pool's addresses; empty: all."""
    node_selector: LabelSelector | None
    """Nodes that may be gateways for the pool's addresses; None: no restriction
    beyond the StaticEgressIP's own gateway selector."""
    pod_namespace_selector: LabelSelector | None
    """Namespaces whose pods a StaticEgressIP using this pool may select beyond
    its own namespace; None: its own namespace only."""
    created: datetime | None

    def holds(self, ip: IPAddress) -> bool:
        """Tell whether `ip` lies in one of the pool's ranges."""
        # `in` is False across families (an IPv4 address is in no IPv6 range).
        return any(ip in net for net in self.cidrs)


def _parse_pool_spec(spec: Any, *, ref: str) -> _PoolSpecIn:
    try:
        return _PoolSpecIn.model_validate(spec)
    except ValidationError as exc:
        raise InvalidSpecError(ref, _errors(("spec",), exc)) from None


def parse_pool(obj: Mapping[str, Any]) -> EgressIPPool:
    """Parse a whole StaticEgressIPPool as read from the API server.

    Raises `InvalidSpecError` (its `ref` is the pool's name) when the spec
    breaks the API's rules; the status is not read.
    """
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    if obj.get("apiVersion") not in (None, API_VERSION) or obj.get("kind") not in (
        None,
        POOL_KIND,
    ):
        raise InvalidSpecError(
            name, [("apiVersion", f"must be {API_VERSION} with kind {POOL_KIND}")]
        )
    spec = _parse_pool_spec(obj.get("spec"), ref=name)

    def sel(s: _LabelSelectorIn | None) -> LabelSelector | None:
        return None if s is None else s.to_selector()

    return EgressIPPool(
        name=name,
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation", 0) or 0),
        cidrs=tuple(_parse_cidr(c) for c in spec.cidrs),
        namespace_selector=spec.namespaceSelector.to_selector(),
        node_selector=sel(spec.nodeSelector),
        pod_namespace_selector=sel(spec.podNamespaceSelector),
        created=_timestamp(meta.get("creationTimestamp")),
    )


def pool_size(cidrs: Iterable[IPNetwork]) -> int:
    """How many addresses `cidrs` hold together, overlaps counted once, at most 2**53."""
    nets = list(cidrs)
    v4 = [n for n in nets if isinstance(n, IPv4Network)]
    v6 = [n for n in nets if isinstance(n, IPv6Network)]
    total = sum(n.num_addresses for n in collapse_addresses(v4))
    total += sum(n.num_addresses for n in collapse_addresses(v6))
    return min(total, POOL_SIZE_LIMIT)


def pinned_to_namespace(selector: LabelSelector, namespace: str) -> bool:
    """Tell whether a namespace-selector can select no namespace but `namespace`.

    Judged from the selector's text alone, as the admission policy judges it:
    pinned means `matchLabels` has `kubernetes.io/metadata.name: <namespace>`,
    or a `matchExpressions` entry on that key is `In` with only `namespace`
    as its values. Any other selector may reach other namespaces, and
    reaching them needs a pool's `podNamespaceSelector`.
    """
    if (NAMESPACE_NAME_LABEL, namespace) in selector.match_labels:
        return True
    return any(
        r.key == NAMESPACE_NAME_LABEL
        and r.operator == "In"
        and bool(r.values)
        and all(v == namespace for v in r.values)
        for r in selector.match_expressions
    )


class PoolMessages:
    """The admission policy's messages, word for word (deploy/admission/pools.yaml)."""

    @staticmethod
    def namespace_not_granted(*, ip: IPAddress | str, pool: str, namespace: str) -> str:
        return (
            f"egress IP {ip} is in {POOL_KIND} {pool}, which does not grant namespace {namespace}"
        )

    @staticmethod
    def cross_namespace(*, rule: int, namespace: str, pool: str) -> str:
        return (
            f"rule {rule} selects pods beyond namespace {namespace}; "
            f"{POOL_KIND} {pool} grants no cross-namespace selection "
            "(spec.podNamespaceSelector)"
        )
