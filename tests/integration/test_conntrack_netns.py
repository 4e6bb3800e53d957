"""Connection resets against the real kernel's conntrack table, in a throwaway
network namespace: only each pod's entries towards what it does not keep go."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest
from pyroute2 import conntrack

from staticegress.dataplane import conntrack as ct_module
from staticegress.dataplane.conntrack import flush_destinations, flush_misnated
from staticegress.dataplane.netns import NetnsRunner

POD_A, POD_B = "10.244.0.2", "10.244.0.3"
KEPT, RESET = "192.0.2.10", "203.0.113.10"

SEND = """
import socket, sys
for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.sendto(b"x", (dst, 9))
    s.close()
"""


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        raise AssertionError("conntrack tests need root (network namespaces)")
    name = f"setest-ct-{uuid.uuid4().hex[:6]}"
    _sh("ip", "netns", "add", name)
    try:
        for cmd in (
            "link set lo up",
            "link add pods type veth peer name peer0",
            "link set peer0 up",
            "link set pods up",
            f"addr add {POD_A}/32 dev pods",
            f"addr add {POD_B}/32 dev pods",
            "route add 192.0.2.0/24 dev pods",
            "route add 203.0.113.0/24 dev pods",
        ):
            _sh("ip", "-n", name, *cmd.split())
        # Conntrack tracks a namespace's packets once a rule needs it.
        _sh(
            "ip", "netns", "exec", name, "nft",
            "add table ip t; add chain ip t out { type filter hook output priority 0; };"
            " add rule ip t out ct state new counter",
        )  # fmt: skip
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _flows(runner: NetnsRunner) -> set[tuple[str, str]]:
    def dump() -> set[tuple[str, str]]:
        ct = conntrack.Conntrack()
        try:
            return {(e.tuple_orig.saddr, e.tuple_orig.daddr) for e in ct.dump_entries()}
        finally:
            ct.close()

    return asyncio.run(runner.run(dump))


def _three_flows_then(netns: str, flush: Callable[[], int]) -> tuple[int, set[tuple[str, str]]]:
    """Pod A to a kept and to a reset destination, pod B to the reset one;
    then `flush` in the namespace: (what it removed, the flows left)."""
    _sh(
        "ip", "netns", "exec", netns, sys.executable, "-c", SEND,
        POD_A, KEPT, POD_A, RESET, POD_B, RESET,
    )  # fmt: skip
    runner = NetnsRunner(netns)
    try:
        before = _flows(runner)
        assert {(POD_A, KEPT), (POD_A, RESET), (POD_B, RESET)} <= before
        removed = asyncio.run(runner.run(flush))
        return removed, _flows(runner)
    finally:
        runner.close()


@pytest.mark.parametrize("dump", ["per pod", "whole table"])
def test_each_pod_loses_only_the_connections_outside_what_it_keeps(
    netns: str, dump: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Either way of reading the table: a dump per pod, filtered by the kernel
    (a change touching few pods), or one of the whole table (many pods)."""
    if dump == "whole table":
        monkeypatch.setattr(ct_module, "FILTERED_DUMP_MAX", 0)
    removed, after = _three_flows_then(
        netns, lambda: flush_destinations({IPv4Address(POD_A): [IPv4Network("192.0.2.0/24")]})
    )
    assert removed == 1
    assert (POD_A, RESET) not in after
    assert {(POD_A, KEPT), (POD_B, RESET)} <= after, "a kept connection was reset"


NODE_ADDRESS, EGRESS_IP = "198.51.100.7", "198.51.100.100"


@pytest.mark.parametrize("dump", ["per pod", "whole table"])
def test_only_connections_masqueraded_to_another_address_are_deleted(
    netns: str, dump: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repair after a pod is steered: its connections whose source NAT
    chose an address other than an egress IP (the CNI's masquerade) go, unless
    their destination is kept; one NATed to an egress IP stays."""
    if dump == "whole table":
        monkeypatch.setattr(ct_module, "FILTERED_DUMP_MAX", 0)
    _sh(
        "ip", "netns", "exec", netns, "nft",
        "add table ip n; add chain ip n post { type nat hook postrouting priority 100; };"
        f" add rule ip n post ip saddr {POD_A} snat to {NODE_ADDRESS};"
        f" add rule ip n post ip saddr {POD_B} snat to {EGRESS_IP}",
    )  # fmt: skip
    removed, after = _three_flows_then(
        netns,
        lambda: flush_misnated(
            [IPv4Address(POD_A), IPv4Address(POD_B)],
            [IPv4Address(EGRESS_IP)],
            [IPv4Network("192.0.2.0/24")],
        ),
    )
    assert removed == 1
    assert (POD_A, RESET) not in after
    assert {(POD_A, KEPT), (POD_B, RESET)} <= after, "a connection was deleted wrongly"
