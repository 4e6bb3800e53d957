"""Every manager replica grants the published grant map, and hears the agents' acks.

Every `interval` (100 ms) the service sends each candidate gateway one grant
(staticegress.dataplane.grants) naming the egress IPs the current grant map
gives it, possibly none: an empty grant still asks for an ack, so the acks
are a heartbeat of the *agent*, the second channel next to ICMP. Sends are
spread over the interval, not sent in one burst.

An ack counts only if it authenticates, comes from the address we sent that
node's grant to, and answers a sequence number we sent that node in the last
second. From the acks the service keeps, per node: when it last answered,
what it holds, what it withholds, and which peers it hears (the indirect
view used by `staticegress.model.ownership.classify`).

The map itself comes from the leader (its `HandoffPlanner`); a standby
grants the map the leader published on its Lease. Both keep granting their
last map when the API server cannot be reached: moves need the API, so an
outage must not darken anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address

from staticegress.api.types import IPAddress, NodeName
from staticegress.dataplane.grants import (
    GRANT_PORT,
    UdpEndpoint,
    WireError,
    decode_ack,
    encode_grant,
    sender_identity,
)
from staticegress.model.ownership import GRANT_TTL, Grant

log = logging.getLogger(__name__)

MAP_ANNOTATION = "staticegress.io/grant-map"


def encode_map(epoch: int, grant_map: Mapping[IPAddress, NodeName]) -> str:
    """The published grant map, grouped by node (compact on the Lease)."""
    by_node: dict[str, list[str]] = {}
    for ip, node in sorted(grant_map.items(), key=lambda kv: str(kv[0])):
        by_node.setdefault(node, []).append(str(ip))
    return json.dumps({"epoch": epoch, "grants": by_node}, separators=(",", ":"), sort_keys=True)


def decode_map(text: str | None) -> tuple[int, dict[IPAddress, NodeName]] | None:
    """The published grant map, or None if absent or unreadable."""
    if not text:
        return None
    try:
        doc = json.loads(text)
        out: dict[IPAddress, NodeName] = {}
        for node, ips in dict(doc["grants"]).items():
            for ip in ips:
                out[ip_address(str(ip))] = NodeName(str(node))
        return int(doc["epoch"]), out
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("published grant map unreadable: %s", exc)
        return None


@dataclass
class NodeAcks:
    """What one node's agent last told us."""

    last: float = float("-inf")
    held: frozenset[IPAddress] = frozenset()
    withheld: frozenset[IPAddress] = frozenset()
    peers: frozenset[NodeName] = frozenset()
    silent: frozenset[NodeName] = frozenset()
    sent: dict[int, float] = field(default_factory=dict)
    """Sequence numbers we sent it recently, and when."""
    waiting_since: float | None = None
    """When we sent the oldest grant it has not answered, of those sent after
    the newest one it did answer; None while nothing is outstanding."""


class GrantService:
    def __init__(
        self,
        *,
        identity: str,
        key: bytes,
        interval: float = 0.1,
        ttl: float = GRANT_TTL,
        port: int = GRANT_PORT,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.sender = sender_identity(identity)
        self._key = key
        self.interval = interval
        self.ttl = ttl
        self.port = port
        self._on_change = on_change
        self._clock = clock
        self._wall = wall
        self.targets: dict[NodeName, IPv4Address] = {}
        self.grant_map: dict[IPAddress, NodeName] = {}
        self.epoch = 0
        self.acks: dict[NodeName, NodeAcks] = {}
        self._seq = 0
        self._fresh: frozenset[NodeName] = frozenset()
        self.endpoint = UdpEndpoint(self._on_packet)
        self.acks_received = 0
        self.acks_rejected = 0

    def set_map(self, epoch: int, grant_map: Mapping[IPAddress, NodeName]) -> None:
        if epoch < self.epoch:
            return  # never go back to an older map
        self.epoch, self.grant_map = epoch, dict(grant_map)

    def set_targets(self, targets: Mapping[NodeName, IPv4Address]) -> None:
        self.targets = dict(targets)
        for node in [n for n in self.acks if n not in self.targets]:
            del self.acks[node]

    # ------------------------------------------------------------ the views

    def ack_age(self, node: NodeName) -> float:
        """For how many seconds `node` has left a grant unanswered: since the
        oldest grant we sent it after the newest one it answered (0 when none
        is outstanding, or it was never asked).

        Counted from what we asked, not from its last answer: when this
        process stalls (a long compute, a starved CPU) it sends nothing, and
        the agents' silence over that time is ours, not theirs. Counting from
        the last answer made every node look silent at once after a stall,
        which the leader takes for a fault of its own view (it freezes and
        gives up leadership), at every stall. The caller drains the socket
        first (`endpoint.drain()`), so answers that arrived during a stall
        count too."""
        st = self.acks.get(node)
        if st is None or st.waiting_since is None:
            return 0.0
        return max(0.0, self._clock() - st.waiting_since)

    def held(self, *, within: float = 0.3) -> dict[NodeName, frozenset[IPAddress]]:
        """What each node holds, by its acks of the last `within` seconds."""
        now = self._clock()
        return {n: st.held for n, st in self.acks.items() if now - st.last <= within}

    def heard_by_peers(self, node: NodeName, *, within: float = 0.3) -> bool:
        """Whether another node's latest ack (itself fresh) says it hears `node`.
        Both windows are short: the fast path waits for them to close."""
        return any(node in st.peers for st in self._fresh_others(node, within))

    def witnessed_lost(self, node: NodeName, *, within: float = 0.3) -> bool:
        """Whether another node, itself answering, probes `node` and hears nothing."""
        return any(node in st.silent for st in self._fresh_others(node, within))

    def _fresh_others(self, node: NodeName, within: float) -> list[NodeAcks]:
        """What every other node said in an ack of the last `within` seconds."""
        now = self._clock()
        return [st for other, st in self.acks.items() if other != node and now - st.last <= within]

    # ---------------------------------------------------------------- wire

    def _on_packet(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            ack = decode_ack(self._key, data)
        except WireError as exc:
            self.acks_rejected += 1
            log.debug("ack from %s rejected: %s", addr[0], exc)
            return
        st = self.acks.get(ack.node)
        expected = self.targets.get(ack.node)
        if st is None or expected is None or str(expected) != addr[0]:
            self.acks_rejected += 1
            return  # not a node we grant to, or not from its own address
        sent_at = st.sent.pop(ack.seq, None)
        if sent_at is None:
            self.acks_rejected += 1
            return  # not an answer to a grant we sent it
        now = self._clock()
        # It was alive after `sent_at`: only grants sent later may still be
        # waiting (every one of them is in `sent`, which keeps the last second,
        # since an answer is only accepted within that second).
        later = [t for t in st.sent.values() if t > sent_at]
        if st.waiting_since is None or st.waiting_since <= sent_at:
            st.waiting_since = min(later) if later else None
        changed = ack.held != st.held or ack.withheld != st.withheld
        st.last, st.held, st.withheld = now, ack.held, ack.withheld
        st.peers, st.silent = ack.peers, ack.silent
        self.acks_received += 1
        if changed:
            self._on_change()

    def _send(self, node: NodeName, ip: IPv4Address) -> None:
        self._seq += 1
        now = self._clock()
        st = self.acks.setdefault(node, NodeAcks())
        st.sent[self._seq] = now
        if st.waiting_since is None:
            st.waiting_since = now
        for seq in [s for s, t in st.sent.items() if now - t > 1.0]:
            del st.sent[seq]
        grant = Grant(
            sender=self.sender,
            node=node,
            epoch=self.epoch,
            seq=self._seq,
            sent_wall=self._wall(),
            ttl=self.ttl,
            ips=frozenset(i for i, n in self.grant_map.items() if n == node),
        )
        self.endpoint.send(encode_grant(self._key, grant), (str(ip), self.port))

    async def run(self) -> None:
        await self.endpoint.open()
        log.info("grants: sender %s from UDP port %d", self.sender, self.endpoint.port)
        try:
            while True:
                start = self._clock()
                targets = sorted(self.targets.items())
                # Pace the round: one datagram per slot, not a burst of N.
                slot = self.interval / max(1, len(targets))
                for i, (node, ip) in enumerate(targets):
                    self._send(node, ip)
                    if i + 1 < len(targets) and slot >= 0.002:
                        await asyncio.sleep(slot)
                fresh = frozenset(n for n in self.targets if self.ack_age(n) <= 3 * self.interval)
                if fresh != self._fresh:
                    self._fresh = fresh
                    self._on_change()
                await asyncio.sleep(max(0.0, self.interval - (self._clock() - start)))
        finally:
            self.endpoint.close()
