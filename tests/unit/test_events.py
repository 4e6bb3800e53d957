"""EventRecorder on an in-memory sink and virtual time: recording never waits on the
API server, the queue stays bounded, and repeats become one Event with a count."""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import time
from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.types import EgressIPRef
from staticegress.k8s.events import EventRecorder

REF = EgressIPRef("a", "x")
T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


class FakeSink:
    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []
        self.patched: list[tuple[str, dict[str, Any]]] = []
        self.gate: asyncio.Event | None = None
        self.expired: set[str] = set()

    async def create(self, namespace: str, body: Mapping[str, Any]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.created.append(dict(body))

    async def patch(self, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        if name in self.expired:
            raise ApiException(status=404, reason="NotFound")
        self.patched.append((name, dict(body)))


class Clocks:
    def __init__(self) -> None:
        self.mono = 0.0
        self.wall = T0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += dt.timedelta(seconds=seconds)


def recorder(sink: FakeSink, clocks: Clocks, **kw: Any) -> EventRecorder:
    return EventRecorder(
        None,
        component="test",
        host="h",
        sink=sink,
        clock=lambda: clocks.mono,
        wall=lambda: clocks.wall,
        **kw,
    )


async def test_record_does_not_wait_for_the_api_server_and_the_queue_is_bounded() -> None:
    sink, clocks = FakeSink(), Clocks()
    sink.gate = asyncio.Event()  # the API server never answers
    rec = recorder(sink, clocks, max_queued=8)
    assert not inspect.iscoroutinefunction(rec.record)
    start = time.monotonic()
    for i in range(1000):
        rec.record(REF, "uid", "GatewayFailover", f"192.0.2.1 moved {i}")
    assert time.monotonic() - start < 0.5
    assert len(rec) <= 8
    assert rec.dropped == 1000 - 8
    # The awaitable forms return at once too.
    await asyncio.wait_for(rec.emit(REF, "uid", "R", "m"), 0.1)
    await asyncio.wait_for(rec.report([(REF, "uid", "NoGateway", "m")]), 0.1)
    sink.gate.set()
    await asyncio.wait_for(rec.flush(), 5)
    assert len(sink.created) == 8
    await rec.aclose()


async def test_repeats_are_aggregated_into_one_event_with_a_count() -> None:
    sink, clocks = FakeSink(), Clocks()
    rec = recorder(sink, clocks, window=600)
    for _ in range(5):  # queued together: folded before they are sent
        rec.record(REF, "uid", "GatewayFailover", "192.0.2.1 moved from n1 to n2")
    await rec.flush()
    (ev,) = sink.created
    assert ev["count"] == 5
    assert ev["involvedObject"]["name"] == "x"
    assert ev["type"] == "Warning"
    assert ev["firstTimestamp"] == ev["lastTimestamp"] == "2026-12-01T12:00:00Z"

    clocks.advance(30)
    rec.record(REF, "uid", "GatewayFailover", "192.0.2.1 moved from n1 to n2")
    await rec.flush()
    assert len(sink.created) == 1, "a repeat within the window updates the Event"
    (name, patch) = sink.patched[-1]
    assert name == ev["metadata"]["name"]
    assert patch == {"count": 6, "lastTimestamp": "2026-12-01T12:00:30Z"}

    # A different message is a different Event.
    rec.record(REF, "uid", "GatewayFailover", "192.0.2.1 moved from n2 to n3")
    await rec.flush()
    assert len(sink.created) == 2

    # After the window, the same Event starts afresh.
    clocks.advance(601)
    rec.record(REF, "uid", "GatewayFailover", "192.0.2.1 moved from n1 to n2")
    await rec.flush()
    assert len(sink.created) == 3
    assert sink.created[-1]["count"] == 1
    await rec.aclose()


async def test_an_expired_event_is_created_again() -> None:
    sink, clocks = FakeSink(), Clocks()
    rec = recorder(sink, clocks)
    rec.record(REF, "uid", "NoEligibleGateway", "192.0.2.1 has no eligible gateway")
    await rec.flush()
    sink.expired.add(sink.created[0]["metadata"]["name"])
    clocks.advance(5)
    rec.record(REF, "uid", "NoEligibleGateway", "192.0.2.1 has no eligible gateway")
    await rec.flush()
    assert len(sink.created) == 2
    await rec.aclose()


async def test_report_records_a_problem_once_until_it_goes_away() -> None:
    sink, clocks = FakeSink(), Clocks()
    rec = recorder(sink, clocks)
    problem = (REF, "uid", "EgressIPConflict", "192.0.2.1 is already claimed by b/y")
    for _ in range(3):
        await rec.report([problem])
        await rec.flush()
    assert len(sink.created) == 1
    assert sink.patched == []
    await rec.report([])
    await rec.report([problem])
    await rec.flush()
    assert len(sink.created) + len(sink.patched) == 2, "it came back: recorded again"
    await rec.aclose()


async def test_a_failing_sink_loses_the_event_but_keeps_draining() -> None:
    sink, clocks = FakeSink(), Clocks()
    calls = 0

    async def refuse(namespace: str, body: Mapping[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ApiException(status=403, reason="Forbidden")
        sink.created.append(dict(body))

    sink.create = refuse  # type: ignore[method-assign]
    rec = recorder(sink, clocks)
    rec.record(REF, "uid", "R1", "first")
    rec.record(REF, "uid", "R2", "second")
    await rec.flush()
    assert [e["reason"] for e in sink.created] == ["R2"]
    await rec.aclose()
