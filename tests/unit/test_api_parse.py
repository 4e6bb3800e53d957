"""The pydantic parser against the shared validation table, plus the internal types."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest
import yaml

from staticegress.api.types import LabelRequirement, LabelSelector
from staticegress.api.v1alpha1 import InvalidSpecError, parse_spec, parse_static_egress_ip
from staticegress.k8s import manifests
from tests.validation_table import INVALID, VALID, Case


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.name)
def test_valid_specs_parse(case: Case) -> None:
    spec = parse_spec(case.spec)
    assert len(spec.rules) == len(case.spec["rules"])
    for rule in spec.rules:
        assert rule.egress_ips
        assert rule.destinations


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.name)
def test_invalid_specs_name_field_and_reason(case: Case) -> None:
    with pytest.raises(InvalidSpecError) as err:
        parse_spec(case.spec)
    assert case.message is not None
    matching = [(f, m) for f, m in err.value.errors if case.message in m]
    assert matching, f"no error says {case.message!r}: {err.value.errors}"
    assert any(f == case.field for f, _ in matching), (
        f"expected field {case.field}, got {err.value.errors}"
    )


def test_table_is_large_enough() -> None:
    # The issue asks for at least 15 malformed objects; keep the table honest.
    assert len(INVALID) >= 15
    assert len({c.name for c in INVALID + VALID}) == len(INVALID) + len(VALID)


def test_seed_example_parses_to_internal_type() -> None:
    with open(manifests.deploy_dir() / "examples" / "seed.yaml") as f:
        obj = yaml.safe_load(f)
    obj["metadata"]["namespace"] = "default"
    parsed = parse_static_egress_ip(obj)
    (rule,) = parsed.spec.rules
    assert str(parsed.ref) == "default/frontend"
    assert rule.egress_ips == (IPv4Address("100.137.146.100"),)
    assert rule.destinations == (IPv4Network("4.2.2.2/32"),)
    assert rule.service_name == "frontend"
    assert rule.pod_selector is None
    assert rule.namespace_selector is None
    assert rule.family == 4


def test_both_forms_parse_into_one_type() -> None:
    old = parse_spec(
        {"rules": [{"egressip": "192.0.2.1", "cidr": "203.0.113.0/24", "service-name": "web"}]}
    )
    new = parse_spec(
        {
            "rules": [
                {"egressips": ["192.0.2.1"], "cidrs": ["203.0.113.0/24"], "service-name": "web"}
            ]
        }
    )
    assert old == new
    assert hash(old) == hash(new)


def test_ipv6_rule_keeps_family() -> None:
    spec = parse_spec(
        {"rules": [{"egressip": "2001:db8::10", "cidr": "2001:db8:1::/48", "service-name": "web"}]}
    )
    assert spec.rules[0].egress_ips == (IPv6Address("2001:db8::10"),)
    assert spec.rules[0].family == 6


def test_selectors_are_normalised_and_match_like_kubernetes() -> None:
    spec = parse_spec(
        {
            "rules": [
                {
                    "egressip": "192.0.2.1",
                    "cidr": "203.0.113.0/24",
                    "pod-selector": {
                        "matchLabels": {"b": "2", "a": "1"},
                        "matchExpressions": [
                            {"key": "t", "operator": "NotIn", "values": ["canary"]}
                        ],
                    },
                }
            ]
        }
    )
    sel = spec.rules[0].pod_selector
    assert sel == LabelSelector(
        match_labels=(("a", "1"), ("b", "2")),
        match_expressions=(LabelRequirement("t", "NotIn", ("canary",)),),
    )
    assert sel.matches({"a": "1", "b": "2"})
    assert sel.matches({"a": "1", "b": "2", "t": "stable"})
    assert not sel.matches({"a": "1", "b": "2", "t": "canary"})
    assert not sel.matches({"a": "1"})
    assert LabelSelector().matches({})


@pytest.mark.parametrize(
    ("req", "labels", "expected"),
    [
        (LabelRequirement("k", "In", ("v",)), {"k": "v"}, True),
        (LabelRequirement("k", "In", ("v",)), {}, False),
        (LabelRequirement("k", "NotIn", ("v",)), {}, True),
        (LabelRequirement("k", "Exists"), {"k": ""}, True),
        (LabelRequirement("k", "Exists"), {}, False),
        (LabelRequirement("k", "DoesNotExist"), {"k": "x"}, False),
    ],
)
def test_label_requirement_semantics(
    req: LabelRequirement, labels: dict[str, str], expected: bool
) -> None:
    assert req.matches(labels) is expected


def test_wrong_kind_is_rejected() -> None:
    with pytest.raises(InvalidSpecError, match="apiVersion"):
        parse_static_egress_ip({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}})


def test_unreadable_status_counts_as_none_written() -> None:
    obj = {
        "metadata": {"namespace": "n", "name": "x"},
        "spec": {
            "rules": [{"egressip": "192.0.2.1", "cidr": "203.0.113.0/24", "service-name": "web"}]
        },
        "status": {"egressIPs": [{"egressIP": "not-an-ip"}]},
    }
    assert parse_static_egress_ip(obj).status.egress_ips == ()
