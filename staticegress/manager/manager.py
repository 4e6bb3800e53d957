"""The gateway manager: probes nodes, and (when leader) assigns gateways and owns status.

Root tasks: three reflectors (StaticEgressIPs, Nodes, Services), the ICMP
prober, the leader elector, the coalescing sync and the health server. Every
replica probes every node, so gateways keep hearing managers while
leadership changes hands; only the leader computes and writes.

One sync: parse every StaticEgressIP (an invalid one gets an `InvalidSpec`
status), compute the assignment (`staticegress.model.assign`, pure), compare
each object's desired status with the one it has, and patch only those that
differ, checking leadership right before each write. Events follow the
changes: GatewayAssigned, GatewayFailover, NoEligibleGateway.

A node is healthy while it answers heartbeats and its Node is not NotReady.
The prober starts by assuming every node healthy, so a new leader keeps the
current assignment instead of reshuffling it while its first probes are out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from kubernetes_asyncio import client

from staticegress.agent.health import HealthState
from staticegress.agent.health import serve as serve_health
from staticegress.agent.metrics import Registry
from staticegress.agent.sync import SyncRunner
from staticegress.api.core import Node, parse_node, parse_service
from staticegress.api.types import NodeName
from staticegress.api.v1alpha1 import GROUP, PLURAL, VERSION
from staticegress.dataplane.heartbeat import Prober
from staticegress.k8s.client import REQUEST_TIMEOUT
from staticegress.k8s.events import EventRecorder
from staticegress.k8s.reflector import Reflector
from staticegress.k8s.snapshot import Invalid, ParseCache, parse_policy
from staticegress.manager.leader import LeaderElector
from staticegress.model.assign import (
    DEFAULT_GATEWAY_LABEL,
    PolicyResult,
    assign_gateways,
    invalid_result,
    status_body,
)

log = logging.getLogger(__name__)
MERGE = "application/merge-patch+json"


@dataclass(frozen=True)
class ManagerOptions:
    identity: str
    namespace: str = "staticegress-system"
    lease_name: str = "staticegress-manager"
    lease_duration: float = 2.0
    renew_interval: float = 0.5
    probe_interval: float = 0.1
    down_after: int = 3
    up_after: int = 5
    default_label: tuple[str, str] = DEFAULT_GATEWAY_LABEL
    health_address: str = "127.0.0.1"
    health_port: int = 9810


def _not_ready(obj: dict[str, Any]) -> bool:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return bool(c.get("status") == "False")
    return False


class Manager:
    def __init__(self, api: client.ApiClient, opts: ManagerOptions) -> None:
        self.api = api
        self.opts = opts
        self.custom = client.CustomObjectsApi(api)
        core = client.CoreV1Api(api)
        self.runner = SyncRunner(self.sync, min_interval=0.02, max_interval=30.0)
        poke = self.runner.poke
        self.reflectors = {
            "staticegressips": Reflector(
                name="staticegressips",
                list_fn=self.custom.list_cluster_custom_object,
                list_args=(GROUP, VERSION, PLURAL),
                on_change=poke,
            ),
            "nodes": Reflector(name="nodes", list_fn=core.list_node, on_change=poke),
            "services": Reflector(
                name="services", list_fn=core.list_service_for_all_namespaces, on_change=poke
            ),
        }
        self.prober = Prober(
            interval=opts.probe_interval,
            down_after=opts.down_after,
            up_after=opts.up_after,
            on_change=self._health_changed,
        )
        self.elector = LeaderElector(
            api,
            namespace=opts.namespace,
            name=opts.lease_name,
            identity=opts.identity,
            duration=opts.lease_duration,
            renew_interval=opts.renew_interval,
            on_change=lambda leader: self._leadership(leader),
        )
        self.events = EventRecorder(api, component="staticegress-manager", host=opts.identity)
        self.metrics = Registry()
        for name, kind, help in (
            ("leader", "gauge", "1 while this replica is the leader."),
            ("assignments_total", "counter", "Egress IPs given a gateway (first time or moved)."),
            ("failovers_total", "counter", "Egress IPs moved off a gateway that failed."),
            ("unreachable_gateways", "gauge", "Nodes that do not answer heartbeats."),
            ("status_writes_total", "counter", "Status patches written."),
            ("sync_errors_total", "counter", "Syncs that failed and were retried."),
        ):
            self.metrics.declare(name, kind, help)
        self.reassign = self.metrics.histogram(
            "time_to_reassign_seconds",
            "From a gateway's first missed heartbeat to its egress IPs' new status.",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0),
        )
        self._node_ips: dict[NodeName, IPv4Address] = {}
        self.parse_cache = ParseCache()

    def _leadership(self, leader: bool) -> None:
        self.metrics.set("leader", 1 if leader else 0)
        if leader:
            self.runner.poke()

    def _health_changed(self, ip: IPv4Address, up: bool) -> None:
        name = next((n for n, a in self._node_ips.items() if a == ip), str(ip))
        log.warning(
            "manager=%s node=%s heartbeat %s", self.opts.identity, name, "back" if up else "lost"
        )
        self.metrics.set(
            "unreachable_gateways", sum(1 for st in self.prober.targets.values() if not st.up)
        )
        self.runner.poke()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for r in self.reflectors.values():
                tg.create_task(r.run(), name=f"reflector-{r.name}")
            tg.create_task(self.prober.run(), name="prober")
            tg.create_task(self.elector.run(), name="leader")
            tg.create_task(self.runner.run(), name="sync")
            if self.opts.health_port:
                await serve_health(
                    HealthState(self._watches_ok, self._ready, self.metrics),
                    host=self.opts.health_address,
                    port=self.opts.health_port,
                )

    def _watches_ok(self) -> tuple[bool, str]:
        down = [
            r.name
            for r in self.reflectors.values()
            if not r.connected and time.monotonic() - r.last_connected > 120
        ]
        return (not down, "ok" if not down else f"watches down: {', '.join(down)}")

    def _ready(self) -> tuple[bool, str]:
        synced = all(r.synced.is_set() for r in self.reflectors.values())
        return (synced, "ok" if synced else "watches not listed yet")

    # ------------------------------------------------------------------ sync

    def _nodes(self) -> list[Node]:
        nodes = [
            n
            for n in (parse_node(o) for o in self.reflectors["nodes"].store.values())
            if n is not None
        ]
        self._node_ips = {n.name: n.internal_ip for n in nodes if n.internal_ip is not None}
        self.prober.set_targets(self._node_ips.values())
        return nodes

    async def sync(self, force: bool) -> None:
        if not all(r.synced.is_set() for r in self.reflectors.values()):
            return
        nodes = self._nodes()  # keeps the prober's targets current on every replica
        if not self.elector.is_leader():
            return
        raw = self.reflectors["nodes"].store
        healthy = frozenset(
            n.name
            for n in nodes
            if n.internal_ip is not None
            and self.prober.is_up(n.internal_ip)
            and not _not_ready(raw.get(n.name, {}))
        )
        services = frozenset(
            (s.namespace, s.name)
            for s in (parse_service(o) for o in self.reflectors["services"].store.values())
            if s is not None
        )
        store = self.reflectors["staticegressips"].store
        parsed = self.parse_cache.parse_all("policies", store, parse_policy)
        policies = [p for p in parsed if not isinstance(p, Invalid)]
        results: list[PolicyResult] = [
            invalid_result(p.ref, p.generation, p.error) for p in parsed if isinstance(p, Invalid)
        ]
        now = dt.datetime.now(dt.UTC)
        results += assign_gateways(
            policies,
            nodes=nodes,
            healthy=healthy,
            services=services,
            now=now,
            default_label=self.opts.default_label,
        )
        for result in results:
            # The store is keyed namespace/name, as the ref prints.
            await self._write(result, store[str(result.ref)], now)

    async def _write(self, result: PolicyResult, obj: dict[str, Any], now: dt.datetime) -> None:
        current = obj.get("status") or {}
        prev_conditions = {c.get("type"): c for c in current.get("conditions") or []}
        body = status_body(result, previous_conditions=prev_conditions, now=now)
        if _same(body, current):
            return
        if not self.elector.is_leader():
            return  # lost the lease since the sync began: write nothing
        meta = obj["metadata"]
        patch = {"metadata": {"resourceVersion": meta.get("resourceVersion")}, "status": body}
        try:
            await self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                meta["namespace"],
                PLURAL,
                meta["name"],
                patch,
                _content_type=MERGE,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except client.exceptions.ApiException as exc:
            if exc.status == 409:
                self.runner.poke()  # the object changed under us: recompute
                return
            raise
        self.metrics.inc("status_writes_total")
        uid = str(meta.get("uid", ""))
        old = {a.get("egressIP"): a.get("gateway") for a in current.get("egressIPs") or []}
        for kind, reason, message in result.events:
            await self.events.emit(result.ref, uid, reason, message, kind=kind)
            if reason in ("GatewayAssigned", "GatewayFailover"):
                self.metrics.inc("assignments_total")
            if reason == "GatewayFailover":
                self.metrics.inc("failovers_total")
                eip = message.split(" ", 1)[0]
                prev_ip = self._node_ips.get(NodeName(str(old.get(eip))))
                st = self.prober.targets.get(prev_ip) if prev_ip else None
                if st is not None and st.down_since is not None:
                    took = time.monotonic() - st.down_since
                    self.reassign.observe(took)
                    log.warning(
                        "manager=%s egressip=%s failover in %.3fs: %s",
                        self.opts.identity,
                        result.ref,
                        took,
                        message,
                    )
        log.info(
            "manager=%s egressip=%s status written: %s",
            self.opts.identity,
            result.ref,
            body["summary"],
        )


def _same(body: dict[str, Any], current: dict[str, Any]) -> bool:
    """Equal apart from fields the API server may render differently."""
    keys = ("observedGeneration", "egressIPs", "summary")
    if any(body.get(k) != current.get(k) for k in keys):
        return False
    strip = ("lastTransitionTime",)
    a = [{k: v for k, v in c.items() if k not in strip} for c in body["conditions"]]
    b = [{k: v for k, v in c.items() if k not in strip} for c in current.get("conditions") or []]
    return a == b
