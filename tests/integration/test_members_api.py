"""The published selection against the real kube-apiserver: the CRD accepts what
the manager renders and refuses malformed objects, the publisher converges
(create, patch, delete) and writes nothing when nothing changed, agents
read back exactly the members that were published, each agent's watches
select exactly the objects labelled for its node plus the endpoints ones,
and a relabel moves an object between nodes' watches."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.members import (
    MEMBERS_PLURAL,
    MEMBERS_SELECTOR,
    agent_selectors,
    gateway_label,
)
from staticegress.api.types import NodeName
from staticegress.api.v1alpha1 import GROUP, VERSION
from staticegress.k8s.members import MemberPublisher
from staticegress.k8s.reflector import Reflector
from staticegress.k8s.snapshot import published_selection
from staticegress.model.desired import Snapshot, select_members
from staticegress.render.members import render_member_shards, same_content
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


def _roles_cluster() -> Snapshot:
    """web's pods (node-c, node-d) leave through node-c, node-a its standby;
    api's pod (node-c) through node-b; manual names a Service without a
    selector, whose endpoint is api's pod, through node-d."""
    nodes = ("a", "b", "c", "d")
    data: dict[str, Any] = {
        "node": "node-a",
        "nodes": [
            {"name": f"node-{n}", "ip": f"198.51.100.1{i}", "podCIDR": f"10.244.{i}.0/24"}
            for i, n in enumerate(nodes, start=1)
        ],
        "namespaces": [{"name": "default"}],
        "services": [{"namespace": "default", "name": "manual", "selector": None}],
        "pods": [
            {"namespace": "default", "name": "web-c", "node": "node-c", "ip": "10.244.3.2"}
            | {"labels": {"app": "web"}},
            {"namespace": "default", "name": "web-d", "node": "node-d", "ip": "10.244.4.2"}
            | {"labels": {"app": "web"}},
            {"namespace": "default", "name": "api-c", "node": "node-c", "ip": "10.244.3.3"}
            | {"labels": {"app": "api"}},
        ],
        "staticegressips": [
            {
                "metadata": {"namespace": "default", "name": name, "uid": f"uid-{name}"}
                | {"creationTimestamp": f"2026-11-01T00:00:0{i}Z"},
                "spec": {"rules": [rule | {"egressip": f"198.51.100.20{i}"}]},
                "status": {"egressIPs": [status | {"egressIP": f"198.51.100.20{i}"}]},
            }
            for i, (name, rule, status) in enumerate(
                (
                    (
                        "web",
                        {"pod-selector": {"matchLabels": {"app": "web"}}},
                        {"gateway": "node-c", "standbys": ["node-a"]},
                    ),
                    (
                        "api",
                        {"pod-selector": {"matchLabels": {"app": "api"}}},
                        {"gateway": "node-b"},
                    ),
                    ("manual", {"service-name": "manual"}, {"gateway": "node-d"}),
                )
            )
        ],
    }
    for i, obj in enumerate(data["staticegressips"]):
        obj["spec"]["rules"][0]["cidr"] = f"203.0.11{i}.0/24"
    snap = scenario.snapshot(data)
    manual = (("default", "manual"), (IPv4Address("10.244.3.3"),))
    return dataclasses.replace(snap, endpoints=(manual,))


def _agent_reflectors(
    custom: client.CustomObjectsApi, namespace: str, node: str
) -> tuple[Reflector, Reflector]:
    """The two watches an agent keeps in `--selection published` mode."""
    gateway, endpoints = agent_selectors(node)

    def watch(name: str, selector: str) -> Reflector:
        return Reflector(
            name=f"{node}-{name}",
            list_fn=custom.list_namespaced_custom_object,
            list_args=(GROUP, VERSION, namespace, MEMBERS_PLURAL),
            list_kwargs={"label_selector": selector},
        )

    return watch("gateway", gateway), watch("endpoints", endpoints)


def _names(reflectors: tuple[Reflector, ...]) -> set[str]:
    return {key.split("/")[1] for r in reflectors for key in r.store}


async def _until(what: str, holds: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not holds():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@pytest.mark.usefixtures("crd")
async def test_each_agent_sees_its_labelled_objects_and_a_relabel_moves_them(
    api: client.ApiClient, namespace: str
) -> None:
    custom = client.CustomObjectsApi(api)
    snap = _roles_cluster()
    members, endpoints = select_members(snap, require_pool=False)
    wanted = render_member_shards(snap.policies, members, dict(endpoints), namespace=namespace)
    web, api_rule, manual, manual_endpoints = (
        "uid-web-0-0",
        "uid-api-0-0",
        "uid-manual-0-0",
        "uid-manual-0-endpoints-0",
    )
    assert set(wanted) == {web, api_rule, manual, manual_endpoints}
    everything = Reflector(
        name="manager",
        list_fn=custom.list_namespaced_custom_object,
        list_args=(GROUP, VERSION, namespace, MEMBERS_PLURAL),
        list_kwargs={"label_selector": MEMBERS_SELECTOR},
    )
    node_a = _agent_reflectors(custom, namespace, "node-a")
    node_b = _agent_reflectors(custom, namespace, "node-b")
    reflectors = (everything, *node_a, *node_b)
    tasks = [asyncio.create_task(r.run()) for r in reflectors]
    try:
        for r in reflectors:
            await asyncio.wait_for(r.synced.wait(), timeout=15)
        publisher = MemberPublisher(api, namespace=namespace)
        assert await _converge(publisher, wanted, everything) == []
        # node-a: web's members (its standby) and every endpoints object;
        # node-b: api's (its gateway), and the endpoints.
        await _until("node-a's view", lambda: _names(node_a) == {web, manual_endpoints})
        await _until("node-b's view", lambda: _names(node_b) == {api_rule, manual_endpoints})
        own = dataclasses.replace(snap, pods=())
        read_a, dropped = published_selection({**node_a[1].store, **node_a[0].store}, own)
        assert dropped == 0
        assert {str(m.ip) for m in read_a.members} == {"10.244.3.2", "10.244.4.2"}
        assert read_a.endpoints == snap.endpoints

        # node-b becomes web's standby instead of node-a: one patch moves the
        # object out of node-a's watch and into node-b's, without a relist.
        moved = tuple(
            dataclasses.replace(
                p,
                status=dataclasses.replace(
                    p.status,
                    egress_ips=tuple(
                        dataclasses.replace(a, standbys=(NodeName("node-b"),))
                        for a in p.status.egress_ips
                    ),
                ),
            )
            if p.ref.name == "web"
            else p
            for p in snap.policies
        )
        relabelled = render_member_shards(moved, members, dict(endpoints), namespace=namespace)
        assert set(relabelled) == set(wanted)
        writes = publisher.writes
        assert await publisher.publish(relabelled, everything.store) == []
        assert publisher.writes == writes + 1
        await _until("node-a lost web", lambda: _names(node_a) == {manual_endpoints})
        await _until(
            "node-b gained web", lambda: _names(node_b) == {web, api_rule, manual_endpoints}
        )
        assert all(r.relists == 1 for r in (*node_a, *node_b))
        # The label is gone from the object, not left with another value.
        obj = await custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, MEMBERS_PLURAL, web
        )
        labels = obj["metadata"]["labels"]
        assert gateway_label("node-a") not in labels
        assert {gateway_label("node-b"), gateway_label("node-c")} <= set(labels)
        # Converged: nothing more to write.
        await _until(
            "the manager's view",
            lambda: same_content(everything.store[f"{namespace}/{web}"], relabelled[web]),
        )
        assert await publisher.publish(relabelled, everything.store) == []
        assert publisher.writes == writes + 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
