"""The lab kubelet and CNI for one node: make the API server believe in the node,
and make every Pod bound to it a real network namespace.

What it does, per node, as one process in the host namespace (it manages the
node's namespace from outside, because named namespaces cannot be created
from inside one):
- registers the Node (InternalIP on the underlay, podCIDR, capacity), keeps
  its Lease renewed every `LEASE_RENEW` seconds and its Ready condition
  fresh; when the process stops (node killed), both go stale, as they would
  for a dead kubelet;
- CNI: wires the node's routes to every other node's pod range, either over
  the underlay (host-gw) or over a flannel-like VXLAN overlay (vxlan), and
  realizes each Pod bound to the node as a namespace with a veth, a /32
  address from the podCIDR and a default route through proxy ARP; then
  patches the Pod's status (IPs, Ready) so the controller manager fills
  EndpointSlices;
- tears a Pod down when it is deleted, then removes the object, as a kubelet
  does once its containers are gone.

Containers are not run: a pod is a network namespace in which `lab exec` runs
the host's programs. Realized pods are recorded under the lab's state
directory, so a restarted kubelet takes them over instead of re-creating them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import platform
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.k8s.client import REQUEST_TIMEOUT
from staticegress.k8s.reflector import Reflector
from staticegress.lab import plan
from staticegress.lab.netns import LabError, arun, asysctl, kill_netns_processes

log = logging.getLogger(__name__)

LEASE_RENEW = 2.0
"""Seconds between Lease renewals (a real kubelet uses 10; the lab wants quick tests)."""
LEASE_DURATION = 40
STATUS_EVERY = 10.0
KUBELET_VERSION = "v1.36.3"
MERGE = "application/merge-patch+json"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class RealizedPod:
    """A pod the kubelet wired up; persisted as `pods/<uid>.json`."""

    namespace: str
    name: str
    uid: str
    node: str
    netns: str
    ip: str
    veth: str
    host_network: bool = False


def pods_dir(state_dir: Path) -> Path:
    return state_dir / "pods"


def load_realized(state_dir: Path, node: str | None = None) -> list[RealizedPod]:
    """Every realized pod on record (optionally on one node)."""
    out = []
    for f in sorted(pods_dir(state_dir).glob("*.json")):
        try:
            pod = RealizedPod(**json.loads(f.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if node is None or pod.node == node:
            out.append(pod)
    return out


def _record(state_dir: Path, pod: RealizedPod) -> None:
    d = pods_dir(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{pod.uid}.tmp"
    tmp.write_text(json.dumps(asdict(pod)))
    tmp.replace(d / f"{pod.uid}.json")


def _forget(state_dir: Path, uid: str) -> None:
    (pods_dir(state_dir) / f"{uid}.json").unlink(missing_ok=True)


class LabKubelet:
    """Kubelet and CNI for one lab node."""

    def __init__(
        self,
        *,
        api: client.ApiClient,
        node: plan.NodePlan,
        cni: plan.CNI,
        state_dir: Path,
        routes_only: bool = False,
    ) -> None:
        self.api = api
        self.routes_only = routes_only
        """Only the CNI's node-to-node routes: a real kubelet runs the node."""
        self.core = client.CoreV1Api(api)
        self.node = node
        self.cni = cni
        self.state_dir = state_dir
        self._dirty = asyncio.Event()
        self._routes_dirty = asyncio.Event()
        self.pods = Reflector(
            name=f"pods@{node.name}",
            list_fn=self.core.list_pod_for_all_namespaces,
            list_kwargs={"field_selector": f"spec.nodeName={node.name}"},
            on_change=self._dirty.set,
        )
        self.nodes = Reflector(
            name="nodes", list_fn=self.core.list_node, on_change=self._routes_dirty.set
        )
        self.realized: dict[str, RealizedPod] = {
            p.uid: p for p in load_realized(state_dir, node.name)
        }
        self._reported: dict[str, str] = {}
        self._vtep_mac = ""

    # ----------------------------------------------------------------- main

    async def run(self) -> None:
        if self.cni == "vxlan":
            self._vtep_mac = await self._ensure_vxlan()
        if self.routes_only:
            await self._adopt()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.nodes.run())
                tg.create_task(self._route_loop())
            return
        await self._register()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.pods.run())
            tg.create_task(self.nodes.run())
            tg.create_task(self._lease_loop())
            tg.create_task(self._status_loop())
            tg.create_task(self._pod_loop())
            tg.create_task(self._route_loop())

    # ------------------------------------------------------------ node object

    def _node_status(self) -> dict[str, Any]:
        now = _now()

        def cond(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": self._started,
            }

        resources = {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "20Gi"}
        return {
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": str(self.node.underlay_ip)},
                    {"type": "Hostname", "address": self.node.name},
                ],
                "capacity": resources,
                "allocatable": resources,
                "conditions": [
                    cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                    cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                    cond("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
                    cond("Ready", "True", "KubeletReady", "lab kubelet is posting ready status"),
                ],
                "nodeInfo": {
                    "machineID": self.node.name,
                    "systemUUID": self.node.name,
                    "bootID": self._started,
                    "kernelVersion": platform.release(),
                    "osImage": "staticegress lab",
                    "containerRuntimeVersion": "lab://netns",
                    "kubeletVersion": KUBELET_VERSION,
                    "kubeProxyVersion": "",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            }
        }

    async def _register(self) -> None:
        self._started = _now()
        labels = {
            "kubernetes.io/hostname": self.node.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            plan.LAB_LABEL: "true",
            # Every lab node may be a gateway (the manager's default label).
            "staticegress.io/gateway": "true",
        }
        annotations = {plan.VTEP_ANNOTATION: self._vtep_mac} if self._vtep_mac else {}
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node.name, "labels": labels, "annotations": annotations},
            "spec": {"podCIDR": str(self.node.pod_cidr), "podCIDRs": [str(self.node.pod_cidr)]},
        }
        try:
            await self.core.create_node(body, _request_timeout=REQUEST_TIMEOUT)
            log.info("node=%s registered", self.node.name)
        except ApiException as exc:
            if exc.status != 409:
                raise
            patch = {"metadata": {"labels": labels, "annotations": annotations}}
            await self.core.patch_node(
                self.node.name, patch, _content_type=MERGE, _request_timeout=REQUEST_TIMEOUT
            )
        await self._post_status()

    async def _adopt(self) -> None:
        """With a real kubelet: wait for it to register the Node, then give the
        Node what the CNI's IPAM owns (the pod range, the VTEP's MAC), as the
        controller manager's IPAM and an overlay daemon would."""
        while True:
            try:
                obj = await self.core.read_node(self.node.name, _request_timeout=REQUEST_TIMEOUT)
                break
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("node=%s read failed: %s", self.node.name, exc.reason)
            except Exception as exc:
                log.warning("node=%s read failed: %s", self.node.name, exc)
            await asyncio.sleep(0.5)
        patch: dict[str, Any] = {}
        if self._vtep_mac:
            patch["metadata"] = {"annotations": {plan.VTEP_ANNOTATION: self._vtep_mac}}
        if not obj.spec.pod_cidr:
            cidr = str(self.node.pod_cidr)
            patch["spec"] = {"podCIDR": cidr, "podCIDRs": [cidr]}
        if patch:
            await self.core.patch_node(
                self.node.name, patch, _content_type=MERGE, _request_timeout=REQUEST_TIMEOUT
            )
        log.info("node=%s adopted (pod range %s)", self.node.name, self.node.pod_cidr)

    async def _post_status(self) -> None:
        await self.core.patch_node_status(
            self.node.name,
            self._node_status(),
            _content_type=MERGE,
            _request_timeout=REQUEST_TIMEOUT,
        )

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY)
            try:
                await self._post_status()
            except Exception as exc:
                log.warning("node=%s status update failed: %s", self.node.name, exc)

    async def _lease_loop(self) -> None:
        leases = client.CoordinationV1Api(self.api)
        name, ns = self.node.name, "kube-node-lease"
        while True:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "holderIdentity": name,
                    "leaseDurationSeconds": LEASE_DURATION,
                    "renewTime": _micro_now(),
                },
            }
            try:
                await leases.patch_namespaced_lease(
                    name, ns, body, _content_type=MERGE, _request_timeout=REQUEST_TIMEOUT
                )
            except ApiException as exc:
                if exc.status == 404:
                    with contextlib.suppress(ApiException):
                        await leases.create_namespaced_lease(
                            ns, body, _request_timeout=REQUEST_TIMEOUT
                        )
                else:
                    log.warning("node=%s lease renewal failed: %s", name, exc.reason)
            except Exception as exc:
                log.warning("node=%s lease renewal failed: %s", name, exc)
            await asyncio.sleep(LEASE_RENEW)

    # ------------------------------------------------------------------ CNI

    async def _ensure_vxlan(self) -> str:
        ns = self.node.netns
        existing = await arun("ip", "-j", "-n", ns, "link", "show", plan.LAB_VXLAN, check=False)
        if not existing.strip():
            await arun(
                "ip",
                "-n",
                ns,
                "link",
                "add",
                plan.LAB_VXLAN,
                "type",
                "vxlan",
                "id",
                str(plan.LAB_VXLAN_ID),
                "dstport",
                str(plan.LAB_VXLAN_PORT),
                "local",
                str(self.node.underlay_ip),
                "dev",
                "eth0",
                "nolearning",
            )
            await arun(
                "ip", "-n", ns, "link", "set", plan.LAB_VXLAN, "mtu", str(plan.VXLAN_MTU), "up"
            )
            await arun(
                "ip", "-n", ns, "addr", "replace", f"{self.node.vtep_ip}/32", "dev", plan.LAB_VXLAN
            )
        out = await arun("ip", "-j", "-n", ns, "link", "show", plan.LAB_VXLAN)
        return str(json.loads(out)[0]["address"])

    async def _route_loop(self) -> None:
        await _coalesced(
            f"node={self.node.name} route sync",
            self.nodes.synced,
            self._routes_dirty,
            self._sync_routes,
        )

    async def _sync_routes(self) -> None:
        ns = self.node.netns
        commands: list[str] = []
        for obj in self.nodes.store.values():
            name = obj["metadata"]["name"]
            cidr = (obj.get("spec") or {}).get("podCIDR")
            addrs = (obj.get("status") or {}).get("addresses") or []
            internal = next((a["address"] for a in addrs if a["type"] == "InternalIP"), None)
            if name == self.node.name or not cidr or not internal:
                continue
            # Values come from another node's object: accept only what parses
            # and lies inside the lab's ranges before it reaches a command.
            peer_cidr = IPv4Network(cidr)
            peer_ip = IPv4Address(internal)
            if not peer_cidr.subnet_of(plan.CLUSTER_CIDR) or peer_ip not in plan.UNDERLAY:
                log.warning("node=%s ignoring peer %s with foreign addresses", ns, name)
                continue
            if self.cni == "host-gw":
                commands.append(f"route replace {peer_cidr} via {peer_ip} dev eth0")
                continue
            mac = (obj["metadata"].get("annotations") or {}).get(plan.VTEP_ANNOTATION, "")
            if not _is_mac(mac):
                continue
            vtep = peer_cidr.network_address
            commands += [
                f"neigh replace {vtep} lladdr {mac} dev {plan.LAB_VXLAN} nud permanent",
                f"route replace {peer_cidr} via {vtep} dev {plan.LAB_VXLAN} onlink",
            ]
            await arun(
                "bridge",
                "-n",
                ns,
                "fdb",
                "replace",
                mac,
                "dev",
                plan.LAB_VXLAN,
                "dst",
                str(peer_ip),
                "self",
                "permanent",
            )
        if commands:
            await _batch(ns, commands, force=True)

    # ----------------------------------------------------------------- pods

    async def _pod_loop(self) -> None:
        await _coalesced(
            f"node={self.node.name} pod sync", self.pods.synced, self._dirty, self._sync_pods
        )

    async def _sync_pods(self) -> None:
        wanted: dict[str, dict[str, Any]] = {}
        for obj in self.pods.store.values():
            meta = obj["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            wanted[meta["uid"]] = obj
        # Tear down first: frees addresses for the pods that replace them.
        for uid in sorted(set(self.realized) - set(wanted)):
            await self._teardown(self.realized.pop(uid))
        for obj in self.pods.store.values():
            meta = obj["metadata"]
            if meta.get("deletionTimestamp") and meta["uid"] not in self.realized:
                await self._finalize_delete(obj)
        for uid, obj in sorted(wanted.items()):
            pod = self.realized.get(uid)
            if pod is None:
                pod = await self._realize(obj)
                self.realized[uid] = pod
                _record(self.state_dir, pod)
            if self._reported.get(uid) != pod.ip or not _is_ready(obj):
                await self._report(obj, pod)
                self._reported[uid] = pod.ip

    def _allocate(self) -> IPv4Address:
        used = {p.ip for p in load_realized(self.state_dir, self.node.name)}
        used |= {p.ip for p in self.realized.values()}
        for host in list(self.node.pod_cidr.hosts())[1:]:  # .1 stays free, as CNIs keep it
            if str(host) not in used:
                return host
        raise LabError(f"node {self.node.name}: pod range {self.node.pod_cidr} exhausted")

    async def _realize(self, obj: dict[str, Any]) -> RealizedPod:
        meta, spec = obj["metadata"], obj.get("spec") or {}
        uid = meta["uid"]
        if spec.get("hostNetwork"):
            return RealizedPod(
                meta["namespace"],
                meta["name"],
                uid,
                self.node.name,
                self.node.netns,
                str(self.node.underlay_ip),
                "",
                True,
            )
        ip = self._allocate()
        netns, veth, node_ns = plan.pod_netns(uid), plan.pod_veth(uid), self.node.netns
        mtu = plan.VXLAN_MTU if self.cni == "vxlan" else 1500
        await arun("ip", "netns", "add", netns)
        try:
            await arun(
                "ip",
                "link",
                "add",
                veth,
                "netns",
                node_ns,
                "mtu",
                str(mtu),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns,
            )
            pod_cmds = [
                "link set lo up",
                f"link set eth0 mtu {mtu} up",
                f"addr add {ip}/32 dev eth0",
                f"route add {plan.POD_GATEWAY} dev eth0 scope link",
                f"route add default via {plan.POD_GATEWAY} dev eth0",
            ]
            await _batch(netns, pod_cmds)
            # Answer the pods' ARP for 169.254.1.1 at once: the default proxy
            # delay would hold every pod's first packet back for up to 0.8 s.
            await asysctl(node_ns, f"net.ipv4.conf.{veth}.proxy_arp", 1)
            await asysctl(node_ns, f"net.ipv4.neigh.{veth}.proxy_delay", 0)
            await _batch(node_ns, [f"link set {veth} up", f"route replace {ip}/32 dev {veth}"])
        except Exception:
            await arun("ip", "netns", "delete", netns, check=False)
            raise
        log.info(
            "node=%s pod=%s/%s ip=%s netns=%s realized",
            self.node.name,
            meta["namespace"],
            meta["name"],
            ip,
            netns,
        )
        return RealizedPod(
            meta["namespace"], meta["name"], uid, self.node.name, netns, str(ip), veth
        )

    async def _teardown(self, pod: RealizedPod) -> None:
        if not pod.host_network:
            await asyncio.to_thread(kill_netns_processes, pod.netns)
            # Deleting the namespace destroys the veth pair and its /32 route.
            await arun("ip", "netns", "delete", pod.netns, check=False)
        _forget(self.state_dir, pod.uid)
        self._reported.pop(pod.uid, None)
        log.info("node=%s pod=%s/%s torn down", self.node.name, pod.namespace, pod.name)

    async def _finalize_delete(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        with contextlib.suppress(ApiException):
            await self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                grace_period_seconds=0,
                body={"preconditions": {"uid": meta["uid"]}, "gracePeriodSeconds": 0},
                _request_timeout=REQUEST_TIMEOUT,
            )

    async def _report(self, obj: dict[str, Any], pod: RealizedPod) -> None:
        now = _now()
        meta, spec = obj["metadata"], obj.get("spec") or {}

        def cond(kind: str) -> dict[str, str]:
            return {"type": kind, "status": "True", "lastTransitionTime": now}

        containers = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "containerID": f"lab://{pod.uid[:8]}-{c['name']}",
                "ready": True,
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            }
            for c in spec.get("containers", [])
        ]
        status = {
            "status": {
                "phase": "Running",
                "hostIP": str(self.node.underlay_ip),
                "hostIPs": [{"ip": str(self.node.underlay_ip)}],
                "podIP": pod.ip,
                "podIPs": [{"ip": pod.ip}],
                "startTime": (obj.get("status") or {}).get("startTime") or now,
                "conditions": [
                    cond("PodReadyToStartContainers"),
                    cond("Initialized"),
                    cond("ContainersReady"),
                    cond("Ready"),
                    cond("PodScheduled"),
                ],
                "containerStatuses": containers,
            }
        }
        await self.core.patch_namespaced_pod_status(
            meta["name"],
            meta["namespace"],
            status,
            _content_type=MERGE,
            _request_timeout=REQUEST_TIMEOUT,
        )


async def _coalesced(
    what: str, synced: asyncio.Event, dirty: asyncio.Event, fn: Callable[[], Awaitable[None]]
) -> None:
    """Run `fn` whenever `dirty` is set, after the first list; retry a second after errors."""
    await synced.wait()
    while True:
        await dirty.wait()
        dirty.clear()
        try:
            await fn()
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)
            await asyncio.sleep(1)
            dirty.set()


def _is_ready(obj: dict[str, Any]) -> bool:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return bool(c.get("status") == "True")
    return False


def _is_mac(value: str) -> bool:
    parts = value.split(":")
    return len(parts) == 6 and all(
        len(p) == 2 and all(ch in "0123456789abcdefABCDEF" for ch in p) for p in parts
    )


async def _batch(netns: str, commands: list[str], *, force: bool = False) -> None:
    """Run `ip` commands in `netns`; with `force`, go on past failing ones."""
    proc = await asyncio.create_subprocess_exec(
        "ip",
        "-n",
        netns,
        *(["-force"] if force else []),
        "-batch",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate(("\n".join(commands) + "\n").encode())
    if proc.returncode != 0:
        raise LabError(f"ip -n {netns}: {err.decode().strip()}")


async def run_kubelet(
    *,
    kubeconfig: Path,
    node: plan.NodePlan,
    cni: plan.CNI,
    state_dir: Path,
    routes_only: bool = False,
) -> None:
    """Entry point of `staticegress lab kubelet`."""
    from staticegress.k8s.client import api_client

    api = await api_client(kubeconfig)
    try:
        await LabKubelet(
            api=api, node=node, cni=cni, state_dir=state_dir, routes_only=routes_only
        ).run()
    finally:
        await api.close()
