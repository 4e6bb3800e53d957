"""Leader election against the real API server: one leader, takeover after the lease
lapses, a clean release hands over at once, and a leader that cannot renew stops."""

from __future__ import annotations

import asyncio
import time

import pytest
from kubernetes_asyncio import client

from staticegress.manager.leader import LeaderElector

pytestmark = pytest.mark.controlplane


async def _until(cond: object, seconds: float) -> float:
    start = time.monotonic()
    while not cond():  # type: ignore[operator]
        if time.monotonic() - start > seconds:
            raise AssertionError(f"condition not met within {seconds}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def _elector(api: client.ApiClient, ns: str, who: str) -> LeaderElector:
    return LeaderElector(
        api,
        namespace=ns,
        name="test-lease",
        identity=who,
        duration=1.0,
        renew_interval=0.2,
        margin=0.3,
    )


async def test_one_leader_and_takeover_after_the_lease_lapses(
    api: client.ApiClient, namespace: str
) -> None:
    a, b = _elector(api, namespace, "a"), _elector(api, namespace, "b")
    ta = asyncio.create_task(a.run())
    await _until(a.is_leader, 5)
    tb = asyncio.create_task(b.run())
    await asyncio.sleep(1.5)
    assert a.is_leader()
    assert not b.is_leader(), "two leaders at once"
    ta.cancel()  # a dies without releasing
    took = await _until(b.is_leader, 5)
    assert not a.is_leader(), "a dead leader must not think it still leads"
    assert took >= 0.5, "the standby took over before the lease could have lapsed"
    tb.cancel()
    await asyncio.gather(ta, tb, return_exceptions=True)


async def test_release_hands_over_at_once(api: client.ApiClient, namespace: str) -> None:
    a, b = _elector(api, namespace, "a"), _elector(api, namespace, "b")
    ta = asyncio.create_task(a.run())
    await _until(a.is_leader, 5)
    tb = asyncio.create_task(b.run())
    await asyncio.sleep(0.5)
    ta.cancel()
    await asyncio.gather(ta, return_exceptions=True)
    await a.release()
    took = await _until(b.is_leader, 5)
    assert took < 0.9, f"took {took:.2f}s after a clean release"
    tb.cancel()
    await asyncio.gather(tb, return_exceptions=True)


async def test_leader_that_cannot_renew_stops_leading(
    api: client.ApiClient, namespace: str
) -> None:
    a = _elector(api, namespace, "a")
    ta = asyncio.create_task(a.run())
    await _until(a.is_leader, 5)

    async def refuse(*args: object, **kwargs: object) -> object:
        raise client.exceptions.ApiException(status=503, reason="unreachable")

    a._leases.read_namespaced_lease = refuse  # type: ignore[method-assign]
    lost = await _until(lambda: not a.is_leader(), 3)
    # Leadership lapses by the leader's own clock before anyone else may take over.
    assert lost <= 1.0 - 0.3 + 0.25
    ta.cancel()
    await asyncio.gather(ta, return_exceptions=True)
