"""The local control plane itself: clean stop, no leftovers after a crash, and the
identities it mints for RBAC tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.controlplane.binaries import Binaries
from staticegress.controlplane.cluster import ControlPlane, sweep_stale_workdirs
from staticegress.k8s.client import api_client

pytestmark = pytest.mark.controlplane


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.split(") ", 1)[1][0] != "Z"


def _wait_gone(pids: list[int], seconds: float = 15) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_stop_leaves_no_process_and_no_directory(binaries: Binaries) -> None:
    cp = ControlPlane(binaries=binaries)
    cp.start()
    workdir = cp.workdir
    assert workdir is not None
    assert workdir.is_dir()
    pids = [p.popen.pid for p in cp._procs]
    assert len(pids) == 4
    assert all(cp.running().values())
    cp.stop()
    assert _wait_gone(pids, 1) == []
    assert not workdir.exists()


def test_crashed_owner_leaves_nothing_behind(binaries: Binaries, tmp_path: Path) -> None:
    # A test run killed with SIGKILL cannot clean up. The kernel must take its
    # components down with it, and the next start must remove its directory.
    paths = json.dumps({k: str(v) for k, v in vars(binaries).items()})
    script = textwrap.dedent(
        f"""
        import json, time
        from pathlib import Path
        from staticegress.controlplane.binaries import Binaries
        from staticegress.controlplane.cluster import ControlPlane
        paths = json.loads({paths!r})
        b = Binaries(**{{k: Path(v) for k, v in paths.items()}})
        cp = ControlPlane(binaries=b, controllers=False, progress=lambda s: None)
        cp.start()
        pids = [p.popen.pid for p in cp._procs]
        print(json.dumps({{"dir": str(cp.workdir), "pids": pids}}), flush=True)
        time.sleep(600)
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        assert owner.stdout is not None
        info = json.loads(owner.stdout.readline())
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    workdir = Path(info["dir"])
    assert workdir.is_dir()
    assert _wait_gone(info["pids"]) == [], "components outlived their killed owner"
    assert sweep_stale_workdirs(progress=lambda s: None) >= 1
    assert not workdir.exists()


async def test_minted_identities_are_subject_to_rbac(
    api: client.ApiClient, namespace: str, control_plane: ControlPlane
) -> None:
    user_cfg = control_plane.kubeconfig_for_user("alice", ("developers",))
    sa_cfg = control_plane.kubeconfig_for_service_account(namespace, "robot")
    for cfg in (user_cfg, sa_cfg):
        c = await api_client(cfg)
        try:
            with pytest.raises(ApiException) as err:
                await client.CoreV1Api(c).list_namespaced_config_map(namespace)
            assert err.value.status == 403
        finally:
            await c.close()

    rbac = client.RbacAuthorizationV1Api(api)
    await rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "read-cm"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
        },
    )
    await rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "read-cm"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-cm"},
            "subjects": [
                {"kind": "Group", "name": "developers", "apiGroup": "rbac.authorization.k8s.io"},
                {"kind": "ServiceAccount", "name": "robot", "namespace": namespace},
            ],
        },
    )
    for cfg in (user_cfg, sa_cfg):
        c = await api_client(cfg)
        try:
            deadline = time.monotonic() + 10
            while True:  # RBAC caches settle within a moment
                try:
                    await client.CoreV1Api(c).list_namespaced_config_map(namespace)
                    break
                except ApiException as exc:
                    if exc.status != 403 or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            with pytest.raises(ApiException) as err:
                await client.CoreV1Api(c).list_namespaced_secret(namespace)
            assert err.value.status == 403
        finally:
            await c.close()
