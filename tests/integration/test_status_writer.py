"""Status writes against the real kube-apiserver: the duplicate-egress-IP reproduction.

Object `a/x` lists one egress IP in two rules; object `b/other` is an
ordinary neighbour. The model must give `a/x` one status entry for that IP
(the status list is a map keyed by egress IP; a second entry is refused with
422 Duplicate value), both objects must get a valid status in the same round,
and a status the API server does refuse, or an object deleted between
compute and write, must not keep any other object from being written.
"""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.core import parse_node
from staticegress.api.types import EgressIPRef, NodeName
from staticegress.api.v1alpha1 import API_VERSION, GROUP, KIND, PLURAL, VERSION
from staticegress.k8s.snapshot import Invalid, parse_policy
from staticegress.k8s.status import KubeStatusAPI, Outcome, StatusWrite, StatusWriter
from staticegress.model.assign import assign_gateways, status_body

pytestmark = pytest.mark.controlplane

SHARED = "198.51.100.200"
OTHER = "198.51.100.201"
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
NODES = [
    parse_node(
        {
            "metadata": {"name": f"node-{i}", "labels": {"staticegress.io/gateway": "true"}},
            "status": {"addresses": [{"type": "InternalIP", "address": f"198.51.100.{10 + i}"}]},
        }
    )
    for i in (1, 2, 3)
]


@pytest.fixture
async def namespaces(api: client.ApiClient, crd: dict[str, Any]) -> AsyncIterator[tuple[str, str]]:
    """Two fresh namespaces, `a-…` and `b-…`, deleted afterwards."""
    core = client.CoreV1Api(api)
    suffix = uuid.uuid4().hex[:6]
    names = (f"a-{suffix}", f"b-{suffix}")
    for n in names:
        await core.create_namespace({"metadata": {"name": n}})
    try:
        yield names
    finally:
        for n in names:
            await core.delete_namespace(n)


def _obj(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {"rules": rules},
    }


async def _create_reproduction(api: client.ApiClient, a: str, b: str) -> None:
    objects = client.CustomObjectsApi(api)
    x = _obj(
        "x",
        [
            {"egressip": SHARED, "cidr": "203.0.113.10/32", "pod-selector": {}},
            {"egressip": SHARED, "cidr": "203.0.113.20/32", "pod-selector": {}},
        ],
    )
    other = _obj("other", [{"egressip": OTHER, "cidr": "203.0.113.10/32", "pod-selector": {}}])
    await objects.create_namespaced_custom_object(GROUP, VERSION, a, PLURAL, x)
    await objects.create_namespaced_custom_object(GROUP, VERSION, b, PLURAL, other)


async def _read(api: client.ApiClient, ref: EgressIPRef) -> dict[str, Any]:
    obj: dict[str, Any] = await client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, ref.namespace, PLURAL, ref.name
    )
    return obj


async def _compute(api: client.ApiClient, refs: list[EgressIPRef]) -> list[StatusWrite[None]]:
    """What one manager sync would write for `refs`, from the objects as stored."""
    objs = {ref: await _read(api, ref) for ref in refs}
    policies = [parse_policy(o) for o in objs.values()]
    assert not any(isinstance(p, Invalid) for p in policies), policies
    results = assign_gateways(
        [p for p in policies if not isinstance(p, Invalid)],
        nodes=[n for n in NODES if n],
        healthy=frozenset(NodeName(f"node-{i}") for i in (1, 2, 3)),
        services=frozenset(),
        now=NOW,
    )
    return [
        StatusWrite(
            ref=r.ref,
            resource_version=objs[r.ref]["metadata"]["resourceVersion"],
            status=status_body(r, previous_conditions={}, now=NOW),
            context=None,
        )
        for r in results
    ]


def _writer(api: client.ApiClient, landed: list[EgressIPRef]) -> StatusWriter[None]:
    return StatusWriter(
        KubeStatusAPI(api),
        is_leader=lambda: True,
        poke=lambda: None,
        on_written=lambda w: landed.append(w.ref),
    )


async def test_shared_egress_ip_and_a_neighbour_both_get_valid_statuses(
    api: client.ApiClient, namespaces: tuple[str, str]
) -> None:
    a, b = namespaces
    await _create_reproduction(api, a, b)
    x, other = EgressIPRef(a, "x"), EgressIPRef(b, "other")
    landed: list[EgressIPRef] = []
    writer = _writer(api, landed)
    writer.submit(await _compute(api, [x, other]))
    await writer.idle()
    assert (writer.outcome(x), writer.outcome(other)) == (Outcome.WRITTEN, Outcome.WRITTEN)
    assert sorted(landed, key=str) == [x, other]

    xs = (await _read(api, x))["status"]
    (entry,) = xs["egressIPs"]
    assert entry["egressIP"] == SHARED
    assert (entry["rule"], entry["rules"]) == (0, [0, 1])
    assert entry["gateway"] in {"node-1", "node-2", "node-3"}
    assert {c["type"]: c["status"] for c in xs["conditions"]}["Ready"] == "True"
    os_ = (await _read(api, other))["status"]
    assert [(e["egressIP"], bool(e.get("gateway"))) for e in os_["egressIPs"]] == [(OTHER, True)]


async def test_a_refused_status_stays_with_its_object(
    api: client.ApiClient, namespaces: tuple[str, str]
) -> None:
    """The bug as it was: one entry per (rule, IP) is refused, and only for `a/x`."""
    a, b = namespaces
    await _create_reproduction(api, a, b)
    x, other = EgressIPRef(a, "x"), EgressIPRef(b, "other")
    writes = await _compute(api, [x, other])
    broken = []
    for w in writes:
        if w.ref == x:
            status = copy.deepcopy(dict(w.status))
            dup = dict(status["egressIPs"][0], rule=1)
            dup.pop("rules", None)
            status["egressIPs"] = [*status["egressIPs"], dup]
            w = StatusWrite(
                ref=w.ref, resource_version=w.resource_version, status=status, context=None
            )
        broken.append(w)
    landed: list[EgressIPRef] = []
    rejected: list[str] = []
    writer: StatusWriter[None] = StatusWriter(
        KubeStatusAPI(api),
        is_leader=lambda: True,
        poke=lambda: None,
        on_written=lambda w: landed.append(w.ref),
        on_rejected=lambda w, why: rejected.append(why),
        call_later=lambda delay, fn: None,
    )
    writer.submit(broken)
    await writer.idle()
    assert writer.outcome(x) is Outcome.REJECTED
    assert writer.outcome(other) is Outcome.WRITTEN
    assert landed == [other]
    (why,) = rejected
    assert why.startswith("422"), why
    assert "Duplicate value" in why, why
    assert writer.backoff_left(x) > 0
    assert writer.backoff_left(other) == 0


async def test_an_object_deleted_between_compute_and_write_is_skipped(
    api: client.ApiClient, namespaces: tuple[str, str]
) -> None:
    a, b = namespaces
    await _create_reproduction(api, a, b)
    x, other = EgressIPRef(a, "x"), EgressIPRef(b, "other")
    writes = await _compute(api, [x, other])
    await client.CustomObjectsApi(api).delete_namespaced_custom_object(
        GROUP, VERSION, a, PLURAL, "x"
    )
    landed: list[EgressIPRef] = []
    writer = _writer(api, landed)
    writer.submit(writes)
    await writer.idle()
    assert writer.outcome(x) is Outcome.GONE
    assert writer.outcome(other) is Outcome.WRITTEN
    assert landed == [other]
    assert writer.backoff_left(x) == 0
    with pytest.raises(ApiException) as gone:
        await _read(api, x)
    assert gone.value.status == 404
    assert (await _read(api, other))["status"]["egressIPs"][0]["gateway"]
