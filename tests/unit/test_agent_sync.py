"""The agent's sync with in-memory fakes for the kernel (no root, no API server):
an egress IP the status gives the node is held only while a grant covers it,
the lease tables ride in every batch, and a lapsed grant is let go; after a
reboot, a local pod's address counts only once kubelet has reported its
sandbox since the boot."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from ipaddress import IPv4Address, ip_address, ip_network
from typing import Any

import pytest
from kubernetes_asyncio import client

from staticegress.agent.agent import Agent, AgentOptions
from staticegress.agent.sync import TemporaryError
from staticegress.dataplane.host import Uplink
from staticegress.dataplane.netlink import ApplyResult
from staticegress.model.desired import stable_bucket
from staticegress.model.ownership import Grant
from staticegress.render.lease import LEASE_TABLE
from staticegress.render.netlink import NetlinkSpec

X = ip_address("198.51.100.200")

BOOT = 1_796_000_000
"""The node's boot in the fixtures (2026-11-30T00:53:20Z), as the kernel gives it."""


def rfc3339(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sandbox_reported(at: int, *, up: bool = True) -> list[dict[str, str]]:
    """A pod's conditions once kubelet reported its sandbox up (or not) at `at`."""
    status = "True" if up else "False"
    return [
        {"type": "PodReadyToStartContainers", "status": status, "lastTransitionTime": rfc3339(at)}
    ]


class FakeNft:
    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.texts: list[str] = []

    async def apply(self, batch: dict[str, Any]) -> None:
        self.batches.append(batch)

    async def apply_all(self, batches: list[dict[str, Any]]) -> None:
        for batch in batches:
            await self.apply(batch)

    async def apply_text(self, text: str) -> None:
        self.texts.append(text)

    async def run(self, cmd: dict[str, Any]) -> Any:
        return {"nftables": []}

    async def watch(self) -> None:
        return None


class FakeNetlink:
    def __init__(self) -> None:
        self.specs: list[tuple[str, NetlinkSpec]] = []

    async def apply(self, spec: NetlinkSpec, *, phase: str) -> ApplyResult:
        self.specs.append((phase, spec))
        return ApplyResult(errors=[])


def node(i: int) -> dict[str, Any]:
    return {
        "metadata": {"name": f"node-{i}", "labels": {"staticegress.io/gateway": "true"}},
        "spec": {"podCIDR": f"10.244.{i}.0/24", "podCIDRs": [f"10.244.{i}.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": f"198.51.100.1{i}"}]},
    }


def pod(i: int) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "default", "name": f"client-{i}", "labels": {"app": "client"}},
        "spec": {"nodeName": f"node-{i}"},
        "status": {
            "phase": "Running",
            "podIP": f"10.244.{i}.5",
            "podIPs": [{"ip": f"10.244.{i}.5"}],
            "conditions": sandbox_reported(BOOT + 30),
        },
    }


POLICY = {
    "apiVersion": "staticegressips.io/v1alpha1",
    "kind": "StaticEgressIP",
    "metadata": {
        "namespace": "default",
        "name": "egress",
        "uid": "u-1",
        "generation": 1,
        "resourceVersion": "7",
        "creationTimestamp": "2026-01-01T00:00:00Z",
    },
    "spec": {
        "rules": [
            {
                "egressip": str(X),
                "pod-selector": {"matchLabels": {"app": "client"}},
                "cidr": "203.0.113.10/32",
            }
        ]
    },
    "status": {"egressIPs": [{"egressIP": str(X), "rule": 0, "gateway": "node-1"}]},
}


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


FLUSHED: list[list[IPv4Address]] = []
FLUSH_KEPT: list[list[Any]] = []
REPAIRED: list[list[IPv4Address]] = []


class BootClock:
    """The kernel's boot time as the agent reads it; `t` is moved by a test."""

    def __init__(self, t: int = BOOT) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def make_agent(
    ownership: str = "grants",
    *,
    boot: BootClock | None = None,
    boot_time: Callable[[], int] | None = None,
    **options: Any,
) -> tuple[Agent, FakeNft, FakeNetlink]:
    """An agent of node-1 with its stores filled; `options` go to AgentOptions."""
    nft, netlink = FakeNft(), FakeNetlink()
    announced: list[IPv4Address] = []

    async def announce(ip: IPv4Address) -> None:
        announced.append(ip)

    async def flush(keep_by_pod: Mapping[IPv4Address, list[Any]]) -> int:
        FLUSHED.append(sorted(keep_by_pod))
        FLUSH_KEPT.extend(list(keep) for keep in keep_by_pod.values())
        return len(keep_by_pod)

    async def repair(pods: list[IPv4Address], allowed: list[IPv4Address], keep: list[Any]) -> int:
        assert X in allowed
        REPAIRED.append(pods)
        return len(pods)

    opts = AgentOptions(
        node="node-1",
        transport="direct",
        ownership=ownership,  # type: ignore[arg-type]
        grant_key=b"k" * 32,
        health_port=0,
        **options,
    )
    agent = Agent(
        client.ApiClient(),
        opts,
        nft=nft,
        netlink=netlink,
        announcer=announce,
        flusher=flush,
        repairer=repair,
        boot_time=boot_time or boot or BootClock(),
    )
    stores = {
        "nodes": {f"node-{i}": node(i) for i in (1, 2, 3)},
        "pods": {f"default/client-{i}": pod(i) for i in (1, 2, 3)},
        "staticegressips": {"default/egress": POLICY},
    }
    for name, r in agent.reflectors.items():
        r.store.update(stores.get(name, {}))
        r.synced.set()
    agent.uplink = Uplink("eth0", 1500, "02:00:00:00:00:01")
    agent.transport = "direct"
    agent.node_ip = IPv4Address("198.51.100.11")
    return agent, nft, netlink


def tables(batch: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (c["add"]["table"]["family"], c["add"]["table"]["name"])
        for c in batch["nftables"]
        if "add" in c and "table" in c["add"]
    }


async def test_named_but_not_granted_is_withheld_then_held_then_let_go() -> None:
    agent, nft, _ = make_agent()
    keeper = agent.keeper
    assert keeper is not None
    clock = Clock()
    keeper._clock = clock

    await agent.sync(True)
    assert agent.applied is not None
    assert agent.applied.named == (X,)
    assert agent.applied.owned == ()
    assert agent.withheld == {X}
    assert ("ip", LEASE_TABLE) in tables(nft.batches[-1])
    assert ("arp", LEASE_TABLE) in tables(nft.batches[-1])
    # Without a grant the node SNATs nothing to X: its pods are dropped (fail closed).
    assert all(not r.snat for r in agent.applied.rules)

    g = Grant(
        sender="m/1", node=agent.node, epoch=1, seq=1, sent_wall=0, ttl=2.0, ips=frozenset({X})
    )
    assert keeper.book.offer(g, now=clock.t, now_wall=0) is None
    await keeper.apply()
    assert "198.51.100.200 timeout 2000ms expires 2000ms" in nft.texts[-1]
    await agent.sync(False)
    assert agent.applied.owned == (X,)
    assert agent.withheld == frozenset()
    assert any(r.snat for r in agent.applied.rules)

    # Nobody renews: at the deadline the node lets go, kernel and dataplane.
    clock.t += 2.0
    await keeper._tick()
    assert "198.51.100.200 timeout 1ms expires 1ms" in nft.texts[-1]
    await agent.sync(False)
    assert agent.applied.owned == ()
    assert agent.withheld == {X}
    assert agent.metrics.get("fences_total") == 2
    await agent.api.close()


async def test_status_only_follows_the_status_and_removes_the_lease_tables() -> None:
    agent, nft, _ = make_agent("status-only")
    assert agent.keeper is None
    await agent.sync(True)
    assert agent.applied is not None
    assert agent.applied.owned == (X,)
    deleted = {
        (c["delete"]["table"]["family"], c["delete"]["table"]["name"])
        for c in nft.batches[-1]["nftables"]
        if "delete" in c
    }
    assert ("ip", LEASE_TABLE) in deleted
    assert ("arp", LEASE_TABLE) in deleted
    await agent.api.close()


async def test_a_withheld_ip_drops_its_pods_and_never_rebuckets_them() -> None:
    """While a handoff waits for its grant, a pod keeps its egress IP (dropped
    meanwhile) instead of moving to the rule's other IP, where conntrack would
    keep it after the grant arrives."""
    y = ip_address("198.51.100.201")
    agent, nft, _ = make_agent()
    policy = json_copy(POLICY)
    rule = policy["spec"]["rules"][0]
    del rule["egressip"]
    rule["egressips"] = [str(X), str(y)]
    policy["status"]["egressIPs"] = [
        {"egressIP": str(X), "rule": 0, "gateway": "node-1"},
        {"egressIP": str(y), "rule": 0, "gateway": "node-2"},
    ]
    agent.reflectors["staticegressips"].store["default/egress"] = policy
    # Pods on node-1 picking each IP, whatever the hash gives.
    for i in range(2, 40):
        raw = pod(1)
        raw["metadata"]["name"] = f"extra-{i}"
        raw["status"]["podIP"] = f"10.244.1.{i}"
        raw["status"]["podIPs"] = [{"ip": f"10.244.1.{i}"}]
        agent.reflectors["pods"].store[f"default/extra-{i}"] = raw
    await agent.sync(True)
    assert agent.applied is not None
    steer = dict(agent.applied.rules[0].steer)
    picks = {ip: (X, y)[stable_bucket(ip, 2)] for ip in steer}
    assert {t for ip, t in steer.items() if picks[ip] == X} == {"drop"}
    slot = {g.node: g.slot for g in agent.applied.gateways}["node-2"]
    assert {t for ip, t in steer.items() if picks[ip] == y} == {slot}
    # ARP is gated for every egress IP of the cluster, IP packets for ours only.
    gated = {
        (c["add"]["element"]["family"], tuple(c["add"]["element"]["elem"]))
        for c in nft.batches[-1]["nftables"]
        if "add" in c and "element" in c["add"] and c["add"]["element"]["name"] == "egress_ips"
    }
    assert gated == {("ip", (str(X),)), ("arp", (str(X), str(y)))}
    await agent.api.close()


def json_copy(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(obj)))


async def test_a_pod_whose_path_passes_through_drop_still_has_its_flows_reset() -> None:
    """Its gateway dies and this node takes over: steer -> drop (waiting for
    the grant) -> local. Its flows were NATed for the old path; they must be
    reset when the new path starts, or they keep leaving un-SNATed."""
    agent, _, _ = make_agent()
    keeper = agent.keeper
    assert keeper is not None
    policies = agent.reflectors["staticegressips"].store
    pod_ip = IPv4Address("10.244.1.5")

    versions = iter(range(100, 200))

    def gateway(node: str) -> None:
        policy = json_copy(POLICY)
        policy["status"]["egressIPs"][0]["gateway"] = node
        policy["metadata"]["resourceVersion"] = str(next(versions))
        policies["default/egress"] = policy

    gateway("node-2")
    await agent.sync(True)
    assert agent.applied is not None
    assert dict(agent.applied.rules[0].steer)[pod_ip] not in ("drop", "local")
    FLUSHED.clear()
    gateway("node-1")  # moved here; no grant yet
    await agent.sync(False)
    await _repaired(agent)
    assert dict(agent.applied.rules[0].steer)[pod_ip] == "drop"
    assert FLUSHED == []
    g = Grant(
        sender="m/1", node=agent.node, epoch=1, seq=1, sent_wall=0, ttl=2.0, ips=frozenset({X})
    )
    keeper.book.offer(g, now=keeper._clock(), now_wall=0)
    await keeper.apply()
    await agent.sync(False)
    await _repaired(agent)
    assert dict(agent.applied.rules[0].steer)[pod_ip] == "local"
    assert [[pod_ip]] == FLUSHED
    await agent.api.close()


def _wide_policy() -> dict[str, Any]:
    """POLICY with a second destination, 192.0.2.0/24, that a narrowing withdraws."""
    wide = json_copy(POLICY)
    wide["spec"]["rules"][0]["cidrs"] = ["203.0.113.10/32", "192.0.2.0/24"]
    del wide["spec"]["rules"][0]["cidr"]
    return wide


async def test_connections_towards_a_withdrawn_destination_are_reset() -> None:
    """A rule loses a destination: the steered pods' connections towards it were
    bound to the old path (an identity SNAT, an egress IP) and must start
    again; those towards what the rule still covers are kept."""
    agent, _, _ = make_agent("status-only")
    policies = agent.reflectors["staticegressips"].store
    wide = _wide_policy()
    policies["default/egress"] = wide
    await agent.sync(True)
    await _repaired(agent)
    FLUSHED.clear()
    FLUSH_KEPT.clear()
    narrow = json_copy(POLICY)
    narrow["metadata"]["resourceVersion"] = "9"
    policies["default/egress"] = narrow
    await agent.sync(False)
    await _repaired(agent)
    assert FLUSHED, "nothing reset"
    assert len(FLUSH_KEPT) == sum(len(p) for p in FLUSHED), "one kept list per pod"
    assert all(ip_network("203.0.113.10/32") in kept for kept in FLUSH_KEPT), (FLUSHED, FLUSH_KEPT)
    assert all(ip_network("192.0.2.0/24") not in kept for kept in FLUSH_KEPT)
    FLUSHED.clear()
    await agent.sync(True)  # nothing changed: nothing reset
    await _repaired(agent)
    assert FLUSHED == []
    await agent.api.close()


async def test_a_slow_reset_never_holds_the_next_sync() -> None:
    """Deleting a busy pod's thousands of connections takes seconds; the syncs
    that follow (a new rule, a failover) must not wait for it, and the resets
    still happen, in order."""
    agent, _, _ = make_agent("status-only")
    release = asyncio.Event()
    done: list[list[IPv4Address]] = []

    async def slow_flush(keep_by_pod: Mapping[IPv4Address, list[Any]]) -> int:
        await release.wait()
        done.append(sorted(keep_by_pod))
        return 1000

    agent._flush = slow_flush
    policies = agent.reflectors["staticegressips"].store
    wide = _wide_policy()
    policies["default/egress"] = wide
    await agent.sync(True)
    await _repaired(agent)
    narrow = json_copy(POLICY)
    narrow["metadata"]["resourceVersion"] = "9"
    policies["default/egress"] = narrow
    updates = agent.metrics.get("table_updates_total")
    await asyncio.wait_for(agent.sync(False), timeout=2)  # the reset is still blocked
    policies["default/egress"] = wide | {"metadata": {**wide["metadata"], "resourceVersion": "10"}}
    await asyncio.wait_for(agent.sync(False), timeout=2)
    assert agent.metrics.get("table_updates_total") == updates + 2, "a sync waited for the reset"
    assert done == []
    release.set()
    await _repaired(agent)
    assert done, "the reset never ran"
    await agent.api.close()


async def _repaired(agent: Agent) -> None:
    """The conntrack repair runs in the background: wait for it."""
    if agent._repair_task is not None:
        await agent._repair_task


async def test_misnated_connections_are_looked_for_only_when_a_known_pod_becomes_steered() -> None:
    """A pod known here and unselected had its connections masqueraded; once it is
    steered they must be deleted (the guard drops them). A brand-new pod was held,
    so it has none: no conntrack dump for it."""
    agent, _, _ = make_agent("status-only")
    pods = agent.reflectors["pods"].store
    REPAIRED.clear()
    await agent.sync(True)
    await _repaired(agent)
    # At start every steered pod is checked: local ones and those SNATed here.
    assert [[ip_address(f"10.244.{i}.5") for i in (1, 2, 3)]] == REPAIRED

    plain = pod(1)
    plain["metadata"] = {"namespace": "default", "name": "plain", "labels": {"app": "plain"}}
    plain["status"]["podIP"] = "10.244.1.9"
    plain["status"]["podIPs"] = [{"ip": "10.244.1.9"}]
    pods["default/plain"] = plain
    await agent.sync(False)
    await _repaired(agent)
    assert len(REPAIRED) == 1  # unselected: nothing to repair

    selected = json.loads(json.dumps(plain))
    selected["metadata"]["labels"] = {"app": "client"}
    pods["default/plain"] = selected
    fresh = json.loads(json.dumps(selected))
    fresh["metadata"]["name"] = "fresh"
    fresh["status"]["podIP"] = "10.244.1.10"
    fresh["status"]["podIPs"] = [{"ip": "10.244.1.10"}]
    pods["default/fresh"] = fresh
    await agent.sync(False)
    await _repaired(agent)
    assert REPAIRED[1:] == [[ip_address("10.244.1.9")]]

    # A destination added to a rule of steered pods: their flows towards it
    # were masqueraded and the guard now drops them, so the known ones are
    # looked for again (the local 10.244.1.x; fresh is known by now too).
    wider = json.loads(json.dumps(POLICY))
    wider["spec"]["rules"][0]["cidrs"] = ["203.0.113.10/32", "192.0.2.0/24"]
    del wider["spec"]["rules"][0]["cidr"]
    wider["metadata"]["resourceVersion"] = "8"
    agent.reflectors["staticegressips"].store["default/egress"] = wider
    await agent.sync(False)
    await _repaired(agent)
    assert REPAIRED[2:] == [
        [ip_address("10.244.1.5"), ip_address("10.244.1.9"), ip_address("10.244.1.10")]
    ]
    del REPAIRED[2:]

    # Our table lost: everything steered is checked again on the next sync.
    agent._table_lost()
    await agent.sync(True)
    await _repaired(agent)
    assert len(REPAIRED[2]) == 5
    await agent.sync(True)
    await _repaired(agent)
    assert len(REPAIRED) == 3
    await agent.api.close()


UNSELECTED = {"app": "plain"}
SERVER_NET = ip_network("203.0.113.10/32")


def local_pod(
    name: str, ip: str, conditions: list[dict[str, str]], labels: Any = UNSELECTED
) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "default", "name": name, "labels": labels},
        "spec": {"nodeName": "node-1"},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": conditions,
        },
    }


async def test_after_a_reboot_a_stale_status_does_not_make_its_address_known() -> None:
    """node-1 rebooted: every local Pod still shows its pre-reboot address. The
    IPAM may give one of them (10.244.1.7, an unselected pod's) to a new
    selected pod before kubelet reports anything; that address must not count
    as known, or the new pod is neither held nor steered and leaves with the
    node's IP."""
    boot = BootClock(BOOT + 100)  # every report in the fixtures predates it
    agent, _, _ = make_agent("status-only", boot=boot)
    pods = agent.reflectors["pods"].store
    pods["default/stale"] = local_pod("stale", "10.244.1.7", sandbox_reported(BOOT + 50))
    await agent.sync(True)
    desired = agent.applied
    assert desired is not None
    assert SERVER_NET in desired.held_destinations
    assert ip_address("10.244.1.7") not in desired.known_local_pods
    assert ip_address("10.244.1.5") not in desired.known_local_pods
    # The selected local pod's old address is not steered either: its new
    # sandbox's traffic is held until kubelet reports it.
    assert desired.rules[0].steer == ()
    # Other nodes' pods are not this boot's to judge: still SNATed here.
    assert dict(desired.rules[0].snat) == {
        ip_address("10.244.2.5"): X,
        ip_address("10.244.3.5"): X,
    }
    assert agent.metrics.get("pods_unreported") == 2

    # kubelet's first status after the boot: no sandbox yet, the old address kept.
    down = sandbox_reported(BOOT + 101, up=False)
    pods["default/stale"] = local_pod("stale", "10.244.1.7", down)
    await agent.sync(False)
    desired = agent.applied
    assert desired is not None
    assert ip_address("10.244.1.7") not in desired.known_local_pods

    # The new sandboxes reported, one of them in the boot's own second.
    pods["default/stale"] = local_pod("stale", "10.244.1.8", sandbox_reported(BOOT + 100))
    client = pod(1)
    client["status"]["conditions"] = sandbox_reported(BOOT + 102)
    pods["default/client-1"] = client
    await agent.sync(False)
    desired = agent.applied
    assert desired is not None
    assert desired.known_local_pods == (ip_address("10.244.1.5"), ip_address("10.244.1.8"))
    assert dict(desired.rules[0].steer) == {ip_address("10.244.1.5"): "local"}
    assert agent.metrics.get("pods_unreported") == 0
    await agent.api.close()


async def test_an_agent_restart_without_a_reboot_keeps_every_pod_known() -> None:
    """Same boot: every running pod's sandbox was reported since it, so a new
    agent trusts them all at once and holds nothing that runs."""
    for _ in range(2):  # the first agent, then its replacement
        agent, _, _ = make_agent("status-only", boot=BootClock(BOOT))
        pods = agent.reflectors["pods"].store
        pods["default/plain"] = local_pod("plain", "10.244.1.7", sandbox_reported(BOOT))
        await agent.sync(True)
        desired = agent.applied
        assert desired is not None
        assert desired.known_local_pods == (ip_address("10.244.1.5"), ip_address("10.244.1.7"))
        assert dict(desired.rules[0].steer) == {ip_address("10.244.1.5"): "local"}
        assert agent.metrics.get("pods_unreported") == 0
        await agent.api.close()


async def test_without_the_boot_time_nothing_is_programmed() -> None:
    def unreadable() -> int:
        raise OSError("no /proc/stat")

    agent, nft, _ = make_agent("status-only", boot_time=unreadable)
    with pytest.raises(TemporaryError, match="boot time"):
        await agent.sync(True)
    assert agent.applied is None
    assert nft.batches == []
    await agent.api.close()


async def test_resets_asked_twice_for_a_pod_keep_only_what_both_kept() -> None:
    agent, _, _ = make_agent("status-only")
    pod, other = IPv4Address("10.244.1.5"), IPv4Address("10.244.1.6")
    a, b = ip_network("192.0.2.0/24"), ip_network("203.0.113.0/24")
    FLUSHED.clear()
    FLUSH_KEPT.clear()
    agent._resets = [("one", [pod, other], [a, b]), ("two", [pod], [a])]
    agent._start_conntrack_work()
    await _repaired(agent)
    assert [[pod, other]] == FLUSHED, "one dump for every reset asked"
    assert sorted(map(str, FLUSH_KEPT)) == sorted(map(str, [[a], [a, b]]))
    await agent.api.close()


async def test_an_outside_edit_during_an_apply_makes_the_next_sync_replace_whole() -> None:
    """The watchdog can report a table changed behind our back while our own
    batch is being applied; what the kernel holds is then unknown, and the
    forced sync must not take it for what the batch left."""
    agent, nft, _ = make_agent("status-only")
    await agent.sync(True)
    assert agent.metrics.get("table_replacements_total") == 1
    applied = nft.apply

    async def apply_and_drift(batch: dict[str, Any]) -> None:
        await applied(batch)
        agent._table_lost()

    nft.apply = apply_and_drift  # type: ignore[method-assign]
    agent.reflectors["pods"].store["default/client-1"]["metadata"]["labels"] = {"app": "other"}
    await agent.sync(False)
    assert agent._tables is None
    nft.apply = applied  # type: ignore[method-assign]
    await agent.sync(True)
    assert agent.metrics.get("table_replacements_total") == 2
    await agent.api.close()


async def test_a_whole_replacement_writes_the_grants_again_at_once() -> None:
    """After an outside flush the lease's `held` set comes back empty: the
    grants are written again with the tables, not when a renewal next moves a
    deadline by 0.25 s (the node would drop its egress IPs' traffic meanwhile)."""
    agent, nft, _ = make_agent()
    keeper = agent.keeper
    assert keeper is not None
    clock = Clock()
    keeper._clock = clock
    g = Grant(
        sender="m/1", node=agent.node, epoch=1, seq=1, sent_wall=0, ttl=2.0, ips=frozenset({X})
    )
    assert keeper.book.offer(g, now=clock.t, now_wall=0) is None
    await agent.sync(True)
    await asyncio.sleep(0.01)
    written = len(nft.texts)
    assert written >= 1
    await keeper.apply()  # nothing moved: skipped
    assert len(nft.texts) == written
    agent._table_lost()  # flushed behind our back
    await agent.sync(True)
    await asyncio.sleep(0.01)
    assert len(nft.texts) == written + 1, "the grants were not written again"
    assert "198.51.100.200 timeout" in nft.texts[-1]
    await agent.api.close()


async def test_a_refused_second_batch_makes_the_next_sync_replace_whole() -> None:
    """An in-place update is two transactions; when the kernel refuses the
    second, what it holds is neither the old state nor the new one, so the
    next sync must not diff against either."""
    from staticegress.dataplane.nft import NftError

    agent, nft, _ = make_agent("status-only")
    await agent.sync(True)
    applied = nft.apply
    calls = 0

    async def refuse_the_second(batch: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise NftError("refused")
        await applied(batch)

    nft.apply = refuse_the_second  # type: ignore[method-assign]
    # A new pod of the selected app: steering first, its release second.
    extra = pod(1)
    extra["metadata"]["name"] = "client-9"
    extra["status"]["podIP"] = extra["status"]["podIPs"][0]["ip"] = "10.244.1.9"
    agent.reflectors["pods"].store["default/client-9"] = extra
    with pytest.raises(TemporaryError):
        await agent.sync(False)
    assert calls == 2, "the update was not two transactions"
    assert agent._tables is None
    nft.apply = applied  # type: ignore[method-assign]
    await agent.sync(True)
    assert agent.metrics.get("table_replacements_total") == 2
    await agent.api.close()
