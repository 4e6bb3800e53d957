"""The new-pod hold (which destinations, and when none) and ending pods (deleted
or finished pods stay known and steered until their object is gone)."""

from __future__ import annotations

import copy
import dataclasses
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from staticegress.api.core import endpoint_slice_addresses, parse_pod
from staticegress.model.desired import DesiredState, compute_desired
from tests import scenario


def _pod(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"namespace": "default", "name": "p", "labels": {"app": "frontend"}},
        "spec": {"nodeName": "node-1"},
        "status": {"phase": "Running", "podIP": "10.244.1.2", "podIPs": [{"ip": "10.244.1.2"}]},
    }
    for path, value in over.items():
        section, key = path.split("__")
        obj[section][key] = value
    return obj


SANDBOX_GONE = [{"type": "PodReadyToStartContainers", "status": "False"}]


def test_ending_pods_parse_until_their_sandbox_is_gone() -> None:
    deleting = parse_pod(_pod(metadata__deletionTimestamp="2026-11-01T00:00:00Z"))
    assert deleting is not None
    assert (deleting.terminating, deleting.finished, deleting.ip) == (
        True,
        False,
        IPv4Address("10.244.1.2"),
    )
    for phase in ("Succeeded", "Failed"):
        done = parse_pod(_pod(status__phase=phase))
        assert done is not None
        assert done.finished
        assert done.ending
        assert parse_pod(_pod(status__phase=phase, status__conditions=SANDBOX_GONE)) is None
    gone = _pod(metadata__deletionTimestamp="2026-11-01T00:00:00Z", status__conditions=SANDBOX_GONE)
    assert parse_pod(gone) is None
    # A live pod whose sandbox is being recreated is still a live pod.
    live = parse_pod(_pod(status__conditions=SANDBOX_GONE))
    assert live is not None
    assert not live.ending


def test_terminating_endpoints_still_count() -> None:
    sl = {
        "metadata": {"namespace": "default", "labels": {"kubernetes.io/service-name": "s"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.244.1.2"], "conditions": {"ready": True}},
            {"addresses": ["10.244.1.3"], "conditions": {"ready": False, "terminating": True}},
        ],
    }
    assert endpoint_slice_addresses(sl) == (
        ("default", "s"),
        (IPv4Address("10.244.1.2"), IPv4Address("10.244.1.3")),
    )


def _mixed(**pod_changes: dict[str, Any]) -> DesiredState:
    """The mixed scenario on node-1, with some pods' raw objects changed."""
    data = scenario.load("mixed")
    snap = scenario.snapshot(data)
    pods = []
    for p in snap.pods:
        if p.name in pod_changes:
            p = dataclasses.replace(p, **pod_changes[p.name])
        pods.append(p)
    return compute_desired(dataclasses.replace(snap, pods=tuple(pods)), scenario.config(data))


def test_ending_pods_stay_known_and_steered() -> None:
    base = _mixed()
    for change in (
        {"terminating": True},
        {"finished": True},
        {"terminating": True, "finished": True},
    ):
        ending = _mixed(**{"fe-1": change, "bill-2": change, "bill-1": change})
        assert ending == base, f"{change}: an ending pod lost its steering, SNAT or hold entry"
        assert IPv4Address("10.244.1.2") in ending.known_local_pods


def test_a_live_pod_takes_over_an_ending_pods_address() -> None:
    data = scenario.load("mixed")
    # other-1 (unselected) finished; its address now belongs to a new frontend pod.
    data["pods"] = [p for p in data["pods"] if p["name"] != "fe-1"]
    data["pods"].append(
        {
            "namespace": "default",
            "name": "fe-new",
            "node": "node-1",
            "ip": "10.244.1.3",
            "labels": {"app": "frontend"},
        }
    )
    snap = scenario.snapshot(data)
    pods = tuple(
        dataclasses.replace(p, finished=True) if p.name == "other-1" else p for p in snap.pods
    )
    desired = compute_desired(dataclasses.replace(snap, pods=pods), scenario.config(data))
    steer = {r.name: dict(r.steer) for r in desired.rules}
    assert steer["default/frontend#0"] == {IPv4Address("10.244.1.3"): 1}
    assert IPv4Address("10.244.1.3") not in steer["default/thief#0"], "the finished pod's rule"
    # And the other way round: a live unselected pod on a finished selected pod's address.
    pods = tuple(
        dataclasses.replace(p, finished=True) if p.name == "fe-new" else p for p in snap.pods
    )
    desired = compute_desired(dataclasses.replace(snap, pods=pods), scenario.config(data))
    steer = {r.name: dict(r.steer) for r in desired.rules}
    assert IPv4Address("10.244.1.3") not in steer["default/frontend#0"]


def _only(data: dict[str, Any], *names: str) -> dict[str, Any]:
    data = copy.deepcopy(data)
    data["staticegressips"] = [o for o in data["staticegressips"] if o["metadata"]["name"] in names]
    return data


def _held(data: dict[str, Any], **snap_changes: Any) -> list[str]:
    snap = dataclasses.replace(scenario.snapshot(data), **snap_changes)
    desired = compute_desired(snap, scenario.config(data))
    if not desired.held_destinations:
        assert desired.known_local_pods == ()
        assert desired.local_pod_ranges == ()
    return [str(n) for n in desired.held_destinations]


def test_held_destinations_are_the_selecting_rules_minus_their_exclusions() -> None:
    mixed = scenario.load("mixed")
    assert _held(mixed) == ["0.0.0.0/0"]  # nogw's pod selector covers everything
    assert _held(_only(mixed, "billing")) == ["192.0.2.0/24", "203.0.113.0/25"]
    assert _held(_only(mixed, "frontend")) == ["203.0.113.10/32"]  # Service with a selector
    assert _held(_only(mixed)) == [], "no rule: no hold"


def test_no_hold_for_rules_that_cannot_select_a_pod_not_seen_yet() -> None:
    mixed = scenario.load("mixed")
    data = _only(mixed, "frontend")
    data["services"] = []
    assert _held(data) == [], "a Service that does not exist selects nothing"
    # A Service without a selector selects the pods at its endpoints.
    data["services"] = [{"namespace": "default", "name": "frontend", "selector": None}]
    known = (("default", "frontend"), (IPv4Address("10.244.1.2"), IPv4Address("10.244.3.7")))
    assert _held(data, endpoints=(known,)) == [], "every local endpoint is a known pod"
    unknown = (("default", "frontend"), (IPv4Address("10.244.1.77"),))
    assert _held(data, endpoints=(unknown,)) == ["203.0.113.10/32"]
    elsewhere = (("default", "frontend"), (IPv4Address("10.244.2.77"),))
    assert _held(data, endpoints=(elsewhere,)) == [], "an endpoint on another node"


def test_no_hold_without_a_pod_range() -> None:
    data = scenario.load("mixed")
    for n in data["nodes"]:
        if n["name"] == "node-1":
            del n["podCIDR"]
    assert _held(data) == []


def test_hold_set_shape_is_unchanged_for_golden_scenario() -> None:
    data = scenario.load("mixed")
    desired = compute_desired(scenario.snapshot(data), scenario.config(data))
    assert desired.local_pod_ranges == (IPv4Network("10.244.1.0/24"),)
    assert [str(a) for a in desired.known_local_pods] == [
        "10.244.1.2",
        "10.244.1.3",
        "10.244.1.4",
        "10.244.1.9",
    ]
