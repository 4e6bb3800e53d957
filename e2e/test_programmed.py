"""`Programmed` on the lab, with the real agents and managers: it turns True only once
the gateway's agent report shows the object's generation, and back to False after a
spec edit until the gateway confirms the new generation."""

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


def test_programmed_follows_the_gateways_report(lab: Lab) -> None:
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

    # With the gateway's agent stopped (its dataplane and heartbeats stay, so
    # nothing moves), a spec edit cannot be confirmed: Programmed turns False,
    # naming the gateway, and stays False.
    staticegress("lab", "agent", "stop", gw)
    try:
        lab.apply(_policy("203.0.113.0/28"))

        def awaiting() -> bool:
            gen, now_gw, c = _state(lab)
            return (
                gen == 2
                and now_gw == gw
                and c.get("status") == "False"
                and c.get("observedGeneration") == 2
                and c.get("reason") == "AwaitingGateway"
                and gw in c.get("message", "")
            )

        wait_for("Programmed=False awaiting the gateway", awaiting, seconds=20)
        # Long enough for every other agent to confirm generation 2.
        wait_for(
            "the directors' records at generation 2",
            lambda: all(
                _record(lab, n)["applied"].get(REF) == 2
                for n in {p["spec"]["nodeName"] for p in pods} - {gw}
            ),
            seconds=20,
        )
        assert awaiting(), _state(lab)
        assert _record(lab, gw)["applied"][REF] == 1
    finally:
        staticegress("lab", "agent", "start", gw)
    wait_for("Programmed again at generation 2", lambda: _programmed_at(lab, 2), seconds=30)
    assert _record(lab, gw)["applied"][REF] == 2
