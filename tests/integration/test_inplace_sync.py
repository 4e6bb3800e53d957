"""Syncs against the real kernel, with traffic: a steered pod's new flows never
leave masqueraded with the node's address while the agent applies sync after
sync, and a new pod is held until its steering is in.

Three throwaway network namespaces: a pod, its node (a director: the agent's
own table-applying code, `Agent._apply_tables`, on the rendering of a
scenario; the CNI's masquerade as an nft table), and a server. The pod sends
UDP from a new socket each time, to a new port each time (each datagram is a
new connection, which NAT decides afresh), as fast as it can. Between syncs,
what changes is elsewhere: other pods' SNAT, a second pod's class. A
whole replacement of our tables let about one such flow in 200 out with the
node's address here (docs/scale.md); the in-place updates let none.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes_asyncio import client

from staticegress.agent.agent import Agent, AgentOptions
from staticegress.model.desired import compute_desired
from staticegress.render.lease import render_lease_tables
from staticegress.render.nft import render_ruleset
from tests import scenario

POD, NODE_IP, SERVER = "10.244.3.5", "198.51.100.13", "203.0.113.20"
SECONDS = 6.0

SENDER = """
import socket, sys, time
end = time.monotonic() + float(sys.argv[1]); n = 0
while time.monotonic() < end:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"x", (sys.argv[2], 9000 + n % 50000))
    except OSError:
        pass
    s.close(); n += 1
print(n)
"""


def _sh(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, input=stdin).stdout


@pytest.fixture
def trio() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        raise AssertionError("in-place sync tests need root (network namespaces)")
    tag = uuid.uuid4().hex[:6]
    pod, node, server = (f"setest-ip{x}-{tag}" for x in "pns")
    for ns in (pod, node, server):
        _sh("ip", "netns", "add", ns)
    try:
        _sh("ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "pods",
            "netns", node)  # fmt: skip
        _sh("ip", "-n", node, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", server)  # fmt: skip
        for ns, cmds in (
            (pod, ["link set lo up", "link set eth0 up", f"addr add {POD}/24 dev eth0",
                   "route add default via 10.244.3.1"]),
            (node, ["link set lo up", "link set pods up", "link set eth0 up",
                    "addr add 10.244.3.1/24 dev pods", f"addr add {NODE_IP}/24 dev eth0",
                    "route add default via 198.51.100.1"]),
            (server, ["link set lo up", "link set eth0 up", "addr add 198.51.100.1/24 dev eth0",
                      f"addr add {SERVER}/32 dev eth0"]),
        ):  # fmt: skip
            for cmd in cmds:
                _sh("ip", "-n", ns, *cmd.split())
        _sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1",
            "net.netfilter.nf_conntrack_udp_timeout=2")  # fmt: skip
        # The CNI's masquerade, and what leaves the node, by source.
        _sh("ip", "netns", "exec", node, "nft", "-f", "-", stdin=f"""
table ip cni {{
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade
  }}
}}
table ip seen {{
  chain post {{
    type filter hook postrouting priority 300; policy accept;
    ct original ip saddr {POD} ip saddr {NODE_IP} udp dport >= 9000 counter
    ip saddr {POD} udp dport >= 9000 counter
  }}
}}""")  # fmt: skip
        yield pod, node
    finally:
        for ns in (pod, node, server):
            subprocess.run(["ip", "netns", "delete", ns], check=False)


def _data(*, pod_known: bool, background: int, second_pod: bool) -> dict[str, Any]:
    """node-3's view: our pod selected towards the server through node-1; other
    pods of node-1 and node-2 that node-3 SNATs; maybe a second local pod of
    a class of its own."""
    pods: list[dict[str, Any]] = [
        {"namespace": "default", "name": "p", "node": "node-3", "labels": {"app": "p"},
         **({"ip": POD} if pod_known else {})},
    ]  # fmt: skip
    policies = [
        scenario._policy(
            "p", 0,
            [{"egressip": "198.51.100.221", "pod-selector": {"matchLabels": {"app": "p"}},
              "cidr": f"{SERVER}/32"}],
            "node-1",
        )
    ]  # fmt: skip
    if second_pod:
        pods.append({"namespace": "default", "name": "q", "node": "node-3", "ip": "10.244.3.6",
                     "labels": {"app": "q"}})  # fmt: skip
        policies.append(scenario._policy(
            "q", 1,
            [{"egressip": "198.51.100.222", "pod-selector": {"matchLabels": {"app": "q"}},
              "cidr": "192.0.2.0/24"}],
            "node-2",
        ))  # fmt: skip
    for k in range(background):
        n = 1 + k % 2
        pods.append({"namespace": "default", "name": f"bg-{k}", "node": f"node-{n}",
                     "ip": f"10.244.{n}.{10 + k // 2}", "labels": {"app": "bg"}})  # fmt: skip
    policies.append(scenario._policy(
        "bg", 2,
        [{"egressip": "198.51.100.100", "pod-selector": {"matchLabels": {"app": "bg"}},
          "cidrs": ["192.0.2.0/24", "203.0.113.128/25"]}],
        "node-3",
    ))  # fmt: skip
    return {
        "node": "node-3",
        "nodes": [
            {"name": f"node-{i}", "ip": f"198.51.100.1{i}", "podCIDR": f"10.244.{i}.0/24"}
            for i in (1, 2, 3)
        ],
        "namespaces": [{"name": "default"}],
        "pods": pods,
        "staticegressips": policies,
    }


def _batch(data: dict[str, Any], transport: str = "direct") -> dict[str, Any]:
    desired = compute_desired(scenario.snapshot(data), scenario.config(data, transport))
    batch = render_ruleset(desired, transport=transport)
    batch["nftables"] += render_lease_tables(desired.named, arp_ips=desired.egress_ips)
    return batch


class _NoNetlink:
    """The agent's routing port, unused here."""


def _agent(netns: str, node: str = "node-3", transport: str = "direct") -> Agent:
    """An agent of `node` programming the namespace `netns` (its tables only)."""
    opts = AgentOptions(
        node=node, transport=transport, ownership="status-only", health_port=0, netns=netns
    )  # type: ignore[arg-type]
    return Agent(client.ApiClient(), opts, netlink=_NoNetlink())  # type: ignore[arg-type]


def _counters(node: str) -> tuple[int, int]:
    out = _sh("ip", "netns", "exec", node, "nft", "list", "chain", "ip", "seen", "post")
    counts = [int(line.split("packets ")[1].split()[0]) for line in out.splitlines()
              if "packets" in line]  # fmt: skip
    return counts[0], counts[1]


def _syncs_under_traffic(pod: str, node: str, batches: list[dict[str, Any]]) -> tuple[int, int]:
    """Apply the batches in turn, through the agent, while the pod sends; (how
    many syncs, how many of its flows left with the node's address)."""

    async def scenario_() -> int:
        agent = _agent(node)
        try:
            await agent._apply_tables(batches[0], reassert=False)
            sender = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", pod, sys.executable, "-c", SENDER, str(SECONDS), SERVER,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            syncs = 0
            while sender.returncode is None:
                await agent._apply_tables(batches[1 + syncs % (len(batches) - 1)], reassert=False)
                syncs += 1
            out, _ = await sender.communicate()
            assert int(out) > 10_000, f"the pod sent only {out!r}"
            assert agent.metrics.get("table_replacements_total") == 1
            return syncs
        finally:
            await agent.api.close()

    syncs = asyncio.run(scenario_())
    leaked, steered = _counters(node)
    assert steered > 10_000, "the pod's traffic was never steered"
    return syncs, leaked


def test_a_steered_pod_never_leaks_while_syncs_change_everything_around_it(
    trio: tuple[str, str],
) -> None:
    pod, node = trio
    batches = [
        _batch(_data(pod_known=True, background=b, second_pod=s))
        for b, s in ((40, False), (41, True), (40, True), (39, False))
    ]
    start = time.monotonic()
    syncs, leaked = _syncs_under_traffic(pod, node, batches)
    assert syncs >= 50, f"only {syncs} syncs in {time.monotonic() - start:.1f}s"
    assert leaked == 0, f"{leaked} new flows left with the node's address over {syncs} syncs"


def test_a_new_pod_is_held_until_its_steering_is_in(trio: tuple[str, str]) -> None:
    """Known, unknown, known again, ...: each time the pod becomes known its
    steering must already be there (the hold lifts in the second batch)."""
    pod, node = trio
    batches = [
        _batch(_data(pod_known=known, background=40, second_pod=second))
        for known, second in ((False, False), (True, True), (False, False), (True, False))
    ]
    syncs, leaked = _syncs_under_traffic(pod, node, batches)
    assert syncs >= 50
    assert leaked == 0, f"{leaked} new flows left with the node's address over {syncs} syncs"


def test_a_restarted_agent_changes_in_place_what_the_previous_run_left(
    trio: tuple[str, str],
) -> None:
    """Each sync here is the first of a new agent process: it reads our tables
    back from the kernel and changes them in place, never whole."""
    pod, node = trio
    batches = [
        _batch(_data(pod_known=True, background=b, second_pod=s))
        for b, s in ((40, False), (41, True), (40, True))
    ]

    async def restarts() -> tuple[int, int]:
        first = _agent(node)
        await first._apply_tables(batches[0], reassert=False)
        await first.api.close()
        sender = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", pod, sys.executable, "-c", SENDER, str(SECONDS), SERVER,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        runs = replaced = 0
        while sender.returncode is None:
            agent = _agent(node)
            try:
                await agent._apply_tables(batches[1 + runs % 2], reassert=False)
                replaced += int(agent.metrics.get("table_replacements_total"))
                # The watchdog knows the adopted tables are ours to watch.
                watched = agent.nft.owned_tables  # type: ignore[attr-defined]
                assert ("ip", "staticegress") in watched, watched
            finally:
                await agent.api.close()
            runs += 1
        await sender.communicate()
        return runs, replaced

    runs, replaced = asyncio.run(restarts())
    leaked, steered = _counters(node)
    assert runs >= 20
    assert replaced == 0, f"{replaced} of {runs} restarted agents replaced the tables whole"
    assert steered > 10_000
    assert leaked == 0, f"{leaked} new flows left with the node's address over {runs} restarts"


def test_the_kernels_listing_reads_back_as_what_the_agent_wrote(trio: tuple[str, str]) -> None:
    """Every set, map, chain and element of the `mixed` scenario (prefixes, host
    addresses, concatenations, verdicts) reads back from the kernel as it was
    written: a restarted agent whose state did not change rewrites rules only,
    and never touches the lease's `held` elements."""
    from staticegress.agent.agent import OWN_TABLES
    from staticegress.render.lease import render_held
    from staticegress.render.nftdiff import incremental_update, table_state

    _, node = trio
    data = scenario.load("mixed")
    batch = _batch(data, "vxlan")
    held = compute_desired(scenario.snapshot(data), scenario.config(data, "vxlan")).egress_ips[0]

    async def read() -> Any:
        agent = _agent(node, "node-1", "vxlan")
        try:
            await agent.nft.apply(batch)
            await agent.nft.apply_text(render_held({held: 30.0}, []))
            return await agent._read_tables()
        finally:
            await agent.api.close()

    kernel = asyncio.run(read())
    assert kernel is not None
    assert set(kernel) == set(OWN_TABLES)
    (update,) = incremental_update(kernel, table_state([batch]))
    verbs = {(verb, next(iter(obj))) for c in update["nftables"] for verb, obj in c.items()}
    assert verbs == {("flush", "chain"), ("add", "rule")}, verbs


def test_ranges_that_replace_others_change_in_place(trio: tuple[str, str]) -> None:
    """A node joining collapses its range with the others' in `cluster_ranges`,
    a narrowed rule replaces a pod's range in the guard's concatenated set:
    the kernel refuses an element overlapping one its set holds, so these go
    in after what they replace, and the sync never falls back to a whole
    replacement. The kernel ends up holding exactly what was rendered."""
    from staticegress.render.nftdiff import table_state

    _, node = trio
    base = scenario.load("mixed")
    joined = scenario.load("mixed")
    joined["nodes"].append({"name": "node-0", "ip": "198.51.100.10", "podCIDR": "10.244.0.0/24"})
    narrowed = scenario.load("mixed")
    narrowed["staticegressips"][1]["spec"]["rules"][0]["cidrs"] = ["203.0.113.0/24", "192.0.2.0/25"]
    sequence = [_batch(d, "vxlan") for d in (base, joined, base, narrowed, base, narrowed, joined)]

    async def run() -> Any:
        agent = _agent(node, "node-1", "vxlan")
        try:
            for batch in sequence:
                await agent._apply_tables(batch, reassert=False)
            assert agent.metrics.get("table_replacements_total") == 1
            assert agent.metrics.get("table_updates_total") == len(sequence) - 1
            return await agent._read_tables()
        finally:
            await agent.api.close()

    kernel = asyncio.run(run())
    assert kernel is not None
    want = table_state([sequence[-1]])
    for key, t in want.items():
        for name, s in t.sets.items():
            assert set(kernel[key].sets[name].elements) == set(s.elements), (key, name)
