"""`Programmed` on the lab, with the real agents and managers: it turns True only once
the gateway's and the directors' agent reports show the object's generation, and back
to False after a spec edit until every one of them confirms the new generation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from e2e.labkit import Lab, spread_deployment, staticegress, wait_for

pytestmark = pytest.mark.lab

EIP = "198.51.100.200"
NAME = "programmed"
REF = f"default/{NAME}"


def _policy(cidr: str) -> str:
    return json.dumps(
        {
            "apiVersion": "staticegressips.io/v1alpha1",
            "kind": "StaticEgressIP",
            "metadata": {"name": NAME, "namespace": "default"},
            "spec": {
                "rules": [
                    {
                        "egressips": [EIP],
                        "pod-selector": {"matchLabels": {"app": "prog"}},
                        "cidr": cidr,
                    }
                ]
            },
        }
    )


def _state(lab: Lab) -> tuple[int, str | None, dict[str, Any]]:
    """(generation, gateway, Programmed condition) of the object."""
    obj = lab.get("staticegressip", NAME)
    status = obj.get("status") or {}
    gw = next((e.get("gateway") for e in status.get("egressIPs") or []), None)
    cond = next((c for c in status.get("conditions") or [] if c["type"] == "Programmed"), {})
    return int(obj["metadata"]["generation"]), gw, cond


def _record(lab: Lab, node: str) -> dict[str, Any]:
    lease = lab.get("lease", "-n", "staticegress-system", f"staticegress-agent-{node}")
    return dict(json.loads(lease["metadata"]["annotations"]["staticegress.io/agent-report"]))


def _programmed_at(lab: Lab, generation: int) -> bool:
    gen, _, cond = _state(lab)
    return (
        gen == generation
        and cond.get("status") == "True"
        and cond.get("observedGeneration") == generation
    )


def test_programmed_follows_the_agents_reports(lab: Lab) -> None:
    lab.apply(spread_deployment("prog", 3))
    pods = wait_for("prog pods", lambda: lab.ready_pods("app=prog", 3), seconds=90)
    lab.apply(_policy("203.0.113.10/32"))
    wait_for("Programmed at generation 1", lambda: _programmed_at(lab, 1), seconds=30)
    _, gw, cond = _state(lab)
    assert gw is not None
    assert cond["reason"] == "AgentsConfirmed"
    # The status said True, so the records it was decided from were written
    # before; records only move forward, so they must show it now.
    gw_record = _record(lab, gw)
    assert gw_record["applied"][REF] >= 1
    assert EIP in gw_record["owned"]
    assert gw_record["fenced"] is False
    # Directors are waited for only once they list the object (the manager
    # does not watch pods), so one that had not synced yet may list it later.
    wait_for(
        "every director's record listing the object",
        lambda: all(
            _record(lab, n)["applied"].get(REF, 0) >= 1
            for n in {p["spec"]["nodeName"] for p in pods} - {gw}
        ),
        seconds=20,
    )

    # With a director's agent stopped (it holds no egress IP, so nothing moves;
    # a stopped *gateway* agent would lose its IPs to another node once its
    # grant lapsed, docs/fault-model.md), a spec edit cannot be confirmed by
    # it: Programmed turns False, naming that director, and stays False while
    # the gateway confirms the new generation.
    director = sorted({p["spec"]["nodeName"] for p in pods} - {gw})[0]
    staticegress("lab", "agent", "stop", director)
    try:
        lab.apply(_policy("203.0.113.0/28"))

        def awaiting() -> bool:
            gen, now_gw, c = _state(lab)
            return (
                gen == 2
                and now_gw == gw
                and c.get("status") == "False"
                and c.get("observedGeneration") == 2
                and c.get("reason") == "AwaitingDirectors"
                and director in c.get("message", "")
            )

        wait_for("Programmed=False awaiting the director", awaiting, seconds=20)
        wait_for(
            "the gateway's record at generation 2",
            lambda: _record(lab, gw)["applied"].get(REF) == 2,
            seconds=20,
        )
        assert awaiting(), _state(lab)
        assert _record(lab, director)["applied"][REF] == 1
    finally:
        staticegress("lab", "agent", "start", director)
    wait_for("Programmed again at generation 2", lambda: _programmed_at(lab, 2), seconds=30)
    assert _record(lab, director)["applied"][REF] == 2
