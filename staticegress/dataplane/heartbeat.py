"""BFD-like liveness: ICMP echo to a set of node addresses every `interval` seconds.

ICMP is answered by the node's kernel, so a node counts as alive while its
kernel and link are, whatever our own processes are doing: an agent that
crashes or restarts never makes its node look dead (its dataplane keeps
working meanwhile), while a dead node or a cut link is noticed within
`down_after` missed probes.

A target turns `down` after `down_after` consecutive misses and `up` again
only after `up_after` consecutive answers (hysteresis: a flaky link does not
flap assignments). A probe still unanswered when the same target's next
probe is due (one interval later) is a miss.

Scaling, so that a prober with thousands of targets stays cheap and exact:
- the caller decides the targets (the manager probes only nodes that could
  be gateways; the agent a few peers), via `set_targets`;
- sends are paced: each round spreads its targets evenly over the interval
  (target i of N at i * interval / N), instead of N packets at once and N
  replies arriving together;
- the receive buffer is sized from the number of targets, with a floor, so
  the replies that do pile up (a loop stall, a burst of late answers) are not
  dropped by the kernel and miscounted as misses; the socket is drained
  before any miss is counted, for the same reason;
- the raw socket carries an ICMP filter that keeps only echo replies: every
  raw ICMP socket gets a copy of every ICMP packet the host receives, and
  without the filter the process would wake for each of them.

Replies are matched on this prober's identifier, the sequence number sent
and the address it was sent to; anything else is ignored. The identifier is
random per Prober: the process id is not unique (every container's main
process may be pid 1, and the same pid recurs across network namespaces),
and every raw socket on the host sees every reply, so two probers sharing an
identifier would count each other's answers.

Needs CAP_NET_RAW (a raw ICMP socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from staticegress.dataplane.netns import NetnsRunner

log = logging.getLogger(__name__)

ECHO_REQUEST = 8
ECHO_REPLY = 0

SOL_RAW = 255
ICMP_FILTER = 1
"""Linux raw-socket option: a 32-bit mask of the ICMP types (< 32) to drop."""
ECHO_REPLY_ONLY = ~(1 << ECHO_REPLY) & 0xFFFFFFFF
SO_RCVBUFFORCE = 33
"""Linux SOL_SOCKET option; the socket module does not name it everywhere."""

RCVBUF_FLOOR = 256 * 1024
RCVBUF_PER_TARGET = 4 * 1024
"""Two rounds of replies per target at the kernel's accounting of a small
packet (its buffer, not the 36 bytes on the wire, counts against the limit)."""
MIN_GAP = 0.001
"""Sends closer together than this go out in one batch: sleeping for less costs
more than it spreads."""


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


def receive_buffer_size(targets: int) -> int:
    """The SO_RCVBUF a prober with `targets` targets asks for."""
    return max(RCVBUF_FLOOR, targets * RCVBUF_PER_TARGET)


def open_socket(*, targets: int = 0) -> socket.socket:
    """A non-blocking raw ICMP socket that receives echo replies only."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        sock.setblocking(False)
        sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", ECHO_REPLY_ONLY))
        size_receive_buffer(sock, targets)
    except BaseException:
        sock.close()
        raise
    return sock


def size_receive_buffer(sock: socket.socket, targets: int) -> int:
    """Grow the socket's receive buffer for `targets`; return what the kernel granted.

    SO_RCVBUF is capped by net.core.rmem_max; SO_RCVBUFFORCE passes the cap
    but needs CAP_NET_ADMIN, which the agent has and the manager does not.
    """
    want = receive_buffer_size(targets)
    # The kernel doubles the value it is given (bookkeeping) and reports the double.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < 2 * want:
        with contextlib.suppress(PermissionError):
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, want)
    got: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if got < 2 * want:
        log.info(
            "heartbeat receive buffer %d bytes, below the %d wanted for %d targets "
            "(raise net.core.rmem_max)",
            got,
            2 * want,
            targets,
        )
    return got


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


@dataclass
class ProberStats:
    """Counters, for tests and metrics."""

    sent: int = 0
    answered: int = 0
    """Replies matched to a probe of ours."""
    ignored: int = 0
    """Echo replies that were not ours (another identifier, sequence or sender)."""


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
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        ident: int | None = None,
        netns: str | None = None,
    ) -> None:
        """`ident`: the ICMP identifier (default: random); `netns`: open the socket
        in this named network namespace (tests; default: our own)."""
        self.interval = interval
        self.down_after = down_after
        self.up_after = up_after
        self._on_change = on_change
        self._clock = clock
        self._sleep = sleep
        self.targets: dict[IPv4Address, TargetState] = {}
        self.ident = ident if ident is not None else random.SystemRandom().randrange(1, 0x10000)
        self._netns = netns
        # Start sequences at a random point too: a restarted prober that drew
        # the same identifier does not accept its predecessor's late replies.
        self._seq = random.SystemRandom().randrange(0x10000)
        self._sock: socket.socket | None = None
        self._rcvbuf = 0
        """The receive buffer last asked for: it only ever grows."""
        self.stats = ProberStats()

    def set_targets(self, ips: Iterable[IPv4Address], *, initially_up: bool = True) -> None:
        wanted = set(ips)
        for ip in list(self.targets):
            if ip not in wanted:
                del self.targets[ip]
        for ip in wanted:
            self.targets.setdefault(ip, TargetState(up=initially_up))
        if self._sock is not None and receive_buffer_size(len(self.targets)) > self._rcvbuf:
            size_receive_buffer(self._sock, len(self.targets))
            self._rcvbuf = receive_buffer_size(len(self.targets))

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

    def handle_reply(self, packet: bytes, source: str) -> bool:
        """Account one received packet; whether it answered a probe of ours."""
        parsed = parse_reply(packet)
        if parsed is None:
            return False
        ident, seq = parsed
        try:
            ip = IPv4Address(source)
        except ValueError:
            ip = None
        st = self.targets.get(ip) if ip is not None and ident == self.ident else None
        if st is None or ip is None or st.outstanding.pop(seq, None) is None:
            self.stats.ignored += 1
            return False
        self.stats.answered += 1
        self._record(ip, True)
        return True

    def drain(self) -> None:
        """Account every reply waiting in the socket now: the loop's reader,
        the send loop before it judges a miss, and a judgment made outside it."""
        if self._sock is None:
            return
        while True:
            try:
                packet, (addr, _) = self._sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            self.handle_reply(packet, addr)

    def round_plan(self, start: float) -> list[tuple[float, IPv4Address]]:
        """When each current target is probed in the round that begins at `start`:
        spread evenly over the interval, in address order."""
        ips = sorted(self.targets)
        if not ips:
            return []
        step = self.interval / len(ips)
        return [(start + i * step, ip) for i, ip in enumerate(ips)]

    def probe(self, ip: IPv4Address, send: Callable[[IPv4Address, bytes], None]) -> None:
        """Count the target's expired probe as a miss, then send it the next one."""
        st = self.targets.get(ip)
        if st is None:
            return
        now = self._clock()
        # A margin of a tenth of the interval keeps a probe sent a little late
        # (loop jitter) from being judged before a full interval has passed.
        expired = [s for s, t in st.outstanding.items() if now - t >= self.interval * 0.9]
        for seq in expired:
            del st.outstanding[seq]
            self._record(ip, False)
        self._seq = (self._seq + 1) & 0xFFFF
        st.outstanding[self._seq] = now
        self.stats.sent += 1
        send(ip, echo_request(self.ident, self._seq))

    async def probe_forever(self, send: Callable[[IPv4Address, bytes], None]) -> None:
        """The paced send loop, over any `send` (the raw socket, or a test's fake)."""
        start = self._clock()
        while True:
            plan = self.round_plan(start)
            for due, ip in plan:
                delay = due - self._clock()
                if delay >= MIN_GAP:
                    await self._sleep(delay)
                # Replies may wait in the socket if the loop was busy: read
                # them before judging anything a miss.
                self.drain()
                self.probe(ip, send)
            start += self.interval
            now = self._clock()
            if not plan or now - start > self.interval:
                # Idle, or fell more than a round behind (a stall): start afresh
                # rather than send the missed rounds in one burst.
                start = max(start, now)
            await self._sleep(max(0.0, start - now))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self._netns is None:
            sock = open_socket(targets=len(self.targets))
        else:
            runner = NetnsRunner(self._netns)
            try:
                # A socket belongs to the namespace it was created in, whichever
                # thread uses it afterwards.
                sock = await runner.run(lambda: open_socket(targets=len(self.targets)))
            finally:
                runner.close()
        self._sock = sock
        self._rcvbuf = receive_buffer_size(len(self.targets))
        loop.add_reader(sock.fileno(), self.drain)

        def send(ip: IPv4Address, packet: bytes) -> None:
            # No route (link down): the probe simply goes unanswered.
            with contextlib.suppress(OSError):
                sock.sendto(packet, (str(ip), 0))

        try:
            await self.probe_forever(send)
        finally:
            loop.remove_reader(sock.fileno())
            self._sock = None
            sock.close()
