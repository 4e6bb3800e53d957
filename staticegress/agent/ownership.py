"""The agent's side of egress IP ownership: accept grants, keep the kernel lease, ack.

`OwnershipKeeper` owns one UDP socket (the grant port on the node's address)
and the `held` sets of the lease tables (staticegress.render.lease). On every
accepted grant it recomputes, from its `GrantBook`, which egress IPs this node
may hold and until when, writes that into the kernel (timeouts = what is left
of each grant; released IPs get 1 ms), and acks to the sender with what it
holds now. The kernel, not this process, enforces the deadline: if this
process freezes or dies, the IPs lapse on their own.

What the node may hold is always the intersection of the grants and the
status the agent watches (`mine`). Before the agent has listed the status
(just restarted), `mine` is what its kernel still holds from the previous
run: a restart within the grant's lifetime loses nothing.

When no grant has arrived for half a lifetime, the keeper asks the agent to
read the status back from the API server (a quorum read, never a cache) and
renews from that read, counted from when the read was sent; see
docs/fault-model.md.

`status-only` mode (no managers: tests, hand-written statuses) skips all of
this: the status alone decides, as before grants existed. It is unsafe under
partitions and the agent says so at start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from staticegress.api.types import IPAddress, NodeName
from staticegress.dataplane.grants import (
    Ack,
    UdpEndpoint,
    WireError,
    decode_grant,
    encode_ack,
    ips_text,
)
from staticegress.model.ownership import GRANT_TTL, GrantBook, Reject
from staticegress.render.lease import render_held

log = logging.getLogger(__name__)

RENEW_EVERY = 0.25
"""Seconds: a grant that only moves the deadlines out by less than this is not
written to the kernel. Every manager replica grants ten times a second, and
each write is a transaction (and a notification every nftables listener
wakes for); the lease a node holds is at most this much shorter for it."""


class LeaseKernel(Protocol):
    """Where the `held` sets live (the kernel, or a fake in tests)."""

    async def set_held(self, text: str) -> None: ...

    async def current_held(self) -> frozenset[IPAddress]: ...


class OwnershipKeeper:
    def __init__(
        self,
        *,
        node: NodeName,
        key: bytes,
        kernel: LeaseKernel,
        on_change: Callable[[], None],
        peers: Callable[[], tuple[frozenset[NodeName], frozenset[NodeName]]],
        readback: Callable[[frozenset[IPAddress]], Awaitable[frozenset[IPAddress]]],
        on_rejoin: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self._key = key
        self._kernel = kernel
        self._on_change = on_change
        self._peers = peers
        self._readback = readback
        self._on_rejoin = on_rejoin
        self._clock = clock
        self._wall = wall
        self.book = GrantBook(node=node)
        self.endpoint = UdpEndpoint(self._on_packet)
        self._mine: frozenset[IPAddress] | None = None
        self._inherited: frozenset[IPAddress] = frozenset()
        self._in_kernel: dict[IPAddress, float] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._valid: frozenset[IPAddress] = frozenset()
        self.accepted = 0
        self.rejected = 0
        self.stale_epochs = 0
        """Grants of an older map, answered but not taken."""
        self.readbacks = 0
        self._last_readback = float("-inf")
        self._rejected_logged: set[str] = set()

    # ------------------------------------------------------------ the views

    def set_mine(self, mine: frozenset[IPAddress]) -> None:
        """The IPs the status names this node for; called after every compute."""
        if mine != self._mine:
            self._mine = mine
            self._spawn(self.apply())

    def mine(self) -> frozenset[IPAddress]:
        return self._mine if self._mine is not None else self._inherited

    def valid(self) -> frozenset[IPAddress]:
        """The IPs this node may hold right now (grants and status agree)."""
        return frozenset(self.book.deadlines(now=self._clock(), mine=self.mine()))

    def held_now(self) -> frozenset[IPAddress]:
        """What the kernel holds now, as far as this process wrote it."""
        now = self._clock()
        return frozenset(ip for ip, until in self._in_kernel.items() if until > now)

    def withheld(self) -> frozenset[IPAddress]:
        return self.mine() - self.valid()

    # ---------------------------------------------------------------- wire

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_packet(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            grant = decode_grant(self._key, data)
        except WireError as exc:
            self._reject(f"from {addr[0]}: {exc}")
            return
        silent = self.book.silent_for(self._clock())
        why = self.book.offer(grant, now=self._clock(), now_wall=self._wall())
        if why is Reject.OLD_EPOCH:
            # An authentic, fresh grant of a map older than one we took: a
            # replica that has not read the leader's newest map yet. It
            # grants nothing, but it is answered: the acks are how every
            # replica tells a live agent from a dead one, and without them a
            # standby took every node for silent after each new map, and
            # froze (reluctant to take over, should the leader die then).
            self.stale_epochs += 1
            self._spawn(self._ack(grant.seq, addr))
            return
        if why is not None:
            self._reject(f"from {addr[0]} ({grant.sender}): {why.value}")
            return
        self.accepted += 1
        if GRANT_TTL / 2 < silent < float("inf"):
            # Back after a silence (a partition healing): our watches may have
            # missed what moved meanwhile and deliver it only after TCP's
            # backoff, so the agent lists afresh.
            log.warning("node=%s grants back after %.1fs of silence", self.node, silent)
            self._on_rejoin()
        self._spawn(self._apply_and_ack(grant.seq, addr))

    def _reject(self, what: str) -> None:
        self.rejected += 1
        # Log each kind of rejection once: a forger or a misconfigured key must
        # not flood the log at 10 datagrams a second.
        kind = what.split(":")[-1].strip()
        if kind not in self._rejected_logged:
            self._rejected_logged.add(kind)
            log.warning("node=%s grant rejected %s", self.node, what)

    async def _apply_and_ack(self, seq: int, addr: tuple[str, int]) -> None:
        await self.apply()
        await self._ack(seq, addr)

    async def _ack(self, seq: int, addr: tuple[str, int]) -> None:
        heard, silent = self._peers()
        ack = Ack(
            node=self.node,
            seq=seq,
            held=self.held_now(),
            withheld=self.mine() - self.held_now(),
            peers=heard,
            silent=silent,
            epoch=self.book.max_epoch,
        )
        self.endpoint.send(encode_ack(self._key, ack), addr)

    # -------------------------------------------------------------- kernel

    def kernel_rewritten(self) -> None:
        """Our tables were written whole (after an outside edit or a flush, the
        lease's `held` set may be empty): write the grants again now, rather
        than when a renewal next moves a deadline by RENEW_EVERY."""
        self._in_kernel = {}
        self._spawn(self.apply())

    async def apply(self) -> None:
        """Make the kernel's `held` sets equal the grant book now."""
        async with self._lock:
            now = self._clock()
            deadlines = self.book.deadlines(now=now, mine=self.mine())
            left = {ip: until - now for ip, until in deadlines.items()}
            released = set(self._in_kernel) - set(left)
            if (
                not released
                and set(left) == set(self._in_kernel)
                and all(0 <= deadlines[ip] - self._in_kernel[ip] < RENEW_EVERY for ip in left)
            ):
                # Same IPs, each deadline pushed out by less than RENEW_EVERY:
                # the kernel keeps the slightly earlier one (never a later one
                # than granted), and no transaction is spent.
                self._changed(frozenset(left))
                return
            text = render_held(left, released)
            if text:
                try:
                    await self._kernel.set_held(text)
                except Exception as exc:
                    # The lease tables are gone (flushed): the next sync
                    # re-creates them and this retries on the next grant.
                    log.warning("node=%s lease not renewed: %s", self.node, exc)
                    self._in_kernel = {}
                    self._changed(frozenset())
                    return
            self._in_kernel = {ip: now + v for ip, v in left.items()}
            if released:
                log.info("node=%s released %s", self.node, ips_text(released))
            self._changed(frozenset(left))

    def _changed(self, valid: frozenset[IPAddress]) -> None:
        if valid != self._valid:
            gained, lost = valid - self._valid, self._valid - valid
            self._valid = valid
            if gained:
                log.info("node=%s grant for %s", self.node, ips_text(gained))
            if lost:
                log.warning("node=%s no live grant for %s", self.node, ips_text(lost))
            self._on_change()

    # ---------------------------------------------------------------- loop

    async def run(self, *, host: str, port: int, sock: object | None = None) -> None:
        self._inherited = await self._kernel.current_held()
        if self._inherited:
            log.info(
                "node=%s kernel still holds %s from before: renewing them on the next grant",
                self.node,
                ips_text(self._inherited),
            )
        await self.endpoint.open(host, port, sock=sock)
        try:
            while True:
                await asyncio.sleep(0.1)
                await self._tick()
        finally:
            self.endpoint.close()

    async def _tick(self) -> None:
        now = self._clock()
        # Something lapsed in the kernel on its own: let the sync catch up.
        if self.valid() != self._valid:
            await self.apply()
        mine = self.mine()
        silent = self.book.silent_for(now)
        # From a quarter of the TTL on, so that one slow or lost read (a loaded
        # API server) still leaves another try before the kernel's deadline.
        if mine and silent > GRANT_TTL / 4 and now - self._last_readback >= 0.5:
            self._last_readback = now
            sent = self._clock()
            try:
                confirmed = await asyncio.wait_for(self._readback(mine), timeout=GRANT_TTL / 2)
            except Exception as exc:
                log.debug("node=%s status read-back failed: %s", self.node, exc)
                return
            self.readbacks += 1
            if self.readbacks == 1 or self.readbacks % 100 == 0:
                log.warning(
                    "node=%s no grant for %.1fs: renewing %s from the status read back",
                    self.node,
                    silent,
                    ips_text(confirmed),
                )
            self.book.confirm_by_readback(confirmed, sent_at=sent)
            await self.apply()
