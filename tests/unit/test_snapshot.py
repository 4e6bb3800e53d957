"""The parsing edge: invalid StaticEgressIPs are reported, never raised, and the
parse cache re-parses only objects whose resourceVersion changed."""

from __future__ import annotations

from typing import Any

from staticegress.api.types import EgressIPRef, StaticEgressIP
from staticegress.k8s.snapshot import Invalid, ParseCache, parse_policy


def _obj(egressip: str, rv: str = "1") -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": "x", "generation": 4, "resourceVersion": rv},
        "spec": {
            "rules": [{"egressip": egressip, "service-name": "web", "cidr": "203.0.113.0/24"}]
        },
    }


def test_invalid_policy_names_the_object_and_the_field() -> None:
    bad = parse_policy(_obj("127.0.0.1"))
    assert isinstance(bad, Invalid)
    assert bad.ref == EgressIPRef("ns", "x")
    assert bad.generation == 4
    assert bad.error.startswith("spec.rules[0].egressip: must be a unicast address")
    assert isinstance(parse_policy(_obj("192.0.2.1")), StaticEgressIP)


def test_parse_cache_reuses_unchanged_objects() -> None:
    calls: list[str] = []

    def parse(obj: dict[str, Any]) -> str:
        calls.append(obj["metadata"]["resourceVersion"])
        return obj["metadata"]["resourceVersion"]

    cache = ParseCache()
    assert cache.parse_all("k", {"ns/x": _obj("192.0.2.1", "1")}, parse) == ["1"]
    assert cache.parse_all("k", {"ns/x": _obj("192.0.2.1", "1")}, parse) == ["1"]
    assert cache.parse_all("k", {"ns/x": _obj("192.0.2.1", "2")}, parse) == ["2"]
    assert calls == ["1", "2"]
