"""The gateway manager: probes nodes, and (when leader) assigns gateways and owns status.

Root tasks: reflectors (StaticEgressIPs, StaticEgressIPPools, Namespaces,
Nodes, Services, ServiceCIDRs, the agents' report Leases), the ICMP prober,
the leader elector, the coalescing sync and the health server. Every replica
probes every node that could be a gateway, so gateways keep hearing managers
while leadership changes hands; only the leader computes and writes.

One sync: parse every StaticEgressIP (an invalid one gets an `InvalidSpec`
status), judge every claim against the StaticEgressIPPools and the cluster's
own addresses (`staticegress.model.pools`, pure: the admission policy can be
removed, so everything it checks is checked again here, and more), compute
the assignment (`staticegress.model.assign`, pure), compare
each object's desired status with the one it has, and hand those that
differ to the status writer (`staticegress.k8s.status`), which writes each
object on its own, checking leadership right before each write: one object
the API server refuses is retried alone, with its own backoff, and never
stops or delays the others. Events are queued, never awaited. `Programmed` comes
from the agents' reports (`staticegress.model.programmed`): True only once
the gateways and directors confirm the object's generation. Events follow the
changes: GatewayAssigned, GatewayFailover, NoEligibleGateway.

Ownership under partial failure (docs/fault-model.md): every replica runs a
`GrantService` that grants the *grant map* to the candidate gateways every
100 ms and hears their agents' acks. The leader derives that map from the
assignment with a `HandoffPlanner` (a moved IP is granted to its new owner
only once the old one confirmed the release, is gone for everyone, or its
grant has surely expired) and publishes it on its Lease; standbys grant what
was published. Node health comes from several views (`classify`): the
leader's ICMP, the agents' acks, and what peer agents hear. If the leader's
view is implausible (half the candidates lost at once) it freezes every
assignment, reports `DetectorFault`, and gives the Lease up to a replica that
sees better.

The selection (which pods each rule selects) is published by a runner of its
own as StaticEgressIPMembers (`render.members`, `k8s.members`), labelled
with the nodes that may SNAT each rule's pods: the gateways and standbys the
status names and those of the leader's latest assignment, which it keeps
for this. A status change or a new assignment relabels them, so the agents'
watches move members from the nodes that lost a role to those that gained
it; a standby holds them before a failover needs them.

The ICMP prober starts by assuming every node healthy, and acks are only
expected once grants have been sent for a moment, so a new leader keeps the
current assignment instead of reshuffling it while its first probes are out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from typing import Any

from kubernetes_asyncio import client

from staticegress.agent.health import HealthState
from staticegress.agent.health import serve as serve_health
from staticegress.agent.metrics import Registry
from staticegress.agent.sync import SyncRunner, TemporaryError
from staticegress.api.core import (
    Node,
    Service,
    parse_namespace,
    parse_node,
    parse_service,
    parse_service_cidr,
)
from staticegress.api.members import MEMBERS_PLURAL, MEMBERS_SELECTOR
from staticegress.api.pools import POOL_PLURAL, EgressIPPool
from staticegress.api.types import (
    EgressIPAssignment,
    EgressIPRef,
    IPAddress,
    IPNetwork,
    NodeName,
)
from staticegress.api.v1alpha1 import GROUP, PLURAL, VERSION
from staticegress.dataplane.grants import GRANT_PORT
from staticegress.dataplane.heartbeat import Prober
from staticegress.k8s.agentreport import LABEL_SELECTOR, records_from_store
from staticegress.k8s.events import EventRecorder
from staticegress.k8s.members import MemberPublisher
from staticegress.k8s.reflector import Reflector
from staticegress.k8s.snapshot import (
    Invalid,
    ParseCache,
    build_snapshot,
    parse_policy,
    parse_pool_checked,
)
from staticegress.k8s.status import KubeStatusAPI, PoolStatusAPI, StatusWrite, StatusWriter
from staticegress.k8s.trim import (
    trim_endpoint_slice,
    trim_namespace,
    trim_node,
    trim_pod,
    trim_service,
)
from staticegress.manager.grants import MAP_ANNOTATION, GrantService, decode_map, encode_map
from staticegress.manager.leader import LeaderElector
from staticegress.model.assign import (
    DEFAULT_GATEWAY_LABEL,
    ConditionOut,
    PolicyResult,
    assign_gateways,
    conditions_body,
    gateway_candidates,
    invalid_result,
    owned_gateways,
    same_status,
    status_body,
)
from staticegress.model.desired import select_members
from staticegress.model.ownership import (
    GRANT_TTL,
    HandoffPlanner,
    Health,
    NodeView,
    Verdict,
    classify,
    eligible,
    handoff_wait,
)
from staticegress.model.pools import (
    Forbidden,
    Tenancy,
    forbidden_addresses,
    judge_tenancy,
    pool_usage,
    trusted_routers,
)
from staticegress.model.programmed import confirm_programmed, previous_programmed
from staticegress.render.members import render_member_shards

log = logging.getLogger(__name__)

MANAGER_HEALTH_PORT = 9745
"""/livez, /healthz, /readyz and /metrics; next to the agent's 9744, a range
no common node component uses (see `agent.agent.AGENT_HEALTH_PORT`)."""


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
    health_port: int = MANAGER_HEALTH_PORT
    grant_key: bytes | None = None
    """The cluster's grant key (required to run: agents hold nothing without grants)."""
    grant_port: int = GRANT_PORT
    grant_interval: float = 0.1
    grant_ttl: float = GRANT_TTL
    agent_grace: float = 1.5
    require_pool: bool = False
    """Honour only egress IPs a StaticEgressIPPool grants (the command line's
    default); False lets a single-tenant cluster use addresses no pool holds
    (--unpooled-egress-ips=allow)."""
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    """Pod ranges besides the Nodes' podCIDRs: never an egress IP."""
    forbidden_cidrs: tuple[IPNetwork, ...] = ()
    """More addresses that are never an egress IP (routers, VIPs, ...)."""
    service_cidr_wait: float = 10.0
    """How long the first sync waits for the ServiceCIDR list before going on
    without it (clusters before 1.33, or without the permission)."""


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
        # The selection is published by a runner of its own, so failover never
        # waits for it (nor for the Pod watch it needs).
        self.members_runner = SyncRunner(self.publish_members, min_interval=0.02, max_interval=60.0)

        def poke() -> None:
            self.runner.poke()
            self.selection_changed()

        self.reflectors = {
            "staticegressips": Reflector(
                name="staticegressips",
                list_fn=self.custom.list_cluster_custom_object,
                list_args=(GROUP, VERSION, PLURAL),
                on_change=poke,
            ),
            # Nodes do not enter the selection: a Node's change only wakes the
            # assignment, not a recompute of every rule's pods.
            "nodes": Reflector(
                name="nodes",
                list_fn=core.list_node,
                on_change=self.runner.poke,
                trim=trim_node,
            ),
            "services": Reflector(
                name="services",
                list_fn=core.list_service_for_all_namespaces,
                on_change=poke,
                trim=trim_service,
            ),
            # Pools and namespaces decide every grant: a sync before both are
            # listed would see no pool and withdraw every egress IP.
            "pools": Reflector(
                name="staticegressippools",
                list_fn=self.custom.list_cluster_custom_object,
                list_args=(GROUP, VERSION, POOL_PLURAL),
                on_change=poke,
            ),
            "namespaces": Reflector(
                name="namespaces", list_fn=core.list_namespace, on_change=poke, trim=trim_namespace
            ),
        }
        selection_poke = self.selection_changed
        self.selection_reflectors = {
            "pods": Reflector(
                name="pods",
                list_fn=core.list_pod_for_all_namespaces,
                on_change=selection_poke,
                trim=trim_pod,
                page_size=500,  # every pod: fewer, larger pages
            ),
            "endpointslices": Reflector(
                name="endpointslices",
                list_fn=client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces,
                on_change=selection_poke,
                trim=trim_endpoint_slice,
            ),
            "members": Reflector(
                name="staticegressipmembers",
                list_fn=self.custom.list_namespaced_custom_object,
                list_args=(GROUP, VERSION, opts.namespace, MEMBERS_PLURAL),
                list_kwargs={"label_selector": MEMBERS_SELECTOR},
                # What is published changed (mostly our own writes coming
                # back): compare again, without selecting again.
                on_change=self.members_runner.poke,
            ),
        }
        self.publisher = MemberPublisher(api, namespace=opts.namespace)
        self.members_cache = ParseCache()
        self._selection_dirty = True
        """An input of the selection changed since `_wanted` was computed."""
        self._wanted: dict[str, dict[str, Any]] | None = None
        self._members_count = 0
        self.assigned: dict[EgressIPRef, tuple[EgressIPAssignment, ...]] = {}
        """The leader's latest assignment, status written or not: it labels the
        published members (`render.members.member_readers`) a round trip
        before the status would."""
        # The service ranges are only forbidden addresses; a cluster without the
        # ServiceCIDR API (or the permission) must not stop failover, so the
        # first sync waits for this list only for a while.
        self.service_cidrs = Reflector(
            name="servicecidrs",
            list_fn=client.NetworkingV1Api(api).list_service_cidr,
            on_change=self.runner.poke,
        )
        self._started = time.monotonic()
        # The agents' reports decide `Programmed` only; kept out of the dict the
        # sync waits on, so a missing report permission never stops failover.
        self.reports = Reflector(
            name="agentreports",
            list_fn=client.CoordinationV1Api(api).list_namespaced_lease,
            list_args=(opts.namespace,),
            list_kwargs={"label_selector": LABEL_SELECTOR},
            on_change=self.runner.poke,
        )
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
            annotations=self._annotations,
            on_change=lambda leader: self._leadership(leader),
        )
        if opts.grant_key is None:
            raise ValueError("the manager needs the cluster's grant key")
        self.grants = GrantService(
            identity=opts.identity,
            key=opts.grant_key,
            interval=opts.grant_interval,
            ttl=opts.grant_ttl,
            port=opts.grant_port,
            on_change=self.runner.poke,
        )
        self.planner: HandoffPlanner | None = None
        self._map_text = ""
        self.verdict = Verdict(health={}, frozen=False)
        self._lost_since: dict[NodeName, float] = {}
        self.events = EventRecorder(api, component="staticegress-manager", host=opts.identity)
        self.status: StatusWriter[_Change] = StatusWriter(
            KubeStatusAPI(api),
            is_leader=self.elector.is_leader,
            poke=self.runner.poke,
            on_written=self._written,
            on_rejected=self._rejected,
        )
        self.pool_status: StatusWriter[str] = StatusWriter(
            PoolStatusAPI(api),
            is_leader=self.elector.is_leader,
            poke=self.runner.poke,
            on_written=lambda w: log.info(
                "manager=%s pool=%s status written: %s",
                opts.identity,
                w.ref.name,
                w.context,
            ),
            on_rejected=lambda w, why: log.warning(
                "manager=%s pool=%s status refused: %s", opts.identity, w.ref.name, why
            ),
        )
        self.metrics = Registry()
        for name, kind, help in (
            ("leader", "gauge", "1 while this replica is the leader."),
            ("assignments_total", "counter", "Egress IPs given a gateway (first time or moved)."),
            ("failovers_total", "counter", "Egress IPs moved off a gateway that failed."),
            ("unreachable_gateways", "gauge", "Nodes that do not answer heartbeats."),
            ("status_writes_total", "counter", "Status patches written."),
            ("status_rejections_total", "counter", "Status patches the API server refused."),
            ("sync_errors_total", "counter", "Syncs that failed and were retried."),
            ("frozen", "gauge", "1 while this replica's view of the nodes is implausible."),
            ("grant_map_epoch", "gauge", "Epoch of the grant map this replica grants."),
            ("pending_handoffs", "gauge", "Moved egress IPs waiting for the old owner to let go."),
            ("members_published", "gauge", "Selected pods in the published selection."),
            ("member_objects", "gauge", "StaticEgressIPMembers objects the selection needs."),
            ("member_writes_total", "counter", "StaticEgressIPMembers creates, patches, deletes."),
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
            # Continue from the predecessor's published map and epoch, so
            # nothing it granted is granted twice.
            published = decode_map(self.elector.observed_annotations.get(MAP_ANNOTATION))
            epoch, grant_map = published if published is not None else (0, {})
            self.grants.set_map(max(epoch, self.grants.epoch), grant_map)
            self.planner = HandoffPlanner.resume(
                grant_map, now=time.monotonic(), wait=handoff_wait(self.opts.grant_ttl)
            )
            self._map_text = encode_map(self.grants.epoch, grant_map)
            self.runner.poke()
            self.selection_changed()
        else:
            self.planner = None
            self.assigned = {}

    def _annotations(self) -> dict[str, str]:
        """What the Lease carries: the leader's grant map; otherwise what is there."""
        if self.planner is not None and self._map_text:
            return {MAP_ANNOTATION: self._map_text}
        return dict(self.elector.observed_annotations)

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
        log.info("manager=%s heartbeats: ICMP identifier %d", self.opts.identity, self.prober.ident)
        async with asyncio.TaskGroup() as tg:
            for r in self.reflectors.values():
                tg.create_task(r.run(), name=f"reflector-{r.name}")
            tg.create_task(self.reports.run(), name="reflector-agentreports")
            for r in self.selection_reflectors.values():
                tg.create_task(r.run(), name=f"reflector-{r.name}")
            tg.create_task(self.members_runner.run(), name="publish-members")
            tg.create_task(self.service_cidrs.run(), name="reflector-servicecidrs")
            tg.create_task(self.prober.run(), name="prober")
            tg.create_task(self.elector.run(), name="leader")
            tg.create_task(self.grants.run(), name="grants")
            tg.create_task(self._grant_loop(), name="grant-map")
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
        # Only nodes that could be gateways are probed: with thousands of nodes
        # and a handful of gateways, probing all would be wasted packets.
        parsed = self.parse_cache.parse_all(
            "policies", self.reflectors["staticegressips"].store, parse_policy
        )
        candidates = gateway_candidates(
            (p for p in parsed if not isinstance(p, Invalid)),
            nodes=nodes,
            default_label=self.opts.default_label,
        )
        self.prober.set_targets(ip for n, ip in self._node_ips.items() if n in candidates)
        self.grants.set_targets({n: ip for n, ip in self._node_ips.items() if n in candidates})
        return nodes

    async def _grant_loop(self) -> None:
        """Standbys follow the published map; the leader re-plans pending handoffs."""
        while True:
            await asyncio.sleep(self.opts.grant_interval)
            if self.planner is None:
                published = decode_map(self.elector.observed_annotations.get(MAP_ANNOTATION))
                if published is not None:
                    self.grants.set_map(*published)
            elif self.planner.pending:
                self.runner.poke()
            self.metrics.set("grant_map_epoch", self.grants.epoch)

    def _judge(self, nodes: list[Node]) -> Verdict:
        """Every candidate's health from all our views; freeze if implausible."""
        raw = self.reflectors["nodes"].store
        # Answers that arrived while this loop was busy are waiting in the
        # sockets: count them before judging anyone silent.
        self.grants.endpoint.drain()
        self.prober.drain()
        now = time.monotonic()
        views = {
            name: NodeView(
                icmp_up=self.prober.is_up(ip),
                ack_age=self.grants.ack_age(name),
                heard_by_peers=self.grants.heard_by_peers(name),
                witnessed_lost=self.grants.witnessed_lost(name),
                ready=not _not_ready(raw.get(name, {})),
                lost_for=now - self._lost_since.get(name, now),
            )
            for name, ip in self.grants.targets.items()
        }
        for name, v in views.items():
            if v.icmp_up or v.ack_age <= 3 * self.opts.grant_interval:
                self._lost_since.pop(name, None)
            else:
                self._lost_since.setdefault(name, now)
                if now - self._lost_since[name] < 0.2:
                    self.runner.poke()  # look again once the settle window has passed
        verdict = classify(views, agent_grace=self.opts.agent_grace)
        if verdict.frozen != self.verdict.frozen:
            if verdict.frozen:
                log.error(
                    "manager=%s detector fault: %d of %d candidate gateways silent at once "
                    "with no witness (%s); freezing every assignment and giving up leadership",
                    self.opts.identity,
                    len(verdict.unreachable),
                    len(views),
                    ",".join(verdict.unreachable),
                )
            else:
                log.warning(
                    "manager=%s detector view plausible again: unfreezing", self.opts.identity
                )
        elif {n: h for n, h in verdict.health.items() if h != Health.ALIVE} != {
            n: h for n, h in self.verdict.health.items() if h != Health.ALIVE
        }:
            log.warning(
                "manager=%s node health: %s",
                self.opts.identity,
                " ".join(f"{n}={h.value}" for n, h in sorted(verdict.health.items())),
            )
        self.elector.reluctant = verdict.frozen
        self.metrics.set("frozen", 1 if verdict.frozen else 0)
        self.verdict = verdict
        return verdict

    async def _publish(self, assignment: dict[IPAddress, NodeName | None]) -> None:
        """Plan the grant map for `assignment`; publish and grant it when it changed."""
        planner = self.planner
        if planner is None:
            return
        now = time.monotonic()
        grant_map = planner.plan(
            assignment, now=now, health=self.verdict.health, held=self.grants.held()
        )
        self.metrics.set("pending_handoffs", len(planner.pending))
        if grant_map != self.grants.grant_map:
            epoch = max(self.grants.epoch + 1, int(time.time() * 1000))
            self.grants.set_map(epoch, grant_map)
            self._map_text = encode_map(epoch, grant_map)
            log.info(
                "manager=%s grant map epoch %d: %s%s",
                self.opts.identity,
                epoch,
                " ".join(f"{ip}->{n}" for ip, n in sorted(grant_map.items(), key=str)) or "-",
                f" (waiting: {', '.join(f'{ip}->{p.new}' for ip, p in planner.pending.items())})"
                if planner.pending
                else "",
            )
        if planner.unpublished and await self.elector.publish():
            planner.published(at=time.monotonic())

    def selection_changed(self) -> None:
        """An input of the published selection changed: select again."""
        self._selection_dirty = True
        self.members_runner.poke()

    async def publish_members(self, force: bool) -> None:
        """Publish which pods each rule selects (`render.members`), as leader,
        labelled for the nodes that may SNAT them. Runs on every change of the
        selection's inputs, of a StaticEgressIP (its status among them) and of
        the leader's assignment."""
        reflectors = (*self.reflectors.values(), *self.selection_reflectors.values())
        if not self.elector.is_leader() or not all(r.synced.is_set() for r in reflectors):
            return
        wanted = self._wanted
        if force or self._selection_dirty or wanted is None:
            self._selection_dirty = False  # a change from now on selects again
            # Copies, read on a thread: at 10,000 pods and 1,000 rules a
            # selection is a few hundred ms of CPU, during which the loop
            # keeps granting and hearing acks.
            stores = {k: dict(r.store) for k, r in self.reflectors.items()}
            pods = dict(self.selection_reflectors["pods"].store)
            slices = dict(self.selection_reflectors["endpointslices"].store)
            assigned = dict(self.assigned)
            try:
                wanted, self._members_count = await asyncio.to_thread(
                    self._select, stores, pods, slices, assigned
                )
            except BaseException:
                self._selection_dirty = True
                raise
            self._wanted = wanted
        assert wanted is not None
        before = self.publisher.writes
        errors = await self.publisher.publish(wanted, self.selection_reflectors["members"].store)
        self.metrics.set("members_published", self._members_count)
        self.metrics.set("member_objects", len(wanted))
        self.metrics.inc("member_writes_total", self.publisher.writes - before)
        if errors:
            raise TemporaryError(
                f"{len(errors)} StaticEgressIPMembers writes failed, first: {errors[0]}"
            )

    def _select(
        self,
        stores: dict[str, dict[str, Any]],
        pods: dict[str, Any],
        slices: dict[str, Any],
        assigned: dict[EgressIPRef, tuple[EgressIPAssignment, ...]],
    ) -> tuple[dict[str, dict[str, Any]], int]:
        """The member objects to publish, and how many members (pure; a thread)."""
        snap, _ = build_snapshot(
            cache=self.members_cache,
            policies=stores["staticegressips"],
            pods=pods,
            nodes={},
            services=stores["services"],
            namespaces=stores["namespaces"],
            slices=slices,
            pools=stores["pools"],
        )
        members, endpoints = select_members(snap, require_pool=self.opts.require_pool)
        wanted = render_member_shards(
            snap.policies,
            members,
            dict(endpoints),
            namespace=self.opts.namespace,
            assigned=assigned,
        )
        return wanted, len(members)

    async def sync(self, force: bool) -> None:
        if not all(r.synced.is_set() for r in self.reflectors.values()):
            return
        if not self.service_cidrs.synced.is_set():
            left = self.opts.service_cidr_wait - (time.monotonic() - self._started)
            if left > 0:
                asyncio.get_running_loop().call_later(left, self.runner.poke)
                return
        nodes = self._nodes()  # keeps the prober's targets current on every replica
        verdict = self._judge(nodes)  # every replica: a frozen one will not lead
        if not self.elector.is_leader():
            return
        healthy, accepting = eligible(verdict)
        parsed_services: list[Service] = [
            s
            for s in self.parse_cache.parse_all(
                "services", self.reflectors["services"].store, parse_service
            )
            if s is not None
        ]
        services = frozenset((s.namespace, s.name) for s in parsed_services)
        store = self.reflectors["staticegressips"].store
        parsed = self.parse_cache.parse_all("policies", store, parse_policy)
        policies = [p for p in parsed if not isinstance(p, Invalid)]
        results: list[PolicyResult] = [
            invalid_result(p.ref, p.generation, p.error) for p in parsed if isinstance(p, Invalid)
        ]
        pools, bad_pools = self._pools()
        forbidden = self._forbidden(nodes, parsed_services)
        tenancy = judge_tenancy(
            policies,
            pools=pools,
            namespaces={
                n.name: dict(n.labels)
                for n in self.parse_cache.parse_all(
                    "namespaces", self.reflectors["namespaces"].store, parse_namespace
                )
                if n is not None
            },
            require_pool=self.opts.require_pool,
            forbidden=forbidden,
        )
        now = dt.datetime.now(dt.UTC)
        results += assign_gateways(
            policies,
            nodes=nodes,
            healthy=healthy,
            services=services,
            now=now,
            default_label=self.opts.default_label,
            accepting=accepting,
            tenancy=tenancy,
        )
        # Only who holds what: a `since` that is new on every sync until the
        # status lands must not recompute the whole selection each time.
        assigned = {
            r.ref: tuple(
                EgressIPAssignment(a.egress_ip, a.rule, a.gateway, None, a.standbys, rules=a.rules)
                for a in r.assignments
            )
            for r in results
        }
        if assigned != self.assigned:
            # New gateways and standbys must hold their members before they
            # are needed: relabel now, not once the status has come back.
            self.assigned = assigned
            self.selection_changed()
        self._write_pool_status(pools, bad_pools, tenancy, forbidden, now)
        await self._publish(owned_gateways(results, tenancy.owners))
        if verdict.frozen:
            results = [_detector_fault(r, verdict) for r in results]
        # `Programmed` from what the agents confirm, not from the assignment.
        results = confirm_programmed(
            results,
            records=records_from_store(self.reports.store, nodes=(n.name for n in nodes))
            if self.reports.synced.is_set()
            else None,
            previous=previous_programmed(policies),
        )
        # Hand every changed status to the writer: each object is written on
        # its own, so one refused or failing object never holds up another.
        self.status.retain([r.ref for r in results])
        self.status.submit(
            w for w in (self._status_write(r, store[str(r.ref)], now) for r in results) if w
        )

    def _pools(self) -> tuple[list[EgressIPPool], list[Invalid]]:
        """The valid pools, and what is wrong with each pool that is not."""
        parsed = self.parse_cache.parse_all(
            "pools", self.reflectors["pools"].store, parse_pool_checked
        )
        return (
            [p for p in parsed if isinstance(p, EgressIPPool)],
            [p for p in parsed if isinstance(p, Invalid)],
        )

    def _forbidden(self, nodes: list[Node], services: list[Service]) -> Forbidden:
        """The cluster's own addresses: never an egress IP, whatever a pool holds."""
        internal = {n.name: n.internal_ip for n in nodes}
        records = records_from_store(self.reports.store, nodes=internal)
        cidrs = [
            net
            for nets in self.parse_cache.parse_all(
                "servicecidrs", self.service_cidrs.store, parse_service_cidr
            )
            for net in nets
        ]
        return forbidden_addresses(
            node_addresses=[(n.name, a) for n in nodes for a in n.addresses],
            pod_ranges=[
                *((f"node {n.name}", c) for n in nodes for c in n.pod_cidrs),
                *(("--cluster-cidr", c) for c in self.opts.cluster_cidrs),
            ],
            service_ranges=cidrs,
            routers=trusted_routers(
                (name, internal.get(name), r.subnet, r.routers) for name, r in records.items()
            ),
            load_balancer_ips=[
                (f"{s.namespace}/{s.name}", a) for s in services for a in s.load_balancer_ips
            ],
            extra=self.opts.forbidden_cidrs,
        )

    def _write_pool_status(
        self,
        pools: list[EgressIPPool],
        bad: list[Invalid],
        tenancy: Tenancy,
        forbidden: Forbidden,
        now: dt.datetime,
    ) -> None:
        """Each pool's used and free counts and conditions, written like the
        objects' statuses: one pool at a time, never holding anything up."""
        store = self.reflectors["pools"].store
        usage = pool_usage(pools, tenancy)
        counts: dict[str, tuple[int, int, int, int]] = {}
        conditions: dict[str, tuple[ConditionOut, ...]] = {}
        for pool in pools:
            u = usage[pool.name]
            counts[pool.name] = (pool.generation, u.total, u.used, u.free)
            reserved = [
                f"{net} ({what})"
                for net, what in forbidden.ranges
                if any(net.version == c.version and net.overlaps(c) for c in pool.cidrs)
            ]
            conditions[pool.name] = (
                ConditionOut(
                    "Ready", "True", "Granting", f"{u.used} of {u.total} addresses in use"
                ),
                ConditionOut(
                    "Degraded",
                    "True",
                    "ForbiddenAddresses",
                    "never granted, though held: "
                    + "; ".join(reserved[:8])
                    + (f" and {len(reserved) - 8} more" if reserved[8:] else ""),
                )
                if reserved
                else ConditionOut("Degraded", "False", "AsExpected", "no problems"),
            )
        for invalid in bad:
            counts[invalid.ref.name] = (invalid.generation, 0, 0, 0)
            conditions[invalid.ref.name] = (
                ConditionOut("Ready", "False", "InvalidSpec", invalid.error[:1000]),
                ConditionOut("Degraded", "True", "InvalidSpec", invalid.error[:1000]),
            )
        self.pool_status.retain([EgressIPRef("", n) for n in counts])
        writes = []
        for name, (generation, total, used, free) in counts.items():
            current = store[name].get("status") or {}
            previous = {c.get("type"): c for c in current.get("conditions") or []}
            body = {
                "observedGeneration": generation,
                "total": total,
                "used": used,
                "free": free,
                "conditions": conditions_body(
                    conditions[name], generation=generation, previous_conditions=previous, now=now
                ),
            }
            if same_status(body, current, keys=("observedGeneration", "total", "used", "free")):
                continue
            writes.append(
                StatusWrite(
                    ref=EgressIPRef("", name),
                    resource_version=(store[name].get("metadata") or {}).get("resourceVersion"),
                    status=body,
                    context=f"used {used} of {total}",
                )
            )
        self.pool_status.submit(writes)

    def _status_write(
        self, result: PolicyResult, obj: dict[str, Any], now: dt.datetime
    ) -> StatusWrite[_Change] | None:
        """The write `result` needs, or None when the object already says it."""
        current = obj.get("status") or {}
        prev_conditions = {c.get("type"): c for c in current.get("conditions") or []}
        body = status_body(result, previous_conditions=prev_conditions, now=now)
        if same_status(body, current):
            return None
        meta = obj["metadata"]
        old = {a.get("egressIP"): a.get("gateway") for a in current.get("egressIPs") or []}
        return StatusWrite(
            ref=result.ref,
            resource_version=meta.get("resourceVersion"),
            status=body,
            context=_Change(result=result, uid=str(meta.get("uid", "")), old_gateways=old),
        )

    def _written(self, write: StatusWrite[_Change]) -> None:
        """After a status landed: its Events (queued, never awaited) and metrics."""
        change = write.context
        result = change.result
        self.metrics.inc("status_writes_total")
        for kind, reason, message in result.events:
            self.events.record(result.ref, change.uid, reason, message, kind=kind)
            if reason in ("GatewayAssigned", "GatewayFailover"):
                self.metrics.inc("assignments_total")
            if reason == "GatewayFailover":
                self.metrics.inc("failovers_total")
                eip = message.split(" ", 1)[0]
                prev_ip = self._node_ips.get(NodeName(str(change.old_gateways.get(eip))))
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
            write.status["summary"],
        )

    def _rejected(self, write: StatusWrite[_Change], why: str) -> None:
        """The API server refused this object's status (the writer backs it off)."""
        self.metrics.inc("status_rejections_total")
        self.events.record(
            write.ref, write.context.uid, "StatusRejected", f"status not written: {why}"
        )


@dataclass(frozen=True)
class _Change:
    """What the manager needs once a status write has landed."""

    result: PolicyResult
    uid: str
    old_gateways: dict[str | None, str | None]
    """egress IP -> gateway before the write, to time failovers."""


def _detector_fault(result: PolicyResult, verdict: Verdict) -> PolicyResult:
    """The same result, marked Degraded because the leader's view is implausible."""
    lost = ", ".join(verdict.unreachable)
    degraded = ConditionOut(
        "Degraded",
        "True",
        "DetectorFault",
        f"{len(verdict.unreachable)} candidate gateways went silent at once with no "
        f"witness ({lost}): "
        "assignments are frozen until a replica with a plausible view leads",
    )
    conditions = (*(c for c in result.conditions if c.type != "Degraded"), degraded)
    return replace(
        result,
        conditions=conditions,
        events=(*result.events, ("Warning", "DetectorFault", degraded.message)),
    )
