"""The node agent: reflectors -> one snapshot -> desired state -> kernel.

Root tasks, in one TaskGroup (if one dies, the process dies and is restarted):
six reflectors (StaticEgressIPs, Pods, Nodes, Services, EndpointSlices,
Namespaces), the SyncRunner, and the health server.

Every watch callback only pokes the runner; `sync()` recomputes everything
from the stores. Nothing is programmed before every reflector has completed
its first list: an empty store means "not known yet" and must never replace a
working dataplane with an empty one.

Apply order within one sync, chosen so no packet finds a half-built path:
1. netlink "add": tunnel, neighbours, FDB, routes and rules that are missing;
2. nftables: the whole table in one transaction;
3. netlink "finish": egress addresses added (then announced by gratuitous
   ARP) or removed, and stale rules, routes, neighbours removed.

Shutdown: on SIGTERM the agent exits and leaves the dataplane as it is. A
rolling upgrade or a crash therefore never opens a window in which selected
pods leave unsteered; the next agent adopts what it finds. Removing
everything is a deliberate act: `staticegress agent --cleanup`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Literal

from kubernetes_asyncio import client

from staticegress.agent.health import HealthState
from staticegress.agent.health import serve as serve_health
from staticegress.agent.metrics import Registry
from staticegress.agent.sync import SyncRunner, TemporaryError
from staticegress.api.core import parse_node
from staticegress.api.types import EgressIPRef, IPAddress, NodeName
from staticegress.api.v1alpha1 import GROUP, PLURAL, VERSION
from staticegress.dataplane.conntrack import flush_pods
from staticegress.dataplane.heartbeat import Prober
from staticegress.dataplane.host import Uplink, announce, find_uplink, prepare_sysctls
from staticegress.dataplane.netlink import NetlinkApplier
from staticegress.dataplane.netns import NetnsRunner
from staticegress.dataplane.nft import NftApplier, NftError
from staticegress.dataplane.transport import detect_transport
from staticegress.k8s.events import EventRecorder
from staticegress.k8s.reflector import Reflector
from staticegress.k8s.snapshot import Invalid, ParseCache, build_snapshot
from staticegress.model.desired import AgentConfig, DesiredState, Snapshot, compute_desired
from staticegress.render.netlink import RoutingConfig, render_netlink
from staticegress.render.nft import TUNNEL, MarkLayout, delete_table_batch, render_ruleset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentOptions:
    """Command-line settings."""

    node: str
    transport: Literal["auto", "direct", "vxlan"] = "auto"
    cluster_cidrs: tuple[IPv4Network, ...] = ()
    health_address: str | None = None
    """Where /healthz, /readyz and /metrics listen; None: the node's InternalIP."""
    health_port: int = 9808
    min_sync_interval: float = 0.05
    resync_interval: float = 60.0
    max_pending: float = 30.0
    watch_grace: float = 120.0
    marks: MarkLayout = field(default_factory=MarkLayout)
    table_base: int = 7300
    rule_priority: int = 100
    netns: str | None = None
    """Drive this named network namespace from outside (tests); None: our own."""
    fence_after: float = 1.0
    """Withdraw owned egress IPs after this long without an answer from any peer
    (0 disables fencing)."""
    rejoin_after: float = 3.0
    peer_interval: float = 0.2


class Agent:
    def __init__(self, api: client.ApiClient, opts: AgentOptions) -> None:
        self.api = api
        self.opts = opts
        self.node = NodeName(opts.node)
        core = client.CoreV1Api(api)
        custom = client.CustomObjectsApi(api)
        disco = client.DiscoveryV1Api(api)
        self.runner = SyncRunner(
            self.sync, min_interval=opts.min_sync_interval, max_interval=opts.resync_interval
        )
        poke = self.runner.poke
        self.reflectors = {
            "staticegressips": Reflector(
                name="staticegressips",
                list_fn=custom.list_cluster_custom_object,
                list_args=(GROUP, VERSION, PLURAL),
                on_change=poke,
            ),
            "pods": Reflector(
                name="pods", list_fn=core.list_pod_for_all_namespaces, on_change=poke
            ),
            "nodes": Reflector(name="nodes", list_fn=core.list_node, on_change=poke),
            "services": Reflector(
                name="services", list_fn=core.list_service_for_all_namespaces, on_change=poke
            ),
            "endpointslices": Reflector(
                name="endpointslices",
                list_fn=disco.list_endpoint_slice_for_all_namespaces,
                on_change=poke,
            ),
            "namespaces": Reflector(name="namespaces", list_fn=core.list_namespace, on_change=poke),
        }
        self.netns_runner = NetnsRunner(opts.netns)
        self.nft = NftApplier(self.netns_runner)
        self.netlink = NetlinkApplier(netns=opts.netns)
        self.events = EventRecorder(api, component="staticegress-agent", host=opts.node)
        self.metrics = Registry()
        for name, kind, help in (
            ("sync_errors_total", "counter", "Syncs that failed and were retried."),
            ("syncs_total", "counter", "Syncs run, applied or found unchanged."),
            ("pods_steered", "gauge", "Local pods whose matching traffic is steered or dropped."),
            ("pods_snat", "gauge", "Pods this node SNATs as a gateway."),
            ("rules_programmed", "gauge", "Rules with at least one pod programmed here."),
            ("egress_ips_owned", "gauge", "Egress IPs this node holds."),
            ("problems", "gauge", "StaticEgressIP problems this node cannot program."),
            ("fences_total", "counter", "Times this node withdrew its egress IPs, cut off."),
            ("fenced", "gauge", "1 while this node withholds its egress IPs."),
            (
                "last_successful_sync_timestamp_seconds",
                "gauge",
                "Unix time of the last sync that left the dataplane as desired.",
            ),
        ):
            self.metrics.declare(name, kind, help)
        self.sync_duration = self.metrics.histogram(
            "sync_duration_seconds", "Time to compute and apply the desired state."
        )
        self.applied: DesiredState | None = None
        self.slots: dict[NodeName, int] = {}
        self.transport: Literal["direct", "vxlan"] | None = None
        self.uplink: Uplink | None = None
        self.node_ip: IPv4Address | None = None
        self.first_sync = asyncio.Event()
        self._reported_invalid: set[tuple[EgressIPRef, int]] = set()
        self._announcing: set[asyncio.Task[None]] = set()
        self.last_compute_seconds = 0.0
        self.parse_cache = ParseCache()
        self.withheld: frozenset[IPAddress] = frozenset()
        self.prober = Prober(interval=opts.peer_interval, down_after=3, up_after=2)
        self._fenced_at: float | None = None
        self._heard_since: float | None = None
        self._probing_since: float | None = None
        self._relists_at_heal = 0

    # ----------------------------------------------------------------- main

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for r in self.reflectors.values():
                tg.create_task(r.run(), name=f"reflector-{r.name}")
            await self._wait_synced()
            await self._discover()
            tg.create_task(self.runner.run(), name="sync")
            if self.opts.fence_after > 0:
                tg.create_task(self.prober.run(), name="peer-prober")
                tg.create_task(self._fence_loop(), name="fence")
            if self.opts.health_port:
                host = self.opts.health_address or str(self.node_ip)
                await serve_health(
                    HealthState(self._watches_ok, self._ready, self.metrics),
                    host=host,
                    port=self.opts.health_port,
                )
                log.info(
                    "node=%s health and metrics on %s:%d", self.node, host, self.opts.health_port
                )

    async def _wait_synced(self) -> None:
        start = time.monotonic()
        for r in self.reflectors.values():
            await r.synced.wait()
        log.info("node=%s all watches listed in %.2fs", self.node, time.monotonic() - start)

    async def _discover(self) -> None:
        """Find our node's address, uplink and transport; retried until they exist."""
        while True:
            obj = self.reflectors["nodes"].store.get(self.node)
            node = parse_node(obj) if obj else None
            if node is not None and node.internal_ip is not None:
                break
            log.warning("node=%s waiting for our Node object and its InternalIP", self.node)
            await asyncio.sleep(1)
        self.node_ip = node.internal_ip
        self.uplink = await find_uplink(node.internal_ip, netns=self.opts.netns)
        if self.opts.transport == "auto":
            nodes = [
                n
                for n in (parse_node(o) for o in self.reflectors["nodes"].store.values())
                if n is not None
            ]
            self.transport, why = await detect_transport(
                nodes, me=self.node, uplink=self.uplink.name, netns=self.opts.netns
            )
            log.info("node=%s transport=%s (auto: %s)", self.node, self.transport, why)
        else:
            self.transport = self.opts.transport
            log.info("node=%s transport=%s (flag)", self.node, self.transport)
        # The tunnel's own setting is made once the first sync has created it.
        await prepare_sysctls(self.netns_runner, uplink=self.uplink.name, tunnel=None)

    # ----------------------------------------------------------------- sync

    def compute(self) -> tuple[DesiredState, list[Invalid], Snapshot]:
        stores = {k: r.store for k, r in self.reflectors.items()}
        snap, invalid = build_snapshot(
            cache=self.parse_cache,
            policies=stores["staticegressips"],
            pods=stores["pods"],
            nodes=stores["nodes"],
            services=stores["services"],
            namespaces=stores["namespaces"],
            slices=stores["endpointslices"],
        )
        config = AgentConfig(
            node=self.node,
            transport=self.transport or "direct",
            cluster_cidrs=self.opts.cluster_cidrs,
            max_slots=self.opts.marks.max_slots,
        )
        desired = compute_desired(snap, config, previous_slots=self.slots, withheld=self.withheld)
        return desired, invalid, snap

    async def sync(self, force: bool) -> None:
        if not all(r.synced.is_set() for r in self.reflectors.values()) or self.uplink is None:
            return
        assert self.transport is not None
        assert self.node_ip is not None
        start = time.perf_counter()
        desired, invalid, snap = self.compute()
        self.last_compute_seconds = time.perf_counter() - start
        self.metrics.inc("syncs_total")
        await self._report(desired, invalid, {p.ref: p.uid for p in snap.policies})
        if desired == self.applied and not force:
            self._record(desired, start)
            return
        routing = RoutingConfig(
            uplink=self.uplink.name,
            uplink_ip=self.node_ip,
            uplink_mtu=self.uplink.mtu,
            table_base=self.opts.table_base,
            rule_priority=self.opts.rule_priority,
            marks=self.opts.marks,
        )
        spec = render_netlink(desired, transport=self.transport, cfg=routing)
        batch = render_ruleset(desired, transport=self.transport, marks=self.opts.marks)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("node=%s ruleset=%s", self.node, batch)
        errors: list[str] = []
        res = await self.netlink.apply(spec, phase="add")
        errors += res.errors or []
        if spec.tunnel is not None:
            await prepare_sysctls(self.netns_runner, uplink=self.uplink.name, tunnel=TUNNEL)
        try:
            await self.nft.apply(batch)
        except NftError as exc:
            self.metrics.inc("sync_errors_total")
            raise TemporaryError(f"nftables refused the ruleset: {exc}") from exc
        fin = await self.netlink.apply(spec, phase="finish")
        errors += fin.errors or []
        for ip in fin.new_addresses:
            task = asyncio.create_task(announce(self.netns_runner, self.uplink, ip))
            self._announcing.add(task)
            task.add_done_callback(self._announcing.discard)
            log.info("node=%s took egress IP %s; announcing it", self.node, ip)
        await self._forget_moved_flows(desired)
        self.slots = {g.node: g.slot for g in desired.gateways}
        if errors:
            self.metrics.inc("sync_errors_total")
            raise TemporaryError(f"{len(errors)} routing changes failed: {errors[0]}")
        self.applied = desired
        self._record(desired, start)
        log.info(
            "node=%s sync applied in %.3fs rules=%d steered=%d snat=%d owned=%s gateways=%s",
            self.node,
            time.perf_counter() - start,
            sum(1 for r in desired.rules if r.steer or r.snat),
            desired.pods_steered,
            desired.pods_snat,
            ",".join(map(str, desired.owned)) or "-",
            ",".join(f"{g.node}:{g.slot}" for g in desired.gateways) or "-",
        )

    def _paths(self, desired: DesiredState) -> dict[IPv4Address, object]:
        """Local pod -> where its steered traffic goes (a gateway node, here, or nowhere)."""
        by_slot = {g.slot: g.node for g in desired.gateways}
        out: dict[IPv4Address, object] = {}
        for rule in desired.rules:
            for ip, target in rule.steer:
                out.setdefault(
                    ip, by_slot.get(target, target) if isinstance(target, int) else target
                )
        return out

    async def _forget_moved_flows(self, desired: DesiredState) -> None:
        if self.applied is None:
            return  # at start-up the kernel's connections match what is programmed
        before, after = self._paths(self.applied), self._paths(desired)
        moved = sorted(
            ip
            for ip, path in after.items()
            if ip in before and before[ip] != path and "drop" not in (path, before[ip])
        )
        if not moved:
            return
        keep = list(desired.cluster)
        removed = await self.netns_runner.run(lambda: flush_pods(moved, keep))
        log.info(
            "node=%s egress path changed for %d pods: %d connections reset",
            self.node,
            len(moved),
            removed,
        )

    def _record(self, desired: DesiredState, start: float) -> None:
        self.sync_duration.observe(time.perf_counter() - start)
        m = self.metrics
        m.set("pods_steered", desired.pods_steered)
        m.set("pods_snat", desired.pods_snat)
        m.set("rules_programmed", sum(1 for r in desired.rules if r.steer or r.snat))
        m.set("egress_ips_owned", len(desired.owned))
        m.set("problems", len(desired.problems))
        m.set("last_successful_sync_timestamp_seconds", time.time())
        self.first_sync.set()

    async def _report(
        self, desired: DesiredState, invalid: list[Invalid], uids: dict[EgressIPRef, str]
    ) -> None:
        for bad in invalid:
            key = (bad.ref, bad.generation)
            if key not in self._reported_invalid:
                # A cluster-wide verdict: the manager puts it on the status;
                # each agent only logs it, once per generation.
                log.warning("egressip=%s invalid, ignored: %s", bad.ref, bad.error)
        self._reported_invalid = {(b.ref, b.generation) for b in invalid}
        await self.events.report(
            (p.ref, uids.get(p.ref, ""), p.reason, p.message) for p in desired.problems
        )

    # --------------------------------------------------------------- fencing

    def _peers(self) -> list[IPv4Address]:
        """Up to eight other nodes to probe, the same ones on every run."""
        nodes = [
            n
            for n in (parse_node(o) for o in self.reflectors["nodes"].store.values())
            if n is not None and n.name != self.node and n.internal_ip is not None
        ]
        ranked = sorted(
            nodes, key=lambda n: hashlib.sha256(f"{self.node}|{n.name}".encode()).digest()
        )
        return [n.internal_ip for n in ranked[:8] if n.internal_ip is not None]

    async def _fence_loop(self) -> None:
        """Withdraw our egress IPs when no peer answers for `fence_after` seconds
        (we are the one cut off), and take them back only after peers have
        answered again for `rejoin_after` seconds, by which time the status
        says whether the manager moved them away meanwhile."""
        while True:
            await asyncio.sleep(0.1)
            peers = self._peers()
            self.prober.set_targets(peers)
            now = time.monotonic()
            if not peers:
                self._probing_since = None
                continue
            if self._probing_since is None:
                self._probing_since = now
            # Silence only counts once the probes have had time to be answered.
            probing = now - self._probing_since >= self.opts.fence_after
            heard = not probing or self.prober.heard_within(self.opts.fence_after)
            owned = self.applied.owned if self.applied is not None else ()
            if not heard and owned and self._fenced_at is None:
                self._fenced_at = now
                self.withheld = frozenset(owned)
                self._heard_since = None
                self.metrics.inc("fences_total")
                log.warning(
                    "node=%s cut off from every peer for %.1fs: withdrawing %s",
                    self.node,
                    self.opts.fence_after,
                    ",".join(map(str, owned)),
                )
                self.runner.poke()
            elif self._fenced_at is not None:
                policies = self.reflectors["staticegressips"]
                if not self.prober.heard_within(0.5):
                    self._heard_since = None
                elif self._heard_since is None:
                    self._heard_since = now
                    # A watch that survived the partition may deliver what it
                    # missed only after TCP's backoff; list afresh instead.
                    self._relists_at_heal = policies.relists
                    policies.request_relist()
                elif (
                    now - self._heard_since >= self.opts.rejoin_after
                    and policies.relists > self._relists_at_heal
                ):
                    log.info(
                        "node=%s peers reachable again for %.1fs: following the status",
                        self.node,
                        self.opts.rejoin_after,
                    )
                    self._fenced_at = None
                    self.withheld = frozenset()
                    self.runner.poke()
            self.metrics.set("fenced", 1 if self._fenced_at is not None else 0)

    # ---------------------------------------------------------------- health

    def _watches_ok(self) -> tuple[bool, str]:
        now = time.monotonic()
        stale = [
            r.name
            for r in self.reflectors.values()
            if not r.connected and now - r.last_connected > self.opts.watch_grace
        ]
        if stale:
            return False, f"watches down for over {self.opts.watch_grace:.0f}s: {', '.join(stale)}"
        return True, "ok"

    def _ready(self) -> tuple[bool, str]:
        if not self.first_sync.is_set():
            return False, "first sync not applied yet"
        age = self.runner.pending_age()
        if age > self.opts.max_pending:
            return False, f"a change has waited {age:.1f}s to be applied"
        return True, "ok"


async def cleanup(*, netns: str | None, uplink: str | None) -> list[str]:
    """Remove our table and every routing object we own; return what failed."""
    runner = NetnsRunner(netns)
    errors: list[str] = []
    try:
        await NftApplier(runner).apply(delete_table_batch())
    except NftError as exc:
        errors.append(f"nftables: {exc}")
    res = await NetlinkApplier(netns=netns).cleanup(uplink)
    errors += res.errors or []
    runner.close()
    return errors
