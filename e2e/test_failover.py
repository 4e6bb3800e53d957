"""Failover on the lab, in both CNI modes, with the real managers: a killed gateway,
a partitioned gateway, a killed leader, a returning node, an API-server outage."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.labkit import Lab, client_lab, require_root, staticegress, wait_for
from e2e.test_agent import probe, probe_result, target
from staticegress.controlplane.binaries import Binaries
from staticegress.lab import lab as lablib
from staticegress.lab import plan

pytestmark = pytest.mark.lab

EIPS = ("198.51.100.200", "198.51.100.201")
SERVER = "203.0.113.10"
NODE_IP = {p.name: str(p.underlay_ip) for p in plan.node_plans(3)}


def gateways(lab: Lab) -> dict[str, tuple[str, str]]:
    """egress IP -> (gateway, since), from the status."""
    obj = lab.get("staticegressip", "failover")
    return {
        e["egressIP"]: (e.get("gateway"), e.get("since"))
        for e in (obj.get("status") or {}).get("egressIPs", [])
    }


def leader(lab: Lab) -> str:
    lease = lab.get("lease", "-n", "staticegress-system", "staticegress-manager")
    return str(lease["spec"]["holderIdentity"])


def arp_owners(ip: str) -> set[str]:
    """MACs that answer ARP for `ip` on the underlay, seen from the external host."""
    ns = plan.NS_EXTERNAL
    cap = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "tcpdump",
            "-l",
            "-n",
            "-e",
            "-i",
            "eth0",
            "-c",
            "20",
            f"arp and arp[6:2] == 2 and arp[14:4] == {_hex(ip)}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    time.sleep(0.5)
    subprocess.run(["ip", "-n", ns, "neigh", "flush", "dev", "eth0"], check=False)
    for _ in range(3):
        subprocess.run(
            ["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", ip],
            capture_output=True,
            check=False,
        )
    time.sleep(1.0)
    cap.terminate()
    out, _ = cap.communicate(timeout=10)
    return set(re.findall(r"^\S+ ([0-9a-f:]{17}) >", out, re.MULTILINE))


def _hex(ip: str) -> str:
    return "0x" + "".join(f"{int(o):02x}" for o in ip.split("."))


def node_has(node: str, ip: str) -> bool:
    out = subprocess.run(
        ["ip", "-n", f"{plan.PREFIX}-{node}", "-o", "addr"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return f" {ip}/32 " in out


def uplink_mac(node: str) -> str:
    out = subprocess.run(
        ["ip", "-n", f"{plan.PREFIX}-{node}", "-j", "link", "show", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return str(json.loads(out)[0]["address"])


@pytest.fixture(scope="module", params=plan.CNIS)
def world(request: pytest.FixtureRequest, binaries: Binaries) -> Iterator[dict[str, Any]]:
    require_root()
    with client_lab(binaries, request.param, eips=EIPS, server=SERVER) as (lab, pods):
        yield {"lab": lab, "pods": pods}


def _pick(world: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(egress IP, its gateway, a client pod on another node that uses that IP)."""
    lab: Lab = world["lab"]
    for eip, (gw, _) in sorted(gateways(lab).items()):
        for node, pod in sorted(world["pods"].items()):
            if node != gw and lab.http_source(target(pod)) == eip:
                return eip, gw, pod
    raise AssertionError(f"no client pod outside its gateway uses an egress IP: {gateways(lab)}")


def _settled(lab: Lab) -> None:
    """Every node answers heartbeats and has its agent: the last test left no wreck."""
    state = lablib.load_state()
    assert state is not None
    wait_for(
        "a healthy lab",
        lambda: (
            not state.killed
            and not state.partitioned
            and all(lablib._ours(state.processes[f"agent/{n}"]) for n in NODE_IP)
        ),
        seconds=10,
    )


def test_killed_gateway_fails_over_with_the_same_egress_ip(world: dict[str, Any]) -> None:
    lab: Lab = world["lab"]
    eip, victim, pod = _pick(world)
    proc = probe(pod, duration=5.0)
    time.sleep(1.0)
    staticegress("lab", "node", "kill", victim)
    try:
        res = probe_result(proc)
        new = gateways(lab)[eip][0]
        assert new not in (None, victim)
        assert set(res["sources"]) == {eip}, f"replies with another source: {res['sources']}"
        assert res["received"] > res["sent"] // 2, res
        print(
            f"\nfailover ({lab.cni}): {eip} {victim} -> {new}, lost window "
            f"{res['longest_gap_ms']:.0f} ms ({res['lost']} of {res['sent']} probes)"
        )
        assert res["longest_gap_ms"] < 2000
    finally:
        staticegress("lab", "node", "restore", victim)
    # The node comes back and gets nothing back: no flapping.
    before = gateways(lab)
    time.sleep(5.0)
    assert gateways(lab) == before, "a returning node changed the assignment"
    assert lab.http_source(target(pod)) == eip


def test_partitioned_gateway_withdraws_and_one_owner_answers_arp(world: dict[str, Any]) -> None:
    lab: Lab = world["lab"]
    _settled(lab)
    eip, victim, pod = _pick(world)
    staticegress("lab", "node", "partition", victim)
    try:
        wait_for("a new gateway", lambda: gateways(lab)[eip][0] not in (None, victim), seconds=5)
        new = gateways(lab)[eip][0]
        wait_for("the partitioned node to withdraw", lambda: not node_has(victim, eip), seconds=5)
        assert lab.http_source(target(pod)) == eip
        assert arp_owners(eip) == {uplink_mac(new)}
    finally:
        staticegress("lab", "node", "heal", victim)
    time.sleep(4.0)  # past the agents' rejoin delay
    assert gateways(lab)[eip][0] == new
    assert not node_has(victim, eip), "the healed node took the IP back"
    owners = arp_owners(eip)
    assert owners == {uplink_mac(new)}, f"ARP answered by {owners}"
    neigh = subprocess.run(
        ["ip", "-n", plan.NS_EXTERNAL, "neigh", "show", eip],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert uplink_mac(new) in neigh, f"the external host's neighbour table: {neigh!r}"
    assert lab.http_source(target(pod)) == eip


def test_leader_dies_and_the_standby_takes_over_without_reassigning(
    world: dict[str, Any],
) -> None:
    lab: Lab = world["lab"]
    _settled(lab)
    before = gateways(lab)
    first = leader(lab)
    index = int(first.rsplit("-", 1)[1])
    staticegress("lab", "manager", "stop", str(index), "--kill")
    try:
        wait_for("the standby to lead", lambda: leader(lab) not in ("", first), seconds=10)
        time.sleep(2.0)
        assert gateways(lab) == before, "a leader change moved egress IPs"
    finally:
        staticegress("lab", "manager", "start", str(index))


def test_api_server_outage_keeps_traffic_flowing(world: dict[str, Any]) -> None:
    lab: Lab = world["lab"]
    _settled(lab)
    before = gateways(lab)
    eip, _, pod = _pick(world)
    proc = probe(pod, duration=34.0, interval=0.05)
    time.sleep(1.0)
    staticegress("lab", "apiserver", "stop")
    try:
        time.sleep(30.0)
    finally:
        staticegress("lab", "apiserver", "start")
    res = probe_result(proc)
    assert set(res["sources"]) == {eip}
    assert res["lost"] <= 2, f"traffic was interrupted: {res['lost']} probes lost"
    wait_for("the API server back", lambda: gateways(lab), seconds=30)
    time.sleep(5.0)
    assert gateways(lab) == before, "the assignment flapped after the outage"
    print(
        f"\nAPI server down 30 s ({lab.cni}): {res['lost']} of {res['sent']} probes lost, "
        f"sources {res['sources']}"
    )
