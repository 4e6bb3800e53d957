"""Partial failures on the lab, in both CNI modes, with the real managers and
grants (docs/fault-model.md): an asymmetric partition, a filtered probe
protocol, a frozen agent whose node loses its gateway label, and the leader's
own path to the nodes cut. Each test prints what it measured.

Faults are injected with a table of our own in the namespace concerned
(`table inet setest_fault`, hooked before everything else) and removed after.
ARP is observed from the external host by `e2e/arpwatch.py`, which asks who
has the egress IP every 50 ms and records every MAC that answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.labkit import Lab, client_lab, require_root, wait_for
from e2e.test_agent import probe, probe_result, target
from e2e.test_failover import gateways, leader, node_has, uplink_mac
from staticegress.controlplane.binaries import Binaries
from staticegress.dataplane.grants import GRANT_PORT
from staticegress.lab import lab as lablib
from staticegress.lab import plan

pytestmark = pytest.mark.lab

EIPS = ("198.51.100.200", "198.51.100.201")
SERVER = "203.0.113.10"
HOST_IP = str(plan.HOST_IP)
NODES = [p.name for p in plan.node_plans(3)]
ARPWATCH = Path(__file__).with_name("arpwatch.py")
GATEWAY_LABEL = "staticegress.io/gateway"
EXT = ["ip", "netns", "exec", plan.NS_EXTERNAL]


def node_ns(node: str) -> str:
    return f"{plan.PREFIX}-{node}"


@contextlib.contextmanager
def fault(netns: str | None, *rules: tuple[str, str]) -> Iterator[None]:
    """Drop what `rules` ((hook, match) pairs) match in `netns` (None: the host)."""
    ns = ["ip", "netns", "exec", netns] if netns else []
    lines = ["table inet setest_fault {"]
    for i, hook in enumerate(sorted({h for h, _ in rules})):
        lines.append(f"  chain c{i} {{ type filter hook {hook} priority -400; policy accept;")
        lines += [f"    {match} drop" for h, match in rules if h == hook]
        lines.append("  }")
    lines.append("}")
    subprocess.run([*ns, "nft", "-f", "-"], input="\n".join(lines), text=True, check=True)
    try:
        yield
    finally:
        subprocess.run([*ns, "nft", "delete", "table", "inet", "setest_fault"], check=False)


class ArpWatch:
    """Background `arpwatch.py` in the external host."""

    def __init__(self, ip: str, seconds: float) -> None:
        self.proc = subprocess.Popen(
            [*EXT, sys.executable, str(ARPWATCH), ip, str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )

    def rounds(self) -> list[tuple[float, set[str]]]:
        out, _ = self.proc.communicate(timeout=120)
        return [(float(t), set(macs)) for t, macs in json.loads(out)["rounds"]]


def owners_timeline(rounds: list[tuple[float, set[str]]]) -> str:
    """Runs of identical answers, for the failure message and the printout."""
    runs: list[tuple[float, float, set[str]]] = []
    for t, macs in rounds:
        if runs and runs[-1][2] == macs:
            runs[-1] = (runs[-1][0], t, macs)
        else:
            runs.append((t, t, macs))
    t0 = rounds[0][0] if rounds else 0.0
    return "; ".join(
        f"{a - t0:.2f}-{b - t0:.2f}s {','.join(sorted(m)) or 'nobody'}" for a, b, m in runs
    )


def settle_time(rounds: list[tuple[float, set[str]]], owner: str, since: float) -> float:
    """Seconds from `since` until only `owner` answers for good."""
    last_other = since
    for t, macs in rounds:
        if t >= since and macs != {owner}:
            last_other = t
    return last_other - since


@pytest.fixture(scope="module", params=plan.CNIS)
def world(request: pytest.FixtureRequest, binaries: Binaries) -> Iterator[dict[str, Any]]:
    require_root()
    with client_lab(binaries, request.param, eips=EIPS, server=SERVER) as (lab, pods):
        yield {"lab": lab, "pods": pods}


def _steady(world: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Wait for a calm lab; (egress IP, its gateway, a client pod elsewhere using it)."""
    lab: Lab = world["lab"]
    for node in NODES:
        lab.kubectl("label", "node", node, f"{GATEWAY_LABEL}=true", "--overwrite")

    def pick() -> tuple[str, str, dict[str, Any]] | None:
        gws = gateways(lab)
        if len(gws) != 2 or not all(g for g, _ in gws.values()):
            return None
        # Every client leaves with an egress IP: no node is still catching up.
        if not all(lab.http_source(target(p)) in EIPS for p in world["pods"].values()):
            return None
        for eip, (gw, _) in sorted(gws.items()):
            for node, pod in sorted(world["pods"].items()):
                if node != gw and lab.http_source(target(pod)) == eip:
                    return eip, str(gw), pod
        return None

    return wait_for("a calm lab with both egress IPs in use", pick, seconds=30)


def test_asymmetric_partition_settles_to_one_owner(world: dict[str, Any]) -> None:
    """The owner loses the API server and the managers, but not its segment."""
    lab: Lab = world["lab"]
    eip, victim, pod = _steady(world)
    old_mac = uplink_mac(victim)
    watch = ArpWatch(eip, 10.0)
    time.sleep(1.5)  # the watcher is running and has seen the owner
    cut_at = time.monotonic()
    with fault(
        node_ns(victim),
        ("input", f"ip saddr {HOST_IP}"),
        ("output", f"ip daddr {HOST_IP}"),
    ):
        new = wait_for(
            "a new gateway",
            lambda: (g := gateways(lab)[eip][0]) not in (None, victim) and g,
            seconds=10,
        )
        rounds = watch.rounds()
        assert rounds[0][0] < cut_at, "the ARP watch started after the cut"
        new_mac = uplink_mac(str(new))
        timeline = owners_timeline(rounds)
        both = [t - cut_at for t, macs in rounds if len(macs) > 1]
        assert not both, f"two MACs answered at {both}: {timeline}"
        assert rounds[-1][1] == {new_mac}, f"not settled on the new owner: {timeline}"
        settled = settle_time(rounds, new_mac, cut_at)
        old_last = max((t for t, m in rounds if old_mac in m), default=cut_at) - cut_at
        assert lab.http_source(target(pod)) == eip
        assert not node_has(victim, eip), "the cut-off node kept the address"
    print(
        f"\nasymmetric partition ({lab.cni}): {eip} {victim} -> {new}; old owner answered "
        f"ARP until {old_last:.2f}s, one owner from {settled:.2f}s after the cut; {timeline}"
    )
    # Healed: the old owner gets grants that do not name the IP, and never takes it back.
    time.sleep(3.0)
    assert gateways(lab)[eip][0] == new
    assert not node_has(victim, eip), "the healed node took the IP back"
    after = ArpWatch(eip, 2.0).rounds()
    assert set().union(*(m for _, m in after)) == {new_mac}, owners_timeline(after)
    answered = sum(1 for _, m in after if m) / len(after)
    assert answered > 0.9, owners_timeline(after)
    assert lab.http_source(target(pod)) == eip


def test_filtered_icmp_moves_nothing(world: dict[str, Any]) -> None:
    """Heartbeats by ICMP dropped between the managers and every node."""
    lab: Lab = world["lab"]
    eip, _, pod = _steady(world)
    before = {ip: gw for ip, (gw, _) in gateways(lab).items()}
    proc = probe(pod, duration=8.0, interval=0.01)
    time.sleep(1.0)
    with contextlib.ExitStack() as stack:
        for node in NODES:
            stack.enter_context(
                fault(node_ns(node), ("input", f"ip saddr {HOST_IP} icmp type echo-request"))
            )
        time.sleep(5.0)
        during = {ip: gw for ip, (gw, _) in gateways(lab).items()}
    res = probe_result(proc)
    assert during == before, f"gateways moved while ICMP was filtered: {before} -> {during}"
    assert set(res["sources"]) == {eip}, res["sources"]
    assert res["longest_gap_ms"] <= 100, f"traffic was interrupted: {res}"
    assert res["lost"] <= 2, f"probes lost: {res}"
    ready = [
        c["status"]
        for c in lab.get("staticegressip", "failover")["status"]["conditions"]
        if c["type"] == "Ready"
    ]
    assert ready == ["True"]
    print(
        f"\nICMP filtered 5 s ({lab.cni}): gateways unchanged {before}, "
        f"{res['lost']} of {res['sent']} probes lost"
    )


def test_frozen_agent_loses_its_label_without_a_second_owner(world: dict[str, Any]) -> None:
    """SIGSTOP the gateway's agent, then remove the node's gateway label: the new
    owner may answer only after the old one's grant has expired."""
    lab: Lab = world["lab"]
    eip, victim, pod = _steady(world)
    state = lablib.load_state()
    assert state is not None
    pid = state.processes[f"agent/{victim}"]
    old_mac = uplink_mac(victim)
    watch = ArpWatch(eip, 9.0)
    time.sleep(1.5)  # the watcher is running and has seen the owner
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        lab.kubectl("label", "node", victim, f"{GATEWAY_LABEL}-")
        new = wait_for(
            "a new gateway",
            lambda: (g := gateways(lab)[eip][0]) not in (None, victim) and g,
            seconds=10,
        )
        rounds = watch.rounds()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert rounds[0][0] < stopped, "the ARP watch started after the agent was stopped"
    new_mac = uplink_mac(str(new))
    timeline = owners_timeline(rounds)
    assert not [t for t, m in rounds if len(m) > 1], f"two owners at once: {timeline}"
    old_last = max((t for t, m in rounds if old_mac in m), default=stopped)
    new_first = min((t for t, m in rounds if new_mac in m), default=float("inf"))
    assert new_first > old_last, timeline
    assert rounds[-1][1] == {new_mac}, timeline
    print(
        f"\nfrozen agent, label removed ({lab.cni}): old owner answered until "
        f"{old_last - stopped:.2f}s, new owner from {new_first - stopped:.2f}s; {timeline}"
    )
    wait_for("the thawed agent to drop the address", lambda: not node_has(victim, eip), seconds=5)
    assert lab.http_source(target(pod)) == eip


def _manager_log(index: int) -> str:
    return (lablib.state_dir() / "logs" / f"manager-{index}.log").read_text()


def test_leader_cut_from_the_nodes_freezes_and_hands_over(world: dict[str, Any]) -> None:
    """The leader's own probes and grants are dropped; the API stays reachable."""
    lab: Lab = world["lab"]
    eip, _, pod = _steady(world)
    before = {ip: gw for ip, (gw, _) in gateways(lab).items()}
    first = leader(lab)
    index = int(first.rsplit("-", 1)[1])
    log = _manager_log(index)
    port = re.findall(r"grants: sender \S+ from UDP port (\d+)", log)[-1]
    ident = re.findall(r"ICMP identifier (\d+)", log)[-1]
    proc = probe(pod, duration=9.0, interval=0.01)
    time.sleep(1.0)
    with fault(
        None,
        ("output", f"udp sport {port}"),
        ("output", f"icmp type echo-request icmp id {ident}"),
    ):
        new_leader = wait_for(
            "another replica to lead",
            lambda: (lead := leader(lab)) not in ("", first) and lead,
            seconds=10,
        )
        time.sleep(3.0)
        during = {ip: gw for ip, (gw, _) in gateways(lab).items()}
        frozen = "detector fault" in _manager_log(index)
    res = probe_result(proc)
    assert frozen, "the cut-off leader did not report a detector fault"
    assert during == before, f"egress IPs moved: {before} -> {during}"
    assert set(res["sources"]) == {eip}
    assert res["longest_gap_ms"] <= 100, f"traffic was interrupted: {res}"
    assert res["lost"] <= 2, f"probes lost: {res}"
    print(
        f"\nleader's path cut ({lab.cni}): {first} froze and handed over to {new_leader}; "
        f"gateways unchanged; {res['lost']} of {res['sent']} probes lost"
    )


def test_filtered_grant_port_keeps_every_gateway(world: dict[str, Any]) -> None:
    """Case 4: grants dropped on every node. Agents renew from their status read
    back from the API server; the leader sees every agent silent and freezes."""
    lab: Lab = world["lab"]
    eip, _, pod = _steady(world)
    before = {ip: gw for ip, (gw, _) in gateways(lab).items()}
    first = leader(lab)
    proc = probe(pod, duration=9.0, interval=0.01)
    time.sleep(1.0)
    with contextlib.ExitStack() as stack:
        for node in NODES:
            stack.enter_context(fault(node_ns(node), ("input", f"udp dport {GRANT_PORT}")))
        time.sleep(6.0)
        during = {ip: gw for ip, (gw, _) in gateways(lab).items()}
    res = probe_result(proc)
    index = int(first.rsplit("-", 1)[1])
    assert "detector fault" in _manager_log(index), "the leader did not blame its view"
    assert during == before, f"egress IPs moved: {before} -> {during}"
    assert set(res["sources"]) == {eip}
    assert res["longest_gap_ms"] <= 100, f"traffic was interrupted: {res}"
    assert res["lost"] <= 2, f"probes lost: {res}"
    renewed = [
        n
        for n in NODES
        if "renewing" in (lablib.state_dir() / "logs" / f"agent-{n}.log").read_text()
    ]
    assert renewed, "no gateway renewed its lease from the status"
    print(
        f"\ngrant port filtered 6 s ({lab.cni}): gateways unchanged, renewed from the status "
        f"on {','.join(renewed)}; {res['lost']} of {res['sent']} probes lost"
    )
