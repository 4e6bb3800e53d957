"""SyncRunner on virtual time: coalescing, minimum interval, periodic resync, retries,
and the freshness readiness reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from staticegress.agent.sync import SyncRunner, TemporaryError
from tests.virtual_time import Clock


class Harness:
    def __init__(self, fail: list[bool] | None = None, **kw: float) -> None:
        self.clock = Clock()
        self.calls: list[tuple[float, bool]] = []
        self._fail = fail or []

        async def fn(force: bool) -> None:
            self.calls.append((round(self.clock.now, 3), force))
            if self._fail and self._fail.pop(0):
                raise TemporaryError("boom")

        self.runner = SyncRunner(fn, clock=self.clock, sleep=self.clock.sleep, **kw)


@pytest.fixture
async def make() -> AsyncIterator[object]:
    tasks: list[asyncio.Task[None]] = []

    def start(fail: list[bool] | None = None, **kw: float) -> Harness:
        h = Harness(fail, **kw)
        tasks.append(asyncio.create_task(h.runner.run()))
        return h

    yield start
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_burst_of_pokes_is_one_run_and_the_first_run_is_forced(make: object) -> None:
    h = make(min_interval=1.0, max_interval=100.0)  # type: ignore[operator]
    for _ in range(50):
        h.runner.poke()
    await h.clock.advance(5)
    assert h.calls == [(0.0, True)]
    assert h.runner.pending_age() == 0.0


async def test_min_interval_spaces_runs(make: object) -> None:
    h = make(min_interval=1.0, max_interval=100.0)  # type: ignore[operator]
    h.runner.poke()
    await h.clock.advance(0.2)
    h.runner.poke()
    await h.clock.advance(0.2)
    assert len(h.calls) == 1, "a second run came before the minimum interval"
    await h.clock.advance(1.0)
    assert h.calls == [(0.0, True), (1.0, False)]


async def test_periodic_resync_is_forced(make: object) -> None:
    h = make(min_interval=0.1, max_interval=60.0)  # type: ignore[operator]
    h.runner.poke()
    await h.clock.advance(130, step=1.0)
    assert h.calls == [(0.0, True), (60.0, True), (120.0, True)]


async def test_failures_retry_with_backoff_and_force(make: object) -> None:
    h = make(
        [True, True, False],
        min_interval=0.0,
        max_interval=100.0,  # type: ignore[operator]
        retry_interval=0.5,
    )
    h.runner.poke()
    await h.clock.advance(3)
    assert [t for t, _ in h.calls] == [0.0, 0.5, 1.5]  # retry after 0.5 s, then 1 s
    assert all(force for _, force in h.calls)
    assert h.runner.failures == 0
    assert h.runner.pending_age() == 0.0


async def test_pending_age_measures_unapplied_changes(make: object) -> None:
    h = make(
        [True] * 100,
        min_interval=0.0,
        max_interval=1000.0,  # type: ignore[operator]
        retry_interval=1.0,
    )
    h.runner.poke()
    await h.clock.advance(10)
    assert h.runner.pending_age() > 5.0, "a change that keeps failing must show as stale"
    assert h.runner.failures >= 3


async def test_a_forced_poke_forces_the_next_run_only(make: object) -> None:
    h = make(min_interval=0.1, max_interval=100.0)  # type: ignore[operator]
    h.runner.poke()
    await h.clock.advance(1)
    h.runner.poke(force=True)  # the kernel lost our table: apply even if unchanged
    await h.clock.advance(1)
    h.runner.poke()
    await h.clock.advance(1)
    assert h.calls == [(0.0, True), (1.0, True), (2.0, False)]
