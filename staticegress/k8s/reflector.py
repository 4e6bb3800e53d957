"""Reflector: keep an in-memory copy of one kind of Kubernetes object current.

The loop is list -> replace the store -> mark synced -> watch from the list's
resourceVersion -> apply each event; when the server answers 410 Gone (our
resourceVersion is too old) it lists again, and on any other error it backs
off and reconnects. kubernetes-asyncio's `Watch` does none of that by itself,
so the stream is read here, line by line.

A watch must never hang on a dead server (one blackholed: packets dropped,
no reset), and a quiet watch must not be torn down for being quiet. So:
- every connect times out after `CONNECT_TIMEOUT`, every list after
  `REQUEST_TIMEOUT`, and a watch must answer its headers within
  `REQUEST_TIMEOUT`;
- an open watch is *heard* whenever a byte arrives (an event, a bookmark,
  the server ending the stream at its `timeout_seconds`) and whenever the
  server's kernel acknowledges one of our TCP keepalive probes (sent after
  `KEEPALIVE_IDLE` seconds of quiet, read back through TCP_INFO): a live
  server costs a few empty packets, never a reconnect;
- a watch not heard for `silence_limit` seconds (default 8) is abandoned and
  replaced; TCP_USER_TIMEOUT makes the kernel give up on it at the same time,
  in case we are busy;
- a watch that brings no event or bookmark for `idle_limit` seconds is
  replaced too, even if the TCP peer still answers (a proxy in front of a
  wedged server): with `allowWatchBookmarks` the server sends a bookmark at
  least every minute;
- `silent_for()` is the time since the server was last heard (by the
  current stream, or by the last list or stream before it); the agent's
  `/healthz` reports every reflector silent for more than 10 s.

Invariants:
- `synced` is set only after a complete first list; callers must not act on
  the store before it (an empty store means "not known yet", not "nothing");
- the store holds the JSON dicts the API server sent, keyed by
  `namespace/name` (or `name` for cluster-scoped kinds), trimmed by `trim`
  when one is given (`k8s.trim`: the fields the parsers read, in the API's
  shape); parsing into validated types is the caller's job, at its own edge;
- a list is read in pages of `page_size` objects (limit/continue; 100 by
  default: one page of realistic Nodes is about 1 MB of JSON), so the
  largest body held at once is one page, not the whole cluster; the store
  is replaced only once the last page arrived, and the watch resumes from
  the list's resourceVersion (every page of one list shares it);
- a failed list (any non-2xx answer) never replaces the store;
- `on_change` is called after every store update and must only poke a
  coalescing trigger, never do the work itself; with `trim`, an event that
  leaves the trimmed object as it was (but for its resourceVersion) updates
  the store without calling it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.k8s.client import REQUEST_TIMEOUT
from staticegress.k8s.trim import Trim

log = logging.getLogger(__name__)

ListFn = Callable[..., Awaitable[Any]]

CONNECT_TIMEOUT = 5.0
"""Seconds to establish a TCP connection to the API server."""
KEEPALIVE_IDLE = 2
"""Seconds of quiet on a watch before the kernel probes the server."""
KEEPALIVE_INTERVAL = 1
SILENCE_LIMIT = 8.0
"""Seconds without hearing the server before a watch is replaced."""
IDLE_LIMIT = 75.0
"""Seconds without an event or a bookmark before a watch is replaced."""


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
        silence_limit: float = SILENCE_LIMIT,
        idle_limit: float = IDLE_LIMIT,
        clock: Callable[[], float] = time.monotonic,
        trim: Trim | None = None,
        page_size: int | None = 100,
    ) -> None:
        self.name = name
        self._trim = trim
        self._page_size = page_size
        self._list_fn = list_fn
        self._list_args = list_args
        self._list_kwargs = list_kwargs or {}
        self._on_change = on_change
        self._watch_timeout = watch_timeout
        self._max_backoff = max_backoff
        self.silence_limit = silence_limit
        self.idle_limit = idle_limit
        self._clock = clock
        self.store: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self.resource_version = ""
        self.relists = 0
        self.reconnects = 0
        """Watches abandoned because the server went silent."""
        self.connected = False
        """True while a watch stream is open."""
        self.last_heard = clock()
        """When the server last sent us something: a list, an event, a bookmark,
        the end of a stream (monotonic seconds)."""
        self._last_event = self.last_heard
        self._sock: Any = None
        self._relist = asyncio.Event()

    @property
    def last_connected(self) -> float:
        """The older name of `last_heard`, still read by callers."""
        return self.last_heard

    def silent_for(self) -> float:
        """Seconds since the server was last heard, TCP keepalive answers included."""
        now = self._clock()
        heard = self.last_heard
        if self.connected and self._sock is not None:
            since_ack = _tcp_quiet_seconds(self._sock)
            if since_ack is not None:
                heard = max(heard, now - since_ack)
        return max(0.0, now - heard)

    async def run(self) -> None:
        """List and watch forever; only cancellation stops it."""
        backoff = 0.2
        while True:
            try:
                await self._list()
                backoff = 0.2
                while True:  # a watch that times out resumes from where it was
                    try:
                        if await self._watch_or_relist():
                            break
                    except _SilentError as exc:
                        # Resume from our resourceVersion at once: if the
                        # server is gone, the connect fails and we back off.
                        self.reconnects += 1
                        log.warning("reflector=%s %s: replacing the watch", self.name, exc)
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
        fresh: dict[str, dict[str, Any]] = {}
        token = ""
        while True:
            paging: dict[str, Any] = {}
            if self._page_size:
                paging["limit"] = self._page_size
            if token:
                paging["_continue"] = token
            resp = await self._list_fn(
                *self._list_args,
                **self._list_kwargs,
                **paging,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(
                    total=REQUEST_TIMEOUT, sock_connect=CONNECT_TIMEOUT
                ),
            )
            try:
                raw = await resp.read()
            finally:
                resp.release()
            # An expired continue token (410) fails the whole list: run() lists
            # again from the first page, as after any failed list.
            _raise_for_status(resp, raw)
            body = json.loads(raw)
            del raw
            kind = str(body.get("kind", "")).removesuffix("List")
            api_version = body.get("apiVersion")
            for item in body.get("items") or []:
                # List responses omit kind/apiVersion on items; restore them so a
                # listed object looks exactly like a watched one.
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", api_version)
                fresh[object_key(item)] = self._trim(item) if self._trim else item
            meta = body.get("metadata") or {}
            self._heard(event=True)
            token = str(meta.get("continue") or "")
            if not token:
                break
        self.store = fresh
        self.resource_version = str(meta.get("resourceVersion", ""))
        self.relists += 1
        self.synced.set()
        self._on_change()

    def _heard(self, *, event: bool) -> None:
        self.last_heard = self._clock()
        if event:
            self._last_event = self.last_heard

    async def _watch_until_expired(self) -> None:
        """One watch request, read until the server ends it; raises when it is
        refused, broken or silent."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
        # cancellation that races with the answer (a relist request would hang).
        async with asyncio.timeout(REQUEST_TIMEOUT):
            resp = await self._list_fn(
                *self._list_args,
                **self._list_kwargs,
                watch=True,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self._watch_timeout,
                _preload_content=False,
                # No read timeout: silence is judged below, where TCP
                # keepalive answers count as hearing the server.
                _request_timeout=aiohttp.ClientTimeout(
                    connect=REQUEST_TIMEOUT, sock_connect=CONNECT_TIMEOUT
                ),
            )
        reader: asyncio.Future[None] | None = None
        try:
            if not 200 <= getattr(resp, "status", 200) <= 299:
                _raise_for_status(resp, await resp.read())
            self._sock = _keepalive(resp)
            self.connected = True
            self._heard(event=True)
            reader = asyncio.ensure_future(self._read(resp))
            while not reader.done():
                silent = self.silent_for()
                idle = self._clock() - self._last_event
                if silent >= self.silence_limit:
                    raise _SilentError(f"nothing heard for {silent:.1f}s")
                if idle >= self.idle_limit:
                    raise _SilentError(f"no event or bookmark for {idle:.1f}s")
                wait = min(self.silence_limit - silent, self.idle_limit - idle, 1.0)
                await asyncio.wait({reader}, timeout=max(wait, 0.01))
            reader.result()
        finally:
            if reader is not None and not reader.done():
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            # Keep what the kernel heard: silence runs on from the last
            # keepalive answer, not from the last event, once the stream is gone.
            self.last_heard = self._clock() - self.silent_for()
            self.connected = False
            self._sock = None
            resp.close()

    async def _read(self, resp: Any) -> None:
        while True:
            line = await resp.content.readline()
            if not line:
                self._heard(event=True)  # the server ended the stream: it is alive
                return
            self._heard(event=True)
            if line.strip():
                self._apply(json.loads(line))

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            if "code" in event:  # a bare Status instead of an event
                if event.get("code") == 410:
                    raise _GoneError
                raise RuntimeError(f"watch error: {event.get('message')}")
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
        elif self._trim:
            kept = self._trim(obj)
            before = self.store.get(key)
            self.store[key] = kept
            if before is not None and _same_but_version(before, kept):
                # A change only to fields nobody reads (a Node's heartbeat time,
                # a Pod's container restart count, managedFields) must not make
                # every agent recompute everything: Nodes alone change every few
                # seconds somewhere in a large cluster.
                return
        else:
            self.store[key] = obj
        self._on_change()


def _same_but_version(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal objects once their resourceVersions are set aside."""
    meta_a, meta_b = a.get("metadata") or {}, b.get("metadata") or {}
    if {k: v for k, v in a.items() if k != "metadata"} != {
        k: v for k, v in b.items() if k != "metadata"
    }:
        return False
    strip = "resourceVersion"
    return {k: v for k, v in meta_a.items() if k != strip} == {
        k: v for k, v in meta_b.items() if k != strip
    }


class _GoneError(Exception):
    """The watch's resourceVersion is too old: list again."""


class _SilentError(Exception):
    """Nothing heard from the server for too long: reconnect."""


def _raise_for_status(resp: Any, body: bytes) -> None:
    status = getattr(resp, "status", 200)
    if 200 <= status <= 299:
        return
    if status == 410:
        raise _GoneError
    reason = getattr(resp, "reason", "") or ""
    with contextlib.suppress(ValueError, AttributeError):
        reason = json.loads(body).get("message") or reason
    raise ApiException(status=status, reason=reason)


def _keepalive(resp: Any) -> Any:
    """Turn on TCP keepalive probes for the watch's connection; return its socket
    (None when there is none, as with scripted responses)."""
    conn = getattr(resp, "connection", None)
    transport = getattr(conn, "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        # Unacknowledged data or probes for this long: the kernel drops the
        # connection itself, so a read blocked on it fails too.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(SILENCE_LIMIT * 1000))
    except (OSError, AttributeError) as exc:
        log.debug("no TCP keepalive on the watch connection: %s", exc)
        return None
    return sock


_TCP_INFO_LEN = 104
_LAST_DATA_RECV = 52
"""Offset of tcpi_last_data_recv in struct tcp_info; tcpi_last_ack_recv follows."""


def _tcp_quiet_seconds(sock: Any) -> float | None:
    """Seconds since the peer last sent us data or an acknowledgement."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        data_ms, ack_ms = struct.unpack_from("=II", info, _LAST_DATA_RECV)
    except (OSError, AttributeError, struct.error):
        return None
    return min(int(data_ms), int(ack_ms)) / 1000.0


def _brief(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"[:200]
