"""gateway_candidates: the nodes the manager probes are exactly those that could
become gateways."""

from __future__ import annotations

from typing import Any

from staticegress.api.core import parse_node
from staticegress.api.v1alpha1 import parse_static_egress_ip
from staticegress.model.assign import gateway_candidates


def _node(name: str, **labels: str) -> Any:
    return parse_node(
        {
            "metadata": {"name": name, "labels": labels},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.51.100.10"}]},
        }
    )


def _pol(name: str, **rule: Any) -> Any:
    return parse_static_egress_ip(
        {
            "metadata": {"namespace": "ns", "name": name, "generation": 1},
            "spec": {
                "rules": [
                    {"egressip": "198.51.100.200", "cidr": "203.0.113.0/24", "pod-selector": {}}
                    | rule
                ]
            },
        }
    )


NODES = [
    _node("plain"),
    _node("labelled", **{"staticegress.io/gateway": "true"}),
    _node("edge-a", role="edge"),
    _node("edge-b", role="edge"),
]


def test_default_label_only_without_selectors() -> None:
    assert gateway_candidates([], nodes=NODES) == {"labelled"}
    assert gateway_candidates([_pol("a")], nodes=NODES) == {"labelled"}


def test_selector_rules_add_their_nodes() -> None:
    pol = _pol("edge", **{"gateway-selector": {"matchLabels": {"role": "edge"}}})
    assert gateway_candidates([pol, _pol("a")], nodes=NODES) == {"labelled", "edge-a", "edge-b"}


def test_a_custom_default_label() -> None:
    assert gateway_candidates([], nodes=NODES, default_label=("role", "edge")) == {
        "edge-a",
        "edge-b",
    }
