"""Benchmark: the agent's memory and CPU on its watch side, with realistic objects.

What it measures. For each cluster size (10,000 and 50,000 pods by default,
side by side in one run) and each way the agent can learn the selection
(`--selection published`, the deployed default: its own node's Pods plus the
manager's published StaticEgressIPMembers; `--selection local`: every Pod and
EndpointSlice of the cluster; a product without the option runs `local`
only), one node agent in a child process of its own, so that its RSS holds
nothing of the benchmark's. The child runs the product's `Agent` as it is:
its own client and reflectors list and watch what the agent watches, and
its sync (snapshot, desired state, render) runs with the `Agent`'s
injectable stand-ins for nftables, netlink, conntrack, ARP and the boot time,
as the unit tests do, so no kernel is touched; nothing of `Agent.run` that
needs a real node (uplink discovery, transport record, sysctls, health
server, grants) runs. Printed per size and selection:

- RSS after the imports (the interpreter, the libraries, an idle `Agent`),
  after every reflector has listed, after the first sync and at the end
  (`VmRSS`); the peak (`VmHWM`) by the end of the lists and overall;
- CPU of the lists, of the first sync (every object parsed) and of a forced
  resync (the periodic one: the parse cache warm), as process time;
- CPU per pod event: N pods anywhere in the cluster (default 1,000) change
  their status (an app container restart, as the kubelet writes it), then
  N others flip a label that rules select on (`track: stable` <->
  `canary`, which also rewrites the published objects that list them, as
  the manager would); the child's process time from just before the first
  write until the sync after the last event has finished, divided by the
  events; and one lone event, which costs one whole sync. The last write of
  every round changes a label on a sentinel pod of the measured node; the
  watch delivers in order, so once the agent's store shows it, every event
  of the round has arrived (it reaches an agent that watches only its own
  node too), and the round ends when the agent's sync runner has nothing
  pending.

The target beside it (from the issue): a director's RSS under 150 MB at
50,000 pods with 100 of them local; `--breakdown` adds the deep size of
each reflector's store, of the parse cache and of the applied desired state
(measured after the figures above, so it does not change them).

The cluster. `pods / 100` nodes (100 at 10,000 pods, 500 at 50,000), the
measured node `node-0` with exactly 100 pods and the others sharing the
rest; Deployments of 10 replicas in namespaces of 20 Deployments, each with
its Service and EndpointSlice. Pods look like a real Deployment's: an app
container with image, command, ports, env (plain, fieldRef, secretKeyRef,
envFrom), resources, liveness and readiness probes, volume mounts and a
security context, and in one Deployment in three a mesh proxy container and
an init container; volumes (the projected service-account token among
them), tolerations, `managedFields` of the controller and of the kubelet,
owner references, labels and annotations; a full status (conditions,
container statuses with imageIDs and containerIDs, podIPs, hostIPs,
startTime): about 11 KB of JSON on average (10 KB without the mesh, 14 KB
with it). Nodes carry 40 images, capacity, allocatable, conditions,
nodeInfo and runtime handlers (about 12 KB each). 100 rules in 20
StaticEgressIPs (by Service, by pod selector with a `track NotIn [canary]`
expression, and every tenth by namespace and pod selector across
namespaces), their egress IPs on 10 gateway nodes, node-0 among them, each
gateway named by the status (the agent runs `--ownership status-only`, so
no grants are needed). The manager's published selection is computed in the
benchmark's own process with the product's functions (`select_members`,
`render_member_shards`), as the manager computes it.

Where the objects come from. By default from a small HTTP server in the
benchmark's process that speaks the API server's list and watch protocol
for these kinds: lists as the API server writes them (no kind on items),
cluster-wide or in one namespace, equality label selectors, the field
selectors the agent uses, `limit`/`continue` paging; watches that replay
from their `resourceVersion`, bookmarks, `sendInitialEvents`. It refuses
any other path, selector or verb (listed at the end of the run), so a change
in what the agent asks for shows up as an error, not as a wrong figure. A
real kube-apiserver is not the default because creating the objects takes
longer than the whole benchmark should: on this project's 2-core machines
the local control plane takes about 550 pod creates and 400 pod status
writes per second with 32 in flight (far fewer when the machine is shared),
so 50,000 pods with their status take 3.5 minutes or more before anything is
measured, and etcd and the API server then share the two cores with the
agent being measured. `--apiserver` runs the same benchmark against a real
kube-apiserver started by the product's control-plane helpers, a fresh one
per size (objects created 32 at a time, statuses through the status
subresource, managedFields written by the API server itself); use it with
smaller sizes, e.g. `--apiserver --pods 2000,5000`. Either way the agent
runs unchanged, through its own client and reflectors, so whatever the
product does (paged lists, trimmed stored objects, a narrower watch) is what
is measured.

    python bench/agent_memory.py [--pods 10000,50000] [--pods-per-node 100]
        [--local 100] [--rules 100] [--events 1000]
        [--selection published,local] [--breakdown] [--apiserver]
        [--agent-log FILE]

The default run takes about 2.5 minutes on 2 cores (the `local` agent at
50,000 pods is most of it); `--breakdown` adds a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import gc
import inspect
import json
import logging
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from aiohttp import web

Json = dict[str, Any]

TARGET_MB = 150.0
"""The issue's target: a director's RSS at 50,000 pods with 100 of them local."""
TARGET_PODS = 50_000
SCRIPT = str(Path(__file__).resolve())
NODE = "node-0"
GATEWAYS = 10
REPLICAS = 10
DEPLOYS_PER_NAMESPACE = 20
RULES_PER_OBJECT = 5
SENTINEL_LABEL = "bench-round"
ROUND_TIMEOUT = 120.0
_BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)


def _at(seconds: int) -> str:
    """A time `seconds` after everything was created, as the API server writes it."""
    return (_BASE + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


T0 = _at(0)
"""Creation time of everything (two hours ago); statuses are a little later."""
BOOT_TIME = int(_BASE.timestamp()) - 86_400
"""The measured node's boot, a day before its pods' sandboxes started (the
agent trusts a local pod's address only if kubelet reported it since)."""

# ------------------------------------------------------------------ the cluster

GROUP, VERSION = "staticegressips.io", "v1alpha1"
AGENT_NAMESPACE = "staticegress-system"
"""Where the manager publishes its selection (the agents' default namespace)."""


@dataclass(frozen=True)
class Kind:
    """One list endpoint the agent watches."""

    name: str
    path: str
    list_kind: str
    api_version: str


KINDS = (
    Kind("pods", "/api/v1/pods", "PodList", "v1"),
    Kind("nodes", "/api/v1/nodes", "NodeList", "v1"),
    Kind("services", "/api/v1/services", "ServiceList", "v1"),
    Kind("namespaces", "/api/v1/namespaces", "NamespaceList", "v1"),
    Kind(
        "endpointslices",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSliceList",
        "discovery.k8s.io/v1",
    ),
    Kind(
        "staticegressips",
        "/apis/staticegressips.io/v1alpha1/staticegressips",
        "StaticEgressIPList",
        "staticegressips.io/v1alpha1",
    ),
    Kind(
        "staticegressippools",
        "/apis/staticegressips.io/v1alpha1/staticegressippools",
        "StaticEgressIPPoolList",
        "staticegressips.io/v1alpha1",
    ),
    Kind(
        "staticegressipmembers",
        "/apis/staticegressips.io/v1alpha1/staticegressipmembers",
        "StaticEgressIPMembersList",
        "staticegressips.io/v1alpha1",
    ),
)


class Item(NamedTuple):
    """One stored object: its key, its JSON (no resourceVersion yet), and what
    label and field selectors look at."""

    key: str
    data: bytes
    labels: dict[str, str]
    node: str | None = None


def _kind(name: str) -> Kind:
    return next(k for k in KINDS if k.name == name)


def _item(obj: Json) -> Item:
    node = (obj.get("spec") or {}).get("nodeName")
    return Item(_key(obj), _dumps(obj), dict(obj["metadata"].get("labels") or {}), node)


@dataclass
class Cluster:
    """Every object by kind (in creation order), and the pods the rounds change."""

    pods: int
    nodes: int
    objects: dict[str, list[Item]] = field(default_factory=dict)
    """Every object, by kind."""
    node_ip: str = ""
    sentinel: str = ""
    status_round: list[str] = field(default_factory=list)
    label_round: list[str] = field(default_factory=list)
    kept: dict[str, Json] = field(default_factory=dict)
    """The pods the rounds change, by key (the rest live only as JSON)."""


def _uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _hex(rng: random.Random, bits: int = 256) -> str:
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


def _suffix(rng: random.Random, n: int = 5) -> str:
    return "".join(rng.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(n))


def _fields(value: Any) -> Json:
    """The `fieldsV1` tree of `value`, as the API server records it in managedFields."""
    if isinstance(value, dict):
        return {f"f:{k}": _fields(v) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out: Json = {}
        for item in value:
            key = next((k for k in ("name", "type", "uid", "ip", "key") if k in item), None)
            if key is None:
                return {}
            tree = _fields(item)
            tree["."] = {}
            out[f'k:{{"{key}":{json.dumps(str(item[key]))}}}'] = tree
        return out
    return {}


def _managed(manager: str, time_: str, body: Json, subresource: str | None = None) -> Json:
    entry: Json = {
        "manager": manager,
        "operation": "Update",
        "apiVersion": "v1",
        "time": time_,
        "fieldsType": "FieldsV1",
        "fieldsV1": _fields(body),
    }
    if subresource:
        entry["subresource"] = subresource
    return entry


def _env(deploy: str, ns: str) -> list[Json]:
    def field_ref(name: str, path: str) -> Json:
        return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}

    return [
        field_ref("POD_NAME", "metadata.name"),
        field_ref("POD_NAMESPACE", "metadata.namespace"),
        field_ref("POD_IP", "status.podIP"),
        field_ref("NODE_NAME", "spec.nodeName"),
        {"name": "DB_HOST", "value": f"{deploy}-db.{ns}.svc.cluster.local"},
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.monitoring:4317"},
        {
            "name": "DB_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": f"{deploy}-db", "key": "password"}},
        },
    ]


def _probe(path: str, port: str, delay: int) -> Json:
    return {
        "httpGet": {"path": path, "port": port, "scheme": "HTTP"},
        "initialDelaySeconds": delay,
        "timeoutSeconds": 1,
        "periodSeconds": 10,
        "successThreshold": 1,
        "failureThreshold": 3,
    }


_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": 10001,
}


@dataclass(frozen=True)
class Deployment:
    ns: str
    name: str
    rs_hash: str
    rs_uid: str
    image: str
    digest: str
    tier: str
    mesh: bool
    """With the mesh's proxy and init containers (one Deployment in three)."""


def _containers(d: Deployment, token_volume: str) -> tuple[list[Json], list[Json]]:
    token = {
        "name": token_volume,
        "readOnly": True,
        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
    }
    common = {
        "imagePullPolicy": "IfNotPresent",
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }
    app = {
        "name": "app",
        "image": d.image,
        "command": ["/app/server"],
        "args": ["--config=/etc/app/config.yaml"],
        "ports": [
            {"name": "http", "containerPort": 8080, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
        ],
        "envFrom": [{"configMapRef": {"name": f"{d.name}-config"}}],
        "env": _env(d.name, d.ns),
        "resources": {
            "limits": {"cpu": "1", "memory": "512Mi"},
            "requests": {"cpu": "250m", "memory": "256Mi"},
        },
        "livenessProbe": _probe("/healthz", "http", 10),
        "readinessProbe": _probe("/ready", "http", 5),
        "volumeMounts": [
            {"name": "config", "readOnly": True, "mountPath": "/etc/app"},
            {"name": "tmp", "mountPath": "/tmp"},
            token,
        ],
        "securityContext": _SECURITY,
        **common,
    }
    proxy = {
        "name": "mesh-proxy",
        "image": "registry.example.com/mesh/proxy:1.22.3",
        "args": ["proxy", "sidecar", f"--service-cluster={d.name}.{d.ns}"],
        "ports": [{"name": "proxy-admin", "containerPort": 15000, "protocol": "TCP"}],
        "resources": {
            "limits": {"cpu": "500m", "memory": "256Mi"},
            "requests": {"cpu": "50m", "memory": "64Mi"},
        },
        "readinessProbe": _probe("/healthz/ready", "proxy-admin", 1),
        "volumeMounts": [
            {"name": "proxy-certs", "readOnly": True, "mountPath": "/etc/certs"},
            {"name": "proxy-data", "mountPath": "/var/lib/proxy"},
            token,
        ],
        **common,
    }
    init = {
        "name": "init-config",
        "image": "registry.example.com/platform/config-render:0.9.4",
        "args": ["render", "--out=/etc/app/config.yaml"],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}, token],
        **common,
    }
    return ([app, proxy], [init]) if d.mesh else ([app], [])


def _status(
    d: Deployment,
    containers: list[Json],
    inits: list[Json],
    cids: Iterator[str],
    *,
    ip: str,
    node_ip: str,
    started: str,
) -> Json:
    def status(c: Json, *, init: bool) -> Json:
        image = str(c["image"])
        cid = f"containerd://{next(cids)}"
        state: Json = (
            {
                "terminated": {
                    "exitCode": 0,
                    "reason": "Completed",
                    "startedAt": started,
                    "finishedAt": started,
                    "containerID": cid,
                }
            }
            if init
            else {"running": {"startedAt": started}}
        )
        return {
            "name": c["name"],
            "state": state,
            "lastState": {},
            "ready": not init,
            "restartCount": 0,
            "image": image,
            "imageID": f"{image.split(':')[0]}@sha256:{d.digest}",
            "containerID": cid,
            "started": not init,
        }

    conditions = [
        {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": started}
        for t in (
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
        )
    ]
    return {
        "phase": "Running",
        "conditions": conditions,
        "hostIP": node_ip,
        "hostIPs": [{"ip": node_ip}],
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": started,
        **({"initContainerStatuses": [status(c, init=True) for c in inits]} if inits else {}),
        "containerStatuses": [status(c, init=False) for c in containers],
        "qosClass": "Burstable",
    }


def make_pod(
    d: Deployment,
    *,
    name: str,
    token: str,
    uid: str,
    node: str,
    node_ip: str,
    ip: str,
    track: str,
    cids: Iterator[str],
) -> Json:
    """One of `d`'s pods (`PodTemplate` calls it once, with holes for the values)."""
    token_volume = f"kube-api-access-{token}"
    containers, inits = _containers(d, token_volume)
    labels = {
        "app": d.name,
        "app.kubernetes.io/name": d.name,
        "app.kubernetes.io/part-of": d.ns,
        "pod-template-hash": d.rs_hash,
        "tier": d.tier,
        "track": track,
        "version": "v1.8.2",
    }
    spec: Json = {
        "volumes": [
            {"name": "config", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            *(
                [
                    {
                        "name": "proxy-certs",
                        "secret": {"secretName": "mesh-certs", "defaultMode": 420},
                    },
                    {"name": "proxy-data", "emptyDir": {}},
                ]
                if d.mesh
                else []
            ),
            {
                "name": token_volume,
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {
                            "configMap": {
                                "name": "kube-root-ca.crt",
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            }
                        },
                        {
                            "downwardAPI": {
                                "items": [
                                    {
                                        "path": "namespace",
                                        "fieldRef": {
                                            "apiVersion": "v1",
                                            "fieldPath": "metadata.namespace",
                                        },
                                    }
                                ]
                            }
                        },
                    ],
                    "defaultMode": 420,
                },
            },
        ],
        **({"initContainers": inits} if inits else {}),
        "containers": containers,
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
        "serviceAccount": "default",
        "nodeName": node,
        "securityContext": {"fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
        "schedulerName": "default-scheduler",
        "tolerations": [
            {
                "key": f"node.kubernetes.io/{t}",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            }
            for t in ("not-ready", "unreachable")
        ],
        "priority": 0,
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
    }
    status = _status(d, containers, inits, cids, ip=ip, node_ip=node_ip, started=_at(6))
    owner = {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "name": f"{d.name}-{d.rs_hash}",
        "uid": d.rs_uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    annotations = {
        "kubectl.kubernetes.io/restartedAt": "2026-10-28T16:02:11Z",
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9090",
    }
    meta_fields = {"generateName": 1, "labels": labels, "annotations": annotations}
    return {
        "metadata": {
            "name": name,
            "generateName": f"{d.name}-{d.rs_hash}-",
            "namespace": d.ns,
            "uid": uid,
            "creationTimestamp": T0,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner],
            "managedFields": [
                _managed(
                    "kube-controller-manager",
                    T0,
                    {"metadata": {**meta_fields, "ownerReferences": [owner]}, "spec": spec},
                ),
                _managed("kubelet", _at(7), {"status": status}, "status"),
            ],
        },
        "spec": spec,
        "status": status,
    }


class PodTemplate:
    """A Deployment's pod as JSON with holes: each pod costs a few string
    replaces instead of building and serializing a dict (60,000 pods in seconds)."""

    def __init__(self, d: Deployment) -> None:
        self.d = d
        holes = iter(["@cid0@", "@cid1@", "@cid2@"])
        pod = make_pod(
            d,
            name="@name@",
            token="@token@",
            uid="@uid@",
            node="@node@",
            node_ip="@hostip@",
            ip="@ip@",
            track="@track@",
            cids=holes,
        )
        self.cids = 3 - len(list(holes))
        self.text = json.dumps(pod, separators=(",", ":"))
        self.labels: dict[str, str] = pod["metadata"]["labels"]

    def make(
        self, rng: random.Random, *, node: str, node_ip: str, ip: str, canary: bool
    ) -> tuple[str, str, Item]:
        """(name, uid, stored form) of a new pod."""
        name = f"{self.d.name}-{self.d.rs_hash}-{_suffix(rng)}"
        uid = _uid(rng)
        track = "canary" if canary else "stable"
        text = (
            self.text.replace("@name@", name)
            .replace("@token@", _suffix(rng))
            .replace("@uid@", uid)
            .replace("@node@", node)
            .replace("@hostip@", node_ip)
            .replace("@ip@", ip)
            .replace("@track@", track)
        )
        for i in range(self.cids):
            text = text.replace(f"@cid{i}@", _hex(rng))
        labels = {**self.labels, "track": track}
        return name, uid, Item(f"{self.d.ns}/{name}", text.encode(), labels, node)


def restart(pod: Json, n: int) -> None:
    """What the kubelet writes when the app container restarts."""
    now = _at(3600 + n)
    status = pod["status"]
    app = status["containerStatuses"][0]
    app["lastState"] = {
        "terminated": {
            "exitCode": 137,
            "reason": "OOMKilled",
            "startedAt": app["state"]["running"]["startedAt"],
            "finishedAt": now,
            "containerID": app["containerID"],
        }
    }
    app["restartCount"] += 1
    app["containerID"] = f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}"
    app["state"] = {"running": {"startedAt": now}}
    for c in status["conditions"]:
        if c["type"] in ("Ready", "ContainersReady"):
            c["lastTransitionTime"] = now
    for m in pod["metadata"].get("managedFields", []):
        if m.get("subresource") == "status":
            m["time"] = now


def flip_track(pod: Json, n: int) -> None:
    """A label rules select on: `track: stable` <-> `canary`."""
    labels = pod["metadata"]["labels"]
    labels["track"] = "stable" if labels["track"] == "canary" else "canary"


def make_node(i: int, rng: random.Random) -> Json:
    name = f"node-{i}"
    ip = node_ip(i)
    labels = {
        "beta.kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "node.kubernetes.io/instance-type": "m6i.2xlarge",
        "topology.kubernetes.io/region": "eu-west-1",
        "topology.kubernetes.io/zone": f"eu-west-1{'abc'[i % 3]}",
    }
    if i < GATEWAYS:
        labels["staticegress.io/gateway"] = "true"
    images = [
        {
            "names": [
                f"registry.example.com/team-{k % 12}/service-{k}@sha256:{_hex(rng)}",
                f"registry.example.com/team-{k % 12}/service-{k}:1.{k % 7}.{k % 5}",
            ],
            "sizeBytes": 20_000_000 + rng.randrange(400_000_000),
        }
        for k in range(40)
    ]
    conditions = [
        {
            "type": t,
            "status": "False" if t != "Ready" else "True",
            "lastHeartbeatTime": _at(3600),
            "lastTransitionTime": T0,
            "reason": reason,
            "message": message,
        }
        for t, reason, message in (
            ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory"),
            ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            ("Ready", "KubeletReady", "kubelet is posting ready status"),
        )
    ]
    status = {
        "capacity": {
            "cpu": "8",
            "ephemeral-storage": "203070420Ki",
            "hugepages-1Gi": "0",
            "hugepages-2Mi": "0",
            "memory": "32408300Ki",
            "pods": "110",
        },
        "allocatable": {
            "cpu": "7910m",
            "ephemeral-storage": "186063183837",
            "hugepages-1Gi": "0",
            "hugepages-2Mi": "0",
            "memory": "31357676Ki",
            "pods": "110",
        },
        "conditions": conditions,
        "addresses": [
            {"type": "InternalIP", "address": ip},
            {"type": "Hostname", "address": name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "machineID": _hex(rng, 128),
            "systemUUID": _uid(rng),
            "bootID": _uid(rng),
            "kernelVersion": "6.1.0-27-cloud-amd64",
            "osImage": "Debian GNU/Linux 12 (bookworm)",
            "containerRuntimeVersion": "containerd://2.0.4",
            "kubeletVersion": "v1.33.5",
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
        "images": images,
        "runtimeHandlers": [
            {"name": "runc", "features": {"recursiveReadOnlyMounts": True, "userNamespaces": True}},
            {"name": "", "features": {"recursiveReadOnlyMounts": True, "userNamespaces": True}},
        ],
    }
    cidr = str(pod_range(i))
    spec = {
        "podCIDR": cidr,
        "podCIDRs": [cidr],
        "providerID": f"aws:///eu-west-1a/i-{_hex(rng, 64)}",
    }
    annotations = {
        "node.alpha.kubernetes.io/ttl": "0",
        "volumes.kubernetes.io/controller-managed-attach-detach": "true",
    }
    return {
        "metadata": {
            "name": name,
            "uid": _uid(rng),
            "creationTimestamp": T0,
            "labels": labels,
            "annotations": annotations,
            "managedFields": [
                _managed(
                    "kubelet", T0, {"metadata": {"labels": labels, "annotations": annotations}}
                ),
                _managed("kube-controller-manager", T0, {"spec": {"podCIDR": 1, "podCIDRs": 1}}),
                _managed("kubelet", _at(3600), {"status": status}, "status"),
            ],
        },
        "spec": spec,
        "status": status,
    }


def node_ip(i: int) -> str:
    return str(IPv4Address(int(IPv4Address("172.20.0.1")) + i))


def pod_range(i: int) -> IPv4Network:
    return IPv4Network((int(IPv4Address("10.64.0.0")) + (i << 8), 24))


def make_service(d: Deployment, rng: random.Random, cluster_ip: str) -> Json:
    spec = {
        "ports": [
            {"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"},
            {"name": "metrics", "protocol": "TCP", "port": 9090, "targetPort": "metrics"},
        ],
        "selector": {"app": d.name},
        "clusterIP": cluster_ip,
        "clusterIPs": [cluster_ip],
        "type": "ClusterIP",
        "sessionAffinity": "None",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "internalTrafficPolicy": "Cluster",
    }
    labels = {"app": d.name, "app.kubernetes.io/part-of": d.ns}
    return {
        "metadata": {
            "name": d.name,
            "namespace": d.ns,
            "uid": _uid(rng),
            "creationTimestamp": T0,
            "labels": labels,
            "managedFields": [
                _managed(
                    "kubectl-client-side-apply", T0, {"metadata": {"labels": labels}, "spec": spec}
                )
            ],
        },
        "spec": spec,
        "status": {"loadBalancer": {}},
    }


def make_slice(
    d: Deployment, service_uid: str, pods: list[tuple[str, str, str, str]], rng: random.Random
) -> Json:
    """`pods`: (name, uid, IP, node) of the Service's pods."""
    endpoints = [
        {
            "addresses": [ip],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "targetRef": {"kind": "Pod", "namespace": d.ns, "name": name, "uid": uid},
            "nodeName": node,
            "zone": "eu-west-1a",
        }
        for name, uid, ip, node in pods
    ]
    labels = {
        "app": d.name,
        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
        "kubernetes.io/service-name": d.name,
    }
    owner = {
        "apiVersion": "v1",
        "kind": "Service",
        "name": d.name,
        "uid": service_uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    ports = [
        {"name": "http", "protocol": "TCP", "port": 8080},
        {"name": "metrics", "protocol": "TCP", "port": 9090},
    ]
    body = {
        "metadata": {"labels": labels, "ownerReferences": [owner]},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }
    return {
        "metadata": {
            "name": f"{d.name}-{_suffix(rng)}",
            "generateName": f"{d.name}-",
            "namespace": d.ns,
            "uid": _uid(rng),
            "creationTimestamp": T0,
            "labels": labels,
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": T0},
            "ownerReferences": [owner],
            "managedFields": [_managed("kube-controller-manager", T0, body)],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }


def make_namespace(name: str, team: str, rng: random.Random) -> Json:
    labels = {"kubernetes.io/metadata.name": name, "team": team}
    return {
        "metadata": {
            "name": name,
            "uid": _uid(rng),
            "creationTimestamp": T0,
            "labels": labels,
            "managedFields": [_managed("kubectl-create", T0, {"metadata": {"labels": labels}})],
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def make_policies(rules: int, deploys: list[Deployment], namespaces: list[str]) -> list[Json]:
    """StaticEgressIPs of 5 rules each; rule k's egress IP on node-(k % GATEWAYS)."""
    by_ns: dict[str, list[Deployment]] = {}
    for d in deploys:
        by_ns.setdefault(d.ns, []).append(d)
    out = []
    for c in range((rules + RULES_PER_OBJECT - 1) // RULES_PER_OBJECT):
        ns = namespaces[c % len(namespaces)]
        mine = by_ns[ns]
        rule_list, status = [], []
        for r in range(min(RULES_PER_OBJECT, rules - c * RULES_PER_OBJECT)):
            k = c * RULES_PER_OBJECT + r
            d = mine[(c // len(namespaces) * RULES_PER_OBJECT + r) % len(mine)]
            eip = str(IPv4Address("100.64.0.1") + k)
            rule: Json = {
                "egressip": eip,
                "cidrs": [f"198.18.{k % 256}.0/24", f"198.19.{k % 256}.0/24"],
            }
            if k % 10 == 9:
                rule["namespace-selector"] = {"matchLabels": {"team": f"t{k % 10}"}}
                rule["pod-selector"] = {"matchLabels": {"tier": "backend"}}
            elif k % 2 == 0:
                rule["service-name"] = d.name
            else:
                rule["pod-selector"] = {
                    "matchLabels": {"app": d.name},
                    "matchExpressions": [
                        {"key": "track", "operator": "NotIn", "values": ["canary"]}
                    ],
                }
            rule_list.append(rule)
            status.append({"egressIP": eip, "rule": r, "gateway": f"node-{k % GATEWAYS}"})
        out.append(
            {
                "metadata": {
                    "name": f"egress-{c}",
                    "namespace": ns,
                    "uid": str(uuid.UUID(int=c + 1)),
                    "generation": 1,
                    "creationTimestamp": _at(60 + c),
                },
                "spec": {"rules": rule_list},
                "status": {"observedGeneration": 1, "egressIPs": status},
            }
        )
    return out


def build_cluster(pods: int, per_node: int, local: int, rules: int, events: int) -> Cluster:
    rng = random.Random(pods)
    nodes = max(GATEWAYS, (pods + per_node - 1) // per_node)
    # Slots: `local` pods on node-0, the rest round-robin over the other nodes.
    slots = [0] * min(local, pods) + [1 + i % (nodes - 1) for i in range(pods - min(local, pods))]
    rng.shuffle(slots)
    if max(slots.count(n) for n in (0, 1)) > 250:
        raise SystemExit("more than 250 pods on one node: lower --pods-per-node or --local")
    n_deploys = (pods + REPLICAS - 1) // REPLICAS
    n_ns = max(1, n_deploys // DEPLOYS_PER_NAMESPACE)
    namespaces = [f"team-{i:03d}" for i in range(n_ns)]
    deploys = [
        Deployment(
            ns=namespaces[i % n_ns],
            name=f"svc-{i:05d}",
            rs_hash=_suffix(rng, 10),
            rs_uid=_uid(rng),
            image=f"registry.example.com/team-{i % n_ns}/svc-{i:05d}:1.{i % 9}.{i % 4}",
            digest=_hex(rng),
            tier=("frontend", "backend", "worker")[i % 3],
            mesh=i % 3 == 0,
        )
        for i in range(n_deploys)
    ]
    cluster = Cluster(pods=pods, nodes=nodes)
    cluster.node_ip = node_ip(0)
    next_ip = [2] * nodes
    pod_items: list[Item] = []
    slices: list[Json] = []
    services: list[Json] = []
    for di, d in enumerate(deploys):
        template = PodTemplate(d)
        members = []
        for p in range(di * REPLICAS, min(pods, (di + 1) * REPLICAS)):
            n = slots[p]
            ip = str(pod_range(n)[next_ip[n]])
            next_ip[n] += 1
            node = f"node-{n}"
            name, uid, item = template.make(
                rng, node=node, node_ip=node_ip(n), ip=ip, canary=p % 10 == 9
            )
            pod_items.append(item)
            members.append((name, uid, ip, node))
        svc = make_service(d, rng, str(IPv4Address("10.96.4.0") + di))
        services.append(svc)
        slices.append(make_slice(d, svc["metadata"]["uid"], members, rng))

    def items(objs: list[Json]) -> list[Item]:
        return [_item(o) for o in objs]

    cluster.objects = {
        "pods": pod_items,
        "nodes": items([make_node(i, rng) for i in range(nodes)]),
        "services": items(services),
        "namespaces": items(
            [make_namespace(ns, f"t{i % 10}", rng) for i, ns in enumerate(namespaces)]
        ),
        "endpointslices": items(slices),
        "staticegressips": items(make_policies(rules, deploys, namespaces)),
        "staticegressippools": [],
    }
    # The sentinel: a pod of the measured node (an agent that watches only its
    # own node's pods sees it too); the label it gets selects nothing new.
    cluster.sentinel = next(i.key for i in reversed(pod_items) if i.node == NODE)
    keys = [i.key for i in pod_items if i.key != cluster.sentinel]
    chosen = rng.sample(keys, min(2 * events, len(keys)))
    cluster.status_round = chosen[:events]
    cluster.label_round = chosen[events:]
    wanted = {cluster.sentinel, *chosen}
    cluster.kept = {i.key: json.loads(i.data) for i in pod_items if i.key in wanted}
    return cluster


def _true(value: str | None) -> bool:
    """A boolean query parameter, as the API server reads it (clients send `True`)."""
    return (value or "").lower() in ("true", "1")


def _key(obj: Json) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else str(meta["name"])


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# ------------------------------------------------------------- the stub server

Publish = Callable[[dict[str, str]], list[Item]]
"""StaticEgressIP uids by key -> the manager's published objects."""
Match = Callable[[str, dict[str, str], str | None], bool]
"""(key, labels, node) -> whether a selector takes the object."""


class UnsupportedError(ValueError):
    """A selector the stub server does not implement."""


def _requirements(text: str) -> list[tuple[str, str, str]]:
    """Equality requirements, (key, op, value) with op one of = != exists !exists."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "(" in part or " in " in part or " notin " in part:
            raise UnsupportedError(f"set-based selector {part!r}")
        if "!=" in part:
            k, v = part.split("!=", 1)
            out.append((k.strip(), "!=", v.strip()))
        elif "=" in part:
            k, v = part.replace("==", "=").split("=", 1)
            out.append((k.strip(), "=", v.strip()))
        elif part.startswith("!"):
            out.append((part[1:], "!exists", ""))
        else:
            out.append((part, "exists", ""))
    return out


def _holds(op: str, have: str | None, want: str) -> bool:
    if op == "=":
        return have == want
    if op == "!=":
        return have != want
    return (have is not None) == (op == "exists")


_FIELDS = ("spec.nodeName", "metadata.name", "metadata.namespace")


def selector(labels: str, fields: str) -> Match:
    """An equality-based label selector (`a=b,c!=d,e,!f`) and a field selector
    on `spec.nodeName`, `metadata.name` or `metadata.namespace`."""
    by_label = _requirements(labels)
    by_field = _requirements(fields)
    for name, op, _ in by_field:
        if name not in _FIELDS or op not in ("=", "!="):
            raise UnsupportedError(f"field selector on {name}")

    def match(key: str, obj_labels: dict[str, str], node: str | None) -> bool:
        ns, _, name = key.rpartition("/")
        values = {"spec.nodeName": node or "", "metadata.name": name, "metadata.namespace": ns}
        return all(_holds(op, obj_labels.get(k), v) for k, op, v in by_label) and all(
            _holds(op, values[k], v) for k, op, v in by_field
        )

    return match


@dataclass
class _Watch:
    queue: asyncio.Queue[bytes]
    namespace: str | None
    match: Match


@dataclass
class _Store:
    kind: Kind
    items: dict[str, Item] = field(default_factory=dict)
    """Objects as list items (no kind or apiVersion), in creation order."""
    log: list[tuple[int, Item, bytes]] = field(default_factory=list)
    """Every event since the load, (resourceVersion, object, line), for watches
    that resume from an older resourceVersion."""
    watches: list[_Watch] = field(default_factory=list)

    def head(self) -> bytes:
        kind, version = self.kind.list_kind.removesuffix("List"), self.kind.api_version
        return b'{"kind":"' + kind.encode() + b'","apiVersion":"' + version.encode() + b'"'

    def event(self, kind: str, data: bytes) -> bytes:
        return (
            b'{"type":"' + kind.encode() + b'","object":' + self.head() + b"," + data[1:] + b"}\n"
        )


def _takes(namespace: str | None, match: Match, item: Item) -> bool:
    if namespace is not None and not item.key.startswith(f"{namespace}/"):
        return False
    return match(item.key, item.labels, item.node)


class StubServer:
    """The list and watch side of an API server, for the kinds the agent reads.

    Lists are served from serialized objects as the API server sends them (no
    kind or apiVersion on items), cluster-wide or in one namespace, with
    equality label selectors, the field selectors the agent uses
    (`spec.nodeName`, `metadata.name`, `metadata.namespace`) and
    `limit`/`continue` paging. Watches replay what followed their
    `resourceVersion`, then stream (with bookmarks when asked) until their
    `timeoutSeconds`; `sendInitialEvents=true` streams the current objects
    first and ends them with the bookmark that says so. Anything else
    (another path, another selector, a write) is refused with the API
    server's Status and remembered in `refused`."""

    def __init__(self) -> None:
        self.stores = {k.name: _Store(k) for k in KINDS}
        self.rv = 1000
        self.refused: list[str] = []
        self.list_bytes: dict[str, int] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._listed: dict[tuple[str, str | None, str, int], list[str]] = {}

    def child_args(self) -> list[str]:
        return ["--url", self.url]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        self._end_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    def _end_watches(self) -> None:
        for store in self.stores.values():
            for w in store.watches:
                w.queue.put_nowait(b"")

    async def load(self, objects: dict[str, list[Item]], publish: Publish | None = None) -> None:
        self._end_watches()  # nothing of the previous cluster may reach the next agent
        for store in self.stores.values():
            self._fill(store, objects.get(store.kind.name, []))
        if publish is not None:
            policies = (json.loads(i.data) for i in self.stores["staticegressips"].items.values())
            uids = {_key(p): p["metadata"]["uid"] for p in policies}
            self._fill(self.stores["staticegressipmembers"], publish(uids))

    def _fill(self, store: _Store, items: list[Item]) -> None:
        store.items.clear()
        store.log.clear()
        head = b'{"metadata":{'
        for item in items:
            assert item.data.startswith(head), item.data[:40]
            self.rv += 1
            rv = b'{"metadata":{"resourceVersion":"%d",' % self.rv
            store.items[item.key] = item._replace(data=rv + item.data[len(head) :])
        self.list_bytes[store.kind.name] = sum(len(i.data) for i in items)

    async def change(self, kind: str, obj: Json | None, key: str = "", part: str = "") -> None:
        """Store the changed object (or delete `key` when `obj` is None) and
        send the event to every watch that takes it."""
        store = self.stores[kind]
        self.rv += 1
        if obj is None:
            gone = store.items.pop(key)
            meta = {"resourceVersion": str(self.rv), "name": key.rpartition("/")[2]}
            item = gone._replace(data=_dumps({"metadata": meta}))
            line = store.event("DELETED", item.data)
        else:
            obj["metadata"]["resourceVersion"] = str(self.rv)
            item = _item(obj)
            store.items[item.key] = item
            line = store.event("MODIFIED", item.data)
        store.log.append((self.rv, item, line))
        for w in store.watches:
            if _takes(w.namespace, w.match, item):
                w.queue.put_nowait(line)
        await asyncio.sleep(0)

    async def flush(self) -> None:
        """Until every watch has written what it was given (into its socket)."""

        def drained() -> bool:
            return all(w.queue.empty() for s in self.stores.values() for w in s.watches)

        await _wait_for(drained, 10.0)
        await asyncio.sleep(0.02)

    def _refuse(self, request: web.Request, code: int, why: str) -> web.Response:
        self.refused.append(f"{request.method} {request.path_qs}: {why}")
        body: Json = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": why}
        body["code"] = code
        return web.Response(status=code, body=_dumps(body), content_type="application/json")

    def _route(self, path: str) -> tuple[_Store, str | None] | None:
        """The store and namespace of a list path (cluster-wide or namespaced)."""
        for store in self.stores.values():
            base, _, plural = store.kind.path.rpartition("/")
            if path == store.kind.path:
                return store, None
            prefix = f"{base}/namespaces/"
            if path.startswith(prefix) and path.endswith(f"/{plural}"):
                ns = path[len(prefix) : -len(plural) - 1]
                if ns and "/" not in ns:
                    return store, ns
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        route = self._route(request.path.rstrip("/"))
        if request.method != "GET" or route is None:
            return self._refuse(request, 404, "not served by the benchmark's server")
        store, namespace = route
        q = request.query
        try:
            match = selector(q.get("labelSelector") or "", q.get("fieldSelector") or "")
        except UnsupportedError as exc:
            return self._refuse(request, 400, str(exc))

        if _true(q.get("watch")):
            return await self._watch(request, store, _Watch(asyncio.Queue(), namespace, match))
        selectors = f"{q.get('labelSelector')}|{q.get('fieldSelector')}"
        return self._list(store, namespace, match, q.get("limit"), q.get("continue"), selectors)

    def _list(
        self,
        store: _Store,
        namespace: str | None,
        match: Match,
        limit: str | None,
        token: str | None,
        query: str,
    ) -> web.Response:
        start, rv = 0, self.rv
        if token:
            state = json.loads(base64.urlsafe_b64decode(token))
            start, rv = int(state["start"]), int(state["rv"])
        # One filtering per list, not per page: a paged list of 50,000 pods
        # would otherwise cost the server more CPU than the agent reading it.
        cached = self._listed.get((store.kind.name, namespace, query, rv))
        if cached is None or not token:
            cached = [k for k, item in store.items.items() if _takes(namespace, match, item)]
            self._listed = {(store.kind.name, namespace, query, rv): cached}
        keys = cached
        end = len(keys) if not limit or int(limit) <= 0 else min(len(keys), start + int(limit))
        meta: Json = {"resourceVersion": str(rv)}
        if end < len(keys):
            meta["continue"] = base64.urlsafe_b64encode(_dumps({"start": end, "rv": rv})).decode()
            meta["remainingItemCount"] = len(keys) - end
        kind = store.kind
        body = b"".join(
            [
                b'{"kind":"' + kind.list_kind.encode() + b'","apiVersion":"',
                kind.api_version.encode() + b'","metadata":' + _dumps(meta) + b',"items":[',
                b",".join(store.items[k].data for k in keys[start:end]),
                b"]}",
            ]
        )
        return web.Response(body=body, content_type="application/json")

    async def _watch(
        self, request: web.Request, store: _Store, watch: _Watch
    ) -> web.StreamResponse:
        q = request.query
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        store.watches.append(watch)
        try:
            with contextlib.suppress(ConnectionResetError):
                await self._stream(resp, store, watch, q)
                await resp.write_eof()
        finally:
            store.watches.remove(watch)
        return resp

    async def _stream(self, resp: web.StreamResponse, store: _Store, watch: _Watch, q: Any) -> None:
        takes = partial(_takes, watch.namespace, watch.match)
        if _true(q.get("sendInitialEvents")):
            for item in list(store.items.values()):
                if takes(item):
                    await resp.write(store.event("ADDED", item.data))
            await resp.write(self._bookmark(store, initial_end=True))
        else:
            since = int(q.get("resourceVersion") or 0)
            for rv, item, line in list(store.log):
                if rv > since and takes(item):
                    await resp.write(line)
        bookmarks = _true(q.get("allowWatchBookmarks"))
        deadline = time.monotonic() + float(q.get("timeoutSeconds") or 1800)
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = await asyncio.wait_for(watch.queue.get(), timeout=min(left, 30.0))
            except TimeoutError:
                if bookmarks:
                    await resp.write(self._bookmark(store))
                continue
            if not line:
                return
            await resp.write(line)

    def _bookmark(self, store: _Store, *, initial_end: bool = False) -> bytes:
        meta: Json = {"resourceVersion": str(self.rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return store.event("BOOKMARK", b'{"metadata":' + _dumps(meta) + b"}")


# ---------------------------------------------------------- a real API server


class ApiError(RuntimeError):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"API server: {status} {body[:300].decode(errors='replace')}")
        self.status = status


async def _ok(call: Any) -> None:
    """Await a write sent with `_preload_content=False` (the client then neither
    raises on an error status nor reads the answer): read it, release the
    connection, raise on anything but 2xx."""
    resp = await call
    try:
        body = await resp.read()
    finally:
        resp.release()
    if not 200 <= resp.status <= 299:
        raise ApiError(resp.status, body)


class ApiServerSource:
    """The same objects, created in a real kube-apiserver started by the
    product's control-plane helpers, a fresh one per cluster size (without
    controllers: the garbage collector would delete pods whose ReplicaSets do
    not exist, and nothing here needs scheduling)."""

    def __init__(self) -> None:
        self.cp: Any = None
        self.api: Any = None
        self.list_bytes: dict[str, int] = {}
        self.refused: list[str] = []
        self._sem = asyncio.Semaphore(32)
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        return None  # one control plane per size, from load()

    def child_args(self) -> list[str]:
        return ["--kubeconfig", str(self.cp.admin_kubeconfig)]

    async def _restart(self) -> None:
        from staticegress.controlplane.binaries import ensure_binaries
        from staticegress.controlplane.cluster import ControlPlane
        from staticegress.k8s.client import api_client
        from staticegress.k8s.crd import install_crd

        await self.stop()
        _progress("starting the local control plane")
        cp = ControlPlane(binaries=await asyncio.to_thread(ensure_binaries), controllers=False)
        await asyncio.to_thread(cp.start)
        self.cp = cp
        self.api = await api_client(cp.admin_kubeconfig)
        await install_crd(self.api)

    async def load(self, objects: dict[str, list[Item]], publish: Publish | None = None) -> None:
        from kubernetes_asyncio import client

        await self._restart()
        core = client.CoreV1Api(self.api)
        disco = client.DiscoveryV1Api(self.api)
        custom = client.CustomObjectsApi(self.api)
        started, done = time.monotonic(), 0
        skip = ("managedFields", "resourceVersion", "uid", "creationTimestamp")
        q = {"_preload_content": False}

        async def create(kind: str, obj: Json) -> None:
            nonlocal done
            meta = obj["metadata"]
            ns, name = meta.get("namespace"), meta["name"]
            body = {k: v for k, v in obj.items() if k != "status"}
            body["metadata"] = {k: v for k, v in meta.items() if k not in skip}
            status = {"status": obj.get("status")}
            async with self._sem:
                if kind == "namespaces":
                    await _ok(core.create_namespace(body, **q))
                    sa = {"metadata": {"name": "default"}}
                    await _ok(core.create_namespaced_service_account(name, sa, **q))
                elif kind == "nodes":
                    await _ok(core.create_node(body, **q))
                    await _ok(core.patch_node_status(name, status, **q))
                elif kind == "services":
                    await _ok(core.create_namespaced_service(ns, body, **q))
                elif kind == "endpointslices":
                    await _ok(disco.create_namespaced_endpoint_slice(ns, body, **q))
                elif kind == "pods":
                    await _ok(core.create_namespaced_pod(ns, body, **q))
                    await _ok(core.patch_namespaced_pod_status(name, ns, status, **q))
                else:  # ours
                    plural = _kind(kind).path.rpartition("/")[2]
                    body |= {"apiVersion": f"{GROUP}/{VERSION}"}
                    body |= {"kind": _kind(kind).list_kind.removesuffix("List")}
                    await _ok(
                        custom.create_namespaced_custom_object(
                            GROUP, VERSION, ns, plural, body, **q
                        )
                    )
                    if "status" in obj:
                        await _ok(
                            custom.patch_namespaced_custom_object_status(
                                GROUP,
                                VERSION,
                                ns,
                                plural,
                                name,
                                status,
                                _content_type="application/merge-patch+json",
                                **q,
                            )
                        )
            done += 1
            if done % 5000 == 0:
                rate = done / (time.monotonic() - started)
                _progress(f"  {done} objects created ({rate:.0f}/s)")

        async def create_all(kind: str, items: list[Item]) -> None:
            self.list_bytes[kind] = sum(len(i.data) for i in items)
            for i in range(0, len(items), 2000):  # a batch at a time, not every task at once
                batch = items[i : i + 2000]
                await asyncio.gather(*(create(kind, json.loads(i.data)) for i in batch))

        await _ok(core.create_namespace({"metadata": {"name": AGENT_NAMESPACE}}, **q))
        for kind in ("namespaces", "nodes", "services", "endpointslices", "pods"):
            await create_all(kind, objects.get(kind, []))
        for kind in ("staticegressips", "staticegressippools"):
            await create_all(kind, objects.get(kind, []))
        if publish is not None:
            # The API server gave the StaticEgressIPs their uids, which the
            # published objects must name.
            listed = await custom.list_cluster_custom_object(GROUP, VERSION, "staticegressips")
            uids = {_key(p): p["metadata"]["uid"] for p in listed["items"]}
            await create_all("staticegressipmembers", publish(uids))
        _progress(f"  {done} objects created in {time.monotonic() - started:.0f}s")

    async def change(self, kind: str, obj: Json | None, key: str = "", part: str = "") -> None:
        """Write a pod's labels or status, or a published object; 32 in flight."""
        from kubernetes_asyncio import client

        core = client.CoreV1Api(self.api)
        custom = client.CustomObjectsApi(self.api)
        ns, _, name = key.rpartition("/")
        if obj is not None:
            meta = obj["metadata"]
            ns, name = meta.get("namespace", ""), meta["name"]
        q: Json = {"_preload_content": False}
        plural = _kind(kind).path.rpartition("/")[2]

        async def write() -> None:
            async with self._sem:
                if obj is None:
                    await _ok(
                        custom.delete_namespaced_custom_object(
                            GROUP, VERSION, ns, plural, name, **q
                        )
                    )
                elif kind == "pods" and part == "status":
                    body = {"status": json.loads(_dumps(obj["status"]))}
                    await _ok(core.patch_namespaced_pod_status(name, ns, body, **q))
                elif kind == "pods":
                    body = {"metadata": {"labels": dict(obj["metadata"]["labels"])}}
                    await _ok(core.patch_namespaced_pod(name, ns, body, **q))
                else:
                    body = {k: v for k, v in obj.items() if k not in ("metadata", "kind")}
                    body["metadata"] = {"labels": obj["metadata"].get("labels") or {}}
                    try:
                        await _ok(
                            custom.patch_namespaced_custom_object(
                                GROUP,
                                VERSION,
                                ns,
                                plural,
                                name,
                                body,
                                _content_type="application/merge-patch+json",
                                **q,
                            )
                        )
                    except ApiError as exc:
                        if exc.status != 404:
                            raise
                        body["metadata"] |= {"name": name, "namespace": ns}
                        body["apiVersion"] = f"{GROUP}/{VERSION}"
                        body["kind"] = _kind(kind).list_kind.removesuffix("List")
                        await _ok(
                            custom.create_namespaced_custom_object(
                                GROUP, VERSION, ns, plural, body, **q
                            )
                        )

        self._pending.add(asyncio.create_task(write()))
        if len(self._pending) >= 256:
            await self.flush()

    async def flush(self) -> None:
        await asyncio.gather(*self._pending)
        self._pending.clear()
        await asyncio.sleep(0.2)  # the API server's watch cache fans out a little later

    async def stop(self) -> None:
        if self.api is not None:
            await self.api.close()
            self.api = None
        if self.cp is not None:
            await asyncio.to_thread(self.cp.stop)
            self.cp = None


# ------------------------------------------------------------------- the child


def _proc_status() -> dict[str, float]:
    """VmRSS and VmHWM of this process, in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) / 1024
    return out


def _emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class _Nft:
    async def apply(self, batch: dict[str, Any]) -> None:
        return None

    async def apply_text(self, text: str) -> None:
        return None

    async def run(self, cmd: dict[str, Any]) -> Any:
        return {"nftables": []}

    async def watch(self) -> None:
        return None


class _Netlink:
    async def apply(self, spec: Any, *, phase: str) -> Any:
        from staticegress.dataplane.netlink import ApplyResult

        return ApplyResult(errors=[])


async def _nothing(*args: Any) -> Any:
    return 0


def deep_size(root: Any) -> int:
    """Bytes of `root` and everything it reaches (each object once), modules and
    classes excluded."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    skip = (type, type(sys), type(deep_size))
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


async def _wait_for(done: Callable[[], bool], within: float) -> bool:
    """Poll `done` every 5 ms (a few microseconds of CPU each) until it holds."""
    deadline = time.monotonic() + within
    while True:
        if done():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)


async def child(args: argparse.Namespace) -> None:
    _emit(event="start", **_proc_status())
    from kubernetes_asyncio import client

    from staticegress.agent.agent import Agent, AgentOptions
    from staticegress.dataplane.host import Uplink

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if args.kubeconfig:
        from staticegress.k8s.client import api_client

        api = await api_client(Path(args.kubeconfig))
    else:
        api = client.ApiClient(client.Configuration(host=args.url))
    # The kernel's part is faked as in the unit tests; options and fakes this
    # version of the product does not have are left out.
    options: Json = {"node": args.node, "transport": "direct", "ownership": "status-only"}
    options["health_port"] = 0
    if args.selection and any(f.name == "selection" for f in dataclasses.fields(AgentOptions)):
        options["selection"] = args.selection
    fakes: Json = {"nft": _Nft(), "netlink": _Netlink()}
    fakes |= {"announcer": _nothing, "flusher": _nothing, "repairer": _nothing}
    if "boot_time" in inspect.signature(Agent).parameters:
        fakes["boot_time"] = lambda: BOOT_TIME
    agent = Agent(api, AgentOptions(**options), **fakes)
    # What Agent._discover would find on a real node (its address, uplink, transport).
    agent.node_ip = IPv4Address(args.node_ip)
    agent.uplink = Uplink("eth0", 9001, "02:00:00:00:00:01", IPv4Network("172.20.0.0/16"))
    agent.transport = "direct"
    _emit(event="imported", **_proc_status())
    cpu, wall = time.process_time(), time.monotonic()
    tasks = [asyncio.create_task(r.run(), name=r.name) for r in agent.reflectors.values()]
    for r in agent.reflectors.values():
        await r.synced.wait()
    list_cpu, list_wall = time.process_time() - cpu, time.monotonic() - wall
    listed = _proc_status()
    cpu = time.process_time()
    await agent.sync(True)  # the first sync: every object parsed
    first = time.process_time() - cpu
    cpu = time.process_time()
    await agent.sync(True)  # a periodic resync: the parse cache warm
    resync = time.process_time() - cpu
    synced = _proc_status()
    runner = agent.runner
    tasks.append(asyncio.create_task(runner.run(), name="sync"))
    # Every watch open and nothing pending: the events to come are all the rounds'.
    await _wait_for(
        lambda: all(r.connected for r in agent.reflectors.values()) and runner.pending_age() == 0,
        ROUND_TIMEOUT,
    )
    applied = agent.applied
    assert applied is not None
    _emit(
        event="ready",
        listed=listed,
        synced=synced,
        list_cpu=list_cpu,
        list_wall=list_wall,
        first_sync=first,
        resync=resync,
        steered=applied.pods_steered,
        snat=applied.pods_snat,
        owned=len(applied.owned),
        problems=len(applied.problems),
        rules=sum(1 for r in applied.rules if r.steer or r.snat),
        reflectors=len(agent.reflectors),
    )
    pods = agent.reflectors["pods"]
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "round":
            runs, cpu, wall = runner.runs, time.process_time(), time.monotonic()
            _emit(event="marked")

            def round_synced(value: str = cmd["value"]) -> bool:
                obj = pods.store.get(args.sentinel) or {}
                seen = ((obj.get("metadata") or {}).get("labels") or {}).get(SENTINEL_LABEL)
                return bool(seen == value and runner.pending_age() == 0)

            if not await _wait_for(round_synced, ROUND_TIMEOUT):
                _emit(event="error", error=f"round {cmd['value']} not synced in time")
                return
            _emit(
                event="round",
                cpu=time.process_time() - cpu,
                wall=time.monotonic() - wall,
                syncs=runner.runs - runs,
            )
        elif cmd["cmd"] == "finish":
            final = _proc_status()  # before the breakdown, which takes memory of its own
            sizes = {}
            if cmd.get("breakdown"):
                for name, r in agent.reflectors.items():
                    sizes[f"store {name}"] = deep_size(r.store)
                sizes["parse cache"] = deep_size(agent.parse_cache)
                sizes["applied desired state"] = deep_size(agent.applied)
            _emit(event="done", final=final, sizes=sizes)
            break
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await api.close()


# ------------------------------------------------------------------ the parent


def _progress(msg: str) -> None:
    print(f"[agent_memory] {msg}", file=sys.stderr, flush=True)


@dataclass
class Result:
    pods: int
    nodes: int
    selection: str
    figures: dict[str, Any] = field(default_factory=dict)


class Child:
    """One agent process; JSON lines both ways."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path | None) -> None:
        self.proc = proc
        self.log = log
        self.stderr: list[str] = []
        assert proc.stderr is not None
        self._drain = asyncio.create_task(self._keep_stderr(proc.stderr))

    @classmethod
    async def start(cls, argv: list[str], log: Path | None = None) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            SCRIPT,
            "--child",
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        return cls(proc, log)

    async def _keep_stderr(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            self.stderr = [*self.stderr[-40:], text]
            if self.log is not None:
                with self.log.open("a") as f:
                    f.write(text + "\n")

    async def expect(self, event: str, within: float = 600) -> Json:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        if not line:
            await self.proc.wait()
            tail = "\n".join(self.stderr[-25:])
            raise SystemExit(f"the agent process ended (code {self.proc.returncode}):\n{tail}")
        msg: Json = json.loads(line)
        if msg.get("event") != event:
            raise SystemExit(f"expected {event} from the agent process, got {msg}")
        return msg

    async def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(_dumps(cmd) + b"\n")
        await self.proc.stdin.drain()

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        self._drain.cancel()


class Source(Protocol):
    """Where the agent's objects come from: the stub server or a real API server."""

    list_bytes: dict[str, int]
    refused: list[str]

    async def start(self) -> None: ...

    def child_args(self) -> list[str]: ...

    async def load(self, objects: dict[str, list[Item]], publish: Publish | None = None) -> None:
        """Serve `objects`, and what `publish` makes of the StaticEgressIPs' uids."""

    async def change(self, kind: str, obj: Json | None, key: str = "", part: str = "") -> None: ...

    async def flush(self) -> None: ...

    async def stop(self) -> None: ...


def _stored(obj: Json) -> Json:
    """`obj` as a list item: metadata first, no kind or apiVersion."""
    rest = {k: v for k, v in obj.items() if k not in ("metadata", "kind", "apiVersion")}
    return {"metadata": obj["metadata"], **rest}


class Publisher:
    """The manager's part, for agents that read the published selection: which
    pods each rule selects, as StaticEgressIPMembers objects, computed with
    the product's own functions (as the manager does). None of it runs in the
    measured process."""

    def __init__(self, objects: dict[str, list[Item]]) -> None:
        from staticegress.k8s import trim
        from staticegress.k8s.snapshot import ParseCache

        def keep(obj: Json) -> Json:
            return obj

        self.trims: dict[str, Callable[[Json], Json]] = {
            kind: getattr(
                trim,
                f"trim_{kind.removesuffix('s').replace('endpointslice', 'endpoint_slice')}",
                keep,
            )
            for kind in ("pods", "nodes", "services", "endpointslices", "namespaces")
        }
        self.stores: dict[str, dict[str, Json]] = {}
        for kind, items in objects.items():
            cut = self.trims.get(kind, keep)
            self.stores[kind] = {}
            for i in items:
                obj = cut(json.loads(i.data))
                obj["metadata"]["resourceVersion"] = "1"
                self.stores[kind][i.key] = obj
        self.cache = ParseCache()
        self.published: dict[str, Json] = {}

    def pod_changed(self, pod: Json) -> None:
        obj = self.trims["pods"](json.loads(_dumps(pod)))
        obj["metadata"]["resourceVersion"] = str(uuid.uuid4())
        self.stores["pods"][_key(pod)] = obj

    def shards(self) -> dict[str, Json]:
        """Every object the manager would publish now, by key, as stored."""
        from staticegress.k8s.snapshot import build_snapshot
        from staticegress.model.desired import select_members
        from staticegress.render.members import render_member_shards

        st = self.stores
        snap, _ = build_snapshot(
            policies=st["staticegressips"],
            pods=st["pods"],
            nodes=st["nodes"],
            services=st["services"],
            namespaces=st["namespaces"],
            slices=st["endpointslices"],
            pools=st["staticegressippools"],
            cache=self.cache,
        )
        members, endpoints = select_members(snap, require_pool=False)
        bodies = render_member_shards(
            snap.policies, members, dict(endpoints), namespace=AGENT_NAMESPACE
        )
        out = {}
        for name, body in bodies.items():
            body["metadata"] |= {"uid": str(uuid.uuid5(uuid.NAMESPACE_URL, name))}
            body["metadata"]["creationTimestamp"] = T0
            out[f"{AGENT_NAMESPACE}/{name}"] = _stored(body)
        return out

    def items(self, uids: dict[str, str]) -> list[Item]:
        """The objects to publish first, naming the StaticEgressIPs by `uids`."""
        for key, uid in uids.items():
            meta = self.stores["staticegressips"][key]["metadata"]
            meta["uid"], meta["resourceVersion"] = uid, uid
        self.published = self.shards()
        return [_item(obj) for obj in self.published.values()]

    async def republish(self, source: Source) -> int:
        """Write the objects whose content changed; return how many."""
        wanted = self.shards()
        changed = 0
        for key, obj in wanted.items():
            if self.published.get(key, {}) != obj:
                await source.change("staticegressipmembers", json.loads(_dumps(obj)))
                changed += 1
        for key in set(self.published) - set(wanted):
            await source.change("staticegressipmembers", None, key)
            changed += 1
        self.published = wanted
        return changed


def selections() -> list[str]:
    """The agent's selection modes this version of the product has."""
    from staticegress.agent.agent import AgentOptions

    kinds = {f.name: f for f in dataclasses.fields(AgentOptions)}
    if "selection" not in kinds:
        return ["local"]
    return ["published", "local"]


async def measure(
    cluster: Cluster,
    source: Source,
    publisher: Publisher | None,
    selection: str,
    args: argparse.Namespace,
) -> Result:
    res = Result(cluster.pods, cluster.nodes, selection)
    agent = await Child.start(
        [
            *source.child_args(),
            *("--node", NODE, "--node-ip", cluster.node_ip, "--sentinel", cluster.sentinel),
            *("--selection", selection),
        ],
        Path(args.agent_log) if args.agent_log else None,
    )
    try:
        start = await agent.expect("start")
        imported = await agent.expect("imported")
        _progress(f"  {selection}: agent started (RSS {imported['VmRSS']:.0f} MB); listing")
        ready = await agent.expect("ready")
        res.figures.update(ready)
        res.figures["start_rss"] = start["VmRSS"]
        res.figures["imported_rss"] = imported["VmRSS"]
        _progress(
            f"  listed in {ready['list_wall']:.1f}s and synced, RSS "
            f"{ready['synced']['VmRSS']:.0f} MB; changing pods"
        )
        sentinel = cluster.kept[cluster.sentinel]
        rounds: list[tuple[str, list[str], Callable[[Json, int], None], str]] = [
            ("status", cluster.status_round, restart, "status"),
            ("label", cluster.label_round, flip_track, "labels"),
            ("single", [], restart, "status"),
        ]
        for n, (name, keys, mutate, part) in enumerate(rounds):
            value = f"{selection}-{n}"
            await agent.send(cmd="round", value=value)
            await agent.expect("marked")
            for i, key in enumerate(keys):
                pod = cluster.kept[key]
                mutate(pod, i)
                await source.change("pods", pod, part=part)
                if publisher is not None:
                    publisher.pod_changed(pod)
            published = 0
            if publisher is not None and part == "labels":
                await source.flush()
                published = await publisher.republish(source)  # what the manager writes
            # Last, after every other write: the watch delivers in order.
            await source.flush()
            sentinel["metadata"]["labels"][SENTINEL_LABEL] = value
            await source.change("pods", sentinel, part="labels")
            await source.flush()
            got = await agent.expect("round", within=ROUND_TIMEOUT + 10)
            events = len(keys) + 1
            res.figures[f"{name}_ms"] = got["cpu"] * 1000 / events
            res.figures[f"{name}_syncs"] = got["syncs"]
            note = f", {published} published objects rewritten" if published else ""
            _progress(
                f"  {events} {name} events{note}: {got['cpu'] * 1000:.0f} ms CPU, "
                f"{got['syncs']} syncs, {got['wall']:.2f}s"
            )
        await agent.send(cmd="finish", breakdown=args.breakdown)
        done = await agent.expect("done", within=900)
        res.figures["final"] = done["final"]
        res.figures["sizes"] = done["sizes"]
        await asyncio.wait_for(agent.proc.wait(), 30)
    finally:
        await agent.close()
    return res


async def run(args: argparse.Namespace) -> list[Result]:
    source: Source = ApiServerSource() if args.apiserver else StubServer()
    modes = [m for m in (args.selection or ",".join(selections())).split(",") if m]
    results: list[Result] = []
    try:
        await source.start()
        for pods in (int(s) for s in args.pods.split(",")):
            t = time.monotonic()
            cluster = build_cluster(pods, args.pods_per_node, args.local, args.rules, args.events)
            _progress(f"{pods} pods on {cluster.nodes} nodes made in {time.monotonic() - t:.1f}s")
            publisher = Publisher(cluster.objects) if "published" in modes else None
            await source.load(cluster.objects, publisher.items if publisher else None)
            if publisher is not None:
                _progress(f"  the manager's selection: {len(publisher.published)} objects")
            cluster.objects = {}  # what the rounds change is kept; the rest is JSON now
            gc.collect()
            for mode in modes:
                res = await measure(cluster, source, publisher, mode, args)
                res.figures["list_bytes"] = dict(source.list_bytes)
                results.append(res)
        for line in source.refused:
            _progress(f"refused: {line}")
    finally:
        await source.stop()
    return results


def report(results: list[Result], args: argparse.Namespace) -> None:
    source = "a real kube-apiserver" if args.apiserver else "the benchmark's list+watch server"
    print(f"agent on {NODE} ({args.local} local pods), objects from {source}")
    print("memory in MB (VmRSS, VmHWM), CPU as process time")
    rows: list[tuple[str, Callable[[Result], str]]] = [
        ("pods", lambda r: str(r.pods)),
        ("selection", lambda r: r.selection),
        ("nodes", lambda r: str(r.nodes)),
        ("pod JSON, KB each", lambda r: f"{r.figures['list_bytes']['pods'] / r.pods / 1024:.1f}"),
        (
            "node JSON, KB each",
            lambda r: f"{r.figures['list_bytes']['nodes'] / r.nodes / 1024:.1f}",
        ),
        (
            "all lists, MB of JSON",
            lambda r: f"{sum(r.figures['list_bytes'].values()) / 2**20:.0f}",
        ),
        ("RSS after imports", lambda r: f"{r.figures['imported_rss']:.0f}"),
        ("RSS after the lists", lambda r: f"{r.figures['listed']['VmRSS']:.0f}"),
        ("RSS after sync", lambda r: f"{r.figures['synced']['VmRSS']:.0f}"),
        ("peak RSS by the lists' end", lambda r: f"{r.figures['listed']['VmHWM']:.0f}"),
        ("peak RSS", lambda r: f"{r.figures['final']['VmHWM']:.0f}"),
        ("target (the issue's)", lambda r: f"< {TARGET_MB:.0f}" if r.pods >= TARGET_PODS else "-"),
        ("RSS at the end", lambda r: f"{r.figures['final']['VmRSS']:.0f}"),
        ("list wall s", lambda r: f"{r.figures['list_wall']:.1f}"),
        ("list CPU ms", lambda r: f"{r.figures['list_cpu'] * 1000:.0f}"),
        ("full-sync CPU ms (first)", lambda r: f"{r.figures['first_sync'] * 1000:.0f}"),
        ("resync CPU ms (warm)", lambda r: f"{r.figures['resync'] * 1000:.0f}"),
        (
            "CPU ms / status event",
            lambda r: f"{r.figures['status_ms']:.2f} ({r.figures['status_syncs']} syncs)",
        ),
        (
            "CPU ms / label event",
            lambda r: f"{r.figures['label_ms']:.2f} ({r.figures['label_syncs']} syncs)",
        ),
        ("CPU ms, one lone event", lambda r: f"{r.figures['single_ms']:.0f}"),
        ("steered / SNAT pods", lambda r: f"{r.figures['steered']} / {r.figures['snat']}"),
        ("rules here / problems", lambda r: f"{r.figures['rules']} / {r.figures['problems']}"),
    ]
    width = max(16, *(len(row[1](r)) + 2 for row in rows for r in results))
    for label, cell in rows:
        print(f"{label:28}" + "".join(f"{cell(r):>{width}}" for r in results))
    if args.breakdown:
        print("\ndeep size after the rounds, MB")
        names = list(results[0].figures["sizes"])
        for name in names:
            print(
                f"{name:28}"
                + "".join(f"{r.figures['sizes'].get(name, 0) / 2**20:>{width}.1f}" for r in results)
            )
    big = [r for r in results if r.pods >= TARGET_PODS]
    print(
        f"\ntarget: a director's RSS < {TARGET_MB:.0f} MB at {TARGET_PODS} pods, {args.local} local"
    )
    if not big:
        print("  not run (no size of 50,000 pods or more)")
    for r in big:
        rss = max(r.figures["synced"]["VmRSS"], r.figures["final"]["VmRSS"])
        peak = r.figures["final"]["VmHWM"]
        print(
            f"  selection {r.selection}, {r.pods} pods: {_verdict(rss)} after sync "
            f"({rss:.0f} MB), {_verdict(peak)} at the peak ({peak:.0f} MB)"
        )


def _verdict(mb: float) -> str:
    return "PASS" if mb < TARGET_MB else "FAIL"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--pods", default="10000,50000", help="cluster sizes, comma-separated")
    ap.add_argument("--pods-per-node", type=int, default=100)
    ap.add_argument("--local", type=int, default=100, help="pods on the measured node")
    ap.add_argument("--rules", type=int, default=100)
    ap.add_argument("--events", type=int, default=1000, help="pods changed per round")
    ap.add_argument("--breakdown", action="store_true", help="deep sizes of stores and caches")
    ap.add_argument("--apiserver", action="store_true", help="a real kube-apiserver")
    ap.add_argument(
        "--selection",
        help="the agent's selection modes, comma-separated (default: every mode it has)",
    )
    ap.add_argument("--agent-log", help="append the agents' logs to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    ap.add_argument("--node", default=NODE, help=argparse.SUPPRESS)
    ap.add_argument("--node-ip", help=argparse.SUPPRESS)
    ap.add_argument("--sentinel", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        asyncio.run(child(args))
        return
    t = time.monotonic()
    results = asyncio.run(run(args))
    report(results, args)
    print(f"\n(run took {time.monotonic() - t:.0f}s)")


if __name__ == "__main__":
    main()
