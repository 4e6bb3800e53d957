"""StatusWriter on an in-memory API and virtual time: one object's fault stays with it.

Each test scripts the API server's answer per object and checks that every
other object is still written in the same round, that 404s are skipped
quietly, that 409s ask for a recompute, and that a backoff (or a write that
hangs) belongs to its object alone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.types import EgressIPRef
from staticegress.k8s.status import Outcome, StatusWrite, StatusWriter

A = EgressIPRef("a", "x")
B = EgressIPRef("b", "other")
C = EgressIPRef("c", "third")

Step = BaseException | asyncio.Event | None


class FakeAPI:
    """Answers each object's patches from a script; the default is success."""

    def __init__(self) -> None:
        self.script: dict[EgressIPRef, list[Step]] = {}
        self.calls: list[EgressIPRef] = []
        self.written: dict[EgressIPRef, Mapping[str, Any]] = {}

    async def patch_status(self, ref: EgressIPRef, patch: Mapping[str, Any]) -> None:
        self.calls.append(ref)
        steps = self.script.get(ref) or []
        step = steps.pop(0) if steps else None
        if isinstance(step, asyncio.Event):
            await step.wait()
        elif step is not None:
            raise step
        self.written[ref] = patch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, fn: Callable[[], None]) -> object:
        self.timers.append((delay, fn))
        return None


class Harness:
    def __init__(self, *, leader: bool = True) -> None:
        self.api = FakeAPI()
        self.clock = Clock()
        self.pokes = 0
        self.leader = leader
        self.landed: list[EgressIPRef] = []
        self.rejected: list[tuple[EgressIPRef, str]] = []
        self.writer: StatusWriter[str] = StatusWriter(
            self.api,
            is_leader=lambda: self.leader,
            poke=self.poke,
            on_written=lambda w: self.landed.append(w.ref),
            on_rejected=lambda w, why: self.rejected.append((w.ref, why)),
            clock=self.clock,
            call_later=self.clock.call_later,
        )

    def poke(self) -> None:
        self.pokes += 1

    async def round(self, *writes: StatusWrite[str]) -> None:
        self.writer.submit(writes)
        await self.writer.idle()


def w(ref: EgressIPRef, summary: str = "s1", rv: str = "1") -> StatusWrite[str]:
    return StatusWrite(ref=ref, resource_version=rv, status={"summary": summary}, context=summary)


def api_error(status: int, message: str = "") -> ApiException:
    exc = ApiException(status=status, reason="refused")
    exc.body = json.dumps({"message": message}) if message else None
    return exc


async def test_a_422_on_one_object_does_not_stop_the_others() -> None:
    h = Harness()
    dup = "status.egressIPs[1]: Duplicate value"
    h.api.script[A] = [api_error(422, dup)]
    await h.round(w(A), w(B), w(C))
    assert set(h.api.written) == {B, C}
    assert h.writer.outcome(A) is Outcome.REJECTED
    assert h.writer.outcome(B) is Outcome.WRITTEN
    assert set(h.landed) == {B, C}
    assert h.rejected == [(A, f"422: {dup}")]
    first = h.writer.backoff_left(A)
    assert first == h.writer.reject_base
    assert [d for d, _ in h.clock.timers] == [first], "one timer to retry A, nothing global"
    assert h.writer.backoff_left(B) == 0.0

    # The next sync brings the same status for A: held back, B's new one goes out.
    h.api.calls.clear()
    await h.round(w(A), w(B, "s2", rv="2"))
    assert h.api.calls == [B]

    # Once A's backoff is over it is tried again; a repeat refusal doubles the
    # backoff but is not reported again (once per streak, not once per sync).
    h.clock.now += first
    h.api.script[A] = [api_error(422, dup)]
    await h.round(w(A))
    assert h.api.calls[-1] == A
    assert h.writer.backoff_left(A) == 2 * first
    assert len(h.rejected) == 1


async def test_a_404_is_skipped_quietly_and_the_rest_is_written() -> None:
    h = Harness()
    h.api.script[A] = [api_error(404)]
    await h.round(w(A), w(B))
    assert h.writer.outcome(A) is Outcome.GONE
    assert set(h.api.written) == {B}
    assert h.rejected == []
    assert h.clock.timers == [], "nothing to retry for a deleted object"
    assert h.pokes == 0
    assert h.writer.backoff_left(A) == 0.0
    h.writer.retain([B])
    assert h.writer.outcome(A) is None, "forgotten once the object is gone from the store"


async def test_a_409_asks_for_a_recompute_and_repeats_back_off_briefly() -> None:
    h = Harness()
    h.api.script[A] = [api_error(409), api_error(409)]
    await h.round(w(A), w(B))
    assert h.writer.outcome(A) is Outcome.CONFLICT
    assert h.pokes == 1
    assert B in h.api.written
    await h.round(w(A, rv="2"))
    assert h.pokes == 1
    assert [d for d, _ in h.clock.timers] == [0.05]
    await h.round(w(A, rv="3"))
    assert h.writer.outcome(A) is Outcome.WRITTEN


async def test_server_errors_back_off_per_object_only() -> None:
    h = Harness()
    h.api.script[A] = [api_error(503), api_error(500)]
    await h.round(w(A), w(B))
    assert h.writer.outcome(A) is Outcome.FAILED
    assert h.writer.backoff_left(A) == h.writer.retry_base
    assert h.writer.outcome(B) is Outcome.WRITTEN
    assert h.rejected == [], "a server error is not the object's fault: no Event"

    # While A backs off, every other object is written at once, as is a new
    # status for A itself (a failover must not wait for an old write's backoff).
    h.api.calls.clear()
    await h.round(w(A), w(B, "s2", rv="2"), w(C))
    assert sorted(h.api.calls, key=str) == [B, C]
    await h.round(w(A, "failover", rv="1"))
    assert h.api.calls[-1] == A
    assert h.writer.backoff_left(A) == 2 * h.writer.retry_base
    h.clock.now += 10
    await h.round(w(A, "failover", rv="1"))
    assert h.writer.outcome(A) is Outcome.WRITTEN
    assert h.writer.backoff_left(A) == 0.0


async def test_timeouts_count_as_failures_of_that_object() -> None:
    h = Harness()
    h.api.script[A] = [TimeoutError()]
    await h.round(w(A), w(B))
    assert h.writer.outcome(A) is Outcome.FAILED
    assert h.writer.outcome(B) is Outcome.WRITTEN


async def test_a_hanging_write_does_not_delay_another_objects_write() -> None:
    h = Harness()
    hang = asyncio.Event()
    h.api.script[A] = [hang]
    h.writer.submit([w(A), w(B)])
    for _ in range(20):
        await asyncio.sleep(0)
    assert B in h.api.written, "B must not wait for A's write"
    assert A not in h.api.written
    # A newer status for A while its write hangs: not a second write at once,
    # but a recompute once the first one lands.
    h.writer.submit([w(A, "s2")])
    assert h.api.calls.count(A) == 1
    hang.set()
    await h.writer.idle()
    assert h.pokes == 1


async def test_nothing_is_written_without_the_lease() -> None:
    h = Harness(leader=False)
    await h.round(w(A), w(B))
    assert h.api.calls == []
    assert h.writer.outcome(A) is Outcome.NOT_LEADER


async def test_a_status_already_written_is_not_written_again_before_the_watch_shows_it() -> None:
    h = Harness()
    await h.round(w(A))
    await h.round(w(A))
    assert h.api.calls == [A]
    await h.round(w(A, rv="2"))  # the watch moved on, something else changed
    assert h.api.calls == [A, A]


async def test_a_failing_hook_stays_with_its_object() -> None:
    h = Harness()

    def boom(write: StatusWrite[str]) -> None:
        if write.ref == A:
            raise RuntimeError("bug")
        h.landed.append(write.ref)

    h.writer = StatusWriter(
        h.api,
        is_leader=lambda: True,
        poke=h.poke,
        on_written=boom,
        clock=h.clock,
        call_later=h.clock.call_later,
    )
    await h.round(w(A), w(B))
    assert h.landed == [B]
    assert h.writer.outcome(A) is Outcome.WRITTEN
