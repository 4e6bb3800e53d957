"""The published selection against the real kube-apiserver: the CRD accepts what
the manager renders and refuses malformed objects, the publisher converges
(create, patch, delete) and writes nothing when nothing changed, and agents
read back exactly the members that were published."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.members import MEMBERS_PLURAL, MEMBERS_SELECTOR
from staticegress.api.v1alpha1 import GROUP, VERSION
from staticegress.k8s.members import MemberPublisher
from staticegress.k8s.reflector import Reflector
from staticegress.k8s.snapshot import published_selection
from staticegress.model.desired import Snapshot, select_members
from staticegress.render.members import render_member_shards
from tests import scenario


def _mixed() -> Snapshot:
    data = scenario.load("mixed")
    data["node"] = "node-1"
    return scenario.snapshot(data)


async def _converge(
    publisher: MemberPublisher, wanted: dict[str, Any], store: Reflector
) -> list[str]:
    errors = await publisher.publish(wanted, store.store)
    deadline = time.monotonic() + 10
    while {k.split("/")[1] for k in store.store} != set(wanted):
        assert time.monotonic() < deadline, (sorted(store.store), sorted(wanted))
        await asyncio.sleep(0.05)
    return errors


@pytest.mark.usefixtures("crd")
async def test_published_members_round_trip_and_converge(
    api: client.ApiClient, namespace: str
) -> None:
    custom = client.CustomObjectsApi(api)
    snap = _mixed()
    members, endpoints = select_members(snap, require_pool=False)
    # Two members per object: the billing rule's two pods take one shard, and
    # more pods would spill into a second.
    wanted = render_member_shards(
        snap.policies, members, dict(endpoints), namespace=namespace, shard_size=1
    )
    assert any(name.endswith("-1") for name in wanted), sorted(wanted)
    store = Reflector(
        name="members",
        list_fn=custom.list_namespaced_custom_object,
        list_args=(GROUP, VERSION, namespace, MEMBERS_PLURAL),
        list_kwargs={"label_selector": MEMBERS_SELECTOR},
    )
    task = asyncio.create_task(store.run())
    try:
        await asyncio.wait_for(store.synced.wait(), timeout=15)
        publisher = MemberPublisher(api, namespace=namespace)
        assert await _converge(publisher, wanted, store) == []
        read, dropped = published_selection(store.store, snap)
        assert dropped == 0
        assert read.members == members
        # Nothing changed: nothing written.
        writes = publisher.writes
        assert await publisher.publish(wanted, store.store) == []
        assert publisher.writes == writes
        # A pod leaves the billing rule: its shard is deleted, the other patched
        # or kept; the agents read the new selection.
        fewer = tuple(m for m in members if str(m.ip) != "10.244.3.7")
        wanted2 = render_member_shards(
            snap.policies, fewer, dict(endpoints), namespace=namespace, shard_size=1
        )
        assert await _converge(publisher, wanted2, store) == []
        deadline = time.monotonic() + 10
        while published_selection(store.store, snap)[0].members != fewer:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # A shard of a StaticEgressIP that no longer has that uid is left out.
        renamed = tuple(dataclasses.replace(p, uid="another") for p in snap.policies)
        reused = dataclasses.replace(snap, policies=renamed)
        assert published_selection(store.store, reused)[1] == len(wanted2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.usefixtures("crd")
async def test_the_crd_refuses_what_the_manager_never_writes(
    api: client.ApiClient, namespace: str
) -> None:
    custom = client.CustomObjectsApi(api)
    base = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "StaticEgressIPMembers",
        "metadata": {"name": "bad"},
        "policy": {"namespace": "default", "name": "x", "uid": "u"},
        "rule": 0,
    }
    for bad in (
        {"rule": 64},
        {"members": [{"ip": "10.244.1.2"}]},  # no node
        {"members": [{"ip": "10.244.1.2", "node": "n"}] * 1001},
        {"policy": {"namespace": "default"}},
    ):
        with pytest.raises(ApiException) as err:
            await custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, MEMBERS_PLURAL, {**base, **bad}
            )
        assert err.value.status == 422, bad
