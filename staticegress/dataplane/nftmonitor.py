"""Notice at once when the nftables tables we own are removed or changed behind our back.

`nft flush ruleset`, a firewall reload or a stray script can delete our
table; until it is back, selected pods leave with the node's address. The
periodic resync would repair that after up to a minute. `WatchedNftApplier`
is the agent's `NftApplier` plus a watchdog that repairs it within a second:

- every batch applied through it updates the set of tables we own (its
  `add table` / `delete table` commands, in order; a batch that only adds
  elements leaves the set alone), and, in the same call on the applier's
  thread, records a fingerprint of each table it changed other than by set
  elements: a hash of its terse, stateless listing (chains, rules, set and
  map definitions with their handles; no elements, no counters), so traffic
  and element timeouts never look like drift. A batch of elements only (most
  in-place syncs) keeps the fingerprints it cannot change: listing our
  tables costs seconds at 10,000 pods;
- `watch()` subscribes to the kernel's nftables notifications (a
  NETLINK_NETFILTER socket in group NFNLGRP_NFTABLES, opened on the
  applier's thread so it lives in the namespace we program) and, after a
  burst of notifications that may change the structure of one of our
  tables, compares the fingerprints: one listing per owned table, coalesced
  however many messages arrived. Set element messages (the grant lease
  renews ten times a second per manager) and changes to other tables (a
  proxy's nftables mode rewrites its own on every endpoint change) cannot
  change a fingerprint, and are not compared. Without notifications (the
  socket could not be opened) it compares every `poll_interval` seconds
  instead, and after any lost notifications (the socket overflowed: ENOBUFS);
- our own batches' notifications are read by the applier right after its
  batches, on its thread (the kernel queues them before the transaction
  returns), and the watch reads the socket on that thread too: what the
  watch finds came from somebody else, so a sync costs no check (at a few
  thousand pods, checks after our own syncs took half of the thread). A
  structural notification still waiting when a batch starts is compared
  before the batch, so the batch's fingerprint never swallows it;
- on a difference it calls `on_drift()` once (the agent forces a full
  sync), and when the next batch leaves every owned table in place it logs
  one line with the time from notice to repair and calls
  `on_restored(seconds)`.

Invariants:
- checks and applies run on the same single thread, so a check never sees a
  half-applied batch, and a fingerprint always describes the table our own
  last batch left;
- an ENOBUFS triggers a check, not a blind resync: our own large batches
  produce thousands of notifications, and resyncing on overflow would feed
  itself;
- a table removed between our commit and our fingerprint (a window of
  milliseconds) is caught there, as missing, and so is any structural
  change then to a table our batches changed only by elements (its
  notification names it); an in-place edit in that window of a table our
  batches reshaped is recorded as ours and left to the periodic resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

from staticegress.dataplane.netns import NetnsRunner
from staticegress.dataplane.nft import NftApplier, NftError

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
"""Not exported by Python's socket module."""
NFNLGRP_NFTABLES = 7
RECV_BUFFER = 4 << 20
"""Bytes; a large buffer absorbs the notification burst of one big batch."""

TableId = tuple[str, str]
"""(family, name)."""


def tables_after(batch: dict[str, Any], before: Iterable[TableId]) -> set[TableId]:
    """The tables that exist after `batch` ran, given those that existed before.

    Only whole-table commands count: `add`/`create` make a table exist,
    `delete`/`destroy` remove it, later commands win."""
    out = set(before)
    for cmd in batch.get("nftables", []):
        if not isinstance(cmd, dict):
            continue
        for verb, obj in cmd.items():
            if not isinstance(obj, dict) or set(obj) != {"table"}:
                continue
            table = obj["table"]
            key = (str(table.get("family", "ip")), str(table.get("name")))
            if verb in ("add", "create"):
                out.add(key)
            elif verb in ("delete", "destroy"):
                out.discard(key)
    return out


def tables_touched(batch: dict[str, Any]) -> set[TableId]:
    """Every table a command of `batch` names, whatever it does to it."""
    out: set[TableId] = set()
    for cmd in batch.get("nftables", []):
        if not isinstance(cmd, dict):
            continue
        for obj in cmd.values():
            if not isinstance(obj, dict):
                continue
            for kind, body in obj.items():
                if not isinstance(body, dict):
                    continue
                name = body.get("name") if kind == "table" else body.get("table")
                if name is not None:
                    out.add((str(body.get("family", "ip")), str(name)))
    return out


def tables_reshaped(batch: dict[str, Any]) -> set[TableId]:
    """The tables a command of `batch` names other than by adding or deleting
    set elements: those whose fingerprint (no elements) may change."""
    elementless = {
        "nftables": [
            c
            for c in batch.get("nftables", [])
            if not (isinstance(c, dict) and all(set(o) == {"element"} for o in c.values()))
        ]
    }
    return tables_touched(elementless)


def open_notification_socket() -> socket.socket:
    """A non-blocking socket subscribed to nftables changes in the calling thread's namespace."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        # SO_RCVBUFFORCE passes the system cap with CAP_NET_ADMIN; without it,
        # take what SO_RCVBUF allows.
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, RECV_BUFFER)  # SO_RCVBUFFORCE
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
        sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class WatchedNftApplier(NftApplier):
    """An `NftApplier` that notices when what it applied disappears, and says so."""

    def __init__(
        self,
        runner: NetnsRunner | None = None,
        *,
        on_drift: Callable[[], None] = lambda: None,
        on_restored: Callable[[float], None] = lambda _: None,
        poll_interval: float = 5.0,
    ) -> None:
        super().__init__(runner)
        self._on_drift = on_drift
        self._on_restored = on_restored
        self.poll_interval = poll_interval
        self._lister: Any = None
        self._expected: dict[TableId, str | None] = {}
        """Owned table -> fingerprint after our last batch (None: it was already gone)."""
        self._drift_since: float | None = None
        self._drift_what = ""
        self._last_repair_request = float("-inf")
        self._sock: socket.socket | None = None
        """The watch's notification socket, while it runs."""
        self._lost = False
        """Notifications were dropped (ENOBUFS) since the flag was cleared."""
        self.restores = 0
        self.checks = 0
        self.skipped = 0
        """Notification bursts of set elements only, which need no check."""

    # --------------------------------------------------- on the runner's thread

    def _list_ctx(self) -> Any:
        # A context of its own: terse and stateless listings, while the
        # applier's context keeps full output for `list_table`.
        if self._lister is None:
            import nftables

            ctx = nftables.Nftables()
            ctx.set_json_output(True)
            ctx.set_terse_output(True)
            ctx.set_stateless_output(True)
            self._lister = ctx
        return self._lister

    def _fingerprint(self, table: TableId) -> str | None:
        family, name = table
        cmd = {"nftables": [{"list": {"table": {"family": family, "name": name}}}]}
        rc, out, _ = self._list_ctx().json_cmd(cmd)
        if rc != 0:
            return None  # ENOENT: the table is gone
        text = out if isinstance(out, str) else repr(out)
        return hashlib.sha256(text.encode()).hexdigest()

    def _pending_structural(self, tables: Collection[TableId] | None = None) -> bool:
        """Read what waits in the notification socket; whether any of it may
        have changed the structure of one of `tables` (default: every table
        we own), or was lost. On the runner's thread: the kernel queues a
        transaction's notifications before the transaction returns, so right
        after one of ours, what waits is ours (and whatever came meanwhile)."""
        sock = self._sock
        if sock is None:
            return False
        try:
            seen, lost = _drain(sock, frozenset(self._expected if tables is None else tables))
        except OSError:
            return True  # closed as the watch ends, or unreadable: compare
        self._lost = self._lost or lost
        return seen

    def _apply_and_record(self, batches: list[dict[str, Any]]) -> tuple[list[str], NftError | None]:
        """Apply the batches in order, fingerprint the tables they changed, and
        compare the others when something may have changed them; return the
        differences found, and the kernel's refusal of a batch, if any (what
        went in before it is recorded all the same).

        A change behind our back whose notification still waits is compared
        first (our batches would otherwise be fingerprinted with it). Our own
        notifications are then read here, so the watch does not list every
        table again after each of our syncs (at a few thousand pods that was
        half of the thread's time, with syncs queued behind it)."""
        before = self._expected
        early = self._differences() if self._pending_structural() else []
        touched: set[TableId] = set()
        reshaped: set[TableId] = set()
        exists: set[TableId] = set(before)
        refused: NftError | None = None
        for batch in batches:
            try:
                self._run(batch)
            except NftError as exc:
                refused = exc
                break
            touched |= tables_touched(batch)
            reshaped |= tables_reshaped(batch)
            exists = tables_after(batch, exists)
        if not touched:
            return early, refused
        self._lost = False
        # Our batches notified structural changes only for the tables they
        # reshaped, which are listed anew below: a structural change to any
        # other table of ours came from somebody else, during our batches.
        others = self._pending_structural(exists - reshaped)
        # Without notifications (or with some lost), only listings show an
        # edit next to ours; with them, such an edit is named by them.
        blind = self._sock is None or self._lost or others
        after: dict[TableId, str | None] = {}
        untouched: list[str] = []
        for table in sorted(exists):
            if table in reshaped or table not in before:
                after[table] = self._fingerprint(table)
            else:
                # Unchanged but for elements, which fingerprints leave out (a
                # sync of a few thousand pods changes only elements, and the
                # listings cost it seconds). A drift there must still be seen.
                after[table] = before[table]
                if blind:
                    untouched.append(self._compare(table, before[table]) or "")
        self._expected = after
        missing = [f"{' '.join(t)} removed" for t in touched if after.get(t, "") is None]
        return early + missing + [d for d in untouched if d], refused

    def _check_pending(self) -> tuple[bool, list[str]]:
        """The watch's step, in one job on the runner's thread (so that no batch
        of ours comes between reading a change and comparing it): whether a
        comparison was needed, and what it found."""
        if self._sock is not None and not self._pending_structural():
            return False, []
        return True, self._differences()

    def _compare(self, table: TableId, expected: str | None) -> str | None:
        now = self._fingerprint(table)
        if now == expected:
            return None
        return f"{' '.join(table)} {'removed' if now is None else 'changed'}"

    def _differences(self) -> list[str]:
        self.checks += 1
        return [d for t, fp in self._expected.items() if (d := self._compare(t, fp))]

    # ------------------------------------------------------------ asyncio side

    @property
    def owned_tables(self) -> list[TableId]:
        return sorted(self._expected)

    async def apply(self, batch: dict[str, Any]) -> None:
        """Run one batch as one transaction and fingerprint what it left."""
        await self.apply_all([batch])

    async def apply_all(self, batches: list[dict[str, Any]]) -> None:
        """Run batches in order, each as one transaction, and fingerprint what
        they left once."""
        diffs, refused = await self._runner.run(lambda: self._apply_and_record(batches))
        if refused is not None:
            if diffs:
                self._drifted(", ".join(diffs))
            raise refused
        if diffs:
            self._drifted(", ".join(diffs))
        elif self._drift_since is not None:
            took = time.monotonic() - self._drift_since
            self._drift_since = None
            self.restores += 1
            log.warning("nftables: %s behind our back; restored in %.3fs", self._drift_what, took)
            self._on_restored(took)

    def _drifted(self, what: str) -> None:
        now = time.monotonic()
        if self._drift_since is None:
            self._drift_since = now
            self._drift_what = what
            log.warning("nftables: %s behind our back; repairing", what)
        elif now - self._last_repair_request < self.poll_interval:
            # Our own repair batch notifies too: asking again at once would
            # loop as fast as the sync runs if the repair does not take.
            return
        self._last_repair_request = now
        self._on_drift()

    async def watch(self) -> None:
        """Check after every burst of nftables notifications, and every
        `poll_interval` seconds; runs until cancelled."""
        sock: socket.socket | None = None
        try:
            sock = await self._runner.run(open_notification_socket)
        except OSError as exc:
            log.warning(
                "nftables: no change notifications (%s); checking every %.0fs only",
                exc,
                self.poll_interval,
            )
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        if sock is not None:
            loop.add_reader(sock.fileno(), woken.set)
            self._sock = sock
        try:
            while True:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that races with the event, and the task never ends.
                woke = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):
                        await woken.wait()
                        woke = True
                woken.clear()
                # Read on the runner's thread, in turn with our batches: what
                # one of ours notified is read by it (`_apply_and_record`), and
                # whatever is left here came from somebody else.
                compared, diffs = await self._runner.run(self._check_pending)
                if not compared:
                    # Only elements changed (the grant lease's renewals, ten
                    # times a second per manager), or only other tables, or
                    # nothing (the poll, while the kernel tells us of every
                    # change): there was nothing to compare.
                    self.skipped += woke
                elif diffs:
                    self._drifted(", ".join(diffs))
        finally:
            if sock is not None:
                self._sock = None
                loop.remove_reader(sock.fileno())
                sock.close()


NFNL_SUBSYS_NFTABLES = 10
ELEMENT_ONLY = frozenset({12, 14, 15, 30})
"""nftables messages that change no table's structure: NEWSETELEM, DELSETELEM,
NEWGEN (the end of every transaction) and DESTROYSETELEM."""
FAMILIES = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}
"""nftables family names -> the protocol numbers notifications carry."""
TABLE_ATTRIBUTE = 1
"""In every nftables message that names a table (tables, chains, rules, sets,
objects, flowtables), the attribute holding its name."""


def _table_of(data: bytes, off: int, length: int) -> tuple[int, str] | None:
    """(family, table name) of the nftables message at `off`, if it names one."""
    family = data[off + 16]
    pos, end = off + 20, off + length
    while pos + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, pos)
        if alen < 4:
            return None
        if atype & 0x3FFF == TABLE_ATTRIBUTE:
            name = data[pos + 4 : pos + alen].split(b"\0", 1)[0]
            return family, name.decode(errors="replace")
        pos += (alen + 3) & ~3
    return None


def structural(data: bytes, owned: Collection[TableId] | None = None) -> bool:
    """Whether a buffer of netlink messages holds one that may change a table's
    structure (anything but set elements and the generation); with `owned`,
    only a change to one of those tables counts (a message naming no table
    counts too). Other tables change all the time (a proxy's nftables mode
    rewrites its own on every endpoint change), and need no look at ours."""
    mine = None if owned is None else {(FAMILIES.get(f, -1), n) for f, n in owned}
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            return True  # malformed: look
        if kind >> 8 != NFNL_SUBSYS_NFTABLES:
            return True
        if (kind & 0xFF) not in ELEMENT_ONLY:
            if mine is None or length < 20 or off + 20 > len(data):
                return True
            table = _table_of(data, off, min(length, len(data) - off))
            if table is None or table in mine:
                return True
        off += (length + 3) & ~3
    return False


def _drain(sock: socket.socket, owned: Collection[TableId] | None = None) -> tuple[bool, bool]:
    """Read every queued notification: whether any may have changed the
    structure of a table of `owned` (all tables if None), and whether some
    were lost (the socket overflowed; that counts as a change too)."""
    seen = lost = False
    while True:
        try:
            seen = structural(sock.recv(65536), owned) or seen
        except BlockingIOError:
            return seen, lost
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            # Some notifications were dropped: the check that follows covers them.
            log.debug("nftables: notification socket overflowed")
            seen = lost = True
