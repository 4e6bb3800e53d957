"""One object's fault stays with that object, on the lab with the real managers, in both
CNI modes.

The reproduction: `a/x` lists one egress IP in two rules (same IP, two
destinations: a legitimate spec). Its status once held one entry per (rule,
IP), which the API server refused (422 Duplicate value), and that failure
stopped the manager's whole sync: `b/other`, created next, got no gateway and
its pods' traffic was dropped. Here `a/x` gets one entry for its IP, and
`b/other` gets its gateway within a second of creation while `a/x` is
present, and its selected pod reaches the external server with its egress IP.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from kubernetes_asyncio import client

from e2e.labkit import Lab, spread_deployment, wait_for
from e2e.test_agent import target
from staticegress.api.v1alpha1 import API_VERSION, GROUP, KIND, PLURAL, VERSION
from staticegress.k8s.client import api_client

pytestmark = pytest.mark.lab

SHARED = "198.51.100.210"
OTHER = "198.51.100.211"
SERVER = "203.0.113.10"
SECOND = "203.0.113.20"


def _segip(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {"rules": rules},
    }


def _status(lab: Lab, ns: str, name: str) -> dict[str, Any]:
    return dict(lab.get("staticegressip", "-n", ns, name).get("status") or {})


def _ready_pods(lab: Lab, ns: str) -> list[dict[str, Any]] | None:
    pods = lab.get("pods", "-n", ns, "-l", "app=client")["items"]
    ready = [
        p
        for p in pods
        if p["status"].get("podIP")
        and any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p["status"].get("conditions", [])
        )
    ]
    return ready if len(ready) == 3 and len(pods) == 3 else None


async def _create_and_time_gateway(lab: Lab, ns: str, body: dict[str, Any]) -> tuple[float, str]:
    """Create `body` in `ns`; seconds until its status names a gateway, and that gateway."""
    api = await api_client(lab.kubeconfig)
    try:
        objects = client.CustomObjectsApi(api)
        name = body["metadata"]["name"]
        start = time.monotonic()
        await objects.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
        while time.monotonic() - start < 10:
            obj = await objects.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            entries = (obj.get("status") or {}).get("egressIPs") or []
            if entries and all(e.get("gateway") for e in entries):
                return time.monotonic() - start, str(entries[0]["gateway"])
            await asyncio.sleep(0.01)
        raise AssertionError(f"{ns}/{name} got no gateway within 10 s: {obj.get('status')}")
    finally:
        await api.close()


def test_shared_egress_ip_does_not_hold_up_another_objects_gateway(lab: Lab) -> None:
    for ns in ("a", "b"):
        lab.kubectl("create", "namespace", ns, check=False)
    lab.kubectl("apply", "-n", "b", "-f", "-", stdin=spread_deployment("client", 3))
    pods = wait_for("b's three client pods", lambda: _ready_pods(lab, "b"), seconds=90)

    # a/x: one egress IP, two rules. Its status must be written, with one entry.
    x = _segip(
        "x",
        [
            {
                "egressip": SHARED,
                "cidr": f"{SERVER}/32",
                "pod-selector": {"matchLabels": {"app": "nobody"}},
            },
            {
                "egressip": SHARED,
                "cidr": f"{SECOND}/32",
                "pod-selector": {"matchLabels": {"app": "nobody"}},
            },
        ],
    )
    lab.kubectl("apply", "-n", "a", "-f", "-", stdin=json.dumps(x))
    status = wait_for(
        "a/x's status",
        lambda: _status(lab, "a", "x").get("egressIPs") and _status(lab, "a", "x"),
        seconds=10,
        every=0.1,
    )
    (entry,) = status["egressIPs"]
    assert entry["egressIP"] == SHARED
    assert entry["rules"] == [0, 1]
    assert entry.get("gateway"), entry

    # b/other, created while a/x is present: its gateway within a second.
    other = _segip(
        "other",
        [
            {
                "egressip": OTHER,
                "cidr": f"{SERVER}/32",
                "pod-selector": {"matchLabels": {"app": "client"}},
            }
        ],
    )
    took, gateway = asyncio.run(_create_and_time_gateway(lab, "b", other))
    print(f"\nb/other gateway ({lab.cni}): {gateway} after {took * 1000:.0f} ms (a/x present)")
    assert took < 1.0, f"b/other waited {took:.2f}s for its gateway"

    # Its pods leave with its egress IP, including one that must be steered
    # from its own node to the gateway.
    remote = next(p for p in pods if p["spec"]["nodeName"] != gateway)
    for pod in (remote, *pods):
        wait_for(
            f"{target(pod)} -> {SERVER} seen as {OTHER}",
            lambda pod=pod: lab.http_source(target(pod), SERVER) == OTHER,
            seconds=20,
        )
    # a/x is still fine, and still has one entry.
    (entry,) = _status(lab, "a", "x")["egressIPs"]
    assert entry["egressIP"] == SHARED
    lab.kubectl("delete", "staticegressip", "-n", "a", "x")
    lab.kubectl("delete", "staticegressip", "-n", "b", "other")
    lab.kubectl("delete", "deployment", "-n", "b", "client")
