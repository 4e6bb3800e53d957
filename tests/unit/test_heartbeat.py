"""The heartbeat's ICMP encoding, pacing, reply matching and up/down hysteresis,
in virtual time."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from ipaddress import IPv4Address

import pytest

from staticegress.dataplane.heartbeat import (
    ECHO_REPLY_ONLY,
    RCVBUF_FLOOR,
    RCVBUF_PER_TARGET,
    Prober,
    _checksum,
    echo_request,
    parse_reply,
    receive_buffer_size,
)


def test_echo_request_checksum_verifies() -> None:
    pkt = echo_request(0x1234, 7)
    assert _checksum(pkt) == 0  # a correct checksum sums to zero
    assert struct.unpack("!BBHHH", pkt[:8])[3:] == (0x1234, 7)


def test_parse_reply_reads_only_echo_replies() -> None:
    ip_header = bytes([0x45]) + bytes(19)
    reply = struct.pack("!BBHHH", 0, 0, 0, 0x1234, 9) + b"x"
    assert parse_reply(ip_header + reply) == (0x1234, 9)
    request = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 9) + b"x"
    assert parse_reply(ip_header + request) is None
    assert parse_reply(b"short") is None


def test_hysteresis() -> None:
    now = [0.0]
    changes: list[tuple[IPv4Address, bool]] = []
    p = Prober(
        down_after=3,
        up_after=2,
        clock=lambda: now[0],
        on_change=lambda ip, up: changes.append((ip, up)),
    )
    ip = IPv4Address("198.51.100.12")
    p.set_targets([ip])
    for answered in (False, False):
        p._record(ip, answered)
    assert p.is_up(ip), "two misses are not enough"
    now[0] = 0.3
    p._record(ip, False)
    assert not p.is_up(ip)
    assert p.targets[ip].down_since == 0.0, "the outage starts at the first miss"
    p._record(ip, True)
    assert not p.is_up(ip), "one answer is not enough"
    p._record(ip, True)
    assert p.is_up(ip)
    assert changes == [(ip, False), (ip, True)]
    now[0] = 5.0
    assert not p.heard_within(1.0)
    p._record(ip, True)
    assert p.heard_within(1.0)


class _Clock:
    """Virtual time: `sleep` advances it, and ends the run after `until`."""

    def __init__(self, until: float) -> None:
        self.now = 0.0
        self.until = until

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.now > self.until:
            raise _EndOfRunError


class _EndOfRunError(Exception):
    pass


async def _run(p: Prober, clock: _Clock, send: Callable[[IPv4Address, bytes], None]) -> None:
    with pytest.raises(_EndOfRunError):
        await p.probe_forever(send)


async def test_sends_are_spread_over_the_interval() -> None:
    clock = _Clock(until=0.35)
    p = Prober(interval=0.1, clock=clock, sleep=clock.sleep)
    ips = [IPv4Address(f"198.51.100.{i}") for i in range(1, 11)]
    p.set_targets(ips)
    sent: list[tuple[float, IPv4Address]] = []
    await _run(p, clock, lambda ip, pkt: sent.append((clock.now, ip)))
    first_round = sent[:10]
    assert [ip for _, ip in first_round] == sorted(ips)
    times = [t for t, _ in first_round]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g == pytest.approx(0.01) for g in gaps), "one send every interval / N"
    # Every target once per interval, never two sends of one target within it.
    per_target: dict[IPv4Address, list[float]] = {}
    for t, ip in sent:
        per_target.setdefault(ip, []).append(t)
    for ts in per_target.values():
        assert all(b - a == pytest.approx(0.1) for a, b in itertools.pairwise(ts))


async def test_a_large_target_set_goes_out_in_small_batches() -> None:
    clock = _Clock(until=0.1)
    p = Prober(interval=0.1, clock=clock, sleep=clock.sleep)
    p.set_targets(IPv4Address(0xC6336400 + i) for i in range(2000))
    sent: list[float] = []
    await _run(p, clock, lambda ip, pkt: sent.append(clock.now))
    assert len(sent) >= 2000
    sent = sent[:2000]  # one round
    assert sent[-1] < 0.1
    batch = max(sum(1 for t in sent if a <= t < a + 0.001) for a in sent)
    assert batch <= 25, f"{batch} packets within one millisecond"


async def test_hysteresis_over_rounds() -> None:
    clock = _Clock(until=2.0)
    changes: list[tuple[float, bool]] = []
    p = Prober(
        interval=0.1,
        down_after=3,
        up_after=2,
        clock=clock,
        sleep=clock.sleep,
        on_change=lambda ip, up: changes.append((round(clock.now, 3), up)),
    )
    ip = IPv4Address("198.51.100.12")
    p.set_targets([ip])

    def send(dst: IPv4Address, pkt: bytes) -> None:
        if not 0.45 <= clock.now < 0.95:
            # The target's kernel answers at once: echo the request back as a reply.
            reply = bytes([0x45]) + bytes(19) + bytes([0]) + pkt[1:]
            assert p.handle_reply(reply, str(dst))

    await _run(p, clock, send)
    # Silent from 0.5 to 1.0: probes sent at 0.5, 0.6, 0.7 are missed, judged
    # when the next one is due, so it goes down at 0.8; it answers again from
    # 1.0 and needs two answers: up at 1.1.
    assert changes == [(0.8, False), (1.1, True)]
    assert p.targets[ip].down_since is None


def test_replies_of_another_prober_or_sender_are_ignored() -> None:
    a, b = Prober(ident=0x1111), Prober(ident=0x2222)
    ip = IPv4Address("198.51.100.12")
    a.set_targets([ip])
    b.set_targets([ip])
    sent: list[bytes] = []
    a.probe(ip, lambda dst, pkt: sent.append(pkt))
    reply = bytes([0x45]) + bytes(19) + bytes([0]) + sent[0][1:]
    assert not b.handle_reply(reply, str(ip)), "b must not take a's reply"
    assert not a.handle_reply(reply, "198.51.100.13"), "nor a from another sender"
    assert a.handle_reply(reply, str(ip))
    assert not a.handle_reply(reply, str(ip)), "a sequence is answered once"
    assert (a.stats.answered, a.stats.ignored, b.stats.ignored) == (1, 2, 1)


def test_identifiers_are_random_per_prober() -> None:
    idents = {Prober().ident for _ in range(50)}
    assert len(idents) > 40, "a fixed (pid-derived) identifier would collide"
    assert all(0 < i <= 0xFFFF for i in idents)


def test_receive_buffer_grows_with_targets_from_a_floor() -> None:
    assert receive_buffer_size(0) == RCVBUF_FLOOR
    assert receive_buffer_size(5) == RCVBUF_FLOOR
    assert receive_buffer_size(10_000) == 10_000 * RCVBUF_PER_TARGET
    assert ECHO_REPLY_ONLY & 1 == 0, "echo replies pass the filter"
    assert ECHO_REPLY_ONLY & (1 << 8), "echo requests do not"
