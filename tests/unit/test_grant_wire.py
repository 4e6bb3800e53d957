"""Grants and acks on the wire, and a manager replica granting an agent over
real UDP on loopback, with a fake kernel and an injected clock (no root)."""

from __future__ import annotations

import asyncio
import time
from ipaddress import IPv4Address, ip_address
from typing import Any

import pytest

from staticegress.agent.ownership import OwnershipKeeper
from staticegress.api.types import IPAddress, NodeName
from staticegress.dataplane.grants import (
    Ack,
    WireError,
    decode_ack,
    decode_grant,
    encode_ack,
    encode_grant,
)
from staticegress.manager.grants import GrantService, decode_map, encode_map
from staticegress.model.ownership import Grant

KEY = b"k" * 32
X = ip_address("198.51.100.200")
A = NodeName("node-1")


def test_grants_round_trip_and_tampering_is_detected() -> None:
    g = Grant(sender="m/1", node=A, epoch=7, seq=3, sent_wall=1.5, ttl=2.0, ips=frozenset({X}))
    packet = encode_grant(KEY, g)
    assert decode_grant(KEY, packet) == g
    with pytest.raises(WireError, match="authentication"):
        decode_grant(b"o" * 32, packet)
    forged = packet.replace(b"198.51.100.200", b"198.51.100.201")
    with pytest.raises(WireError, match="authentication"):
        decode_grant(KEY, forged)
    with pytest.raises(WireError):
        decode_grant(KEY, b"garbage")
    ack = Ack(node=A, seq=3, held=frozenset({X}), withheld=frozenset(), peers=frozenset(), epoch=7)
    assert decode_ack(KEY, encode_ack(KEY, ack)) == ack
    with pytest.raises(WireError, match="not a grant"):
        decode_grant(KEY, encode_ack(KEY, ack))


def test_the_published_map_round_trips() -> None:
    text = encode_map(12, {X: A})
    assert decode_map(text) == (12, {X: A})
    assert decode_map("{not json") is None
    assert decode_map(None) is None


class FakeKernel:
    def __init__(self) -> None:
        self.commands: list[str] = []
        self.inherited: frozenset[IPAddress] = frozenset()

    async def set_held(self, text: str) -> None:
        self.commands.append(text)

    async def current_held(self) -> frozenset[IPAddress]:
        return self.inherited


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def no_readback(mine: frozenset[IPAddress]) -> frozenset[IPAddress]:
    return frozenset()


def make_keeper(
    kernel: FakeKernel,
    clock: Clock,
    *,
    readback: Any = no_readback,
    peers: Any = lambda: (frozenset(), frozenset()),
    on_change: Any = lambda: None,
) -> OwnershipKeeper:
    return OwnershipKeeper(
        node=A,
        key=KEY,
        kernel=kernel,
        on_change=on_change,
        peers=peers,
        readback=readback,
        clock=clock,
    )


async def wait_until(check: object, seconds: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_replica_grants_an_agent_which_holds_acks_and_lets_go() -> None:
    clock = Clock()
    kernel = FakeKernel()
    changes: list[int] = []
    keeper = make_keeper(
        kernel,
        clock,
        on_change=lambda: changes.append(1),
        peers=lambda: (frozenset({NodeName("node-2")}), frozenset()),
    )
    keeper.set_mine(frozenset({X}))
    agent_task = asyncio.create_task(keeper.run(host="127.0.0.1", port=0))
    await wait_until(lambda: keeper.endpoint.is_open)
    service = GrantService(identity="manager-1", key=KEY, port=keeper.endpoint.port)
    service.set_targets({A: IPv4Address("127.0.0.1")})
    service.set_map(5, {X: A})
    manager_task = asyncio.create_task(service.run())
    try:
        await wait_until(lambda: keeper.held_now() == {X})
        assert any("198.51.100.200 timeout 2000ms expires 2000ms" in c for c in kernel.commands)
        await wait_until(lambda: service.held().get(A) == frozenset({X}))
        assert service.heard_by_peers(NodeName("node-2"))
        assert service.ack_age(A) < 0.3
        # The map moves X away (a new epoch): the node releases it at once.
        service.set_map(6, {})
        await wait_until(lambda: service.held().get(A) == frozenset())
        assert keeper.held_now() == frozenset()
        assert "198.51.100.200 timeout 1ms expires 1ms" in kernel.commands[-1]
        # An agent whose status no longer names it ignores a grant for it.
        service.set_map(7, {X: A})
        keeper.set_mine(frozenset())
        await asyncio.sleep(0.3)
        assert keeper.held_now() == frozenset()
        assert changes
    finally:
        manager_task.cancel()
        agent_task.cancel()
        await asyncio.gather(manager_task, agent_task, return_exceptions=True)


async def test_without_grants_the_node_lets_go_at_the_deadline() -> None:
    """Case 2, agent side: grants stop (partition), the permission lapses."""
    clock = Clock()
    kernel = FakeKernel()
    keeper = make_keeper(kernel, clock)
    keeper.set_mine(frozenset({X}))
    g = Grant(sender="m/1", node=A, epoch=1, seq=1, sent_wall=0, ttl=2.0, ips=frozenset({X}))
    keeper.book.offer(g, now=clock.t, now_wall=0)
    await keeper.apply()
    assert keeper.held_now() == {X}
    clock.t += 2.0
    assert keeper.held_now() == frozenset()
    assert keeper.withheld() == {X}


async def test_a_restarted_agent_renews_what_its_kernel_still_holds() -> None:
    """Case 6: before the agent has listed the status, the kernel's own set counts."""
    clock = Clock()
    kernel = FakeKernel()
    kernel.inherited = frozenset({X})
    keeper = make_keeper(kernel, clock)
    task = asyncio.create_task(keeper.run(host="127.0.0.1", port=0))
    try:
        await wait_until(lambda: keeper.endpoint.is_open)
        assert keeper.mine() == {X}
        g = Grant(sender="m/1", node=A, epoch=1, seq=1, sent_wall=0, ttl=2.0, ips=frozenset({X}))
        keeper.book.offer(g, now=clock.t, now_wall=0)
        await keeper.apply()
        assert keeper.held_now() == {X}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_read_back_keeps_the_lease_when_grants_stop_but_the_api_answers() -> None:
    """Case 4: the grant port filtered."""
    clock = Clock()
    kernel = FakeKernel()
    reads: list[frozenset[IPAddress]] = []

    async def readback(mine: frozenset[IPAddress]) -> frozenset[IPAddress]:
        reads.append(mine)
        return mine

    keeper = make_keeper(kernel, clock, readback=readback)
    keeper.set_mine(frozenset({X}))
    await keeper._tick()
    assert reads == [frozenset({X})]
    assert keeper.held_now() == {X}
    clock.t += 1.9
    await keeper._tick()
    assert keeper.held_now() == {X}


def _answer(service: GrantService, seq: int, ip: str = "127.0.0.1") -> None:
    ack = Ack(node=A, seq=seq, held=frozenset(), withheld=frozenset(), peers=frozenset(), epoch=1)
    service._on_packet(encode_ack(KEY, ack), (ip, 9811))


def test_silence_counts_from_the_oldest_unanswered_grant_not_from_the_last_answer() -> None:
    """A manager that stalls sends nothing: its agents' silence over that time
    is its own. Counted from the last answer, every node looked silent at once
    after a 0.5 s stall, and the leader froze and gave up leadership."""
    clock = Clock()
    service = GrantService(identity="manager-1", key=KEY, clock=clock)
    service.set_targets({A: IPv4Address("127.0.0.1")})
    assert service.ack_age(A) == 0.0  # never asked
    service._send(A, IPv4Address("127.0.0.1"))
    first = service._seq
    clock.t += 0.01
    _answer(service, first)
    assert service.ack_age(A) == 0.0
    clock.t += 0.5  # this process stalled: nothing sent, nothing owed
    assert service.ack_age(A) == 0.0
    service._send(A, IPv4Address("127.0.0.1"))
    second = service._seq
    clock.t += 0.1
    service._send(A, IPv4Address("127.0.0.1"))
    third = service._seq
    clock.t += 0.3
    assert service.ack_age(A) == pytest.approx(0.4)  # owed since the second grant
    _answer(service, second)
    assert service.ack_age(A) == pytest.approx(0.3)  # the third is still owed
    _answer(service, first)  # a late duplicate changes nothing
    assert service.ack_age(A) == pytest.approx(0.3)
    _answer(service, third)
    assert service.ack_age(A) == 0.0
    # An agent that stops answering ages from the first grant it left unanswered.
    for _ in range(20):
        service._send(A, IPv4Address("127.0.0.1"))
        clock.t += 0.1
    assert service.ack_age(A) == pytest.approx(2.0)


async def test_answers_waiting_in_the_socket_count_before_a_judgment() -> None:
    """`drain()` reads what arrived while the loop was busy, without the loop."""
    import socket

    service = GrantService(identity="manager-1", key=KEY)
    await service.endpoint.open("127.0.0.1", 0)
    try:
        service.set_targets({A: IPv4Address("127.0.0.1")})
        service._send(A, IPv4Address("127.0.0.1"))
        ack = Ack(
            node=A,
            seq=service._seq,
            held=frozenset({X}),
            withheld=frozenset(),
            peers=frozenset(),
            epoch=1,
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as agent:
            agent.bind(("127.0.0.1", 0))
            agent.sendto(encode_ack(KEY, ack), ("127.0.0.1", service.endpoint.port))
        # Blocking, never yielding: the loop does not run its reader, as while
        # a long callback holds it.
        time.sleep(0.02)  # noqa: ASYNC251
        assert service.acks_received == 0
        assert service.endpoint.drain() == 1
        assert service.acks_received == 1
        assert service.ack_age(A) == 0.0
    finally:
        service.endpoint.close()


async def test_renewals_reach_the_kernel_at_most_every_quarter_second_unless_they_shorten() -> None:
    """Grants come ten times a second per manager; writing each one was a
    transaction each time. A renewal that only pushes the deadline out by
    less than RENEW_EVERY is skipped; a shorter or a released grant never is."""
    from staticegress.agent.ownership import RENEW_EVERY

    clock = Clock()
    kernel = FakeKernel()
    keeper = make_keeper(kernel, clock)
    keeper.set_mine(frozenset({X}))
    await asyncio.sleep(0)

    def grant(seq: int, ttl: float = 2.0, ips: frozenset[IPAddress] = frozenset({X})) -> None:
        g = Grant(sender="m/1", node=A, epoch=1, seq=seq, sent_wall=0, ttl=ttl, ips=ips)
        assert keeper.book.offer(g, now=clock.t, now_wall=0) is None

    grant(1)
    await keeper.apply()
    writes = len(kernel.commands)
    assert keeper.held_now() == {X}
    clock.t += 0.1
    grant(2)
    await keeper.apply()
    assert len(kernel.commands) == writes, "a renewal by 0.1 s was written"
    clock.t += RENEW_EVERY
    grant(3)
    await keeper.apply()
    assert len(kernel.commands) == writes + 1
    assert "timeout 2000ms" in kernel.commands[-1]
    clock.t += 0.05
    grant(4, ttl=1.0)  # shorter: at once
    await keeper.apply()
    assert len(kernel.commands) == writes + 2
    assert "timeout 1000ms" in kernel.commands[-1]
    clock.t += 0.05
    grant(5, ips=frozenset())  # released: at once
    await keeper.apply()
    assert "timeout 1ms" in kernel.commands[-1]
    assert keeper.held_now() == frozenset()


async def test_a_grant_of_an_older_map_is_answered_but_not_taken() -> None:
    """A standby that has not read the leader's newest map yet still hears every
    live agent: unanswered, it took all of them for silent after each new map
    and froze. The answer takes nothing: the older map's IPs stay unheld."""
    from staticegress.agent.ownership import OwnershipKeeper as Keeper

    clock = Clock()
    kernel = FakeKernel()
    keeper: Keeper = make_keeper(kernel, clock)
    keeper.set_mine(frozenset({X}))
    sent: list[tuple[bytes, tuple[str, int]]] = []
    keeper.endpoint.send = lambda data, addr: sent.append((data, addr))  # type: ignore[method-assign]

    def packet(sender: str, seq: int, epoch: int, ips: frozenset[IPAddress]) -> bytes:
        g = Grant(sender=sender, node=A, epoch=epoch, seq=seq, sent_wall=clock.t, ttl=2.0, ips=ips)
        return encode_grant(KEY, g)

    keeper._wall = lambda: clock.t
    keeper._on_packet(packet("leader/aa", 1, 7, frozenset()), ("198.51.100.2", 40000))
    await asyncio.sleep(0.01)
    keeper._on_packet(packet("standby/bb", 1, 6, frozenset({X})), ("198.51.100.3", 40001))
    await asyncio.sleep(0.01)
    acks = [(decode_ack(KEY, data), addr) for data, addr in sent]
    assert [(a.seq, addr[0]) for a, addr in acks] == [(1, "198.51.100.2"), (1, "198.51.100.3")]
    standby_ack = acks[1][0]
    assert standby_ack.held == frozenset(), "an older map's grant was taken"
    assert standby_ack.epoch == 7  # tells the standby it is behind
    assert keeper.held_now() == frozenset()
    assert keeper.stale_epochs == 1
    # The same datagram replayed is not answered again.
    keeper._on_packet(packet("standby/bb", 1, 6, frozenset({X})), ("198.51.100.3", 40001))
    await asyncio.sleep(0.01)
    assert len(sent) == 2
