"""`lab up` is idempotent and `lab down` leaves the host exactly as it found it."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from e2e.labkit import Lab, require_no_lab, spread_deployment, staticegress, wait_for
from staticegress.controlplane.binaries import Binaries
from staticegress.controlplane.cluster import pid_alive
from staticegress.lab import lab as lablib
from staticegress.lab import plan

pytestmark = pytest.mark.lab


def _lab_processes() -> list[str]:
    """Command lines of processes that belong to a lab."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(lablib.state_dir()) in cmd or "staticegress lab serve" in cmd:
            out.append(cmd)
    return out


def _host_snapshot() -> dict[str, object]:
    snap = lablib.snapshot_host()
    snap["processes"] = sorted(_lab_processes())
    snap["controlplane_dirs"] = sorted(
        p.name for p in Path(tempfile.gettempdir()).glob("staticegress-cp-*")
    )
    snap["iptables_host"] = subprocess.run(
        ["iptables-save"], capture_output=True, text=True
    ).stdout.count("\n")
    return snap


@pytest.mark.parametrize("cni", plan.CNIS)
def test_up_is_idempotent_and_down_leaves_nothing(cni: plan.CNI, binaries: Binaries) -> None:
    require_no_lab()
    before = _host_snapshot()
    staticegress("lab", "up", "--nodes", "2", "--cni", cni)
    try:
        lab = Lab(
            cni=cni, nodes=2, kubeconfig=lablib.state_dir() / "admin.kubeconfig", binaries=binaries
        )
        during = _host_snapshot()
        made = set(during["netns"]) - set(before["netns"])  # type: ignore[call-overload]
        assert {n for n in made if n.startswith(plan.PREFIX)} == {
            "selab-ul",
            "selab-ext",
            "selab-node-1",
            "selab-node-2",
        }
        again = staticegress("lab", "up", "--nodes", "2", "--cni", cni)
        assert "already up" in again.stderr
        assert _host_snapshot()["processes"] == during["processes"], "second up restarted things"
        # Settings that differ are refused, not silently applied.
        other = "vxlan" if cni == "host-gw" else "host-gw"
        with pytest.raises(AssertionError, match="already up with"):
            staticegress("lab", "up", "--nodes", "2", "--cni", other)
        # A pod leaves more behind (a namespace, a veth, a record): down removes it too.
        lab.apply(spread_deployment("leftover", 2))
        wait_for("leftover pods", lambda: lab.ready_pods("app=leftover", 2), seconds=60)
    finally:
        staticegress("lab", "down")
    assert _host_snapshot() == before
    # down on a lab that is already down is harmless.
    staticegress("lab", "down")
    assert _host_snapshot() == before


def test_a_lab_left_by_a_killed_run_is_cleared_and_a_live_one_kept(binaries: Binaries) -> None:
    """A test run killed before `lab down` leaves the state behind with every process
    gone; the next run must take that down rather than fail, but never a live lab."""
    require_no_lab()
    before = _host_snapshot()
    staticegress("lab", "up", "--nodes", "2", "--cni", "host-gw", "--no-agents")
    try:
        assert not lablib.clear_stale(progress=print), "a live lab was taken down"
        state = lablib.load_state()
        assert state is not None
        for pid in state.processes.values():
            subprocess.run(["kill", "-KILL", str(pid)], check=False)
        wait_for(
            "the lab's processes gone",
            lambda: not any(pid_alive(pid) for pid in state.processes.values()),
            seconds=10,
        )
        assert lablib.clear_stale(progress=print), "a lab without processes was kept"
        assert lablib.load_state() is None
    finally:
        staticegress("lab", "down")
    assert _host_snapshot() == before
