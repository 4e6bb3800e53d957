"""The node agent: reflectors -> one snapshot -> desired state -> kernel.

Root tasks, in one TaskGroup (if one dies, the process dies and is restarted):
the reflectors (StaticEgressIPs, pools, Pods, Nodes, Services, Namespaces;
with `--selection published` this node's Pods only, and two watches of the
manager's StaticEgressIPMembers: the members of the rules this node is a
gateway or standby for, by its label, and every Service's endpoint
addresses; with `--selection local` every Pod and EndpointSlice), the
SyncRunner, the report writer, the nftables monitor (a table of ours
removed or edited behind our back forces a full sync at once:
`dataplane.nftmonitor`), the grant keeper (`agent.ownership`: the egress IPs
the status gives this node are held only while a manager's grant covers
them, enforced by the kernel), the peer prober, and the health server. With a CNI
gate (`dataplane.cnigate`), it is installed before anything else starts, a
keeper puts it back whenever the CNI rewrites its config, and the ready file
that lets held pods through is written after the first successful sync.

After every successful sync the agent publishes what it programmed (the
generation of each relevant StaticEgressIP, and whether it is fenced) to its
report Lease, for the manager's `Programmed` condition; the sync only hands
the record over and never waits for that write (`k8s.agentreport`).

Every watch callback only pokes the runner; `sync()` recomputes everything
from the stores. Nothing is programmed before every reflector has completed
its first list: an empty store means "not known yet" and must never replace a
working dataplane with an empty one. A local pod's address counts only once
kubelet has reported its sandbox since the node booted (`model.boot`): after
a reboot every local Pod still shows its old address, which a new sandbox may
have been given.

Apply order within one sync, chosen so no packet finds a half-built path:
1. netlink "add": tunnel, neighbours, FDB, routes and rules that are missing;
2. nftables: the whole table in one transaction;
3. netlink "finish": egress addresses added (then announced by gratuitous
   ARP) or removed, and stale rules, routes, neighbours removed.

Shutdown: on SIGTERM the agent exits and leaves the dataplane as it is. A
rolling upgrade or a crash therefore never opens a window in which selected
pods leave unsteered; the next agent adopts what it finds. One thing does not
wait for it: the egress IPs this node holds lapse in the kernel when their
grant does (2 s). A restart within that time loses nothing (the new agent
renews what its kernel still holds on the first grant); a longer stop lets
the managers move them (docs/fault-model.md). The CNI gate's ready file stays
too: the kernel state it vouches for outlives the agent, and a reboot voids
it (it holds the boot id). Removing everything is a deliberate act:
`staticegress agent --cleanup`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path
from typing import Any, Literal, Protocol

from kubernetes_asyncio import client

from staticegress.agent.health import HealthState, watches_heard
from staticegress.agent.health import serve as serve_health
from staticegress.agent.metrics import Registry
from staticegress.agent.ownership import OwnershipKeeper
from staticegress.agent.sync import SyncRunner, TemporaryError
from staticegress.agent.transport import choose_transport, node_event
from staticegress.api.core import parse_node
from staticegress.api.members import MEMBERS_PLURAL, agent_selectors
from staticegress.api.pools import POOL_PLURAL
from staticegress.api.types import EgressIPRef, IPAddress, NodeName
from staticegress.api.v1alpha1 import GROUP, PLURAL, VERSION
from staticegress.dataplane import bpfcheck
from staticegress.dataplane.cnigate import (
    GateConfig,
    GateKeeper,
    read_boot_id,
    uninstall,
    write_ready,
)
from staticegress.dataplane.conntrack import flush_destinations, flush_misnated
from staticegress.dataplane.grants import GRANT_PORT
from staticegress.dataplane.heartbeat import Prober
from staticegress.dataplane.host import (
    PROC_SYS,
    Uplink,
    announce,
    find_uplink,
    labelled_uplinks,
    prepare_sysctls,
    read_boot_time,
    restore_sysctls,
    sysctl_fix,
)
from staticegress.dataplane.lease import NftLease
from staticegress.dataplane.netlink import ApplyResult, NetlinkApplier
from staticegress.dataplane.netns import NetnsRunner
from staticegress.dataplane.nft import NftApplier, NftError
from staticegress.dataplane.nftmonitor import WatchedNftApplier
from staticegress.dataplane.transport import detect_transport
from staticegress.k8s.agentreport import AgentReporter, LeaseReportWriter
from staticegress.k8s.client import REQUEST_TIMEOUT
from staticegress.k8s.events import EventRecorder
from staticegress.k8s.reflector import Reflector
from staticegress.k8s.snapshot import (
    Invalid,
    ParseCache,
    build_snapshot,
    published_selection,
)
from staticegress.k8s.trim import (
    trim_endpoint_slice,
    trim_namespace,
    trim_node,
    trim_pod,
    trim_pool,
    trim_service,
    trim_static_egress_ip,
)
from staticegress.model.boot import trust_since_boot
from staticegress.model.desired import AgentConfig, DesiredState, Snapshot, compute_desired
from staticegress.model.programmed import AgentRecord, agent_record
from staticegress.render.lease import LEASE_TABLE, delete_lease_tables, render_lease_tables
from staticegress.render.netlink import NetlinkSpec, RoutingConfig, render_netlink
from staticegress.render.nft import (
    FAMILY,
    GUARD_TABLE,
    TABLE,
    TUNNEL,
    MarkLayout,
    delete_table_batch,
    render_ruleset,
)
from staticegress.render.nftdiff import Key as TableKey
from staticegress.render.nftdiff import (
    ReplacementNeededError,
    TableState,
    incremental_update,
    kernel_table_state,
    table_state,
)

log = logging.getLogger(__name__)

OWN_TABLES = (
    (FAMILY, TABLE),
    (FAMILY, GUARD_TABLE),
    ("ip", LEASE_TABLE),
    ("arp", LEASE_TABLE),
)
LEASE_HELD = (("ip", LEASE_TABLE, "held"), ("arp", LEASE_TABLE, "held"))
"""Written by the grant path only: never part of a sync's update."""

RELEASE_SETS = {(FAMILY, TABLE): ["known_local_pods"]}
"""A new key here lifts the hold of a new pod: it goes in only once the pod's
steering is in the kernel (the second transaction of an update)."""

AGENT_HEALTH_PORT = 9744
"""/livez, /healthz, /readyz and /metrics, on the node's address. Chosen to
clash with no port commonly taken on nodes (kubelet and kube-proxy 10248-10259,
CSI liveness probes 9808-9812, node exporters 9100/9796, CNI agents 9099 and
9890-9965, our grants 9811/udp and VXLAN 4790/udp)."""

GATE_PROBLEM = "CNIGateProblem"
"""The Node Event reason for what keeps the CNI gate from working."""

GATEWAY_SHARDS = "members-gateway"
ENDPOINT_SHARDS = "members-endpoints"
"""The reflectors of the published selection (`--selection published`): the
members objects labelled for this node, and every endpoints object."""


class _Phases:
    """Where a sync's time went, for its log line: when a node syncs slowly,
    the first question is whether the model, the kernel or the loop took it."""

    def __init__(self, start: float) -> None:
        self._last = start
        self._spent: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self._spent.append((name, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return " ".join(f"{name} {seconds:.3f}" for name, seconds in self._spent)


@dataclass(frozen=True)
class AgentOptions:
    """Command-line settings."""

    node: str
    transport: Literal["auto", "direct", "vxlan"] = "auto"
    cluster_cidrs: tuple[IPv4Network, ...] = ()
    require_pool: bool = False
    """Honour only egress IPs a StaticEgressIPPool grants (--unpooled-egress-ips;
    the command line's default is to require one)."""
    health_address: str | None = None
    """Where /healthz, /readyz and /metrics listen; None: the node's InternalIP."""
    health_port: int = AGENT_HEALTH_PORT
    min_sync_interval: float = 0.05
    resync_interval: float = 60.0
    max_pending: float = 30.0
    watch_silence: float = 10.0
    """/healthz fails while a watch has not heard the API server for this long
    (a report only: nothing restarts or clears anything over it)."""
    marks: MarkLayout = field(default_factory=MarkLayout)
    table_base: int = 7300
    rule_priority: int = 100
    netns: str | None = None
    """Drive this named network namespace from outside (tests); None: our own."""
    ownership: Literal["grants", "status-only"] = "grants"
    """`grants`: hold an egress IP only while a manager's grant (or a status
    read-back) covers it, enforced by the kernel (docs/fault-model.md).
    `status-only`: the status alone decides; for clusters without managers
    (tests), and unsafe under partitions."""
    grant_key: bytes | None = None
    """The cluster's grant key; required with `grants`."""
    grant_port: int = GRANT_PORT
    grant_address: str | None = None
    """Where to accept grants; known before the watches have listed (from the
    downward API), the agent renews what its kernel still holds right after a
    restart. None: the node's InternalIP, once the Node is listed."""
    peer_interval: float = 0.1
    """Peer ICMP probes; what they hear within 3 intervals goes into every ack."""
    namespace: str = "staticegress-system"
    """The agent's own namespace: where the cluster's transport record lives."""
    report_namespace: str = "staticegress-system"
    """Where this node's agent report (a Lease) is written for the manager."""
    proc_sys: str = str(PROC_SYS)
    """Where the node's /proc/sys is writable: a container's own /proc/sys is
    read-only, so the DaemonSet mounts the node's /proc/sys/net elsewhere."""
    sysctl_record: str | None = None
    """Where the settings' values from before our first write are kept, for
    `cleanup` to restore; None: not kept."""
    bpffs: str = str(bpfcheck.BPFFS)
    """The node's BPF filesystem (read for Cilium's pinned tcx links)."""
    cni_gate: GateConfig | None = None
    """Install the CNI gate that holds new pods until this node is programmed
    since boot (`dataplane.cnigate`); None: no gate."""
    selection: Literal["published", "local"] = "local"
    """`published` (deployed): watch only this node's Pods, and take the other
    nodes' selected pods from the manager's StaticEgressIPMembers, so memory
    and watch traffic follow this node, not the cluster (docs/scale.md).
    `local`: watch every Pod and EndpointSlice and select everything here;
    for clusters without managers (tests)."""


class NftPort(Protocol):
    """The nftables side of the dataplane (a `WatchedNftApplier`, or a fake)."""

    async def apply(self, batch: dict[str, Any]) -> None: ...

    async def apply_all(self, batches: list[dict[str, Any]]) -> None: ...

    async def apply_text(self, text: str) -> None: ...

    async def run(self, cmd: dict[str, Any]) -> Any: ...

    async def watch(self) -> None: ...


class NetlinkPort(Protocol):
    """Routes, rules, links and addresses (a `NetlinkApplier`, or a fake)."""

    async def apply(self, spec: NetlinkSpec, *, phase: str) -> ApplyResult: ...


class Agent:
    def __init__(
        self,
        api: client.ApiClient,
        opts: AgentOptions,
        *,
        nft: NftPort | None = None,
        netlink: NetlinkPort | None = None,
        announcer: Callable[[IPv4Address], Coroutine[Any, Any, None]] | None = None,
        flusher: Callable[[Mapping[IPv4Address, list[IPv4Network]]], Awaitable[int]] | None = None,
        repairer: Callable[
            [list[IPv4Address], list[IPv4Address], list[IPv4Network]], Awaitable[int]
        ]
        | None = None,
        boot_time: Callable[[], int] | None = None,
    ) -> None:
        """`nft`, `netlink`, `announcer`, `flusher`, `repairer` and `boot_time`
        stand in for the kernel in tests."""
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
                trim=trim_static_egress_ip,
            ),
            # Stored trimmed (k8s.trim): memory follows what we read, not the
            # size of every object in the cluster.
            "pods": Reflector(
                name="pods",
                list_fn=core.list_pod_for_all_namespaces,
                list_kwargs={"field_selector": f"spec.nodeName={opts.node}"}
                if opts.selection == "published"
                else None,
                on_change=poke,
                trim=trim_pod,
            ),
            "nodes": Reflector(
                name="nodes", list_fn=core.list_node, on_change=poke, trim=trim_node
            ),
            "services": Reflector(
                name="services",
                list_fn=core.list_service_for_all_namespaces,
                on_change=poke,
                trim=trim_service,
            ),
            "namespaces": Reflector(
                name="namespaces", list_fn=core.list_namespace, on_change=poke, trim=trim_namespace
            ),
            # Pools decide who owns an egress IP and how far a rule reaches; a
            # sync before they are listed would refuse every claim.
            "pools": Reflector(
                name="staticegressippools",
                list_fn=custom.list_cluster_custom_object,
                list_args=(GROUP, VERSION, POOL_PLURAL),
                on_change=poke,
                trim=trim_pool,
            ),
        }
        if opts.selection == "published":
            # Not the whole selection: a selected pod's change would reach
            # every node. This node selects its own pods itself; it needs the
            # members of the rules it may SNAT for (a standby too, so that a
            # failover never waits for a list), and the endpoint addresses
            # its own pods are selected among. Both must be listed before
            # the first sync, like every other reflector.
            gateway, endpoints = agent_selectors(self.node)
            for key, name, selector in (
                (GATEWAY_SHARDS, "staticegressipmembers-gateway", gateway),
                (ENDPOINT_SHARDS, "staticegressipmembers-endpoints", endpoints),
            ):
                self.reflectors[key] = Reflector(
                    name=name,
                    list_fn=custom.list_namespaced_custom_object,
                    list_args=(GROUP, VERSION, opts.namespace, MEMBERS_PLURAL),
                    list_kwargs={"label_selector": selector},
                    on_change=poke,
                )
        else:
            self.reflectors["endpointslices"] = Reflector(
                name="endpointslices",
                list_fn=disco.list_endpoint_slice_for_all_namespaces,
                on_change=poke,
                trim=trim_endpoint_slice,
            )
        self._dropped_shards = 0
        self.netns_runner = NetnsRunner(opts.netns)
        # Conntrack dumps can take seconds on a busy node: on a thread of their
        # own, so they never delay the next sync.
        self.conntrack_runner = NetnsRunner(opts.netns)
        # The grant lease is renewed, and only then acked, on a thread and
        # libnftables context of its own: behind the ruleset's transaction
        # (hundreds of ms at a few thousand pods), every ack waited for it,
        # and the managers took a busy node for a lagging one, or several at
        # once for a fault of their own view. The kernel serializes the two
        # transactions; they touch different objects (the sync never writes
        # the `held` elements, the lease never the ruleset).
        self.lease_runner = NetnsRunner(opts.netns)
        # Every batch goes through the watchdog, which forces a full sync the
        # moment one of our tables is removed or changed behind our back.
        self.nft: NftPort = nft or WatchedNftApplier(
            self.netns_runner,
            on_drift=self._table_lost,
            on_restored=self._nft_restored,
        )
        self.netlink: NetlinkPort = netlink or NetlinkApplier(netns=opts.netns)
        self._announce = announcer or self._garp
        self._flush = flusher or self._flush_conntrack
        self._repair = repairer or self._repair_conntrack
        self._boot_time = boot_time or read_boot_time
        self._unreported: frozenset[tuple[str, str]] = frozenset()
        """Local pods (namespace, name) whose address the last sync did not trust."""
        self._repair_queue: set[IPv4Address] = set()
        self._repair_args: tuple[list[IPv4Address], list[IPv4Network]] = ([], [])
        self._repair_task: asyncio.Task[None] | None = None
        self._tables: dict[TableKey, TableState] | None = None
        """What our last batches left in the kernel, when known."""
        self._kernel_read = False
        self._drifts = 0
        """Outside edits noticed so far (an apply under way must not undo one)."""
        self._resets: list[tuple[str, list[IPv4Address], list[IPv4Network]]] = []
        """Connection resets the syncs asked for (why, pods, destinations kept),
        done in order by the background conntrack worker."""
        self._repair_all = True
        """Look for misNATed connections of every steered pod after the next
        applied sync: at start (the previous agent's view is unknown) and after
        our table was lost (connections made meanwhile were masqueraded)."""
        self._local_seen: frozenset[IPv4Address] = frozenset()
        """This node's pod IPs as of the previous sync, selected or not."""
        self.events = EventRecorder(api, component="staticegress-agent", host=opts.node)
        self.metrics = Registry()
        for name, kind, help in (
            ("sync_errors_total", "counter", "Syncs that failed and were retried."),
            ("syncs_total", "counter", "Syncs run, applied or found unchanged."),
            ("pods_steered", "gauge", "Local pods whose matching traffic is steered or dropped."),
            ("pods_snat", "gauge", "Pods this node SNATs as a gateway."),
            (
                "member_objects_ignored",
                "gauge",
                "Published StaticEgressIPMembers objects left out as unreadable or stale.",
            ),
            (
                "pods_unreported",
                "gauge",
                "Local pods whose status shows an address but whose sandbox kubelet has "
                "not reported since the node booted: their addresses count as unknown.",
            ),
            ("rules_programmed", "gauge", "Rules with at least one pod programmed here."),
            ("egress_ips_owned", "gauge", "Egress IPs this node holds."),
            ("problems", "gauge", "StaticEgressIP problems this node cannot program."),
            (
                "fences_total",
                "counter",
                "Times this node began to withhold egress IPs it is named for.",
            ),
            ("fenced", "gauge", "1 while this node withholds its egress IPs."),
            (
                "misnated_connections_deleted_total",
                "counter",
                "Connections of selected pods deleted because NAT had given them an "
                "address other than an egress IP (they began before the pod was steered).",
            ),
            (
                "connections_reset_total",
                "counter",
                "Connections deleted because their pod's egress path or destinations changed.",
            ),
            (
                "table_updates_total",
                "counter",
                "Syncs that changed our nftables tables in place (only what differed).",
            ),
            (
                "table_replacements_total",
                "counter",
                "Syncs that replaced our nftables tables whole (first sync, after an error "
                "or an outside edit).",
            ),
            ("nft_restores_total", "counter", "Our nftables tables restored after outside edits."),
            (
                "nft_last_restore_seconds",
                "gauge",
                "Time from noticing the last outside edit of our tables to their repair.",
            ),
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
        self.refused: str | None = None
        """Why this node cannot be programmed (an eBPF dataplane); None: it can."""
        self.sysctl_problems: list[str] = []
        self._reported_invalid: set[tuple[EgressIPRef, int]] = set()
        self._announcing: set[asyncio.Task[None]] = set()
        self._node_events: set[asyncio.Task[None]] = set()
        self.gate = (
            GateKeeper(opts.cni_gate, on_problem=partial(self._node_problem, GATE_PROBLEM))
            if opts.cni_gate
            else None
        )
        self.last_compute_seconds = 0.0
        self.parse_cache = ParseCache()
        self.withheld: frozenset[IPAddress] = frozenset()
        """Egress IPs the status gives this node that it does not hold (no live grant)."""
        self._used_paths: dict[IPv4Address, object] = {}
        """Local pod -> the last path its traffic took that was not `drop`."""
        self.prober = Prober(interval=opts.peer_interval, down_after=3, up_after=2)
        self._peer_names: dict[IPv4Address, NodeName] = {}
        self._custom = custom
        self.keeper: OwnershipKeeper | None = None
        if opts.ownership == "grants":
            if opts.grant_key is None:
                raise ValueError("ownership by grants needs the cluster's grant key")
            self.keeper = OwnershipKeeper(
                node=self.node,
                key=opts.grant_key,
                kernel=NftLease(self.nft if nft is not None else NftApplier(self.lease_runner)),
                on_change=poke,
                peers=self._peers_heard,
                readback=self._read_back,
                on_rejoin=self.reflectors["staticegressips"].request_relist,
            )
        # What the current sync will have programmed once it succeeds; published
        # (never awaited) from _record, so the sync never waits for the API.
        self._report_next: AgentRecord | None = None
        self.reporter = AgentReporter(
            LeaseReportWriter(api, namespace=opts.report_namespace, node=self.node)
        )

    # ----------------------------------------------------------------- main

    async def run(self) -> None:
        if self.gate is not None:
            # First of all: from here on a reboot holds new pods until we are back.
            await asyncio.to_thread(self.gate.check)
            self.gate.report()
        async with asyncio.TaskGroup() as tg:
            if self.gate is not None:
                tg.create_task(self.gate.run(), name="cni-gate")
                tg.create_task(self._open_cni_gate(self.gate.cfg), name="cni-ready")
            for r in self.reflectors.values():
                tg.create_task(r.run(), name=f"reflector-{r.name}")
            early = self.keeper is not None and self.opts.grant_address is not None
            if self.keeper is not None and early:
                # Before the lists: a restart renews what the kernel still holds.
                tg.create_task(self._run_keeper(self.keeper), name="grants")
            await self._wait_synced()
            await self._discover()
            tg.create_task(self.runner.run(), name="sync")
            tg.create_task(self.nft.watch(), name="nft-monitor")
            tg.create_task(self.reporter.run(), name="report")
            tg.create_task(self.prober.run(), name="peer-prober")
            tg.create_task(self._peer_loop(), name="peers")
            if self.keeper is not None and not early:
                tg.create_task(self._run_keeper(self.keeper), name="grants")
            elif self.keeper is None:
                log.warning(
                    "node=%s ownership=status-only: egress IPs follow the status alone; "
                    "a partitioned gateway keeps its IPs (no managers' grants)",
                    self.node,
                )
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
        nodes = [
            n
            for n in (parse_node(o) for o in self.reflectors["nodes"].store.values())
            if n is not None
        ]
        uplink = self.uplink.name
        # One transport for the whole cluster: our detection only proposes.
        decision = await choose_transport(
            self.api,
            node=self.node,
            node_uid=str(((obj or {}).get("metadata") or {}).get("uid", "")),
            namespace=self.opts.namespace,
            flag=self.opts.transport,
            detect=lambda: detect_transport(
                nodes, me=self.node, uplink=uplink, netns=self.opts.netns
            ),
            metrics=self.metrics,
        )
        self.transport = decision.transport
        await self._check_dataplane()
        # The tunnel's own setting is made once the first sync has created it.
        await self._prepare_host(tunnel=None)

    # ----------------------------------------------------------------- sync

    async def compute(self) -> tuple[DesiredState, list[Invalid], Snapshot]:
        """The desired state from the stores. The work runs on a thread, off the
        event loop, so grants keep being answered and renewed while a large
        cluster is recomputed (a manager takes a node whose acks stop for
        0.3 s as lagging); the stores are copied first, on the loop, since the
        reflectors go on changing them."""
        stores = {k: dict(r.store) for k, r in self.reflectors.items()}
        granted = self.keeper.held_now() if self.keeper is not None else None
        desired, invalid, snap = await asyncio.to_thread(
            self._derive, stores, granted, dict(self.slots)
        )
        withheld = frozenset(desired.named) - frozenset(desired.owned)
        if withheld and not self.withheld:
            self.metrics.inc("fences_total")
        self.withheld = withheld
        if self.keeper is not None:
            self.keeper.set_mine(frozenset(desired.named))
        self.metrics.set("fenced", 1 if self.withheld else 0)
        return desired, invalid, snap

    def _derive(
        self,
        stores: dict[str, dict[str, Any]],
        granted: frozenset[IPAddress] | None,
        slots: dict[NodeName, int],
    ) -> tuple[DesiredState, list[Invalid], Snapshot]:
        snap, invalid = build_snapshot(
            cache=self.parse_cache,
            policies=stores["staticegressips"],
            pods=stores["pods"],
            nodes=stores["nodes"],
            services=stores["services"],
            namespaces=stores["namespaces"],
            slices=stores.get("endpointslices", {}),
            pools=stores["pools"],
        )
        if GATEWAY_SHARDS in stores:
            # By key, so an object both watches hold counts once.
            shards = {**stores[ENDPOINT_SHARDS], **stores[GATEWAY_SHARDS]}
            snap = self._with_published_selection(snap, shards)
        snap = self._trust_since_boot(snap)
        config = AgentConfig(
            node=self.node,
            transport=self.transport or "direct",
            cluster_cidrs=self.opts.cluster_cidrs,
            max_slots=self.opts.marks.max_slots,
            require_pool=self.opts.require_pool,
        )
        desired = compute_desired(
            snap,
            config,
            previous_slots=slots,
            withheld=self._never_held(snap),
            granted=granted,
        )
        return desired, invalid, snap

    def _trust_since_boot(self, snap: Snapshot) -> Snapshot:
        """`snap` without the addresses of local pods kubelet has not reported
        since the boot (`model.boot`); logs when that set changes."""
        try:
            boot = self._boot_time()
        except (OSError, ValueError) as exc:
            # Without the boot time no local address can be vouched for.
            raise TemporaryError(f"cannot read the node's boot time: {exc}") from exc
        trusted, stale = trust_since_boot(snap, node=self.node, boot=boot)
        self.metrics.set("pods_unreported", len(stale))
        names = frozenset((p.namespace, p.name) for p in stale)
        if names != self._unreported:
            if stale:
                shown = ", ".join(f"{p.namespace}/{p.name} ({p.ip})" for p in stale[:5])
                more = f" and {len(stale) - 5} more" if len(stale) > 5 else ""
                log.info(
                    "node=%s %d local pods not reported by kubelet since the boot at %d, "
                    "their addresses count as unknown (new pods there are held): %s%s",
                    self.node,
                    len(stale),
                    boot,
                    shown,
                    more,
                )
            else:
                log.info("node=%s every local pod reported by kubelet since the boot", self.node)
            self._unreported = names
        return trusted

    def _with_published_selection(self, snap: Snapshot, shards: Any) -> Snapshot:
        """`snap` (this node's pods only) with the manager's published selection."""
        published, dropped = published_selection(shards, snap, cache=self.parse_cache)
        if dropped != self._dropped_shards:
            log.warning(
                "node=%s %d StaticEgressIPMembers objects left out (unreadable, or of a "
                "StaticEgressIP that no longer exists)",
                self.node,
                dropped,
            )
            self._dropped_shards = dropped
        self.metrics.set("member_objects_ignored", dropped)
        return published

    def _never_held(self, snap: Snapshot) -> frozenset[IPAddress]:
        """Addresses this node refuses to hold whatever the status says: any
        node's own address and our routers. The manager refuses them too; this
        is the last line, should a status name one anyway (a manager that
        misjudged, an edited status), since holding one would hijack it."""
        own = {a for n in snap.nodes for a in n.addresses}
        if self.uplink is not None:
            own |= self.uplink.routers
        return frozenset(own)

    async def sync(self, force: bool) -> None:
        if not all(r.synced.is_set() for r in self.reflectors.values()) or self.uplink is None:
            return
        if self.refused is not None and await self._check_dataplane():
            return
        assert self.transport is not None
        assert self.node_ip is not None
        start = time.perf_counter()
        phases = _Phases(start)
        desired, invalid, snap = await self.compute()
        phases.mark("compute")
        self._report_next = agent_record(
            node=self.node,
            policies=snap.policies,
            desired=desired,
            withheld=self.withheld,
            subnet=self.uplink.subnet,
            routers=frozenset(self.uplink.routers),
        )
        self.last_compute_seconds = time.perf_counter() - start
        self.metrics.inc("syncs_total")
        await self._report(desired, invalid, {p.ref: p.uid for p in snap.policies})
        local = frozenset(
            p.ip for p in snap.pods if p.node == self.node and p.ip and not p.host_network
        )
        if desired == self.applied and not force:
            self._local_seen = local
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
        # The lease tables ride along: created if missing, gating every IP we
        # are named for or still have as an address.
        gated: set[IPAddress] | None = None
        if self.keeper is not None:
            gated = {*desired.named, *(self.applied.owned if self.applied else ())}
        # Rendering is pure and, at a few thousand pods, tens of ms: on a
        # thread, so that the loop answers grants meanwhile.
        batch = await asyncio.to_thread(self._render_tables, desired, self.transport, gated)
        phases.mark("render")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("node=%s ruleset=%s", self.node, batch)
        errors: list[str] = []
        res = await self.netlink.apply(spec, phase="add")
        errors += res.errors or []
        if spec.tunnel is not None or self.sysctl_problems:
            await self._prepare_host(tunnel=TUNNEL if spec.tunnel is not None else None)
        phases.mark("routes")
        try:
            await self._apply_tables(batch, reassert=force)
        except NftError as exc:
            self.metrics.inc("sync_errors_total")
            raise TemporaryError(f"nftables refused the ruleset: {exc}") from exc
        phases.mark("tables")
        fin = await self.netlink.apply(spec, phase="finish")
        errors += fin.errors or []
        phases.mark("addresses")
        for ip in fin.new_addresses:
            task = asyncio.create_task(self._announce(ip))
            self._announcing.add(task)
            task.add_done_callback(self._announcing.discard)
            log.info("node=%s took egress IP %s; announcing it", self.node, ip)
        self._forget_moved_flows(desired)
        self._repair_misnated(desired)
        self._local_seen = local
        self.slots = {g.node: g.slot for g in desired.gateways}
        if errors:
            self.metrics.inc("sync_errors_total")
            raise TemporaryError(f"{len(errors)} routing changes failed: {errors[0]}")
        # What made this sync: which parts of the desired state changed (or a
        # forced run): the first question when a node syncs more than expected.
        changed = (
            [
                f.name
                for f in fields(desired)
                if getattr(desired, f.name) != getattr(previous, f.name)
            ]
            if (previous := self.applied) is not None
            else ["everything"]
        )
        self.applied = desired
        self._record(desired, start)
        phases.mark("after")
        log.info(
            "node=%s sync applied in %.3fs (%s) changed=%s rules=%d steered=%d snat=%d owned=%s "
            "gateways=%s",
            self.node,
            time.perf_counter() - start,
            phases,
            ",".join(changed) or "nothing (forced)",
            sum(1 for r in desired.rules if r.steer or r.snat),
            desired.pods_steered,
            desired.pods_snat,
            ",".join(map(str, desired.owned)) or "-",
            ",".join(f"{g.node}:{g.slot}" for g in desired.gateways) or "-",
        )

    def _render_tables(
        self, desired: DesiredState, transport: str, gated: set[IPAddress] | None
    ) -> dict[str, Any]:
        batch = render_ruleset(desired, transport=transport, marks=self.opts.marks)
        if gated is not None:
            batch["nftables"] += render_lease_tables(gated, arp_ips=desired.egress_ips)
        else:
            batch["nftables"] += delete_lease_tables()
        return batch

    async def _apply_tables(self, batch: dict[str, Any], *, reassert: bool) -> None:
        """Bring our tables to `batch`: in place, from the difference with the
        last batch the kernel took (staticegress.render.nftdiff: a replacement
        lets a few new flows of steered pods out masqueraded), or whole when
        what the kernel holds is not known (first sync, after an error, after
        a table changed behind our back) or a definition changed."""
        state = await asyncio.to_thread(table_state, [batch])
        updates = [batch]
        adopted = False
        if self._tables is None and not self._kernel_read:
            # The first sync of this process: what the previous run left is
            # still steering traffic; change that in place too.
            self._kernel_read = True
            self._tables = await self._read_tables()
            adopted = self._tables is not None
        if self._tables is not None:
            try:
                updates = await asyncio.to_thread(
                    incremental_update,
                    self._tables,
                    state,
                    release=RELEASE_SETS,
                    reassert=reassert,
                )
            except ReplacementNeededError as exc:
                log.info("node=%s replacing our tables whole: %s", self.node, exc)
            else:
                if adopted:
                    # `add table` of a table that exists changes nothing, and
                    # tells the watchdog which tables are ours to watch.
                    owned = [{"add": {"table": {"family": f, "name": n}}} for f, n in state]
                    first = updates[0]["nftables"] if updates else []
                    updates = [{"nftables": owned + first}, *updates[1:]]
        self._tables = None  # unknown until every update is in
        drifts = self._drifts
        await self.nft.apply_all(updates)
        # A table of ours changed behind our back while we applied: what the
        # kernel holds is not `state`, and the forced sync must replace whole.
        self._tables = state if self._drifts == drifts else None
        whole = updates == [batch]
        self.metrics.inc("table_replacements_total" if whole else "table_updates_total")
        if whole and self.keeper is not None:
            self.keeper.kernel_rewritten()

    async def _read_tables(self) -> dict[TableKey, TableState] | None:
        """Our tables as the kernel holds them, or None when the main one is
        missing (a fresh node: nothing to keep) or cannot be read."""
        listings = []
        for family, name in OWN_TABLES:
            cmd = {"nftables": [{"list": {"table": {"family": family, "name": name}}}]}
            try:
                out = await self.nft.run(cmd)
            except NftError as exc:
                if "No such file or directory" in str(exc):
                    continue  # absent: nothing to keep
                log.warning("node=%s cannot list %s %s (%s)", self.node, family, name, exc)
                return None
            listings.append(json.loads(out) if isinstance(out, str) else out)
        try:
            tables = kernel_table_state(listings, skip_elements=LEASE_HELD)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("node=%s our tables in the kernel are unreadable (%s)", self.node, exc)
            return None
        if (FAMILY, TABLE) not in tables:
            return None
        log.info(
            "node=%s changing in place what the previous run left: %s",
            self.node,
            ", ".join(" ".join(k) for k in sorted(tables)),
        )
        return tables

    async def _flush_conntrack(self, keep_by_pod: Mapping[IPv4Address, list[IPv4Network]]) -> int:
        return await self.conntrack_runner.run(lambda: flush_destinations(keep_by_pod))

    async def _repair_conntrack(
        self, pods: list[IPv4Address], allowed: list[IPv4Address], keep: list[IPv4Network]
    ) -> int:
        return await self.conntrack_runner.run(lambda: flush_misnated(pods, allowed, keep))

    def _table_lost(self) -> None:
        self._tables = None  # changed behind our back: replace whole
        self._drifts += 1
        self._repair_all = True
        self.runner.poke(force=True)

    @staticmethod
    def _steered(desired: DesiredState | None) -> frozenset[IPv4Address]:
        """Pods whose matching traffic leaves through an egress IP (not dropped)."""
        if desired is None:
            return frozenset()
        return frozenset(ip for r in desired.rules for ip, t in r.steer if t != "drop") | frozenset(
            ip for r in desired.rules for ip, _ in r.snat
        )

    @staticmethod
    def _pieces(
        desired: DesiredState | None, *, steer_verdicts: bool = True
    ) -> dict[IPv4Address, frozenset[tuple[IPv4Network, object]]]:
        """Pod -> the destination pieces it is steered or SNATed for, with where to
        (the egress IP it is SNATed to; for steering, the verdict, or with
        `steer_verdicts=False` only that it is steered)."""
        out: dict[IPv4Address, set[tuple[IPv4Network, object]]] = {}
        for ip, net, verdict in desired.steer_pieces if desired else ():
            out.setdefault(ip, set()).add((net, verdict if steer_verdicts else "steered"))
        for ip, net, eip in desired.snat_pieces if desired else ():
            out.setdefault(ip, set()).add((net, eip))
        return {ip: frozenset(v) for ip, v in out.items()}

    def _repair_misnated(self, desired: DesiredState) -> None:
        """Delete the connections a steered pod began before it was steered for
        their destination: they kept the CNI's masquerade (or an older egress
        IP), which the guard table now drops on every packet, so they would
        stall. After the first sync and after our table was lost, every steered
        pod is checked; otherwise the pods already known here whose pieces
        changed (newly steered, a destination added, another egress IP): a
        brand-new pod's packets were held, so it has no such connection. The
        work runs in the background, one conntrack dump at a time, so neither
        the next sync nor anything else waits for it."""
        steered = self._steered(desired)
        if self._repair_all:
            pods = set(steered)
        else:
            before, now = self._pieces(self.applied), self._pieces(desired)
            changed = {ip for ip in steered if now.get(ip) != before.get(ip)}
            pods = changed & self._local_seen
        self._repair_all = False
        if not pods:
            return
        self._repair_queue |= pods
        self._repair_args = (list(desired.egress_ips), list(desired.cluster))
        self._start_conntrack_work()

    def _start_conntrack_work(self) -> None:
        if self._repair_task is None or self._repair_task.done():
            self._repair_task = asyncio.create_task(self._conntrack_worker())

    async def _conntrack_worker(self) -> None:
        """Resets first, in the order the syncs asked for them, then the repair.
        Deleting entries takes a netlink round trip each (seconds for a busy
        pod's thousands of flows): here, none of it delays the next sync."""
        while self._resets or self._repair_queue:
            if self._resets:
                # Every reset asked for so far, in one dump: a pod asked twice
                # keeps only what both kept (a connection reset once too often
                # starts again; one kept wrongly goes on with a stale NAT).
                keep_by_pod: dict[IPv4Address, list[IPv4Network]] = {}
                reasons: dict[str, int] = {}
                for what, pods, keep in self._resets:
                    reasons[what] = reasons.get(what, 0) + len(pods)
                    for ip in pods:
                        had = keep_by_pod.get(ip)
                        keep_by_pod[ip] = (
                            list(keep)
                            if had is None
                            else [n for n in had if any(n.subnet_of(k) for k in keep)]
                        )
                self._resets = []
                try:
                    removed = await self._flush(keep_by_pod)
                except Exception as exc:  # they stall or time out: never fail
                    log.warning("node=%s cannot reset connections: %s", self.node, exc)
                    continue
                if removed:
                    self.metrics.inc("connections_reset_total", removed)
                log.info(
                    "node=%s connections reset: %d (%s)",
                    self.node,
                    removed,
                    ", ".join(f"{what} for {n} pods" for what, n in sorted(reasons.items())),
                )
            if not self._repair_queue:
                break
            pods, self._repair_queue = sorted(self._repair_queue), set()
            allowed, keep = self._repair_args
            try:
                removed = await self._repair(pods, allowed, keep)
            except Exception as exc:  # the guard keeps dropping them: never fail
                log.warning("node=%s cannot delete misNATed connections: %s", self.node, exc)
                continue
            if removed:
                self.metrics.inc("misnated_connections_deleted_total", removed)
                log.warning(
                    "node=%s deleted %d connections of pods steered anew that had left "
                    "with another address (they began before the pods were steered there)",
                    self.node,
                    removed,
                )

    async def _garp(self, ip: IPv4Address) -> None:
        assert self.uplink is not None
        await announce(self.netns_runner, self.uplink, ip)

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

    def _forget_moved_flows(self, desired: DesiredState) -> None:
        """Reset the connections of pods whose egress path now differs from the
        last path they actually used: their NAT binding was made for that path.

        A pass through `drop` (a handoff waiting for its grant) leaves the old
        bindings in place, so the comparison is with the last path that was not
        `drop`, not with the previous sync."""
        after = self._paths(desired)
        if self.applied is None:
            # At start-up the kernel's connections match what is programmed.
            self._used_paths = {ip: p for ip, p in after.items() if p != "drop"}
            return
        moved = sorted(
            ip
            for ip, path in after.items()
            if path != "drop" and ip in self._used_paths and self._used_paths[ip] != path
        )
        self._used_paths = {
            ip: (path if path != "drop" else self._used_paths.get(ip, path))
            for ip, path in after.items()
            if path != "drop" or ip in self._used_paths
        }
        if moved:
            self._resets.append(("egress path changed", moved, list(desired.cluster)))
        self._forget_withdrawn_pieces(desired, skip=frozenset(moved))
        self._start_conntrack_work()

    def _forget_withdrawn_pieces(
        self, desired: DesiredState, *, skip: frozenset[IPv4Address]
    ) -> None:
        """Reset a pod's connections towards destinations whose verdict changed or
        went away (a rule removed or narrowed, the pod unselected, another egress
        IP): their NAT was bound for the old verdict (an identity SNAT, an old
        egress IP) and would go on with it, stalled or with the wrong address.
        Destinations that kept their verdict, and the cluster's ranges, keep
        their connections. Only withdrawals: what was added is the repair's."""

        # Steering by destination only: a new path (or a pass through drop) is
        # `_forget_moved_flows`'s; SNAT by destination and egress IP.
        before = self._pieces(self.applied, steer_verdicts=False)
        now = self._pieces(desired, steer_verdicts=False)
        empty: frozenset[tuple[IPv4Network, object]] = frozenset()
        withdrawn = sorted(
            ip for ip, had in before.items() if ip not in skip and had - now.get(ip, empty)
        )
        for ip in withdrawn:
            kept = [net for net, _ in before[ip] & now.get(ip, empty)]
            self._resets.append(("destinations withdrawn", [ip], [*desired.cluster, *kept]))

    def _record(self, desired: DesiredState, start: float) -> None:
        self.sync_duration.observe(time.perf_counter() - start)
        m = self.metrics
        m.set("pods_steered", desired.pods_steered)
        m.set("pods_snat", desired.pods_snat)
        m.set("rules_programmed", sum(1 for r in desired.rules if r.steer or r.snat))
        m.set("egress_ips_owned", len(desired.owned))
        m.set("problems", len(desired.problems))
        m.set("last_successful_sync_timestamp_seconds", time.time())
        if self._report_next is not None:
            self.reporter.publish(self._report_next)
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

    # ------------------------------------------------------------- CNI gate

    async def _open_cni_gate(self, cfg: GateConfig) -> None:
        """Write the ready file once the first sync since boot is in the kernel
        (its table holds the pods we do not know yet), letting held pods through."""
        await self.first_sync.wait()
        delay = 1.0
        while True:
            try:
                await asyncio.to_thread(lambda: write_ready(cfg.ready_file, read_boot_id()))
            except OSError as exc:
                message = (
                    f"cannot write the CNI gate's ready file {cfg.ready_file}: {exc}; "
                    "new pods on this node stay held"
                )
                log.error("node=%s %s", self.node, message)
                if delay == 1.0:
                    self._node_problem(GATE_PROBLEM, message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            log.info("node=%s CNI gate open: wrote %s", self.node, cfg.ready_file)
            return

    # ------------------------------------------------------------ host

    async def _check_dataplane(self) -> bool:
        """Refuse (log, Node Event, not Ready, nothing programmed) while an eBPF
        dataplane that bypasses netfilter runs here; True while refused."""
        assert self.uplink is not None
        why = await bpfcheck.check(
            self.uplink.name, netns=self.opts.netns, bpffs=Path(self.opts.bpffs)
        )
        if why is not None and why != self.refused:
            log.error(
                "node=%s refusing to program this node (its selected pods leave unsteered): %s",
                self.node,
                why,
            )
            self._node_problem("EBPFDataplaneRefused", why)
            if self.gate is not None:
                # While refused we program nothing, so the gate would hold the
                # node's new pods for as long: let them start (the refusal is
                # reported, and they would not be steered either way).
                cfg = self.gate.cfg
                try:
                    await asyncio.to_thread(lambda: write_ready(cfg.ready_file, read_boot_id()))
                except OSError as exc:
                    log.error("node=%s cannot open the CNI gate: %s", self.node, exc)
        elif why is None and self.refused is not None:
            log.info("node=%s no eBPF dataplane seen any more: programming", self.node)
        self.refused = why
        return why is not None

    async def _prepare_host(self, *, tunnel: str | None) -> None:
        """Apply the node settings; what cannot be applied keeps us not Ready
        and is reported once per change (log and Node Event), never raised."""
        assert self.uplink is not None
        problems = await prepare_sysctls(
            self.netns_runner,
            uplink=self.uplink.name,
            tunnel=tunnel,
            root=Path(self.opts.proc_sys),
            record=Path(self.opts.sysctl_record) if self.opts.sysctl_record else None,
        )
        if problems and problems != self.sysctl_problems:
            fix = sysctl_fix(Path(self.opts.proc_sys))
            for problem in problems:
                log.error("node=%s %s", self.node, problem)
            log.error("node=%s not Ready until the node settings hold: %s", self.node, fix)
            self._node_problem("SysctlNotSet", f"{'; '.join(problems)}; {fix}")
        elif not problems and self.sysctl_problems:
            log.info("node=%s node settings now hold", self.node)
        self.sysctl_problems = problems

    def _node_problem(self, reason: str, message: str) -> None:
        """A Warning Event on our Node; never waits."""
        obj = self.reflectors["nodes"].store.get(self.node) or {}
        task = asyncio.create_task(
            node_event(
                self.api,
                node=self.node,
                uid=str((obj.get("metadata") or {}).get("uid", "")),
                reason=reason,
                message=message,
            )
        )
        self._node_events.add(task)
        task.add_done_callback(self._node_events.discard)

    # ----------------------------------------------------------- ownership

    def _peers(self) -> dict[IPv4Address, NodeName]:
        """Up to eight other nodes to probe, the same ones on every run."""
        nodes = [
            n
            for n in (parse_node(o) for o in self.reflectors["nodes"].store.values())
            if n is not None and n.name != self.node and n.internal_ip is not None
        ]
        ranked = sorted(
            nodes, key=lambda n: hashlib.sha256(f"{self.node}|{n.name}".encode()).digest()
        )
        return {n.internal_ip: n.name for n in ranked[:8] if n.internal_ip is not None}

    async def _peer_loop(self) -> None:
        """Keep the peer prober's targets current. What it hears goes into every
        ack: the managers' indirect view of our peers (docs/fault-model.md)."""
        while True:
            self._peer_names = self._peers()
            self.prober.set_targets(self._peer_names)
            await asyncio.sleep(1.0)

    def _peers_heard(self) -> tuple[frozenset[NodeName], frozenset[NodeName]]:
        """(peers heard in the last 3 probe rounds, peers probed but not heard)."""
        now = time.monotonic()
        heard: set[NodeName] = set()
        silent: set[NodeName] = set()
        for ip, st in self.prober.targets.items():
            name = self._peer_names.get(ip)
            if name is None:
                continue
            if now - st.last_answer <= 3 * self.opts.peer_interval:
                heard.add(name)
            elif not st.up:
                silent.add(name)  # missed enough probes to count as down
        return frozenset(heard), frozenset(silent)

    async def _run_keeper(self, keeper: OwnershipKeeper) -> None:
        host = self.opts.grant_address or str(self.node_ip)
        port = self.opts.grant_port
        sock = None
        if self.opts.netns is not None:
            # The socket must live in the namespace we drive, so make it there.
            sock = await self.netns_runner.run(lambda: _bound_udp(host, port))
        log.info("node=%s accepting grants on %s:%d", self.node, host, port)
        await keeper.run(host=host, port=port, sock=sock)

    async def _read_back(self, mine: frozenset[IPAddress]) -> frozenset[IPAddress]:
        """Which of `mine` the status still gives us, read from the API server now.

        A plain GET of one object is served from etcd (a quorum read), never
        from the API server's watch cache, so a move written before the read
        was sent is seen."""
        store = self.reflectors["staticegressips"].store
        confirmed: set[IPAddress] = set()
        for key, obj in list(store.items()):
            entries = (obj.get("status") or {}).get("egressIPs") or []
            if not any(e.get("gateway") == self.node for e in entries):
                continue
            ns, name = key.split("/", 1)
            fresh = await self._custom.get_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, name, _request_timeout=REQUEST_TIMEOUT
            )
            for e in (fresh.get("status") or {}).get("egressIPs") or []:
                if e.get("gateway") != self.node:
                    continue
                try:
                    ip = ip_address(str(e.get("egressIP")))
                except ValueError:
                    continue
                if ip in mine:
                    confirmed.add(ip)
        return frozenset(confirmed)

    # ---------------------------------------------------------------- health

    def _watches_ok(self) -> tuple[bool, str]:
        return watches_heard(self.reflectors.values(), limit=self.opts.watch_silence)

    def _nft_restored(self, seconds: float) -> None:
        self.metrics.inc("nft_restores_total")
        self.metrics.set("nft_last_restore_seconds", seconds)

    def _ready(self) -> tuple[bool, str]:
        if self.refused is not None:
            return False, f"refusing to program this node: {self.refused}"
        if self.sysctl_problems:
            return False, f"node settings: {'; '.join(self.sysctl_problems)}"
        if not self.first_sync.is_set():
            return False, "first sync not applied yet"
        age = self.runner.pending_age()
        if age > self.opts.max_pending:
            return False, f"a change has waited {age:.1f}s to be applied"
        return True, "ok"


def _bound_udp(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


async def cleanup(
    *,
    netns: str | None,
    uplink: str | None,
    cni_gate: GateConfig | None = None,
    proc_sys: Path = PROC_SYS,
    sysctl_record: Path | None = None,
) -> list[str]:
    """Remove our table and every routing object we own, and with `cni_gate`
    the gate (logging what was removed); with `sysctl_record`, put the node
    settings back as they were before us. Return what failed."""
    runner = NetnsRunner(netns)
    errors: list[str] = []
    # Egress IPs first, while the lease gate still silences them: the other
    # way round, a leftover address would answer ARP again for a moment.
    # Without --uplink, every link holding an address with our label.
    netlink = NetlinkApplier(netns=netns)
    uplinks: list[str | None] = [uplink] if uplink else [*await labelled_uplinks(netns=netns)]
    for name in uplinks or [None]:
        res = await netlink.cleanup(name)
        errors += res.errors or []
    try:
        batch = delete_table_batch()
        batch["nftables"] += delete_lease_tables()
        await NftApplier(runner).apply(batch)
    except NftError as exc:
        errors.append(f"nftables: {exc}")
    if sysctl_record is not None:
        record = sysctl_record
        errors += await runner.run(lambda: restore_sysctls(root=proc_sys, record=record))
    runner.close()
    if cni_gate is not None:
        removed, failed = await asyncio.to_thread(uninstall, cni_gate)
        for line in removed:
            log.info("cleanup: %s", line)
        errors += failed
    return errors
