"""Shared fixtures: a real local control plane (etcd, kube-apiserver, controller manager,
scheduler) for the whole session, admin and per-identity kubeconfigs, and clients."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client

from staticegress.controlplane.binaries import Binaries, ensure_binaries
from staticegress.controlplane.cluster import ControlPlane
from staticegress.k8s.client import api_client
from staticegress.k8s.crd import install_crd


@pytest.fixture(scope="session")
def binaries() -> Binaries:
    """Every control-plane binary, built into the cache on first use."""
    return ensure_binaries()


@pytest.fixture(scope="session")
def control_plane(binaries: Binaries) -> Iterator[ControlPlane]:
    """A running control plane, shared by the session and torn down at its end."""
    with ControlPlane(binaries=binaries) as cp:
        yield cp


@pytest.fixture(scope="session")
def admin_kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.admin_kubeconfig


@pytest.fixture(scope="session")
async def api(admin_kubeconfig: Path) -> AsyncIterator[client.ApiClient]:
    """An admin kubernetes-asyncio client."""
    c = await api_client(admin_kubeconfig)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture(scope="session")
async def crd(api: client.ApiClient) -> dict[str, object]:
    """The StaticEgressIP CRD, installed and Established."""
    return await install_crd(api)


@pytest.fixture
async def namespace(api: client.ApiClient) -> AsyncIterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    await core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        await core.delete_namespace(name)


@pytest.fixture(scope="session")
def kubectl(binaries: Binaries, admin_kubeconfig: Path) -> Callable[..., str]:
    """Run kubectl as the admin; return stdout, raising with stderr on failure."""

    def run(*args: str, kubeconfig: Path | None = None, stdin: str | None = None) -> str:
        env = {**os.environ, "KUBECONFIG": str(kubeconfig or admin_kubeconfig)}
        proc = subprocess.run(
            [str(binaries.kubectl), *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout

    return run
