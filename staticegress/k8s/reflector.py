"""Reflector: keep an in-memory copy of one kind of Kubernetes object current.

The loop is list -> replace the store -> mark synced -> watch from the list's
resourceVersion -> apply each event; when the server answers 410 Gone (our
resourceVersion is too old) it lists again, and on any other error it backs
off and reconnects. kubernetes-asyncio's `Watch` does none of that by itself.

Invariants:
- `synced` is set only after a complete first list; callers must not act on
  the store before it (an empty store means "not known yet", not "nothing");
- the store holds the raw JSON dicts the API server sent, keyed by
  `namespace/name` (or `name` for cluster-scoped kinds); parsing into
  validated types is the caller's job, at its own edge;
- every request carries a client timeout and every watch a server timeout,
  so a dead connection is noticed and replaced;
- `on_change` is called after every store update and must only poke a
  coalescing trigger, never do the work itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio import watch
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.k8s.client import REQUEST_TIMEOUT

log = logging.getLogger(__name__)

ListFn = Callable[..., Awaitable[Any]]


def object_key(obj: dict[str, Any]) -> str:
    """`namespace/name`, or `name` for cluster-scoped objects."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


class Reflector:
    """Mirror one list endpoint (with its arguments) into `store`."""

    def __init__(
        self,
        *,
        name: str,
        list_fn: ListFn,
        list_args: tuple[Any, ...] = (),
        list_kwargs: dict[str, Any] | None = None,
        on_change: Callable[[], None] = lambda: None,
        watch_timeout: int = 240,
        max_backoff: float = 10.0,
    ) -> None:
        self.name = name
        self._list_fn = list_fn
        self._list_args = list_args
        self._list_kwargs = list_kwargs or {}
        self._on_change = on_change
        self._watch_timeout = watch_timeout
        self._max_backoff = max_backoff
        self.store: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self.resource_version = ""
        self.relists = 0
        self.connected = False
        """True while a watch stream is open; health checks read it."""
        self.last_connected = time.monotonic()
        """When the stream was last known good (monotonic seconds)."""
        self._relist = asyncio.Event()

    async def run(self) -> None:
        """List and watch forever; only cancellation stops it."""
        backoff = 0.2
        while True:
            try:
                await self._list()
                backoff = 0.2
                while True:  # a watch that times out resumes from where it was
                    if await self._watch_or_relist():
                        break
            except asyncio.CancelledError:
                raise
            except _GoneError:
                log.info("reflector=%s resourceVersion expired, listing again", self.name)
                continue
            except Exception as exc:  # any API or network failure: back off, reconnect
                self.connected = False
                log.warning("reflector=%s error=%s retry_in=%.1fs", self.name, _brief(exc), backoff)
                await asyncio.sleep(backoff * (1 + random.random() / 2))
                backoff = min(backoff * 2, self._max_backoff)

    def request_relist(self) -> None:
        """Drop the current watch and list again (e.g. after a network partition healed,
        when a surviving stream may deliver what it missed only much later)."""
        self._relist.set()

    async def _watch_or_relist(self) -> bool:
        """Watch until the stream ends (False) or a relist is requested (True)."""
        watch_task = asyncio.ensure_future(self._watch_until_expired())
        relist = asyncio.ensure_future(self._relist.wait())
        try:
            done, _ = await asyncio.wait({watch_task, relist}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            relist.cancel()
            if not watch_task.done():
                watch_task.cancel()
                await asyncio.gather(watch_task, return_exceptions=True)
        if relist in done:
            self._relist.clear()
            log.info("reflector=%s listing again on request", self.name)
            return True
        watch_task.result()  # re-raise what ended the stream, if anything
        return False

    async def _list(self) -> None:
        resp = await self._list_fn(
            *self._list_args,
            **self._list_kwargs,
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
        )
        body = json.loads(await resp.read())
        items = body.get("items") or []
        kind = str(body.get("kind", "")).removesuffix("List")
        api_version = body.get("apiVersion")
        fresh: dict[str, dict[str, Any]] = {}
        for item in items:
            # List responses omit kind/apiVersion on items; restore them so a
            # listed object looks exactly like a watched one.
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", api_version)
            fresh[object_key(item)] = item
        self.store = fresh
        self.resource_version = str(body.get("metadata", {}).get("resourceVersion", ""))
        self.relists += 1
        self.last_connected = time.monotonic()
        self.synced.set()
        self._on_change()

    async def _watch_until_expired(self) -> None:
        w = watch.Watch()
        try:
            stream = w.stream(
                self._list_fn,
                *self._list_args,
                **self._list_kwargs,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self._watch_timeout,
                _request_timeout=self._watch_timeout + REQUEST_TIMEOUT,
            )
            self.connected = True
            async for event in stream:
                self.last_connected = time.monotonic()
                self._apply(event)
            self.last_connected = time.monotonic()
        except ApiException as exc:
            if exc.status == 410:
                raise _GoneError from None
            raise
        finally:
            self.connected = False
            w.stop()
            await w.close()

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("raw_object") or event.get("object")
        if not isinstance(obj, dict):
            return
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _GoneError
            raise RuntimeError(f"watch error: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.resource_version = str(rv)
        if kind == "BOOKMARK":
            return
        key = object_key(obj)
        if kind == "DELETED":
            self.store.pop(key, None)
        else:
            self.store[key] = obj
        self._on_change()


class _GoneError(Exception):
    """The watch's resourceVersion is too old: list again."""


def _brief(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"[:200]
