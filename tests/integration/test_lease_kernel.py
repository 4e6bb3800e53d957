"""The kernel-enforced ownership lease against the real kernel, in two throwaway
network namespaces: a gateway holding an egress IP, and a neighbour on its
segment. The neighbour reaches the egress IP (ARP and IP) only while the
gateway's kernel holds a grant for it; the grant lapses at its deadline with
no user-space action; a sync re-creating the tables keeps a live grant."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from ipaddress import ip_address

import pytest

from staticegress.agent.agent import cleanup
from staticegress.dataplane.lease import NftLease
from staticegress.dataplane.netns import NetnsRunner
from staticegress.dataplane.nft import NftApplier
from staticegress.render.lease import render_held, render_lease_tables

EIP = ip_address("198.51.100.200")


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        raise AssertionError("kernel lease tests need root (network namespaces)")
    tag = uuid.uuid4().hex[:6]
    gw, ext = f"setest-lgw-{tag}", f"setest-lext-{tag}"
    _sh("ip", "netns", "add", gw)
    _sh("ip", "netns", "add", ext)
    try:
        _sh(
            "ip",
            "-n",
            gw,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ext,
        )
        for ns, addr in ((gw, "198.51.100.11/24"), (ext, "198.51.100.1/24")):
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "addr", "add", addr, "dev", "eth0")
        _sh("ip", "-n", gw, "addr", "add", f"{EIP}/32", "dev", "eth0")
        yield gw, ext
    finally:
        for ns in (gw, ext):
            subprocess.run(["ip", "netns", "delete", ns], check=False)


def _reaches(ext: str) -> bool:
    """Whether `ext` gets an answer from the egress IP (resolved by ARP afresh,
    unless a static entry stands in for ARP)."""
    _sh("ip", "-n", ext, "neigh", "flush", "dev", "eth0")
    proc = _sh("ip", "netns", "exec", ext, "ping", "-c", "1", "-W", "1", str(EIP), check=False)
    return proc.returncode == 0


def _static_neigh(gw: str, ext: str) -> None:
    mac = _sh("ip", "netns", "exec", gw, "cat", "/sys/class/net/eth0/address").stdout.strip()
    _sh(
        "ip",
        "-n",
        ext,
        "neigh",
        "replace",
        str(EIP),
        "lladdr",
        mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    )


def test_the_egress_ip_answers_only_while_a_grant_lives(pair: tuple[str, str]) -> None:
    gw, ext = pair
    nft = NftApplier(NetnsRunner(gw))
    lease = NftLease(nft)

    async def sync() -> None:
        await nft.apply({"nftables": render_lease_tables([EIP])})

    asyncio.run(sync())
    # No grant: no ARP answer, and with the MAC known anyway, no IP answer.
    assert not _reaches(ext)
    _static_neigh(gw, ext)
    proc = _sh("ip", "netns", "exec", ext, "ping", "-c", "1", "-W", "1", str(EIP), check=False)
    assert proc.returncode != 0, "an ungranted egress IP answered IP traffic"
    _sh("ip", "-n", ext, "neigh", "del", str(EIP), "dev", "eth0")

    asyncio.run(lease.set_held(render_held({EIP: 1.5}, [])))
    assert asyncio.run(lease.current_held()) == {EIP}
    assert _reaches(ext)

    # A sync re-creates the tables (idempotently): the live grant survives.
    asyncio.run(sync())
    assert asyncio.run(lease.current_held()) == {EIP}
    assert _reaches(ext)

    # Nobody renews: the kernel lets go at the deadline on its own, for ARP
    # and for IP alike.
    time.sleep(1.6)
    assert asyncio.run(lease.current_held()) == frozenset()
    assert not _reaches(ext)
    _static_neigh(gw, ext)
    assert not _reaches(ext)
    _sh("ip", "-n", ext, "neigh", "del", str(EIP), "dev", "eth0")

    # A renewal brings it back; a release (1 ms) ends it at once.
    asyncio.run(lease.set_held(render_held({EIP: 5.0}, [])))
    assert _reaches(ext)
    asyncio.run(lease.set_held(render_held({}, [EIP])))
    time.sleep(0.05)
    assert not _reaches(ext)


def test_a_renewal_with_the_same_lifetime_extends_the_grant(pair: tuple[str, str]) -> None:
    """Grants repeat the same lifetime every 100 ms: each must push the expiry
    out again (re-adding with an unchanged timeout alone would not)."""
    gw, _ = pair
    nft = NftApplier(NetnsRunner(gw))
    lease = NftLease(nft)
    asyncio.run(nft.apply({"nftables": render_lease_tables([EIP])}))
    for _ in range(4):
        asyncio.run(lease.set_held(render_held({EIP: 0.5}, [])))
        time.sleep(0.3)
    assert asyncio.run(lease.current_held()) == {EIP}, "renewals did not extend the grant"
    time.sleep(0.3)
    assert asyncio.run(lease.current_held()) == frozenset()


def test_a_renewal_can_shorten_a_grant(pair: tuple[str, str]) -> None:
    """The protocol relies on re-adding an element setting its timeout either way."""
    gw, _ = pair
    nft = NftApplier(NetnsRunner(gw))
    lease = NftLease(nft)
    asyncio.run(nft.apply({"nftables": render_lease_tables([EIP])}))
    asyncio.run(lease.set_held(render_held({EIP: 30.0}, [])))
    asyncio.run(lease.set_held(render_held({EIP: 0.2}, [])))
    time.sleep(0.3)
    assert asyncio.run(lease.current_held()) == frozenset()


def test_cleanup_removes_the_lease_tables(pair: tuple[str, str]) -> None:
    """Uninstall leaves no gate behind: a gate without grants would drop the
    address's traffic forever."""
    gw, _ = pair
    nft = NftApplier(NetnsRunner(gw))
    asyncio.run(nft.apply({"nftables": render_lease_tables([EIP])}))
    assert "staticegress_lease" in _sh("ip", "netns", "exec", gw, "nft", "list", "tables").stdout
    assert asyncio.run(cleanup(netns=gw, uplink=None)) == []
    assert _sh("ip", "netns", "exec", gw, "nft", "list", "tables").stdout.strip() == ""


class _NoNetlink:
    """The agent's routing port, unused here."""


def test_a_renewal_never_waits_for_the_rulesets_transaction(pair: tuple[str, str]) -> None:
    """The agent acks a grant only once the renewal is in the kernel: a renewal
    queued behind a ruleset transaction (hundreds of ms on a busy node) made
    the managers take the node for lagging. Here the ruleset's thread is held
    for 1.5 s; the agent's renewal lands meanwhile, in the real kernel."""
    from kubernetes_asyncio import client

    from staticegress.agent.agent import Agent, AgentOptions

    gw, _ = pair

    async def scenario() -> float:
        opts = AgentOptions(
            node="node-1",
            transport="direct",
            ownership="grants",
            grant_key=b"k" * 32,
            health_port=0,
            netns=gw,
        )
        agent = Agent(client.ApiClient(), opts, netlink=_NoNetlink())  # type: ignore[arg-type]
        assert agent.keeper is not None
        await agent.nft.apply({"nftables": render_lease_tables([EIP])})
        busy = asyncio.ensure_future(agent.netns_runner.run(lambda: time.sleep(1.5)))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        await agent.keeper._kernel.set_held(render_held({EIP: 5.0}, []))
        took = time.monotonic() - start
        assert not busy.done(), "the ruleset's thread was not held during the renewal"
        await busy
        return took

    took = asyncio.run(scenario())
    assert took < 0.5, f"the renewal waited {took:.2f}s for the ruleset's thread"
    nft = NftApplier(NetnsRunner(gw))
    assert asyncio.run(NftLease(nft).current_held()) == {EIP}
