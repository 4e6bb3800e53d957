"""After a reboot, a local pod's address counts only once kubelet has reported
its sandbox since the boot: what the Pod parser reads for it, the model's
judgement, and the kernel's boot time."""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from staticegress.api.core import parse_pod
from staticegress.api.types import NodeName
from staticegress.dataplane.host import read_boot_time
from staticegress.k8s.snapshot import build_snapshot
from staticegress.model.boot import reported_since, trust_since_boot
from staticegress.model.desired import AgentConfig, Snapshot, compute_desired

BOOT = 1_796_000_000  # 2026-11-30T00:53:20Z
BEFORE = "2026-11-30T00:53:19Z"
AT_BOOT = "2026-11-30T00:53:20Z"
AFTER = "2026-11-30T00:54:00Z"
ME = NodeName("node-1")
SERVER = IPv4Network("203.0.113.10/32")


def raw_pod(
    name: str,
    ip: str | None,
    *,
    node: str = "node-1",
    labels: dict[str, str] | None = None,
    host_network: bool = False,
    **status: Any,
) -> dict[str, Any]:
    st: dict[str, Any] = {"phase": "Running", **status}
    if ip is not None:
        st.update(podIP=ip, podIPs=[{"ip": ip}])
    return {
        "metadata": {"namespace": "default", "name": name, "labels": labels or {"app": "plain"}},
        "spec": {"nodeName": node, "hostNetwork": host_network},
        "status": st,
    }


def ready_to_start(status: str, at: str | None) -> list[dict[str, str]]:
    cond = {"type": "PodReadyToStartContainers", "status": status}
    if at is not None:
        cond["lastTransitionTime"] = at
    return [cond]


def since(**status: Any) -> int | None:
    pod = parse_pod(raw_pod("p", "10.244.1.2", **status))
    assert pod is not None
    return pod.sandbox_since


# ------------------------------------------------------------------- parsing


def test_the_condition_says_since_when_the_sandbox_is_up() -> None:
    assert since(conditions=ready_to_start("True", AFTER)) == BOOT + 40
    assert since(conditions=ready_to_start("True", "2026-11-30T01:53:20+01:00")) == BOOT
    # Down, or being replaced: the address shown is the old sandbox's.
    assert since(conditions=ready_to_start("False", AFTER)) is None
    assert since(conditions=ready_to_start("Unknown", AFTER)) is None
    # A time that is not the API server's: no report to trust.
    for bad in (None, "yesterday", "2026-11-30T00:54:00", 1796000040):
        assert since(conditions=ready_to_start("True", bad)) is None  # type: ignore[arg-type]


def test_without_the_condition_the_latest_container_start_counts() -> None:
    statuses = {
        "initContainerStatuses": [{"state": {"terminated": {"startedAt": BEFORE}}}],
        "containerStatuses": [
            {"state": {"running": {"startedAt": AFTER}}},
            {"state": {"waiting": {"reason": "ContainerCreating"}}},
        ],
    }
    assert since(**statuses) == BOOT + 40
    assert since(ephemeralContainerStatuses=[{"state": {"running": {"startedAt": AT_BOOT}}}]) == (
        BOOT
    )
    assert since(containerStatuses=[{"state": {"waiting": {}}}]) is None
    assert since() is None
    # The condition, when there, decides: the containers may be from the old sandbox.
    assert since(conditions=ready_to_start("False", AFTER), **statuses) is None


# --------------------------------------------------------------------- model

POLICY = {
    "apiVersion": "staticegressips.io/v1alpha1",
    "kind": "StaticEgressIP",
    "metadata": {
        "namespace": "default",
        "name": "egress",
        "uid": "u-1",
        "generation": 1,
        "creationTimestamp": "2026-01-01T00:00:00Z",
    },
    "spec": {
        "rules": [
            {
                "egressip": "198.51.100.200",
                "pod-selector": {"matchLabels": {"app": "client"}},
                "cidr": str(SERVER),
            }
        ]
    },
    "status": {"egressIPs": [{"egressIP": "198.51.100.200", "rule": 0, "gateway": "node-2"}]},
}


def snapshot(*pods: dict[str, Any]) -> Snapshot:
    nodes = {
        f"node-{i}": {
            "metadata": {"name": f"node-{i}"},
            "spec": {"podCIDR": f"10.244.{i}.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": f"198.51.100.1{i}"}]},
        }
        for i in (1, 2)
    }
    snap, invalid = build_snapshot(
        policies={"default/egress": POLICY},
        pods={f"default/{p['metadata']['name']}": p for p in pods},
        nodes=nodes,
        services={},
        namespaces={"default": {"metadata": {"name": "default"}}},
        slices={},
    )
    assert not invalid
    return snap


def rebooted() -> Snapshot:
    """node-1 just booted; its Pods still show their pre-reboot addresses."""
    return snapshot(
        raw_pod("stale", "10.244.1.7", conditions=ready_to_start("True", BEFORE)),
        raw_pod(
            "client",
            "10.244.1.5",
            labels={"app": "client"},
            conditions=ready_to_start("True", BEFORE),
        ),
        raw_pod("reported", "10.244.1.9", conditions=ready_to_start("True", AT_BOOT)),
        raw_pod(
            "remote",
            "10.244.2.5",
            node="node-2",
            labels={"app": "client"},
            conditions=ready_to_start("True", BEFORE),
        ),
        raw_pod("host", "198.51.100.11", host_network=True),
        raw_pod("pending", None),
    )


def test_a_stale_local_address_is_not_known_after_a_reboot() -> None:
    """A new selected pod given 10.244.1.7, which the stale status of an
    unselected pod shows, is held until kubelet reports it."""
    snap = rebooted()
    config = AgentConfig(node=ME)
    # What the model alone would do: trust the stale address.
    assert IPv4Address("10.244.1.7") in compute_desired(snap, config).known_local_pods

    trusted, stale = trust_since_boot(snap, node=ME, boot=BOOT)
    assert sorted(p.name for p in stale) == ["client", "stale"]
    desired = compute_desired(trusted, config)
    assert desired.known_local_pods == (IPv4Address("10.244.1.9"),)
    assert SERVER in desired.held_destinations
    assert desired.rules[0].steer == ()
    # Another node's pod keeps its address: its boot is not ours to judge.
    assert desired.remote_pods == (IPv4Address("10.244.2.5"),)
    by_name = {p.name: p for p in trusted.pods}
    assert by_name["stale"].ip is None
    assert by_name["client"].labels == (("app", "client"),)
    assert by_name["host"].ip == IPv4Address("198.51.100.11")


def test_a_pod_counts_again_once_reported_since_the_boot() -> None:
    snap = snapshot(
        raw_pod("stale", "10.244.1.8", conditions=ready_to_start("True", AFTER)),
        raw_pod(
            "client",
            "10.244.1.5",
            labels={"app": "client"},
            conditions=ready_to_start("True", AT_BOOT),
        ),
    )
    trusted, stale = trust_since_boot(snap, node=ME, boot=BOOT)
    assert stale == ()
    assert trusted is snap
    desired = compute_desired(trusted, AgentConfig(node=ME))
    assert desired.known_local_pods == (IPv4Address("10.244.1.5"), IPv4Address("10.244.1.8"))
    assert [ip for ip, _ in desired.rules[0].steer] == [IPv4Address("10.244.1.5")]


def test_the_boot_second_itself_counts() -> None:
    pod = parse_pod(raw_pod("p", "10.244.1.2", conditions=ready_to_start("True", AT_BOOT)))
    assert pod is not None
    assert reported_since(pod, BOOT)
    assert not reported_since(pod, BOOT + 1)


# ---------------------------------------------------------------- boot time


def test_boot_time_is_the_kernels_btime(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nintr 5\nctxt 9\nbtime 1796000000\nprocesses 4\n")
    assert read_boot_time(stat) == BOOT
    stat.write_text("cpu  1 2 3\n")
    with pytest.raises(OSError, match="no btime"):
        read_boot_time(stat)
    assert 0 < read_boot_time() <= time.time()
