"""Build model snapshots from compact YAML scenarios (tests/cases/model/*.yaml).

The compact form is expanded into the raw objects the API server would send,
so the parsing edge (`build_snapshot`) is exercised too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from staticegress.api.types import NodeName
from staticegress.k8s.snapshot import build_snapshot
from staticegress.model.desired import AgentConfig, Snapshot

CASES = Path(__file__).parent / "cases" / "model"


def _node(n: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "Node",
        "metadata": {"name": n["name"], "labels": n.get("labels", {})},
        "spec": {"podCIDR": n.get("podCIDR")},
        "status": {"addresses": [{"type": "InternalIP", "address": n["ip"]}]},
    }


def _pod(p: dict[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running"}
    if p.get("ip"):
        status.update(podIP=p["ip"], podIPs=[{"ip": p["ip"]}])
    return {
        "kind": "Pod",
        "metadata": {"namespace": p["namespace"], "name": p["name"], "labels": p.get("labels", {})},
        "spec": {"nodeName": p.get("node"), "hostNetwork": p.get("hostNetwork", False)},
        "status": status,
    }


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CASES / f"{name}.yaml").read_text())
    return data


def snapshot(data: dict[str, Any]) -> Snapshot:
    policies = {}
    for obj in data.get("staticegressips", []):
        obj = {
            "apiVersion": "staticegressips.io/v1alpha1",
            "kind": "StaticEgressIP",
            "metadata": {"generation": 1, **obj["metadata"]},
            **{k: v for k, v in obj.items() if k != "metadata"},
        }
        policies[f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"] = obj
    snap, invalid = build_snapshot(
        policies=policies,
        pods={str(i): _pod(p) for i, p in enumerate(data.get("pods", []))},
        nodes={n["name"]: _node(n) for n in data.get("nodes", [])},
        services={
            f"{s['namespace']}/{s['name']}": {
                "metadata": {"namespace": s["namespace"], "name": s["name"]},
                "spec": {"selector": s.get("selector")},
            }
            for s in data.get("services", [])
        },
        namespaces={
            n["name"]: {"metadata": {"name": n["name"], "labels": n.get("labels", {})}}
            for n in data.get("namespaces", [])
        },
        slices={},
    )
    assert not invalid, invalid
    return snap


def config(data: dict[str, Any], transport: str = "direct") -> AgentConfig:
    return AgentConfig(node=NodeName(data["node"]), transport=transport)  # type: ignore[arg-type]


def _policy(name: str, second: int, rules: list[dict[str, Any]], gateway: str) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "default",
            "name": name,
            "creationTimestamp": f"2026-11-01T00:00:{second:02d}Z",
            "uid": name,
        },
        "spec": {"rules": rules},
        "status": {
            "egressIPs": [
                {"egressIP": r["egressip"], "gateway": gateway} for r in rules if "egressip" in r
            ]
        },
    }


def overlapping(node: str) -> tuple[Snapshot, AgentConfig]:
    """app=web on node-1 (10.244.1.2) and on node-3 (10.244.3.2): an older rule
    via node-2 for 203.0.113.0/24 less .128/25, a younger one here (node-1)
    for all of 203.0.113.0/24 and 192.0.2.0/24."""
    data: dict[str, Any] = {
        "node": node,
        "nodes": [
            {"name": f"node-{i}", "ip": f"198.51.100.1{i}", "podCIDR": f"10.244.{i}.0/24"}
            for i in (1, 2, 3)
        ],
        "namespaces": [{"name": "default"}],
        "pods": [
            {
                "namespace": "default",
                "name": f"web-{i}",
                "node": f"node-{i}",
                "ip": f"10.244.{i}.2",
                "labels": {"app": "web"},
            }
            for i in (1, 3)
        ],
        "staticegressips": [
            _policy(
                "older",
                1,
                [
                    {
                        "egressip": "198.51.100.200",
                        "pod-selector": {"matchLabels": {"app": "web"}},
                        "cidr": "203.0.113.0/24",
                        "excluded-cidrs": ["203.0.113.128/25"],
                    }
                ],
                "node-2",
            ),
            _policy(
                "younger",
                2,
                [
                    {
                        "egressip": "198.51.100.201",
                        "pod-selector": {"matchLabels": {"app": "web"}},
                        "cidrs": ["203.0.113.0/24", "192.0.2.0/24"],
                    }
                ],
                "node-1",
            ),
        ],
    }
    return snapshot(data), config(data)
