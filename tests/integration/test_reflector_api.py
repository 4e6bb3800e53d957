"""The reflector against the real kube-apiserver: it lists and watches, reads the
stream itself, and a quiet watch stays heard through TCP keepalive answers
instead of being reconnected."""

from __future__ import annotations

import asyncio
import time

from kubernetes_asyncio import client

from staticegress.k8s.reflector import KEEPALIVE_IDLE, Reflector


async def test_a_quiet_watch_stays_heard_and_events_arrive(
    api: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    changes: list[float] = []
    r = Reflector(
        name="configmaps",
        list_fn=core.list_namespaced_config_map,
        list_args=(namespace,),
        on_change=lambda: changes.append(time.monotonic()),
        silence_limit=KEEPALIVE_IDLE + 2.0,
    )
    task = asyncio.create_task(r.run())
    try:
        await asyncio.wait_for(r.synced.wait(), timeout=15)
        deadline = time.monotonic() + 10
        while not r.connected:
            assert time.monotonic() < deadline, "the watch never connected"
            await asyncio.sleep(0.05)
        # Quiet for twice the keepalive idle time: no event, no bookmark, yet
        # heard (the server's kernel answers our probes) and never replaced.
        worst = 0.0
        for _ in range(int((KEEPALIVE_IDLE * 2 + 1) / 0.1)):
            worst = max(worst, r.silent_for())
            await asyncio.sleep(0.1)
        assert r.connected
        assert r.reconnects == 0
        assert worst < KEEPALIVE_IDLE + 1.5, f"silent for {worst:.1f}s on a live server"
        await core.create_namespaced_config_map(
            namespace, {"metadata": {"name": "hello"}, "data": {"k": "v"}}
        )
        deadline = time.monotonic() + 10
        while f"{namespace}/hello" not in r.store:
            assert time.monotonic() < deadline, "the event never arrived"
            await asyncio.sleep(0.05)
        assert r.relists == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_paged_list_gets_every_object(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    for i in range(5):
        await core.create_namespaced_config_map(
            namespace, {"metadata": {"name": f"page-{i}"}, "data": {"k": "v" * 100}}
        )
    pages: list[object] = []

    async def listing(*args: object, **kwargs: object) -> object:
        if not kwargs.get("watch"):
            pages.append(kwargs.get("_continue"))
        return await core.list_namespaced_config_map(*args, **kwargs)

    r = Reflector(
        name="configmaps",
        list_fn=listing,
        list_args=(namespace,),
        page_size=2,
        trim=lambda o: {"metadata": o["metadata"]},
    )
    task = asyncio.create_task(r.run())
    try:
        await asyncio.wait_for(r.synced.wait(), timeout=15)
        names = {k.split("/")[1] for k in r.store}
        assert {f"page-{i}" for i in range(5)} <= names
        assert len(pages) >= 3, pages
        assert pages[0] is None, pages
        assert all(pages[1:]), pages
        assert all("data" not in o for o in r.store.values())
        # The watch resumes from the paged list's resourceVersion: a change arrives.
        await core.delete_namespaced_config_map("page-0", namespace)
        deadline = time.monotonic() + 10
        while f"{namespace}/page-0" in r.store:
            assert time.monotonic() < deadline, "the deletion never arrived"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
