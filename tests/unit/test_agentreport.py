"""Agent reports: the reporter coalesces, writes only changes, retries failures, and
never makes the publisher wait (virtual time, fake writer); the record's JSON round
trip; and how the manager reads records from its store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from ipaddress import ip_address

import pytest

from staticegress.api.types import EgressIPRef, NodeName
from staticegress.k8s.agentreport import (
    ANNOTATION,
    AgentReporter,
    decode,
    encode,
    lease_name,
    records_from_store,
)
from staticegress.model.programmed import AgentRecord
from tests.virtual_time import Clock

N = NodeName("node-1")


def _rec(gen: int, *, fenced: bool = False) -> AgentRecord:
    ip = ip_address("198.51.100.200")
    return AgentRecord(
        node=N,
        applied={EgressIPRef("ns", "web"): gen},
        fenced=fenced,
        withheld=frozenset({ip}) if fenced else frozenset(),
        owned=frozenset() if fenced else frozenset({ip}),
    )


class FakeWriter:
    """Records writes with their virtual time; can fail, or hang until released."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.writes: list[tuple[float, AgentRecord]] = []
        self.fail = 0
        self.attempts = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def write(self, record: AgentRecord) -> None:
        self.attempts += 1
        await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise ConnectionError("apiserver unreachable")
        self.writes.append((round(self.clock.now, 3), record))


@pytest.fixture
async def harness() -> AsyncIterator[tuple[Clock, FakeWriter, AgentReporter]]:
    clock = Clock(step=0.01)
    writer = FakeWriter(clock)
    reporter = AgentReporter(
        writer, min_interval=0.2, retry_interval=0.5, clock=clock, sleep=clock.sleep
    )
    task = asyncio.create_task(reporter.run())
    try:
        yield clock, writer, reporter
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_first_record_written_at_once_then_bursts_coalesce(
    harness: tuple[Clock, FakeWriter, AgentReporter],
) -> None:
    clock, writer, reporter = harness
    reporter.publish(_rec(1))
    await clock.advance(0.01)
    assert [(t, r.applied) for t, r in writer.writes] == [(0.0, {EgressIPRef("ns", "web"): 1})]
    # A burst of syncs within the interval: one write, of the newest record,
    # no sooner than min_interval after the previous write.
    for gen in (2, 3, 4):
        reporter.publish(_rec(gen))
        await clock.advance(0.03)
    await clock.advance(0.5)
    assert [(t, r.applied[EgressIPRef("ns", "web")]) for t, r in writer.writes] == [
        (0.0, 1),
        (0.2, 4),
    ]


async def test_unchanged_records_are_not_written_again(
    harness: tuple[Clock, FakeWriter, AgentReporter],
) -> None:
    clock, writer, reporter = harness
    reporter.publish(_rec(1))
    await clock.advance(0.5)
    for _ in range(5):  # periodic resyncs that change nothing
        reporter.publish(_rec(1))
        await clock.advance(0.3)
    assert len(writer.writes) == 1
    # A change and its undo within one interval: nothing left to write.
    reporter.publish(_rec(2))
    reporter.publish(_rec(1))
    await clock.advance(1.0)
    assert len(writer.writes) == 1
    reporter.publish(_rec(1, fenced=True))
    await clock.advance(0.3)
    assert writer.writes[-1][1].fenced
    assert len(writer.writes) == 2


async def test_publish_never_waits_for_a_hung_write(
    harness: tuple[Clock, FakeWriter, AgentReporter],
) -> None:
    clock, writer, reporter = harness
    writer.gate.clear()  # the API server does not answer
    reporter.publish(_rec(1))
    await clock.advance(0.1)
    assert writer.attempts == 1
    # The sync goes on publishing (a plain call, nothing to await) while the
    # write hangs; the newest record is what gets written once it unblocks.
    for gen in range(2, 50):
        reporter.publish(_rec(gen))
    await clock.advance(5.0)
    assert writer.writes == []
    writer.gate.set()
    await clock.advance(0.5)
    assert [r.applied[EgressIPRef("ns", "web")] for _, r in writer.writes] == [1, 49]


async def test_failures_are_retried_with_backoff_and_logged_once(
    harness: tuple[Clock, FakeWriter, AgentReporter], caplog: pytest.LogCaptureFixture
) -> None:
    clock, writer, reporter = harness
    writer.fail = 3
    with caplog.at_level(logging.INFO, logger="staticegress.k8s.agentreport"):
        reporter.publish(_rec(1))
        await clock.advance(0.1)
        assert writer.attempts == 1
        await clock.advance(0.5)  # first retry after 0.5 s
        assert writer.attempts == 2
        await clock.advance(0.8)  # the next 1 s after the first retry
        assert writer.attempts == 2
        await clock.advance(0.2)
        assert writer.attempts == 3
        await clock.advance(2.1)  # then 2 s: it succeeds
        assert writer.attempts == 4
        assert [r for _, r in writer.writes] == [_rec(1)]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "written after 3 failures" in caplog.text
    assert reporter.failures == 0
    assert reporter.written == _rec(1)


def test_record_json_round_trip_is_compact_and_deterministic() -> None:
    rec = AgentRecord(
        node=N,
        applied={EgressIPRef("b", "y"): 2, EgressIPRef("a", "x"): 7},
        fenced=True,
        withheld=frozenset({ip_address("198.51.100.9"), ip_address("198.51.100.10")}),
        owned=frozenset(),
    )
    text = encode(rec)
    assert text == (
        '{"applied":{"a/x":7,"b/y":2},"fenced":true,'
        '"withheld":["198.51.100.9","198.51.100.10"],"owned":[]}'
    )
    assert decode(N, text) == rec


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        '{"applied":{"no-slash":1}}',
        '{"applied":{"a/b":"1"}}',
        '{"applied":{"a/b":true}}',
        '{"fenced":"yes"}',
        '{"owned":["not-an-ip"]}',
        "{",
    ],
)
def test_malformed_records_are_refused(text: str) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        decode(N, text)


def _lease(node: str, text: str | None) -> dict[str, object]:
    annotations = {ANNOTATION: text} if text is not None else {}
    return {"metadata": {"name": lease_name(NodeName(node)), "annotations": annotations}}


def test_manager_reads_records_of_existing_nodes_named_by_the_lease() -> None:
    good = encode(_rec(3))
    store = {
        "staticegress-system/staticegress-agent-node-1": _lease("node-1", good),
        "staticegress-system/staticegress-agent-node-2": _lease("node-2", "{"),
        "staticegress-system/staticegress-agent-gone": _lease("gone", good),
        "staticegress-system/staticegress-agent-node-3": _lease("node-3", None),
        "staticegress-system/staticegress-manager": {"metadata": {"name": "staticegress-manager"}},
    }
    nodes = [NodeName(n) for n in ("node-1", "node-2", "node-3")]
    records = records_from_store(store, nodes=nodes)
    assert list(records) == [NodeName("node-1")]
    assert records[NodeName("node-1")].applied == {EgressIPRef("ns", "web"): 3}
