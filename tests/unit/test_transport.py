"""decide_transport: one transport for the cluster, through a fake record store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

import pytest

from staticegress.dataplane.transport import (
    KEY_DECIDED_BY,
    KEY_TRANSPORT,
    Transport,
    TransportRecordError,
    decide_transport,
)


class FakeStore:
    """A record with the API server's create semantics (the first create wins)."""

    def __init__(self, data: Mapping[str, str] | None = None) -> None:
        self.data = dict(data) if data is not None else None
        self.creates = 0

    async def get(self) -> Mapping[str, str] | None:
        await asyncio.sleep(0)  # let racing nodes interleave
        return dict(self.data) if self.data is not None else None

    async def create(self, data: Mapping[str, str]) -> bool:
        await asyncio.sleep(0)
        self.creates += 1
        if self.data is not None:
            return False
        self.data = dict(data)
        return True


def detects(t: Transport) -> Callable[[], Awaitable[tuple[Transport, str]]]:
    async def detect() -> tuple[Transport, str]:
        return t, f"routes say {t}"

    return detect


async def test_first_node_records_its_detection() -> None:
    store = FakeStore()
    d = await decide_transport(store, node="node-1", flag="auto", detect=detects("direct"))
    assert (d.transport, d.source, d.mismatch) == ("direct", "first", None)
    assert store.data is not None
    assert store.data[KEY_TRANSPORT] == "direct"
    assert store.data[KEY_DECIDED_BY] == "node-1"


async def test_later_node_follows_the_record_and_reports_disagreement() -> None:
    store = FakeStore()
    await decide_transport(store, node="node-1", flag="auto", detect=detects("vxlan"))
    d = await decide_transport(store, node="node-2", flag="auto", detect=detects("direct"))
    assert d.transport == "vxlan"
    assert d.source == "cluster"
    assert d.mismatch is not None
    assert "node-2 detects direct" in d.mismatch
    assert "recorded by node-1" in d.mismatch
    agree = await decide_transport(store, node="node-3", flag="auto", detect=detects("vxlan"))
    assert (agree.transport, agree.mismatch) == ("vxlan", None)


async def test_racing_nodes_converge_on_the_first_write() -> None:
    store = FakeStore()
    decisions = await asyncio.gather(
        *(
            decide_transport(
                store, node=f"node-{i}", flag="auto", detect=detects("direct" if i % 2 else "vxlan")
            )
            for i in range(6)
        )
    )
    assert store.data is not None
    assert {d.transport for d in decisions} == {store.data[KEY_TRANSPORT]}
    assert sum(1 for d in decisions if d.source == "first") == 1
    assert store.creates >= 2, "the race was real: several nodes tried to record"


async def test_operator_record_is_followed() -> None:
    store = FakeStore({KEY_TRANSPORT: "vxlan"})
    d = await decide_transport(store, node="node-1", flag="auto", detect=detects("direct"))
    assert d.transport == "vxlan"
    assert d.mismatch is not None
    assert "set by the operator" in d.mismatch
    assert store.creates == 0


async def test_flag_overrides_the_record_and_says_so() -> None:
    store = FakeStore({KEY_TRANSPORT: "direct", KEY_DECIDED_BY: "node-1"})
    d = await decide_transport(store, node="node-2", flag="vxlan", detect=detects("direct"))
    assert (d.transport, d.source) == ("vxlan", "flag")
    assert d.mismatch is not None
    assert "overrides the cluster's direct" in d.mismatch


async def test_flag_records_itself_when_nothing_is_recorded() -> None:
    store = FakeStore()

    async def never() -> tuple[Transport, str]:
        raise AssertionError("an explicit flag needs no detection")

    d = await decide_transport(store, node="node-1", flag="vxlan", detect=never)
    assert (d.transport, d.mismatch) == ("vxlan", None)
    follower = await decide_transport(store, node="node-2", flag="auto", detect=detects("vxlan"))
    assert follower.transport == "vxlan"


async def test_an_invalid_record_is_never_guessed_around() -> None:
    store = FakeStore({KEY_TRANSPORT: "geneve"})
    with pytest.raises(TransportRecordError, match="geneve"):
        await decide_transport(store, node="node-1", flag="auto", detect=detects("direct"))
    flagged = await decide_transport(store, node="node-1", flag="direct", detect=detects("direct"))
    assert flagged.transport == "direct"
    assert flagged.mismatch is not None
    assert "invalid" in flagged.mismatch
