"""The reflector against scripted API responses: list, watch, 410 Gone, disconnects."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from staticegress.k8s.reflector import Reflector


def _pod(name: str, rv: int) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": str(rv)}}


def _event(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


class _Content:
    def __init__(self, lines: list[bytes]) -> None:
        self._lines = iter(lines)

    async def readline(self) -> bytes:
        await asyncio.sleep(0)
        return next(self._lines, b"")


class _Response:
    def __init__(
        self, *, body: dict[str, Any] | None = None, lines: list[bytes] | None = None
    ) -> None:
        self._body = body
        self.content = _Content(lines or [])

    async def read(self) -> bytes:
        return json.dumps(self._body).encode()

    def close(self) -> None:
        pass

    def release(self) -> None:
        pass


class _Script:
    """A fake list endpoint that answers lists and watches from a script."""

    def __init__(self, steps: list[Any]) -> None:
        self._steps: Iterator[Any] = iter(steps)
        self.calls: list[dict[str, Any]] = []
        self.done = asyncio.Event()

    async def __call__(self, *args: Any, **kwargs: Any) -> _Response:
        self.calls.append(kwargs)
        try:
            step = next(self._steps)
        except StopIteration:
            self.done.set()
            await asyncio.Event().wait()  # hang like an idle server until cancelled
            raise AssertionError("unreachable") from None
        if isinstance(step, Exception):
            raise step
        return step


def _list(rv: int, *pods: dict[str, Any]) -> _Response:
    return _Response(
        body={
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(rv)},
            "items": list(pods),
        }
    )


async def _run(script: _Script) -> Reflector:
    changes: list[int] = []
    r = Reflector(
        name="test", list_fn=script, on_change=lambda: changes.append(1), max_backoff=0.01
    )
    task = asyncio.create_task(r.run())
    await asyncio.wait_for(script.done.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert changes, "on_change never called"
    return r


async def test_list_then_watch_applies_events_in_order() -> None:
    script = _Script(
        [
            _list(10, _pod("a", 5), _pod("z", 6)),
            _Response(
                lines=[
                    _event("ADDED", _pod("b", 11)),
                    _event("MODIFIED", _pod("a", 12)),
                    _event("DELETED", _pod("b", 13)),
                    _event("BOOKMARK", {"metadata": {"resourceVersion": "20"}}),
                ]
            ),
        ]
    )
    r = await _run(script)
    assert sorted(r.store) == ["ns/a", "ns/z"]
    assert r.store["ns/a"]["metadata"]["resourceVersion"] == "12"
    assert r.store["ns/z"]["kind"] == "Pod"  # restored on listed items
    assert r.synced.is_set()
    assert script.calls[1]["resource_version"] == "10"
    # After the stream ended, the watch resumed from the bookmark without listing.
    assert script.calls[2]["resource_version"] == "20"
    assert r.relists == 1


async def test_gone_relists_and_replaces_the_store() -> None:
    gone = {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "code": 410,
            "reason": "Expired",
            "message": "too old resource version",
        },
    }
    script = _Script(
        [
            _list(10, _pod("a", 5), _pod("b", 6)),
            _Response(lines=[json.dumps(gone).encode() + b"\n"]),
            _list(30, _pod("c", 29)),
        ]
    )
    r = await _run(script)
    # The relist is the truth: objects deleted while we were away are gone.
    assert sorted(r.store) == ["ns/c"]
    assert r.relists == 2
    assert script.calls[3]["resource_version"] == "30"


async def test_errors_back_off_and_keep_the_last_good_store() -> None:
    script = _Script(
        [
            _list(10, _pod("a", 5)),
            ConnectionResetError("peer went away"),
            OSError("connection refused"),
            _list(15, _pod("a", 5), _pod("d", 14)),
        ]
    )
    r = await _run(script)
    assert sorted(r.store) == ["ns/a", "ns/d"]
    assert r.synced.is_set()


async def test_not_synced_until_a_list_succeeds() -> None:
    script = _Script([OSError("down"), OSError("still down")])
    r = Reflector(name="t", list_fn=script, max_backoff=0.01)
    task = asyncio.create_task(r.run())
    await asyncio.wait_for(script.done.wait(), timeout=5)
    assert not r.synced.is_set()
    assert r.store == {}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class _Hanging(_Response):
    """A watch stream that stays open and silent, as one cut off by a partition."""

    def __init__(self) -> None:
        super().__init__(lines=[])

        async def never() -> bytes:
            await asyncio.Event().wait()
            return b""

        self.content.readline = never  # type: ignore[method-assign]


async def test_request_relist_replaces_a_silent_watch() -> None:
    script = _Script([_list(10, _pod("a", 5)), _Hanging(), _list(20, _pod("b", 19))])
    r = Reflector(name="t", list_fn=script, max_backoff=0.01)
    task = asyncio.create_task(r.run())
    for _ in range(100):
        await asyncio.sleep(0)
    assert sorted(r.store) == ["ns/a"]
    r.request_relist()
    await asyncio.wait_for(script.done.wait(), timeout=5)
    assert sorted(r.store) == ["ns/b"]
    assert r.relists == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ------------------------------------------------------------------ silence


async def test_a_silent_watch_is_replaced_from_where_it_was() -> None:
    script = _Script(
        [
            _list(10, _pod("a", 5)),
            _Hanging(),  # connected, then nothing: the server was blackholed
            _Response(lines=[_event("ADDED", _pod("b", 11))]),
        ]
    )
    r = Reflector(name="pods", list_fn=script, max_backoff=0.01, silence_limit=0.3)
    task = asyncio.create_task(r.run())
    try:
        await asyncio.sleep(0.15)
        assert r.connected
        assert 0.1 < r.silent_for() < 0.3
        await asyncio.wait_for(script.done.wait(), timeout=5)
        assert r.reconnects == 1
        assert r.relists == 1, "a silent watch resumes, it does not list again"
        assert [c.get("resource_version") for c in script.calls[1:3]] == ["10", "10"]
        assert sorted(r.store) == ["ns/a", "ns/b"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_watch_without_events_is_replaced_after_the_idle_limit() -> None:
    script = _Script([_list(10), _Hanging(), _Response(lines=[])])
    r = Reflector(name="t", list_fn=script, silence_limit=10.0, idle_limit=0.2)
    task = asyncio.create_task(r.run())
    try:
        await asyncio.wait_for(script.done.wait(), timeout=5)
        assert r.reconnects == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_refused_list_keeps_the_store() -> None:
    class _Refused(_Response):
        status = 403
        reason = "Forbidden"

    script = _Script([_list(10, _pod("a", 5)), OSError("reset"), _Refused(body={"items": []})])
    r = Reflector(name="t", list_fn=script, max_backoff=0.01)
    task = asyncio.create_task(r.run())
    try:
        await asyncio.wait_for(script.done.wait(), timeout=5)
        assert sorted(r.store) == ["ns/a"], "a 403 must not empty the store"
        assert r.relists == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_healthz_names_the_silent_watches_and_livez_stays_up() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from staticegress.agent.health import HealthState, make_app, watches_heard
    from staticegress.agent.metrics import Registry

    quiet = _Script([_list(10, _pod("a", 5)), _Hanging()])
    gone = _Script([_list(10, _pod("a", 5)), OSError("no route to host")])
    reflectors = [
        Reflector(name="pods", list_fn=quiet, silence_limit=60.0),
        Reflector(name="nodes", list_fn=gone, max_backoff=0.05, silence_limit=60.0),
    ]
    tasks = [asyncio.create_task(r.run()) for r in reflectors]
    state = HealthState(
        lambda: watches_heard(reflectors, limit=0.3), lambda: (True, "ok"), Registry()
    )
    client = TestClient(TestServer(make_app(state)))
    await client.start_server()
    try:
        resp = await client.get("/healthz")
        assert (resp.status, await resp.text()) == (200, "ok\n")
        await asyncio.sleep(0.5)
        resp = await client.get("/healthz")
        text = await resp.text()
        assert resp.status == 503
        # Both are silent: one open but quiet, one that cannot reconnect.
        assert re.fullmatch(r"watches silent: pods \ds, nodes \ds\n", text), text
        assert (await client.get("/livez")).status == 200
    finally:
        await client.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_tcp_keepalive_answers_count_as_hearing_the_server() -> None:
    """A live server that sends nothing is still heard, through its kernel's
    answers to our keepalive probes (real sockets on loopback)."""
    from types import SimpleNamespace

    from staticegress.k8s.reflector import KEEPALIVE_IDLE, _keepalive, _tcp_quiet_seconds

    accepted: list[asyncio.StreamWriter] = []

    async def on_client(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _probed_r, probed_w = await asyncio.open_connection("127.0.0.1", port)
    _plain_r, plain_w = await asyncio.open_connection("127.0.0.1", port)
    try:
        fake = SimpleNamespace(connection=SimpleNamespace(transport=probed_w.transport))
        sock = _keepalive(fake)
        assert sock is not None
        await asyncio.sleep(KEEPALIVE_IDLE + 1.5)
        probed = _tcp_quiet_seconds(sock)
        plain = _tcp_quiet_seconds(plain_w.transport.get_extra_info("socket"))
        assert probed is not None
        assert plain is not None
        assert plain >= KEEPALIVE_IDLE + 1.4
        assert probed < KEEPALIVE_IDLE + 0.5, (probed, plain)
    finally:
        for w in (probed_w, plain_w, *accepted):
            w.close()
        server.close()
        await server.wait_closed()


def _page(rv: int, token: str, *pods: dict[str, Any]) -> _Response:
    page = _list(rv, *pods)
    assert page._body is not None
    page._body["metadata"]["continue"] = token
    return page


async def test_a_list_is_read_in_pages_and_replaces_the_store_at_the_end() -> None:
    seen: list[list[str]] = []
    script = _Script(
        [
            _list(10, _pod("old", 5)),
            _Response(lines=[]),  # the watch ends: list again (below, after a 410)
            _Response(
                lines=[
                    json.dumps(
                        {"type": "ERROR", "object": {"kind": "Status", "code": 410}}
                    ).encode()
                    + b"\n"
                ]
            ),
            _page(40, "t1", _pod("a", 31)),
            _page(40, "t2", _pod("b", 32)),
            _page(40, "", _pod("c", 33)),
        ]
    )
    r = Reflector(name="test", list_fn=script, max_backoff=0.01, page_size=1)
    r._on_change = lambda: seen.append(sorted(r.store))
    task = asyncio.create_task(r.run())
    await asyncio.wait_for(script.done.wait(), timeout=5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert sorted(r.store) == ["ns/a", "ns/b", "ns/c"]
    # Never a partial store: only the first list and the complete second one.
    assert seen == [["ns/old"], ["ns/a", "ns/b", "ns/c"]]
    assert [c.get("limit") for c in script.calls[3:6]] == [1, 1, 1]
    assert [c.get("_continue") for c in script.calls[3:6]] == [None, "t1", "t2"]
    assert script.calls[6]["resource_version"] == "40"


async def test_a_list_failing_between_pages_keeps_the_last_store() -> None:
    script = _Script(
        [
            _list(10, _pod("old", 5)),
            _Response(
                lines=[json.dumps({"type": "ERROR", "object": {"code": 410}}).encode() + b"\n"]
            ),
            _page(40, "t1", _pod("a", 31)),
            OSError("connection reset"),
        ]
    )
    r = Reflector(name="test", list_fn=script, max_backoff=0.01, page_size=1)
    task = asyncio.create_task(r.run())
    await asyncio.wait_for(script.done.wait(), timeout=5)
    # The next attempt starts again from the first page.
    assert "_continue" not in script.calls[-1]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert sorted(r.store) == ["ns/old"]


async def test_stored_objects_are_trimmed_from_lists_and_events() -> None:
    script = _Script(
        [
            _list(10, _pod("a", 5)),
            _Response(lines=[_event("ADDED", _pod("b", 11))]),
        ]
    )
    r = Reflector(
        name="test",
        list_fn=script,
        max_backoff=0.01,
        trim=lambda o: {"metadata": {"name": o["metadata"]["name"], "trimmed": True}},
    )
    task = asyncio.create_task(r.run())
    await asyncio.wait_for(script.done.wait(), timeout=5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert all(o["metadata"]["trimmed"] for o in r.store.values())
    assert sorted(r.store) == ["ns/a", "ns/b"]


async def test_a_change_to_trimmed_away_fields_updates_the_store_without_a_sync() -> None:
    """A Node heartbeat changes nothing an agent reads; it must not recompute
    every agent's state, but the stored resourceVersion still follows."""

    def node(rv: int, heartbeat: str, ready: str) -> dict[str, Any]:
        return {
            "metadata": {"name": "n1", "resourceVersion": str(rv)},
            "status": {"heartbeat": heartbeat, "ready": ready},
        }

    script = _Script(
        [
            _list(10, node(5, "t0", "True")),
            _Response(
                lines=[
                    _event("MODIFIED", node(11, "t1", "True")),
                    _event("MODIFIED", node(12, "t2", "True")),
                    _event("MODIFIED", node(13, "t3", "False")),
                    _event("MODIFIED", node(14, "t4", "False")),
                ]
            ),
        ]
    )
    changes: list[str] = []

    def on_change() -> None:
        changes.append(r.store["n1"]["status"]["ready"])

    r = Reflector(
        name="test",
        list_fn=script,
        on_change=on_change,
        max_backoff=0.01,
        trim=lambda o: {"metadata": o["metadata"], "status": {"ready": o["status"]["ready"]}},
    )
    task = asyncio.create_task(r.run())
    await asyncio.wait_for(script.done.wait(), timeout=5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert changes == ["True", "False"], "one call for the list, one for the real change"
    assert r.store["n1"]["metadata"]["resourceVersion"] == "14"
