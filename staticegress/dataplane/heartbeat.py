"""BFD-like liveness: ICMP echo to a set of node addresses every `interval` seconds.

ICMP is answered by the node's kernel, so a node counts as alive while its
kernel and link are, whatever our own processes are doing: an agent that
crashes or restarts never makes its node look dead (its dataplane keeps
working meanwhile), while a dead node or a cut link is noticed within
`down_after` missed probes.

A target turns `down` after `down_after` consecutive misses and `up` again
only after `up_after` consecutive answers (hysteresis: a flaky link does not
flap assignments). Replies are matched on our ICMP identifier, the sequence
number we sent and the address we sent it to; anything else is ignored.

Needs CAP_NET_RAW (a raw ICMP socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

log = logging.getLogger(__name__)

ECHO_REQUEST = 8
ECHO_REPLY = 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    header = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq)
    payload = b"staticegress-hb"
    csum = _checksum(header + payload)
    return struct.pack("!BBHHH", ECHO_REQUEST, 0, csum, ident, seq) + payload


def parse_reply(packet: bytes) -> tuple[int, int] | None:
    """(identifier, sequence) of an ICMP echo reply inside an IPv4 packet."""
    if len(packet) < 28:
        return None
    ihl = (packet[0] & 0x0F) * 4
    icmp = packet[ihl : ihl + 8]
    if len(icmp) < 8:
        return None
    kind, _, _, ident, seq = struct.unpack("!BBHHH", icmp)
    if kind != ECHO_REPLY:
        return None
    return ident, seq


@dataclass
class TargetState:
    """What the prober knows about one address."""

    up: bool = True
    misses: int = 0
    answers: int = 0
    last_answer: float = 0.0
    down_since: float | None = None
    """When the current run of misses began (monotonic): the start of an outage."""
    outstanding: dict[int, float] = field(default_factory=dict)


class Prober:
    """Probe targets forever; call `set_targets` whenever the set changes."""

    def __init__(
        self,
        *,
        interval: float = 0.1,
        down_after: int = 3,
        up_after: int = 5,
        on_change: Callable[[IPv4Address, bool], None] = lambda ip, up: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.down_after = down_after
        self.up_after = up_after
        self._on_change = on_change
        self._clock = clock
        self.targets: dict[IPv4Address, TargetState] = {}
        self._ident = os.getpid() & 0xFFFF
        self._seq = 0
        self._sock: socket.socket | None = None

    def set_targets(self, ips: Iterable[IPv4Address], *, initially_up: bool = True) -> None:
        wanted = set(ips)
        for ip in list(self.targets):
            if ip not in wanted:
                del self.targets[ip]
        for ip in wanted:
            self.targets.setdefault(ip, TargetState(up=initially_up))

    def is_up(self, ip: IPv4Address) -> bool:
        st = self.targets.get(ip)
        return st is not None and st.up

    def heard_within(self, seconds: float) -> bool:
        """Whether any target answered in the last `seconds`."""
        now = self._clock()
        return any(now - st.last_answer <= seconds for st in self.targets.values())

    def _record(self, ip: IPv4Address, answered: bool) -> None:
        st = self.targets.get(ip)
        if st is None:
            return
        now = self._clock()
        if answered:
            st.answers += 1
            st.misses = 0
            st.last_answer = now
            if not st.up and st.answers >= self.up_after:
                st.up = True
                st.down_since = None
                self._on_change(ip, True)
        else:
            if st.misses == 0:
                st.down_since = now
            st.misses += 1
            st.answers = 0
            if st.up and st.misses >= self.down_after:
                st.up = False
                self._on_change(ip, False)

    def _receive(self) -> None:
        assert self._sock is not None
        while True:
            try:
                packet, (addr, _) = self._sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            parsed = parse_reply(packet)
            if parsed is None or parsed[0] != self._ident:
                continue
            try:
                ip = IPv4Address(addr)
            except ValueError:
                continue
            st = self.targets.get(ip)
            if st is not None and st.outstanding.pop(parsed[1], None) is not None:
                self._record(ip, True)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self._sock.setblocking(False)
        loop.add_reader(self._sock.fileno(), self._receive)
        try:
            next_tick = self._clock()
            while True:
                now = self._clock()
                for ip, st in list(self.targets.items()):
                    # A probe unanswered by the next round counts as missed.
                    for seq in [s for s, t in st.outstanding.items() if now - t >= self.interval]:
                        del st.outstanding[seq]
                        self._record(ip, False)
                    self._seq = (self._seq + 1) & 0xFFFF
                    st.outstanding[self._seq] = now
                    # No route (link down): the probe simply goes unanswered.
                    with contextlib.suppress(OSError):
                        self._sock.sendto(echo_request(self._ident, self._seq), (str(ip), 0))
                next_tick += self.interval
                await asyncio.sleep(max(0.0, next_tick - self._clock()))
        finally:
            loop.remove_reader(self._sock.fileno())
            self._sock.close()
