"""The heartbeat's ICMP encoding and its up/down hysteresis."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from staticegress.dataplane.heartbeat import Prober, _checksum, echo_request, parse_reply


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
