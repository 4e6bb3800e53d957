"""The nftables watchdog against the real kernel, in a throwaway network namespace:
a flush of the whole ruleset, a deleted or edited table of ours, and a change
to someone else's table, each seen (or not) from the kernel's notifications."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from staticegress.dataplane import nftmonitor
from staticegress.dataplane.netns import NetnsRunner
from staticegress.dataplane.nft import NftError
from staticegress.dataplane.nftmonitor import WatchedNftApplier
from staticegress.model.desired import compute_desired
from staticegress.render.nft import render_ruleset
from tests import scenario

ARP_TABLE: list[dict[str, Any]] = [
    {"add": {"table": {"family": "arp", "name": "staticegress_test_arp"}}},
    {
        "add": {
            "chain": {
                "family": "arp",
                "table": "staticegress_test_arp",
                "name": "output",
                "type": "filter",
                "hook": "output",
                "prio": 0,
                "policy": "accept",
            }
        }
    },
]


def _nft(ns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", *args], check=True, capture_output=True, text=True
    ).stdout


def _tables(ns: str) -> list[str]:
    return [
        _nft(ns, "list", "table", "ip", "staticegress"),
        _nft(ns, "list", "table", "arp", "staticegress_test_arp"),
    ]


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        raise AssertionError("dataplane tests need root (network namespaces)")
    name = f"setest-mon-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _batch() -> dict[str, Any]:
    data = scenario.load("mixed")
    data["node"] = "node-1"
    desired = compute_desired(scenario.snapshot(data), scenario.config(data, "direct"))
    batch = render_ruleset(desired, transport="direct")
    batch["nftables"] += ARP_TABLE
    return batch


class _Agent:
    """Plays the agent's side: a forced sync re-applies the last batch at once."""

    def __init__(self, ns: str, *, poll_interval: float = 5.0) -> None:
        self.drifts: list[float] = []
        self.restored: list[float] = []
        self.batch = _batch()
        self.nft = WatchedNftApplier(
            NetnsRunner(ns),
            on_drift=self._drift,
            on_restored=self.restored.append,
            poll_interval=poll_interval,
        )
        self._repairs: set[asyncio.Task[None]] = set()

    def _drift(self) -> None:
        self.drifts.append(time.monotonic())
        task = asyncio.create_task(self.nft.apply(self.batch))
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)


@contextlib.asynccontextmanager
async def _started(agent: _Agent) -> AsyncIterator[_Agent]:
    await agent.nft.apply(agent.batch)
    task = asyncio.create_task(agent.nft.watch())
    await asyncio.sleep(0.2)  # subscribed, and the check after our own batch is done
    try:
        yield agent
    finally:
        task.cancel()
        await asyncio.gather(task, *agent._repairs, return_exceptions=True)
        agent.nft._runner.close()


async def _until(what: str, check: Callable[[], object], seconds: float = 2.0) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"{what}: not within {seconds}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def test_the_batch_defines_the_owned_tables(netns: str) -> None:
    async with _started(_Agent(netns)) as agent:
        assert agent.nft.owned_tables == [
            ("arp", "staticegress_test_arp"),
            ("ip", "staticegress"),
            ("ip", "staticegress_guard"),
        ]
        assert agent.drifts == [], "our own batches must not look like drift"


async def test_flush_ruleset_is_restored_within_a_second(netns: str) -> None:
    async with _started(_Agent(netns)) as agent:
        flushed = time.monotonic()
        await asyncio.to_thread(_nft, netns, "flush", "ruleset")
        await _until("the repair", lambda: agent.restored)
        took = time.monotonic() - flushed
        noticed = agent.drifts[0] - flushed
        print(f"\nflush ruleset: noticed after {noticed:.3f}s, restored in {took:.3f}s")
        assert noticed < 1.0
        assert took < 1.0
        assert len(agent.drifts) == 1
        assert "staticegress" in _nft(netns, "list", "tables")
        assert "staticegress_test_arp" in _nft(netns, "list", "tables")
        # Our own repair batch notified too; it must not be taken for another drift.
        await asyncio.sleep(0.3)
        assert len(agent.drifts) == 1
        assert agent.nft.restores == 1


@pytest.mark.parametrize(
    "edit",
    [
        ("delete", "table", "arp", "staticegress_test_arp"),
        ("add", "rule", "ip", "staticegress", "prerouting", "counter"),
        ("flush", "chain", "ip", "staticegress", "prerouting"),
    ],
    ids=["other-table-of-ours-deleted", "rule-added", "chain-flushed"],
)
async def test_an_edit_of_any_owned_table_is_repaired(netns: str, edit: tuple[str, ...]) -> None:
    async with _started(_Agent(netns)) as agent:
        before = _tables(netns)
        await asyncio.to_thread(_nft, netns, *edit)
        await _until("the repair", lambda: agent.restored)
        assert _tables(netns) == before


async def test_changes_to_other_tables_are_left_alone(netns: str) -> None:
    """Other tables change all the time (a proxy's nftables mode rewrites its
    own on every endpoint change): their notifications are read, and cost no
    listing of ours. A change to ours right after is still repaired."""
    async with _started(_Agent(netns)) as agent:
        checks, skipped = agent.nft.checks, agent.nft.skipped
        await asyncio.to_thread(_nft, netns, "add", "table", "inet", "someone_else")
        await asyncio.to_thread(
            _nft,
            netns,
            "add",
            "chain",
            "inet",
            "someone_else",
            "c",
            "{ type filter hook input priority 0; }",
        )
        await asyncio.sleep(0.3)
        assert agent.nft.skipped > skipped, "the notifications were not seen"
        assert agent.nft.checks == checks, "another table's change cost a check"
        assert agent.drifts == []
        await asyncio.to_thread(
            _nft, netns, "add", "rule", "ip", "staticegress", "prerouting", "counter"
        )
        await _until("the repair", lambda: agent.restored)


async def test_without_notifications_the_poll_still_repairs(
    netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse() -> Any:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(nftmonitor, "open_notification_socket", refuse)
    agent = _Agent(netns, poll_interval=0.3)
    async with _started(agent):
        await asyncio.to_thread(_nft, netns, "delete", "table", "ip", "staticegress")
        await _until("the repair by polling", lambda: agent.restored, seconds=2.0)


async def test_element_changes_cost_no_check_and_a_structural_one_still_does(
    netns: str,
) -> None:
    """The grant lease writes set elements ten times a second per manager: a
    check (a listing of every table of ours) after each cost an agent a
    noticeable share of a core at rest. Element-only bursts are skipped; the
    rule added after them is still seen and repaired."""
    async with _started(_Agent(netns)) as agent:
        checks = agent.nft.checks
        for i in range(20):
            await asyncio.to_thread(
                _nft, netns, "add", "element", "ip", "staticegress", "known_local_pods",
                f"{{ 10.244.1.{100 + i} }}",
            )  # fmt: skip
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert agent.nft.skipped >= 10, agent.nft.skipped
        assert agent.nft.checks == checks, "a check ran for element changes"
        before = _nft(netns, "list", "chain", "ip", "staticegress", "prerouting")
        await asyncio.to_thread(
            _nft, netns, "add", "rule", "ip", "staticegress", "prerouting", "counter"
        )
        await _until("the repair", lambda: agent.restored)
        assert _nft(netns, "list", "chain", "ip", "staticegress", "prerouting") == before


def test_only_element_and_generation_messages_count_as_not_structural() -> None:
    def msg(kind: int) -> bytes:
        import struct

        return struct.pack("=IHHII", 20, (10 << 8) | kind, 0, 0, 0) + b"\0" * 4

    assert not nftmonitor.structural(msg(12) + msg(15))  # NEWSETELEM, NEWGEN
    assert not nftmonitor.structural(msg(14))  # DELSETELEM
    assert nftmonitor.structural(msg(12) + msg(6))  # ... and a NEWRULE
    assert nftmonitor.structural(msg(2))  # DELTABLE
    assert nftmonitor.structural(struct_pack_other())


def test_only_changes_to_our_tables_count_when_we_know_them() -> None:
    import struct

    def msg(kind: int, family: int, table: str) -> bytes:
        name = table.encode() + b"\0"
        attr = struct.pack("=HH", 4 + len(name), 1) + name
        attr += b"\0" * (-len(attr) % 4)
        body = struct.pack("=BBH", family, 0, 0) + attr
        return struct.pack("=IHHII", 16 + len(body), (10 << 8) | kind, 0, 0, 0) + body

    ours = [("ip", "staticegress"), ("ip", "staticegress_guard")]
    assert nftmonitor.structural(msg(6, 2, "staticegress"), ours)  # NEWRULE in ours
    assert nftmonitor.structural(msg(2, 2, "staticegress_guard"), ours)  # DELTABLE
    assert not nftmonitor.structural(msg(6, 1, "kube-proxy"), ours)
    assert not nftmonitor.structural(msg(6, 1, "staticegress"), ours)  # inet, not ip
    assert nftmonitor.structural(msg(6, 1, "kube-proxy") + msg(8, 2, "staticegress"), ours)
    assert nftmonitor.structural(msg(6, 1, "kube-proxy"))  # tables unknown: any counts
    nameless = struct.pack("=IHHII", 20, (10 << 8) | 6, 0, 0, 0) + struct.pack("=BBH", 2, 0, 0)
    assert nftmonitor.structural(nameless, ours)
    # A buffer cut short after a header: counted, never an exception.
    cut = struct.pack("=IHHII", 40, (10 << 8) | 6, 0, 0, 0) + b"\2"
    assert nftmonitor.structural(cut, ours)


def struct_pack_other() -> bytes:
    import struct

    return struct.pack("=IHHII", 16, (1 << 8) | 12, 0, 0, 0)  # another subsystem


def _element(i: int) -> dict[str, Any]:
    """A batch that touches our table without changing its structure."""
    elem = {"family": "ip", "table": "staticegress", "name": "known_local_pods"}
    return {"nftables": [{"add": {"element": {**elem, "elem": [f"10.244.1.{150 + i}"]}}}]}


async def test_our_own_batches_cost_no_check(netns: str) -> None:
    """A sync's own transactions notify like anybody's; the applier reads its
    own notifications, so the watch lists nothing after our syncs (it listed
    every table after each, a third of the thread's time at a few thousand
    pods). Somebody else's edit after them is still repaired."""
    async with _started(_Agent(netns)) as agent:
        checks = agent.nft.checks
        for _ in range(10):
            # Two structural transactions in one call, as an in-place sync does.
            await agent.nft.apply_all([agent.batch, agent.batch])
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert agent.nft.checks == checks, f"{agent.nft.checks - checks} checks after our own"
        assert not agent.drifts
        await asyncio.to_thread(
            _nft, netns, "add", "rule", "ip", "staticegress", "prerouting", "counter"
        )
        await _until("the repair", lambda: agent.restored)


async def test_an_edit_still_unread_when_a_batch_starts_is_not_taken_for_ours(
    netns: str,
) -> None:
    """An edit behind our back whose notification the watch has not read yet,
    followed by one of our batches on the same table: the batch's fingerprint
    would include the edit and hide it for good. The applier compares first."""
    agent = _Agent(netns)
    try:
        await agent.nft.apply(agent.batch)
        agent.nft._sock = await agent.nft._runner.run(nftmonitor.open_notification_socket)
        before = _nft(netns, "list", "chain", "ip", "staticegress", "prerouting")
        _nft(netns, "add", "rule", "ip", "staticegress", "prerouting", "counter")
        await agent.nft.apply(_element(1))  # touches the edited table
        assert agent.drifts, "the edit was recorded as ours"
        await _until("the repair", lambda: agent.restored)
        assert _nft(netns, "list", "chain", "ip", "staticegress", "prerouting") == before
    finally:
        if agent.nft._sock is not None:
            agent.nft._sock.close()
        await asyncio.gather(*agent._repairs, return_exceptions=True)
        agent.nft._runner.close()


async def test_a_batch_of_elements_costs_no_listing(netns: str) -> None:
    """An in-place sync mostly adds and deletes elements, which fingerprints
    leave out: listing our tables after it (seconds at 10,000 pods) is
    skipped. A batch that changes a rule is listed, and an edit after an
    element batch is still repaired."""
    async with _started(_Agent(netns)) as agent:
        listed: list[Any] = []
        fingerprint = agent.nft._fingerprint

        def counted(table: Any) -> Any:
            listed.append(table)
            return fingerprint(table)

        agent.nft._fingerprint = counted  # type: ignore[method-assign]
        for i in range(5):
            await agent.nft.apply_all([_element(i), _element(i + 10)])
        await asyncio.sleep(0.2)
        assert listed == [], f"listed after element batches: {listed}"
        await agent.nft.apply(agent.batch)
        assert ("ip", "staticegress") in listed
        await agent.nft.apply(_element(20))
        await asyncio.to_thread(
            _nft, netns, "add", "rule", "ip", "staticegress", "prerouting", "counter"
        )
        await _until("the repair", lambda: agent.restored)


async def test_an_edit_during_our_batch_of_elements_is_still_seen(netns: str) -> None:
    """An edit that lands while our batch runs (here: right after its commit,
    before the applier reads the notifications) on a table our batch changed
    only by elements: that table is not listed anew, so the notification
    naming it must not be taken for ours."""
    async with _started(_Agent(netns)) as agent:
        run = agent.nft._run
        edited: list[bool] = []

        def run_then_edit(batch: dict[str, Any]) -> Any:
            out = run(batch)
            if not edited:
                edited.append(True)
                _nft(netns, "add", "rule", "ip", "staticegress", "prerouting", "counter")
            return out

        agent.nft._run = run_then_edit  # type: ignore[method-assign]
        before = _nft(netns, "list", "chain", "ip", "staticegress", "prerouting")
        await agent.nft.apply(_element(3))
        assert agent.drifts, "the edit was taken for ours"
        agent.nft._run = run  # type: ignore[method-assign]
        await _until("the repair", lambda: agent.restored)
        assert _nft(netns, "list", "chain", "ip", "staticegress", "prerouting") == before


async def test_a_refused_batch_still_reports_what_was_found_before_it(netns: str) -> None:
    """An edit found before our batch, and the kernel refusing the batch: the
    refusal is raised, and the edit is reported all the same (its notification
    is read, so nobody else would report it)."""
    agent = _Agent(netns)
    try:
        await agent.nft.apply(agent.batch)
        agent.nft._sock = await agent.nft._runner.run(nftmonitor.open_notification_socket)
        _nft(netns, "add", "rule", "ip", "staticegress", "prerouting", "counter")
        missing = {"family": "ip", "table": "staticegress", "name": "no_such_set"}
        refused = {"nftables": [{"add": {"element": {**missing, "elem": ["192.0.2.1"]}}}]}
        with pytest.raises(NftError):
            await agent.nft.apply(refused)
        assert agent.drifts, "the edit found before the refused batch was dropped"
    finally:
        if agent.nft._sock is not None:
            agent.nft._sock.close()
        await asyncio.gather(*agent._repairs, return_exceptions=True)
        agent.nft._runner.close()
