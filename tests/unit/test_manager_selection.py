"""The manager's published selection is computed again only when one of its
inputs changed: its own writes coming back, a Node's heartbeat, an agent's
report or an ack do not make it select every rule's pods again (at 10,000
pods and 1,000 rules a selection is a few hundred ms of CPU; the leader spent
93 % of a core at rest). No API server: stores filled by hand, the publisher
faked."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes_asyncio import client

from staticegress.manager import manager as manager_module
from staticegress.manager.manager import Manager, ManagerOptions
from tests.unit.test_agent_sync import POLICY, pod


async def test_only_the_selection_inputs_select_again(monkeypatch: pytest.MonkeyPatch) -> None:
    m = Manager(client.ApiClient(), ManagerOptions(identity="manager-1", grant_key=b"k" * 32))
    monkeypatch.setattr(m.elector, "is_leader", lambda: True)
    for r in (*m.reflectors.values(), *m.selection_reflectors.values()):
        r.synced.set()
    m.reflectors["staticegressips"].store["default/egress"] = POLICY
    m.selection_reflectors["pods"].store.update({f"default/client-{i}": pod(i) for i in (1, 2)})
    selections: list[int] = []
    real = manager_module.select_members

    def counting(*args: Any, **kwargs: Any) -> Any:
        selections.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(manager_module, "select_members", counting)
    published: list[dict[str, Any]] = []

    async def publish(wanted: dict[str, Any], store: Any) -> list[str]:
        published.append(dict(wanted))
        return []

    monkeypatch.setattr(m.publisher, "publish", publish)

    await m.publish_members(False)
    assert len(selections) == 1
    members = next(iter(published[-1].values()))
    assert len(members["members"]) == 2, members

    # Our own writes come back, a Node and an agent report change: no selection.
    m.selection_reflectors["members"]._on_change()
    m.reflectors["nodes"]._on_change()
    m.reports._on_change()
    await m.publish_members(False)
    assert len(selections) == 1
    assert published[-1] == published[0], "the cached selection was not published as it was"

    # A new pod is an input: selected again, and published with it.
    m.selection_reflectors["pods"].store["default/client-3"] = pod(3)
    m.selection_reflectors["pods"]._on_change()
    await m.publish_members(False)
    assert len(selections) == 2
    assert len(next(iter(published[-1].values()))["members"]) == 3
    # A periodic forced run selects again whatever happened.
    await m.publish_members(True)
    assert len(selections) == 3
    await m.api.close()
