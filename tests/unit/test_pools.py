"""The StaticEgressIPPool parser against the shared pool validation table, the
pool type, its size, and the Python twins of the admission policy's verdicts."""

from __future__ import annotations

from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any

import pytest
import yaml

from staticegress.api.pools import (
    NAMESPACE_NAME_LABEL,
    POOL_KIND,
    POOL_PLURAL,
    POOL_SIZE_LIMIT,
    PoolMessages,
    parse_pool,
    pinned_to_namespace,
    pool_size,
)
from staticegress.api.types import IPNetwork, LabelRequirement, LabelSelector
from staticegress.api.v1alpha1 import API_VERSION, InvalidSpecError, parse_static_egress_ip
from staticegress.k8s import manifests
from tests.pool_admission_table import GRANT_CASES, NAMESPACE_LABELS, PINNED_CASES, SelectorCase
from tests.pool_validation_table import POOL_INVALID, POOL_VALID
from tests.validation_table import Case


def _pool(spec: Any, name: str = "p") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": POOL_KIND, "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize("case", POOL_VALID, ids=lambda c: c.name)
def test_valid_pool_specs_parse(case: Case) -> None:
    pool = parse_pool(_pool(case.spec))
    assert [str(c) for c in pool.cidrs] == case.spec["cidrs"]


@pytest.mark.parametrize("case", POOL_INVALID, ids=lambda c: c.name)
def test_invalid_pool_specs_name_field_and_reason(case: Case) -> None:
    with pytest.raises(InvalidSpecError) as err:
        parse_pool(_pool(case.spec, name="bad"))
    assert err.value.ref == "bad"
    assert case.message is not None
    matching = [(f, m) for f, m in err.value.errors if case.message in m]
    assert matching, f"no error says {case.message!r}: {err.value.errors}"
    assert any(f == case.field for f, _ in matching), (
        f"expected field {case.field}, got {err.value.errors}"
    )


def test_pool_table_covers_every_field() -> None:
    fields = {c.field.split("[")[0].split(".")[1] for c in POOL_INVALID if c.field}
    assert {"cidrs", "namespaceSelector", "nodeSelector", "podNamespaceSelector"} <= fields
    assert len({c.name for c in POOL_INVALID + POOL_VALID}) == len(POOL_INVALID) + len(POOL_VALID)


def test_whole_pool_parses_into_the_internal_type() -> None:
    pool = parse_pool(
        {
            "apiVersion": API_VERSION,
            "kind": POOL_KIND,
            "metadata": {
                "name": "tenant-b",
                "uid": "u-1",
                "generation": 3,
                "creationTimestamp": "2026-12-01T10:00:00Z",
            },
            "spec": {
                "cidrs": ["198.51.100.200/29", "2001:db8:e::/120"],
                "namespaceSelector": {"matchLabels": {"tenant": "b"}},
                "nodeSelector": {
                    "matchExpressions": [{"key": "egress", "operator": "In", "values": ["b"]}]
                },
            },
            "status": {"total": "not read"},
        }
    )
    assert pool.name == "tenant-b"
    assert pool.uid == "u-1"
    assert pool.generation == 3
    assert pool.created == datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    assert pool.cidrs == (IPv4Network("198.51.100.200/29"), IPv6Network("2001:db8:e::/120"))
    assert pool.namespace_selector == LabelSelector(match_labels=(("tenant", "b"),))
    assert pool.node_selector == LabelSelector(
        match_expressions=(LabelRequirement("egress", "In", ("b",)),)
    )
    assert pool.pod_namespace_selector is None
    assert pool.holds(IPv4Address("198.51.100.200"))
    assert pool.holds(IPv4Address("198.51.100.207"))
    assert not pool.holds(IPv4Address("198.51.100.208"))
    assert pool.holds(IPv6Address("2001:db8:e::ff"))
    assert not pool.holds(IPv6Address("2001:db8:f::1"))
    # Families never mix: the IPv4 address with the same low bits is not held
    # by the IPv6 range, nor the other way round.
    assert not pool.holds(IPv4Address("0.0.0.1"))
    assert not pool.holds(IPv6Address("::c633:64c8"))


def test_pool_names_what_it_is() -> None:
    assert (POOL_KIND, POOL_PLURAL) == ("StaticEgressIPPool", "staticegressippools")
    (doc,) = manifests.load(manifests.POOL_CRD_FILE)
    assert doc["spec"]["names"]["kind"] == POOL_KIND
    assert doc["spec"]["names"]["plural"] == POOL_PLURAL


def test_a_static_egress_ip_is_not_a_pool() -> None:
    with pytest.raises(InvalidSpecError, match="apiVersion"):
        parse_pool({"apiVersion": API_VERSION, "kind": "StaticEgressIP", "metadata": {}})
    with pytest.raises(InvalidSpecError, match="spec"):
        parse_pool({"metadata": {"name": "x"}})


@pytest.mark.parametrize(
    ("cidrs", "size"),
    [
        (["198.51.100.200/29"], 8),
        (["100.137.146.100/32"], 1),
        (["2001:db8::1/128"], 1),
        (["198.51.100.0/24", "198.51.100.128/25"], 256),  # overlap counted once
        (["198.51.100.0/25", "198.51.100.128/25"], 256),
        (["198.51.100.200/29", "2001:db8::/120"], 8 + 256),
        (["2001:db8::/76"], 2**52),
        (["2001:db8::/75"], POOL_SIZE_LIMIT),
        (["2001:db8::/64"], POOL_SIZE_LIMIT),
        (["::/0", "0.0.0.0/0"], POOL_SIZE_LIMIT),
        ([], 0),
    ],
)
def test_pool_size_counts_addresses_and_saturates(cidrs: list[str], size: int) -> None:
    nets: list[IPNetwork] = [ip_network(c) for c in cidrs]
    assert pool_size(nets) == size
    assert pool_size(iter(nets)) == size
    assert POOL_SIZE_LIMIT == 9007199254740992


@pytest.mark.parametrize("case", GRANT_CASES, ids=lambda c: c.name)
def test_namespace_grant_twin(case: SelectorCase) -> None:
    namespace = "tenant-a"
    pool = parse_pool(
        _pool({"cidrs": ["192.0.2.1/32"], "namespaceSelector": case.for_namespace(namespace)})
    )
    labels = {**NAMESPACE_LABELS, NAMESPACE_NAME_LABEL: namespace}
    assert pool.namespace_selector.matches(labels) is case.expected


@pytest.mark.parametrize("case", PINNED_CASES, ids=lambda c: c.name)
def test_pinned_selector_twin(case: SelectorCase) -> None:
    namespace = "tenant-a"
    pool = parse_pool(
        _pool({"cidrs": ["192.0.2.1/32"], "namespaceSelector": case.for_namespace(namespace)})
    )
    assert pinned_to_namespace(pool.namespace_selector, namespace) is case.expected
    # A selector pinned to one namespace is pinned to no other.
    assert not pinned_to_namespace(pool.namespace_selector, "other")


def test_admission_messages() -> None:
    assert PoolMessages.namespace_not_granted(
        ip=IPv4Address("198.51.100.201"), pool="tenant-b", namespace="tenant-a"
    ) == (
        "egress IP 198.51.100.201 is in StaticEgressIPPool tenant-b, "
        "which does not grant namespace tenant-a"
    )
    assert PoolMessages.cross_namespace(rule=0, namespace="tenant-a", pool="p") == (
        "rule 0 selects pods beyond namespace tenant-a; StaticEgressIPPool p grants no "
        "cross-namespace selection (spec.podNamespaceSelector)"
    )


def _strip_descriptions(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_descriptions(v) for k, v in schema.items() if k != "description"}
    if isinstance(schema, list):
        return [_strip_descriptions(v) for v in schema]
    return schema


def test_pool_selectors_validate_like_the_static_egress_ip_selectors() -> None:
    egress = manifests.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    pool = manifests.pool_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rule = egress["properties"]["spec"]["properties"]["rules"]["items"]["properties"]
    selector = _strip_descriptions(rule["namespace-selector"])
    spec = pool["properties"]["spec"]["properties"]
    for field in ("namespaceSelector", "nodeSelector", "podNamespaceSelector"):
        assert _strip_descriptions(spec[field]) == selector, field
    # The CIDR rules too, item for item.
    cidr = _strip_descriptions(rule["cidrs"]["items"])
    assert _strip_descriptions(spec["cidrs"]["items"]) == cidr
    # And the conditions of both statuses.
    conditions = egress["properties"]["status"]["properties"]["conditions"]
    pool_conditions = pool["properties"]["status"]["properties"]["conditions"]
    assert _strip_descriptions(pool_conditions) == _strip_descriptions(conditions)


def test_install_covers_every_crd_static_egress_ip_first() -> None:
    names = [c["metadata"]["name"] for c in manifests.crds()]
    assert names == [
        "staticegressips.staticegressips.io",
        "staticegressippools.staticegressips.io",
        "staticegressipmembers.staticegressips.io",
    ]


def test_example_pool_grants_the_seed_its_egress_ip() -> None:
    with open(manifests.deploy_dir() / "examples" / "pool.yaml") as f:
        pool = parse_pool(yaml.safe_load(f))
    with open(manifests.deploy_dir() / "examples" / "seed.yaml") as f:
        seed = yaml.safe_load(f)
    seed["metadata"]["namespace"] = "default"
    (rule,) = parse_static_egress_ip(seed).spec.rules
    (ip,) = rule.egress_ips
    assert pool.holds(ip)
    assert pool.namespace_selector.matches({NAMESPACE_NAME_LABEL: "default"})
    assert not pool.namespace_selector.matches({NAMESPACE_NAME_LABEL: "other"})
    assert pool_size(pool.cidrs) <= 8, "a small range"
