"""Record Events on StaticEgressIP objects, off the caller's path and aggregated.

Two promises to callers:
- Recording never waits on the API server. `record` puts the Event in a
  bounded queue and returns; one background task, started on first use,
  sends them. When the queue is full new Events are dropped (counted and
  logged once per full spell): an Event is best effort and must never hold
  up a sync or a failover.
- Repeats are aggregated, not multiplied. The same Event (object, type,
  reason, message) recorded again while it is still queued only raises the
  queued count; recorded again within `window` of the last one sent, it
  updates that Event's `count` and `lastTimestamp` instead of creating a new
  one, as the Kubernetes event correlator does.

On top of that, `report` serves callers that re-derive their problems on
every sync (the agent): a problem is recorded when it first appears, and
again only if it goes away and comes back.

The cluster is reached through `EventSink`, so tests drive the recorder with
an in-memory fake and injected clocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.types import EgressIPRef
from staticegress.api.v1alpha1 import API_VERSION, KIND
from staticegress.k8s.client import REQUEST_TIMEOUT

log = logging.getLogger(__name__)

Key = tuple[EgressIPRef, str, str]
"""(object, reason, message): one distinct problem, for `report`."""

EventKey = tuple[EgressIPRef, str, str, str, str]
"""(object, uid, type, reason, message): what makes two Events the same one."""


class EventSink(Protocol):
    """Where Events go; raises `ApiException` when the API server refuses."""

    async def create(self, namespace: str, body: Mapping[str, Any]) -> None: ...

    async def patch(self, namespace: str, name: str, body: Mapping[str, Any]) -> None: ...


class KubeEventSink:
    """`EventSink` on core/v1 Events."""

    def __init__(self, api: client.ApiClient) -> None:
        self._core = client.CoreV1Api(api)

    async def create(self, namespace: str, body: Mapping[str, Any]) -> None:
        await self._core.create_namespaced_event(
            namespace, dict(body), _request_timeout=REQUEST_TIMEOUT
        )

    async def patch(self, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        await self._core.patch_namespaced_event(
            name, namespace, dict(body), _request_timeout=REQUEST_TIMEOUT
        )


@dataclass
class _Sent:
    """The last Event created for one EventKey, to fold repeats into."""

    name: str
    count: int
    at: float
    """When it was last sent, by the recorder's clock."""


def _stamp(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    def __init__(
        self,
        api: client.ApiClient | None,
        *,
        component: str,
        host: str,
        sink: EventSink | None = None,
        window: float = 600.0,
        max_queued: int = 256,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        """`api` None and no `sink`: Events are only logged (tests, dry runs)."""
        self._sink = sink if sink is not None else (KubeEventSink(api) if api is not None else None)
        self._component = component
        self._host = host
        self._window = window
        self._max_queued = max_queued
        self._clock = clock
        self._wall = wall
        self._active: set[Key] = set()
        # Insertion-ordered: the drainer sends the oldest first. The value is
        # how many times the Event was recorded since it was queued.
        self._queued: dict[EventKey, int] = {}
        self._sent: dict[EventKey, _Sent] = {}
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._full = False
        self.emitted = 0
        """Events created or updated on the API server."""
        self.dropped = 0
        """Events dropped because the queue was full."""

    # ------------------------------------------------------------ callers

    async def report(self, problems: Iterable[tuple[EgressIPRef, str, str, str]]) -> None:
        """`problems`: (ref, uid, reason, message) present now. Records the new ones."""
        current: dict[Key, str] = {(ref, reason, msg): uid for ref, uid, reason, msg in problems}
        for key in sorted(set(current) - self._active, key=str):
            ref, reason, message = key
            log.warning("egressip=%s reason=%s node=%s %s", ref, reason, self._host, message)
            self.record(ref, current[key], reason, message)
        self._active = set(current)

    async def emit(
        self, ref: EgressIPRef, uid: str, reason: str, message: str, *, kind: str = "Warning"
    ) -> None:
        """Awaitable form of `record`, for callers that were written for one."""
        self.record(ref, uid, reason, message, kind=kind)

    def record(
        self, ref: EgressIPRef, uid: str, reason: str, message: str, *, kind: str = "Warning"
    ) -> None:
        """Queue one Event and return at once; never blocks, never raises."""
        if self._sink is None:
            return
        key: EventKey = (ref, uid, kind, reason, message[:1024])
        if key in self._queued:
            self._queued[key] += 1
            return
        if len(self._queued) >= self._max_queued:
            self.dropped += 1
            if not self._full:
                log.warning("event queue full (%d): dropping Events until it drains", len(self))
            self._full = True
            return
        self._full = False
        self._queued[key] = 1
        self._drained.clear()
        self._wake.set()
        self._ensure_drainer()

    def __len__(self) -> int:
        """Events waiting to be sent."""
        return len(self._queued)

    async def flush(self) -> None:
        """Wait until every queued Event has been sent or given up (tests, shutdown)."""
        if self._queued and self._task is not None and not self._task.done():
            await self._drained.wait()

    async def aclose(self) -> None:
        """Stop the background sender; what is still queued is dropped."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # ------------------------------------------------------------ sender

    def _ensure_drainer(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._drain(), name=f"events-{self._component}"
            )

    async def _drain(self) -> None:
        while True:
            if not self._queued:
                self._wake.clear()
                await self._wake.wait()
                continue
            key = next(iter(self._queued))
            times = self._queued[key]
            try:
                await self._send(key, times)
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                # An Event is best effort; losing one must never stop anything.
                log.warning("event for %s not recorded: %s %s", key[0], exc.status, exc.reason)
            except Exception as exc:
                log.warning("event for %s not recorded: %s", key[0], exc)
            # Only now leave the queue: repeats recorded while it was being
            # sent were added to this entry's count and are sent next round.
            left = self._queued.pop(key, 0) - times
            if left > 0:
                self._queued[key] = left
            if not self._queued:
                self._drained.set()
            self._prune()

    async def _send(self, key: EventKey, times: int) -> None:
        assert self._sink is not None
        ref, uid, kind, reason, message = key
        now = self._clock()
        stamp = _stamp(self._wall())
        prev = self._sent.get(key)
        if prev is not None and now - prev.at < self._window:
            count = prev.count + times
            try:
                await self._sink.patch(
                    ref.namespace, prev.name, {"count": count, "lastTimestamp": stamp}
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
                # The Event expired (the API server's event TTL): start a new one.
            else:
                self._sent[key] = _Sent(prev.name, count, now)
                self.emitted += 1
                return
        name = f"{ref.name}.{uuid.uuid4().hex[:12]}"
        await self._sink.create(
            ref.namespace,
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": name, "namespace": ref.namespace},
                "involvedObject": {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": ref.name,
                    "namespace": ref.namespace,
                    "uid": uid,
                },
                "reason": reason,
                "message": message,
                "type": kind,
                "source": {"component": self._component, "host": self._host},
                "reportingComponent": self._component,
                "reportingInstance": self._host,
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "count": times,
            },
        )
        self._sent[key] = _Sent(name, times, now)
        self.emitted += 1

    def _prune(self) -> None:
        """Forget Events older than the window, so the table stays small."""
        now = self._clock()
        for key in [k for k, s in self._sent.items() if now - s.at >= self._window]:
            del self._sent[key]
