"""The heartbeat prober against the real kernel, in a throwaway network namespace:
two probers side by side never count each other's replies, the ICMP filter is
set on the socket, and a silent target goes down while others answer."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from staticegress.dataplane.heartbeat import ECHO_REPLY_ONLY, ICMP_FILTER, SOL_RAW, Prober

LOCAL = IPv4Address("192.0.2.1")


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        raise AssertionError("heartbeat tests need root (network namespaces, raw sockets)")
    name = f"setest-hb-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (
            "link set lo up",
            "link add hb0 type veth peer name hb1",
            "link set hb0 up",
            "link set hb1 up",
            f"addr add {LOCAL}/24 dev hb0",
        ):
            subprocess.run(["ip", "-n", name, *cmd.split()], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


async def _started(p: Prober) -> None:
    for _ in range(200):
        if p._sock is not None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the prober did not open its socket")


async def test_two_probers_in_one_namespace_keep_their_own_replies(netns: str) -> None:
    """Both probe the same address; the kernel drops a's requests (matched on a's
    identifier), so only b's are answered. a must see the target down although
    every one of b's replies reaches a's socket too."""
    changes: list[tuple[str, IPv4Address, bool]] = []

    def prober(name: str) -> Prober:
        return Prober(
            interval=0.02,
            down_after=3,
            up_after=2,
            netns=netns,
            on_change=lambda ip, up: changes.append((name, ip, up)),
        )

    a, b = prober("a"), prober("b")
    assert a.ident != b.ident
    nft = (
        "add table ip hbtest\n"
        "add chain ip hbtest out { type filter hook output priority 0; }\n"
        f"add rule ip hbtest out icmp type echo-request icmp id {a.ident} drop\n"
    )
    await asyncio.to_thread(
        subprocess.run,
        ["ip", "netns", "exec", netns, "nft", "-f", "-"],
        input=nft,
        text=True,
        check=True,
    )
    a.set_targets([LOCAL])
    b.set_targets([LOCAL])
    tasks = [asyncio.create_task(p.run()) for p in (a, b)]
    try:
        for p in (a, b):
            await _started(p)
        assert a._sock is not None
        raw = a._sock.getsockopt(SOL_RAW, ICMP_FILTER, 4)
        assert struct.unpack("=I", raw)[0] == ECHO_REPLY_ONLY
        rcvbuf = a._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert rcvbuf >= 2 * 256 * 1024, "the receive buffer has its floor (we run as root)"
        await asyncio.sleep(1.0)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    assert b.is_up(LOCAL)
    assert b.stats.sent >= 20
    assert b.stats.sent - 2 <= b.stats.answered <= b.stats.sent
    assert not a.is_up(LOCAL), "a took b's replies for its own"
    assert a.stats.answered == 0
    assert a.stats.ignored >= b.stats.answered - 2, "a saw b's replies, and ignored them"
    assert changes == [("a", LOCAL, False)]
