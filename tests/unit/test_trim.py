"""Trimmed objects parse exactly like the full ones, and are much smaller."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from staticegress.api.core import (
    endpoint_slice_addresses,
    parse_namespace,
    parse_node,
    parse_pod,
    parse_service,
)
from staticegress.api.pools import parse_pool
from staticegress.api.v1alpha1 import parse_static_egress_ip
from staticegress.k8s.trim import (
    trim_endpoint_slice,
    trim_namespace,
    trim_node,
    trim_pod,
    trim_pool,
    trim_service,
    trim_static_egress_ip,
)

_MANAGED = [
    {
        "manager": "kubelet",
        "operation": "Update",
        "apiVersion": "v1",
        "time": "2026-11-01T00:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": {f"f:status{i}": {"f:conditions": {}, "f:podIPs": {}} for i in range(20)},
    }
    for _ in range(3)
]


def pod(**over: Any) -> dict[str, Any]:
    """A pod as a Deployment makes it, with its status as kubelet writes it."""
    obj: dict[str, Any] = {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": "web-7d9c-abcde",
            "namespace": "shop",
            "uid": "0b0e2c1e",
            "resourceVersion": "4711",
            "creationTimestamp": "2026-11-01T00:00:00Z",
            "labels": {"app": "web", "pod-template-hash": "7d9c"},
            "annotations": {"checksum/config": "x" * 64},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d9c", "uid": "r"}],
            "managedFields": _MANAGED,
        },
        "spec": {
            "nodeName": "node-7",
            "hostNetwork": False,
            "containers": [
                {
                    "name": f"c{i}",
                    "image": "registry.example/web:1.2.3",
                    "env": [{"name": f"E{j}", "value": "v" * 30} for j in range(20)],
                    "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
                    "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}],
                }
                for i in range(3)
            ],
            "volumes": [{"name": "cfg", "configMap": {"name": "web"}}],
            "tolerations": [{"key": "k", "operator": "Exists"}],
        },
        "status": {
            "phase": "Running",
            "hostIP": "198.51.100.17",
            "podIP": "10.244.7.9",
            "podIPs": [{"ip": "10.244.7.9"}, {"ip": "2001:db8:244:7::9"}],
            "startTime": "2026-11-01T00:00:01Z",
            "conditions": [
                {
                    "type": t,
                    "status": "True",
                    "lastProbeTime": None,
                    "lastTransitionTime": "2026-11-01T00:00:02Z",
                    "message": "m" * 40,
                }
                for t in ("PodReadyToStartContainers", "Initialized", "Ready", "PodScheduled")
            ],
            "containerStatuses": [
                {
                    "name": f"c{i}",
                    "image": "registry.example/web:1.2.3",
                    "imageID": "registry.example/web@sha256:" + "a" * 64,
                    "containerID": "containerd://" + "b" * 64,
                    "ready": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": "2026-11-01T00:00:03Z"}},
                }
                for i in range(3)
            ],
        },
    }
    for path, value in over.items():
        section, key = path.split("__")
        obj[section][key] = value
    return obj


def node() -> dict[str, Any]:
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": "node-7",
            "uid": "n7",
            "resourceVersion": "9",
            "labels": {"kubernetes.io/hostname": "node-7", "staticegress.io/gateway": "true"},
            "annotations": {"a": "b" * 200},
            "managedFields": _MANAGED,
        },
        "spec": {"podCIDR": "10.244.7.0/24", "podCIDRs": ["10.244.7.0/24", "2001:db8:244:7::/64"]},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": "198.51.100.17"},
                {"type": "ExternalIP", "address": "203.0.113.77"},
                {"type": "Hostname", "address": "node-7"},
            ],
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "ok"}
            ],
            "images": [{"names": [f"registry.example/i{i}@sha256:{'c' * 64}"]} for i in range(50)],
            "nodeInfo": {"kubeletVersion": "v1.36.3", "bootID": "b"},
            "allocatable": {"cpu": "8"},
        },
    }


def service(selector: dict[str, str] | None) -> dict[str, Any]:
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": "web", "namespace": "shop", "uid": "s", "managedFields": _MANAGED},
        "spec": {
            "selector": selector,
            "ports": [{"port": 80}],
            "clusterIP": "10.96.0.7",
            "externalIPs": ["192.0.2.50"],
            "loadBalancerIP": "192.0.2.51",
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.52", "ipMode": "VIP"}]}},
    }


def endpoint_slice() -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": "web-x1",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "web"},
            "managedFields": _MANAGED,
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [f"10.244.7.{i}"],
                "conditions": {"ready": True},
                "nodeName": "node-7",
                "targetRef": {"kind": "Pod", "name": f"web-{i}"},
            }
            for i in range(10)
        ],
        "ports": [{"port": 8080}],
    }


def namespace() -> dict[str, Any]:
    return {
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {"name": "shop", "labels": {"team": "shop"}, "managedFields": _MANAGED},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


_ending = {"type": "PodReadyToStartContainers", "status": "False"}

CASES = [
    ("pod", pod(), trim_pod, parse_pod),
    ("host-network pod", pod(spec__hostNetwork=True), trim_pod, parse_pod),
    (
        "terminating pod, sandbox gone",
        pod(metadata__deletionTimestamp="2026-11-02T00:00:00Z", status__conditions=[_ending]),
        trim_pod,
        parse_pod,
    ),
    ("finished pod", pod(status__phase="Succeeded"), trim_pod, parse_pod),
    ("node", node(), trim_node, parse_node),
    ("service", service({"app": "web"}), trim_service, parse_service),
    ("service without selector", service(None), trim_service, parse_service),
    ("endpoint slice", endpoint_slice(), trim_endpoint_slice, endpoint_slice_addresses),
    ("namespace", namespace(), trim_namespace, parse_namespace),
    # Kubelets that do not write PodReadyToStartContainers: the sandbox's
    # report is read from the containers' start times.
    (
        "pod without the sandbox condition",
        pod(status__conditions=[{"type": "Ready", "status": "True"}]),
        trim_pod,
        parse_pod,
    ),
]


@pytest.mark.parametrize(("what", "obj", "trim", "parse"), CASES, ids=[c[0] for c in CASES])
def test_a_trimmed_object_parses_like_the_full_one(
    what: str, obj: Any, trim: Any, parse: Any
) -> None:
    full = copy.deepcopy(obj)
    trimmed = trim(obj)
    assert obj == full, "trimming changed its input"
    assert parse(trimmed) == parse(full)
    assert parse(full) is not None or what.startswith("terminating")
    assert trimmed["metadata"]["name"] == full["metadata"]["name"]


@pytest.mark.parametrize(("what", "obj", "trim", "parse"), CASES[:1] + CASES[4:5])
def test_what_is_kept_is_a_small_part(what: str, obj: Any, trim: Any, parse: Any) -> None:
    full, kept = len(json.dumps(obj)), len(json.dumps(trim(obj)))
    assert kept * 10 < full, (what, kept, full)


def test_the_node_keeps_what_the_manager_reads() -> None:
    kept = trim_node(node())
    assert kept["status"]["conditions"] == [{"type": "Ready", "status": "True"}]
    assert kept["metadata"]["uid"] == "n7"  # Events name their Node by uid


def static_egress_ip() -> dict[str, Any]:
    return {
        "kind": "StaticEgressIP",
        "apiVersion": "staticegressips.io/v1alpha1",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "uid": "u1",
            "generation": 3,
            "resourceVersion": "77",
            "creationTimestamp": "2026-11-01T00:00:00Z",
            "managedFields": _MANAGED,
        },
        "spec": {
            "rules": [{"egressip": "198.51.100.10", "service-name": "web", "cidr": "192.0.2.0/24"}]
        },
        "status": {
            "observedGeneration": 3,
            "egressIPs": [
                {
                    "egressIP": "198.51.100.10",
                    "rule": 0,
                    "gateway": "node-2",
                    "since": "2026-11-01T00:00:01Z",
                    "standbys": ["node-3"],
                }
            ],
            "conditions": [
                {
                    "type": "Programmed",
                    "status": "True",
                    "reason": "Programmed",
                    "message": "every node",
                    "lastTransitionTime": "2026-11-01T00:00:02Z",
                }
            ],
        },
    }


def test_an_agent_keeps_a_static_egress_ips_spec_and_gateways_not_its_conditions() -> None:
    full = static_egress_ip()
    whole, kept = parse_static_egress_ip(full), parse_static_egress_ip(trim_static_egress_ip(full))
    assert whole.status.conditions, "the sample must carry conditions"
    assert kept.spec == whole.spec
    assert (kept.ref, kept.uid, kept.generation, kept.created) == (
        whole.ref,
        whole.uid,
        whole.generation,
        whole.created,
    )
    assert kept.status.egress_ips == whole.status.egress_ips
    assert kept.status.conditions == ()


def test_a_pool_keeps_its_spec() -> None:
    full = {
        "kind": "StaticEgressIPPool",
        "apiVersion": "staticegressips.io/v1alpha1",
        "metadata": {"name": "lab", "uid": "p1", "managedFields": _MANAGED},
        "spec": {"cidrs": ["198.51.100.0/24"], "namespaceSelector": {}},
        "status": {"conditions": [{"type": "Valid", "status": "True"}]},
    }
    assert parse_pool(trim_pool(full)) == parse_pool(full)
    assert "status" not in trim_pool(full)
