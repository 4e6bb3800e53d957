"""The node agent on the lab, in both CNI modes: steering, SNAT, fail-closed, edits,
restarts, the CNI's egress policy, bad objects, deletion and uninstall.

The manager does not exist yet, so the tests write each object's status (the
gateway of every egress IP) themselves, as the manager will.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.labkit import (
    STATICEGRESS,
    Lab,
    node_state,
    pod_server,
    require_no_lab,
    spread_deployment,
    staticegress,
    wait_for,
)
from staticegress.controlplane.binaries import Binaries
from staticegress.lab import lab as lablib
from staticegress.lab import plan

pytestmark = pytest.mark.lab

EIP_FE = "198.51.100.200"
EIP_WORK = "198.51.100.201"
EIP_NEW = "198.51.100.202"
SERVER = "203.0.113.10"
OTHER = "203.0.113.20"
NODE_IP = {p.name: str(p.underlay_ip) for p in plan.node_plans(3)}


def set_gateways(lab: Lab, name: str, gateways: dict[str, str | None]) -> None:
    entries = [{"egressIP": ip, **({"gateway": gw} if gw else {})} for ip, gw in gateways.items()]
    lab.kubectl(
        "patch",
        "staticegressip",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"egressIPs": entries}}),
    )


def egress(lab: Lab, name: str, rule: dict[str, Any]) -> None:
    lab.apply(
        json.dumps(
            {
                "apiVersion": "staticegressips.io/v1alpha1",
                "kind": "StaticEgressIP",
                "metadata": {"name": name},
                "spec": {"rules": [rule]},
            }
        )
    )


def pods_of(lab: Lab, app: str, count: int) -> dict[str, dict[str, Any]]:
    """node -> pod, for a Deployment with one pod per node."""
    pods = wait_for(
        f"{count} Ready {app} pods", lambda: lab.ready_pods(f"app={app}", count), seconds=90
    )
    return {p["spec"]["nodeName"]: p for p in pods}


def target(pod: dict[str, Any]) -> str:
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def eventually_source(lab: Lab, pod: dict[str, Any], want: str, server: str = SERVER) -> None:
    wait_for(
        f"{target(pod)} -> {server} seen as {want}",
        lambda: lab.http_source(target(pod), server) == want,
        seconds=20,
    )


def probe(pod: dict[str, Any], *, duration: float, interval: float = 0.01) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *STATICEGRESS,
            "lab",
            "probe",
            target(pod),
            "--server",
            SERVER,
            "--interval",
            str(interval),
            "--duration",
            str(duration),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def probe_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.fixture(scope="module", params=plan.CNIS)
def world(request: pytest.FixtureRequest, binaries: Binaries) -> Iterator[dict[str, Any]]:
    """A lab whose nodes were snapshotted before the agents started, then workloads:
    frontend (service-name rule), worker (label rule), plain (unselected)."""
    require_no_lab()
    cni = request.param
    staticegress("lab", "up", "--nodes", "3", "--cni", cni, "--no-agents")
    try:
        lab = Lab(
            cni=cni, nodes=3, kubeconfig=lablib.state_dir() / "admin.kubeconfig", binaries=binaries
        )
        pristine = {n: node_state(n) for n in NODE_IP}
        for n in NODE_IP:
            staticegress("lab", "agent", "start", n)
        for app, labels in (("frontend", {}), ("worker", {"tier": "batch"}), ("plain", {})):
            lab.apply(spread_deployment(app, 3, labels))
        lab.kubectl("expose", "deployment", "frontend", "--port", "80")
        world = {
            "lab": lab,
            "pristine": pristine,
            "frontend": pods_of(lab, "frontend", 3),
            "worker": pods_of(lab, "worker", 3),
            "plain": pods_of(lab, "plain", 3),
        }
        wait_for("agents ready", lambda: all(_ready(n) for n in NODE_IP), seconds=30)
        world["before_crs"] = {n: node_state(n) for n in NODE_IP}
        egress(
            lab,
            "frontend",
            {"egressip": EIP_FE, "service-name": "frontend", "cidr": f"{SERVER}/32"},
        )
        set_gateways(lab, "frontend", {EIP_FE: "node-2"})
        egress(
            lab,
            "workers",
            {
                "egressip": EIP_WORK,
                "pod-selector": {"matchLabels": {"tier": "batch"}},
                "cidr": "203.0.113.0/24",
                "excluded-cidrs": [f"{OTHER}/32"],
            },
        )
        set_gateways(lab, "workers", {EIP_WORK: "node-3"})
        yield world
    finally:
        staticegress("lab", "down")


def _ready(node: str) -> bool:
    ip = NODE_IP[node]
    proc = subprocess.run(
        ["curl", "-s", "-m", "2", f"http://{ip}:{lablib.AGENT_PORT}/readyz"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() == "ok"


# ------------------------------------------------------------------ steering


def test_service_name_rule_steers_every_frontend_pod(world: dict[str, Any]) -> None:
    lab: Lab = world["lab"]
    for node, pod in world["frontend"].items():
        # node-2 is the gateway itself: its own pod must work too.
        eventually_source(lab, pod, EIP_FE)
        assert lab.http_source(target(pod), OTHER) == NODE_IP[node], "outside the CIDR"
        assert lab.udp_echo(target(pod), "u", SERVER) == f"{EIP_FE} u"


def test_label_selector_rule_with_exclusion(world: dict[str, Any]) -> None:
    lab: Lab = world["lab"]
    for node, pod in world["worker"].items():
        eventually_source(lab, pod, EIP_WORK)
        assert lab.http_source(target(pod), OTHER) == NODE_IP[node], "excluded CIDR"


def test_unselected_pods_keep_the_node_ip(world: dict[str, Any]) -> None:
    lab: Lab = world["lab"]
    for node, pod in world["plain"].items():
        assert lab.http_source(target(pod), SERVER) == NODE_IP[node]


def test_pod_to_pod_traffic_is_untouched(world: dict[str, Any]) -> None:
    lab: Lab = world["lab"]
    client, server = world["frontend"]["node-1"], world["plain"]["node-3"]
    server_ip = server["status"]["podIP"]
    with pod_server(target(server), server_ip):
        seen = wait_for(
            "pod-to-pod",
            lambda: lab.http_source(target(client), server_ip, 8080) or None,
            seconds=15,
        )
        assert seen == client["status"]["podIP"]


def test_cni_egress_policy_still_applies(world: dict[str, Any]) -> None:
    lab: Lab = world["lab"]
    pod = world["frontend"]["node-1"]
    ip = pod["status"]["podIP"]
    eventually_source(lab, pod, EIP_FE)
    rule = ["FORWARD", "-s", ip, "-m", "comment", "--comment", "test policy", "-j", "DROP"]
    had_filter = "table ip filter" in lab.exec("node-1", "nft", "list", "tables").stdout
    lab.exec("node-1", "iptables", "-w", "-I", *rule)
    try:
        out = lab.exec(target(pod), "curl", "-s", "-m", "2", f"http://{SERVER}/", check=False)
        assert out.stdout.strip() == "", f"a denied pod got through: {out.stdout!r}"
    finally:
        lab.exec("node-1", "iptables", "-w", "-D", *rule)
        if not had_filter:  # iptables leaves its empty table behind; the node was without
            lab.exec("node-1", "nft", "delete", "table", "ip", "filter")
    eventually_source(lab, pod, EIP_FE)


# ------------------------------------------------------------- fail closed


def test_unknown_gateway_fails_closed_and_is_reported(world: dict[str, Any]) -> None:
    lab: Lab = world["lab"]
    lab.apply(spread_deployment("orphan", 3))
    pods = pods_of(lab, "orphan", 3)
    egress(
        lab,
        "orphan",
        {
            "egressip": "198.51.100.209",
            "pod-selector": {"matchLabels": {"app": "orphan"}},
            "cidr": f"{SERVER}/32",
        },
    )
    try:
        pod = pods["node-1"]
        wait_for(
            "orphan traffic held",
            lambda: (
                lab.exec(
                    target(pod), "curl", "-s", "-m", "1", f"http://{SERVER}/", check=False
                ).stdout.strip()
                == ""
            ),
            seconds=20,
        )
        res = probe_result(probe(pod, duration=1.0, interval=0.02))
        assert res["received"] == 0, f"a pod without a gateway got out: {res['sources']}"
        events = lab.get("events", "--field-selector", "reason=NoGateway")["items"]
        assert any(e["involvedObject"]["name"] == "orphan" for e in events)
        # Once a gateway is known, the same pod works.
        set_gateways(lab, "orphan", {"198.51.100.209": "node-3"})
        eventually_source(lab, pod, "198.51.100.209")
    finally:
        lab.kubectl("delete", "staticegressip", "orphan")
        lab.kubectl("delete", "deployment", "orphan")


def test_new_pod_is_held_until_the_agent_knows_it(world: dict[str, Any]) -> None:
    """A selected pod created while its node's agent is down must not get out at
    all; once the agent runs, it leaves with the egress IP and nothing else."""
    lab: Lab = world["lab"]
    staticegress("lab", "agent", "stop", "node-1")
    try:
        lab.apply(spread_deployment("fresh", 1, {"tier": "batch"}, node="node-1"))
        rec = wait_for(
            "the new pod's namespace",
            lambda: next((p for p in lablib_pods() if p.name.startswith("fresh-")), None),
            seconds=60,
        )
        pod = {"metadata": {"namespace": rec.namespace, "name": rec.name}}
        held = probe_result(probe(pod, duration=1.5, interval=0.01))
        assert held["received"] == 0, f"an unknown new pod got out: {held['sources']}"
        proc = probe(pod, duration=4.0, interval=0.01)
        time.sleep(0.3)
    finally:
        staticegress("lab", "agent", "start", "node-1")
    res = probe_result(proc)
    assert res["received"] > 0
    assert set(res["sources"]) == {EIP_WORK}, f"a new pod leaked: {res['sources']}"
    print(
        f"\nnew pod while the agent was down ({lab.cni}): {held['sent']} probes held, none "
        f"out; first reply {res['first_reply_ms']:.0f} ms after the agent started"
    )
    # With the agent running: how long from the pod's IP being known to it being programmed.
    lab.kubectl("delete", "deployment", "fresh")
    lab.apply(spread_deployment("fresh2", 1, {"tier": "batch"}, node="node-1"))
    try:
        rec = wait_for(
            "the second pod's namespace",
            lambda: next((p for p in lablib_pods() if p.name.startswith("fresh2-")), None),
            seconds=60,
            every=0.002,
        )
        start = time.monotonic()
        wait_for(
            "the agent to know the pod",
            lambda: (
                rec.ip
                in lab.exec(
                    "node-1", "nft", "list", "set", "ip", "staticegress", "known_local_pods"
                ).stdout
            ),
            seconds=10,
            every=0.005,
        )
        print(
            f"new pod ({lab.cni}): programmed {1000 * (time.monotonic() - start):.0f} ms "
            f"after its namespace existed (held meanwhile)"
        )
    finally:
        lab.kubectl("delete", "deployment", "fresh2")


def lablib_pods() -> list[Any]:
    from staticegress.lab.kubelet import load_realized

    return load_realized(lablib.state_dir())


# --------------------------------------------------------------- restarts


def test_agent_restart_never_leaks(world: dict[str, Any]) -> None:
    lab: Lab = world["lab"]
    pod = world["frontend"]["node-1"]
    eventually_source(lab, pod, EIP_FE)
    proc = probe(pod, duration=6.0)
    time.sleep(1.0)
    for node in ("node-1", "node-2"):  # the director, then the gateway
        staticegress("lab", "agent", "stop", node, "--kill")
        time.sleep(0.5)
        staticegress("lab", "agent", "start", node)
    res = probe_result(proc)
    assert set(res["sources"]) == {EIP_FE}, f"replies with another source: {res['sources']}"
    print(
        f"\nagent kill -9 + restart ({lab.cni}): {res['lost']} of {res['sent']} probes lost, "
        f"longest gap {res['longest_gap_ms']:.0f} ms"
    )
    assert res["lost"] <= res["sent"] * 0.05


# ------------------------------------------------------------------ edits


def test_edits_take_effect(world: dict[str, Any]) -> None:
    lab: Lab = world["lab"]
    pod = world["frontend"]["node-3"]
    eventually_source(lab, pod, EIP_FE)
    try:
        # A new egress IP.
        egress(
            lab,
            "frontend",
            {"egressip": EIP_NEW, "service-name": "frontend", "cidr": f"{SERVER}/32"},
        )
        set_gateways(lab, "frontend", {EIP_NEW: "node-1"})
        eventually_source(lab, pod, EIP_NEW)
        # A new CIDR: the old destination is no longer captured.
        egress(
            lab,
            "frontend",
            {"egressip": EIP_NEW, "service-name": "frontend", "cidr": f"{OTHER}/32"},
        )
        eventually_source(lab, pod, EIP_NEW, OTHER)
        assert lab.http_source(target(pod), SERVER) == NODE_IP["node-3"]
        # The rule removed (the object keeps another rule that selects nothing).
        egress(
            lab,
            "frontend",
            {
                "egressip": EIP_NEW,
                "pod-selector": {"matchLabels": {"app": "nobody"}},
                "cidr": f"{OTHER}/32",
            },
        )
        eventually_source(lab, pod, NODE_IP["node-3"], OTHER)
    finally:
        egress(
            lab,
            "frontend",
            {"egressip": EIP_FE, "service-name": "frontend", "cidr": f"{SERVER}/32"},
        )
        set_gateways(lab, "frontend", {EIP_FE: "node-2"})
    eventually_source(lab, pod, EIP_FE)


def test_a_flow_begun_before_selection_moves_to_the_egress_ip(world: dict[str, Any]) -> None:
    """NAT is decided on a connection's first packet: a flow the pod began while
    unselected was masqueraded, and without the guard and the conntrack repair it
    kept the node's address for as long as it lasted, even once steered."""
    lab: Lab = world["lab"]
    pod = world["plain"]["node-1"]
    proc = probe(pod, duration=8.0)  # one UDP socket: one flow for the whole run
    try:
        time.sleep(2.0)
        egress(
            lab,
            "late",
            {
                "egressip": EIP_NEW,
                "pod-selector": {"matchLabels": {"app": "plain"}},
                "cidr": f"{SERVER}/32",
            },
        )
        set_gateways(lab, "late", {EIP_NEW: "node-2"})
        res = probe_result(proc)
    finally:
        lab.kubectl("delete", "staticegressip", "late", "--ignore-not-found")
    sources = res["sources"]
    print(
        f"\nflow begun before selection ({lab.cni}): replies by source {sources}, "
        f"{res['lost']} of {res['sent']} lost"
    )
    assert set(sources) <= {NODE_IP["node-1"], EIP_NEW}, sources
    # About 2 s from the node before the object, then the egress IP: the same
    # flow, so this needs its masquerade forgotten.
    assert sources.get(EIP_NEW, 0) >= res["sent"] * 0.4, sources
    eventually_source(lab, pod, NODE_IP["node-1"])


# --------------------------------------------------- bad and hostile objects


def test_two_hundred_bad_objects(world: dict[str, Any]) -> None:
    lab: Lab = world["lab"]
    lab.apply(spread_deployment("victim", 3))
    pods_of(lab, "victim", 3)
    docs = []
    for i in range(50):
        base = {"apiVersion": "staticegressips.io/v1alpha1", "kind": "StaticEgressIP"}
        docs += [
            {
                **base,
                "metadata": {"name": f"bad-conflict-{i}"},
                "spec": {
                    "rules": [
                        {
                            "egressip": EIP_FE,
                            "pod-selector": {"matchLabels": {"app": "victim"}},
                            "cidr": f"{OTHER}/32",
                        }
                    ]
                },
            },
            {
                **base,
                "metadata": {"name": f"bad-nosvc-{i}"},
                "spec": {
                    "rules": [
                        {
                            "egressip": f"198.51.100.{100 + i}",
                            "service-name": f"missing-{i}",
                            "cidr": f"{SERVER}/32",
                        }
                    ]
                },
            },
            {
                **base,
                "metadata": {"name": f"bad-empty-{i}"},
                "spec": {
                    "rules": [
                        {
                            "egressip": f"198.51.100.{150 + i}",
                            "pod-selector": {"matchLabels": {"app": "nobody"}},
                            "cidr": f"{SERVER}/32",
                        }
                    ]
                },
            },
            {
                **base,
                "metadata": {"name": f"bad-nogw-{i}"},
                "spec": {
                    "rules": [
                        {
                            "egressip": f"192.0.2.{10 + i}",
                            "pod-selector": {"matchLabels": {"app": "victim"}},
                            "cidr": "192.0.2.0/24",
                        }
                    ]
                },
            },
        ]
    manifest = "\n---\n".join(json.dumps(d) for d in docs)
    lab.kubectl("apply", "-f", "-", stdin=manifest)
    try:
        for i in range(0, 50, 7):
            set_gateways(lab, f"bad-nogw-{i}", {f"192.0.2.{10 + i}": "node-99"})
        # Valid objects keep working throughout.
        for pod in world["frontend"].values():
            eventually_source(lab, pod, EIP_FE)

        # Each agent reports what it cannot program on its node, once.
        def events(reason: str) -> set[str]:
            items = lab.get("events", "--field-selector", f"reason={reason}")["items"]
            return {e["involvedObject"]["name"] for e in items}

        wait_for("conflict events", lambda: len(events("EgressIPConflict")) == 50, seconds=30)
        wait_for("no-gateway events", lambda: len(events("NoGateway")) >= 50, seconds=30)
        # Trigger more syncs; the problems must not be logged again.
        for n in range(3):
            lab.kubectl("label", "pod", "-l", "app=plain", f"poke={n}", "--overwrite")
            time.sleep(0.5)
        log = (lablib.state_dir() / "logs" / "agent-node-1.log").read_text()
        assert log.count("egressip=default/bad-conflict-7 reason=EgressIPConflict") == 1
        assert log.count("egressip=default/bad-nogw-3 reason=NoGateway") == 1
        state = lablib.load_state()
        assert state is not None
        for n in NODE_IP:
            assert lablib._ours(state.processes[f"agent/{n}"]), f"the agent of {n} died"
        # A victim pod selected only by conflicting or gateway-less rules is held.
        victim = lab.ready_pods("app=victim", 3)
        assert victim is not None
        out = lab.exec(
            target(victim[0]), "curl", "-s", "-m", "1", f"http://{OTHER}/", check=False
        ).stdout
        assert out.strip() == "", f"a pod of a conflicting rule got out as {out!r}"
    finally:
        lab.kubectl(
            "delete",
            "staticegressips",
            "--field-selector",
            "metadata.name!=frontend,metadata.name!=workers",
            "--wait=true",
        )
        lab.kubectl("delete", "deployment", "victim")
    for pod in world["frontend"].values():
        eventually_source(lab, pod, EIP_FE)


# ------------------------------------------------------ deletion, uninstall


def test_deleting_everything_restores_the_nodes(world: dict[str, Any]) -> None:
    lab: Lab = world["lab"]
    lab.kubectl("delete", "staticegressips", "--all", "--wait=true")
    for node, pod in world["frontend"].items():
        eventually_source(lab, pod, NODE_IP[node])
    deadline = time.monotonic() + 20
    for node, before in world["before_crs"].items():
        while (now := node_state(node)) != before and time.monotonic() < deadline:
            time.sleep(0.25)
        assert now == before, f"{node} differs from before any StaticEgressIP:\n" + _diff(
            before, now
        )


def test_uninstall_leaves_the_node_as_before(world: dict[str, Any]) -> None:
    lab: Lab = world["lab"]
    node = "node-3"
    # Give it something to remove first: an owned egress IP and steering.
    egress(
        lab, "frontend", {"egressip": EIP_FE, "service-name": "frontend", "cidr": f"{SERVER}/32"}
    )
    set_gateways(lab, "frontend", {EIP_FE: "node-3"})
    eventually_source(lab, world["frontend"]["node-1"], EIP_FE)
    staticegress("lab", "agent", "stop", node)
    lab.exec(node, sys.executable, "-m", "staticegress", "agent", "--cleanup", "--uplink", "eth0")
    after = node_state(node)
    assert after == world["pristine"][node], _diff(world["pristine"][node], after)


def _diff(a: str, b: str) -> str:
    import difflib

    return "\n".join(difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm=""))
