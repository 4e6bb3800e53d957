"""StatusWriter: write StaticEgressIP statuses so that one object's fault stays with it.

The manager computes every object's status in one sync and hands the ones
that differ to `submit`, which returns at once. Each object's write then runs
as its own task (at most `max_in_flight` at a time), so a slow, refused or
failing write never holds up another object's write, nor the next sync.

Per object, by outcome of its patch:
- written: the object's failure count resets; `on_written` runs (Events,
  metrics). Submitting the same status against the same resourceVersion again
  is a no-op, so syncs that run before the watch delivers our own write do
  not write twice.
- 409 Conflict (the object changed since it was read): poke the sync so it
  recomputes from the fresh object; repeated conflicts on one object back off
  briefly so a lagging watch cannot make the sync spin.
- 404 Not Found: deleted while the sync ran; skipped without a word.
- 422 and other 4xx: the API server refuses this status; the object alone
  backs off (from `reject_base` doubling to `reject_max`), with a log line per
  attempt and `on_rejected` once per streak (the manager turns it into an
  Event), never once per sync.
- 5xx, 429, timeouts, connection errors: the object alone retries with
  backoff (from `retry_base` doubling to `retry_max`).
A backoff holds back only a repeat of the very status that failed; a
different status for that object (a failover, say) is written at once.
When a backoff ends, a timer pokes the sync, which recomputes and submits
again.

Invariant kept from the manager: nothing is written unless `is_leader()`
says so right before the patch goes out.

The cluster is reached through `StatusAPI`; time through the injected
`clock` and `call_later`, so tests run on in-memory fakes and virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.pools import POOL_PLURAL
from staticegress.api.types import EgressIPRef
from staticegress.api.v1alpha1 import GROUP, PLURAL, VERSION
from staticegress.k8s.client import REQUEST_TIMEOUT

log = logging.getLogger(__name__)

MERGE = "application/merge-patch+json"

T = TypeVar("T")


class StatusAPI(Protocol):
    """Patch one object's status subresource.

    Raises `ApiException` when the API server answers with an error, and
    `TimeoutError`, `aiohttp.ClientError` or `OSError` when it does not answer.
    """

    async def patch_status(self, ref: EgressIPRef, patch: Mapping[str, Any]) -> None: ...


class KubeStatusAPI:
    """`StatusAPI` on the StaticEgressIP status subresource, as a merge patch."""

    def __init__(self, api: client.ApiClient) -> None:
        self._custom = client.CustomObjectsApi(api)

    async def patch_status(self, ref: EgressIPRef, patch: Mapping[str, Any]) -> None:
        await self._custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            ref.namespace,
            PLURAL,
            ref.name,
            dict(patch),
            _content_type=MERGE,
            _request_timeout=REQUEST_TIMEOUT,
        )


class PoolStatusAPI:
    """`StatusAPI` on the cluster-scoped StaticEgressIPPool status subresource.

    Pools reuse the writer's per-object isolation; a pool is named by a ref
    with an empty namespace."""

    def __init__(self, api: client.ApiClient) -> None:
        self._custom = client.CustomObjectsApi(api)

    async def patch_status(self, ref: EgressIPRef, patch: Mapping[str, Any]) -> None:
        await self._custom.patch_cluster_custom_object_status(
            GROUP,
            VERSION,
            POOL_PLURAL,
            ref.name,
            dict(patch),
            _content_type=MERGE,
            _request_timeout=REQUEST_TIMEOUT,
        )


@dataclass(frozen=True)
class StatusWrite(Generic[T]):
    """One object's new status, and what the caller wants back when it lands."""

    ref: EgressIPRef
    resource_version: str | None
    """The version the status was computed from; the patch fails with 409 if it moved."""
    status: Mapping[str, Any]
    context: T
    """Handed back to `on_written` / `on_rejected` untouched."""


class Outcome(Enum):
    WRITTEN = "written"
    NOT_LEADER = "not-leader"
    CONFLICT = "conflict"
    GONE = "gone"
    REJECTED = "rejected"
    FAILED = "failed"


@dataclass
class _Object:
    """What the writer remembers about one object between syncs."""

    task: asyncio.Task[None] | None = None
    in_flight: Mapping[str, Any] | None = None
    stale: bool = False
    """A different status was submitted while a write was in flight."""
    written: tuple[str | None, Mapping[str, Any]] | None = None
    """(resourceVersion, status) of the last successful write."""
    failures: int = 0
    """Consecutive refusals or failures (not conflicts)."""
    conflicts: int = 0
    failed: Mapping[str, Any] | None = None
    """The status whose write failed last; held back until `retry_at`."""
    retry_at: float = float("-inf")
    last: Outcome | None = None


def _message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "")
        return str(body.get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


class StatusWriter(Generic[T]):
    def __init__(
        self,
        api: StatusAPI,
        *,
        is_leader: Callable[[], bool],
        poke: Callable[[], None],
        on_written: Callable[[StatusWrite[T]], None],
        on_rejected: Callable[[StatusWrite[T], str], None] | None = None,
        max_in_flight: int = 16,
        retry_base: float = 0.5,
        retry_max: float = 30.0,
        reject_base: float = 5.0,
        reject_max: float = 300.0,
        conflict_max: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        call_later: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        self._api = api
        self._is_leader = is_leader
        self._poke = poke
        self._on_written = on_written
        self._on_rejected = on_rejected
        self._slots = asyncio.Semaphore(max_in_flight)
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.reject_base = reject_base
        self.reject_max = reject_max
        self.conflict_max = conflict_max
        self._clock = clock
        self._call_later = call_later
        self._objects: dict[EgressIPRef, _Object] = {}

    # ------------------------------------------------------------ callers

    def submit(self, writes: Iterable[StatusWrite[T]]) -> None:
        """Start the writes that are due; returns without waiting for any of them."""
        now = self._clock()
        for w in writes:
            obj = self._objects.setdefault(w.ref, _Object())
            if obj.task is not None and not obj.task.done():
                if obj.in_flight != w.status:
                    obj.stale = True  # recompute once the write in flight lands
                continue
            if obj.written == (w.resource_version, w.status):
                continue  # ours, not yet back through the watch
            if obj.failed == w.status and now < obj.retry_at:
                continue  # backing off this very status; a timer pokes the sync later
            obj.in_flight = w.status
            obj.task = asyncio.get_running_loop().create_task(
                self._write(w, obj), name=f"status-{w.ref}"
            )

    def retain(self, live: Collection[EgressIPRef]) -> None:
        """Forget objects that no longer exist (and have no write in flight)."""
        for ref in [r for r, o in self._objects.items() if r not in live]:
            task = self._objects[ref].task
            if task is None or task.done():
                del self._objects[ref]

    def outcome(self, ref: EgressIPRef) -> Outcome | None:
        """How the last write of `ref` ended (None: never written, or forgotten)."""
        obj = self._objects.get(ref)
        return obj.last if obj is not None else None

    def backoff_left(self, ref: EgressIPRef) -> float:
        """Seconds before a failed status of `ref` may be written again (0 if none)."""
        obj = self._objects.get(ref)
        return max(0.0, obj.retry_at - self._clock()) if obj is not None else 0.0

    async def idle(self) -> None:
        """Wait until no write is in flight (tests, shutdown)."""
        while tasks := [o.task for o in self._objects.values() if o.task and not o.task.done()]:
            await asyncio.wait(tasks)

    async def aclose(self) -> None:
        """Cancel the writes in flight."""
        tasks = [o.task for o in self._objects.values() if o.task and not o.task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------ one write

    async def _write(self, w: StatusWrite[T], obj: _Object) -> None:
        try:
            async with self._slots:
                obj.last = await self._attempt(w, obj)
        finally:
            obj.in_flight = None
            if obj.stale:
                obj.stale = False
                self._poke()

    async def _attempt(self, w: StatusWrite[T], obj: _Object) -> Outcome:
        if not self._is_leader():
            return Outcome.NOT_LEADER  # lost the lease since the sync began: write nothing
        patch = {"metadata": {"resourceVersion": w.resource_version}, "status": w.status}
        try:
            await self._api.patch_status(w.ref, patch)
        except asyncio.CancelledError:
            raise
        except ApiException as exc:
            return self._refused(w, obj, exc)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return self._failed(w, obj, f"no answer: {exc!r}")
        except Exception as exc:
            # A bug, not the API server: still this object's problem alone.
            log.exception("egressip=%s status write raised", w.ref)
            return self._failed(w, obj, f"unexpected error: {exc!r}")
        obj.failures = obj.conflicts = 0
        obj.failed = None
        obj.retry_at = float("-inf")
        obj.written = (w.resource_version, w.status)
        try:
            self._on_written(w)
        except Exception:
            log.exception("egressip=%s after-write hook failed", w.ref)
        return Outcome.WRITTEN

    def _refused(self, w: StatusWrite[T], obj: _Object, exc: ApiException) -> Outcome:
        status = int(exc.status or 0)
        if status == 409:
            obj.conflicts += 1
            obj.written = None
            if obj.conflicts == 1:
                self._poke()
            else:
                self._later(min(0.05 * 2 ** (obj.conflicts - 2), self.conflict_max))
            log.info("egressip=%s changed under the status write: recomputing", w.ref)
            return Outcome.CONFLICT
        if status == 404:
            # Deleted while the sync ran: nothing to retry, nothing to say.
            # `retain` forgets it once the watch has dropped it too.
            log.debug("egressip=%s deleted before its status write: skipped", w.ref)
            obj.failures = obj.conflicts = 0
            obj.failed = obj.written = None
            obj.retry_at = float("-inf")
            return Outcome.GONE
        if 400 <= status < 500 and status != 429:
            obj.failures += 1
            delay = min(self.reject_base * 2 ** (obj.failures - 1), self.reject_max)
            self._hold(w, obj, delay)
            message = _message(exc)
            log.warning(
                "egressip=%s status refused (%d, attempt %d, next in %.0fs): %s",
                w.ref,
                status,
                obj.failures,
                delay,
                message,
            )
            if obj.failures == 1 and self._on_rejected is not None:
                try:
                    self._on_rejected(w, f"{status}: {message}")
                except Exception:
                    log.exception("egressip=%s rejection hook failed", w.ref)
            return Outcome.REJECTED
        return self._failed(w, obj, f"{status} {exc.reason}")

    def _failed(self, w: StatusWrite[T], obj: _Object, why: str) -> Outcome:
        obj.failures += 1
        delay = min(self.retry_base * 2 ** (obj.failures - 1), self.retry_max)
        self._hold(w, obj, delay)
        log.warning(
            "egressip=%s status write failed (attempt %d, retry in %.1fs): %s",
            w.ref,
            obj.failures,
            delay,
            why,
        )
        return Outcome.FAILED

    def _hold(self, w: StatusWrite[T], obj: _Object, delay: float) -> None:
        obj.failed = w.status
        obj.written = None
        obj.retry_at = self._clock() + delay
        self._later(delay)

    def _later(self, delay: float) -> None:
        if self._call_later is not None:
            self._call_later(delay, self._poke)
        else:
            asyncio.get_running_loop().call_later(delay, self._poke)
