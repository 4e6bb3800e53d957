"""The deploy kit against the real kube-apiserver: `kubectl apply -k deploy/` and
`kubectl apply -k deploy/uninstall/` are accepted object by object (server-side
dry run: schema, admission, Pod Security), and `staticegress uninstall` runs the
whole procedure on a control plane of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from staticegress.controlplane.binaries import Binaries
from staticegress.controlplane.cluster import ControlPlane
from staticegress.k8s.manifests import UNINSTALL_KIT, deploy_dir

pytestmark = pytest.mark.controlplane


def _dry_run(kubectl: Callable[..., str], relative: str) -> str:
    out = kubectl("apply", "-k", str(deploy_dir() / relative), "--dry-run=server")
    assert "(server dry run)" in out
    return out


def test_the_product_is_accepted_by_the_api_server(kubectl: Callable[..., str]) -> None:
    # A server-side dry run creates nothing, so the objects inside the
    # namespace need it to exist for real.
    kubectl("apply", "-f", str(deploy_dir() / "namespace.yaml"))
    out = _dry_run(kubectl, ".")
    for obj in (
        "namespace/staticegress-system",
        "customresourcedefinition.apiextensions.k8s.io/staticegressips.staticegressips.io",
        "customresourcedefinition.apiextensions.k8s.io/staticegressippools.staticegressips.io",
        "customresourcedefinition.apiextensions.k8s.io/staticegressipmembers.staticegressips.io",
        "clusterrole.rbac.authorization.k8s.io/staticegress-edit",
        "clusterrole.rbac.authorization.k8s.io/staticegress-view",
        "validatingadmissionpolicy.admissionregistration.k8s.io/staticegress-pools",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/staticegress-pools",
        "daemonset.apps/staticegress-agent",
        "deployment.apps/staticegress-manager",
        "poddisruptionbudget.policy/staticegress-manager",
        "validatingadmissionpolicy.admissionregistration.k8s.io/staticegress-agent-report",
    ):
        assert obj in out, out


def test_the_uninstall_kit_is_accepted_by_the_api_server(kubectl: Callable[..., str]) -> None:
    kubectl("apply", "-f", str(deploy_dir() / UNINSTALL_KIT / "namespace.yaml"))
    try:
        out = _dry_run(kubectl, UNINSTALL_KIT)
        assert "daemonset.apps/staticegress-cleanup" in out, out
    finally:
        kubectl("delete", "namespace", "staticegress-uninstall", "--wait=false")


@pytest.fixture(scope="module")
def own_control_plane(binaries: Binaries) -> Iterator[ControlPlane]:
    """Uninstalling deletes the CRD, which the session's other tests need."""
    with ControlPlane(binaries=binaries) as cp:
        yield cp


def test_uninstall_removes_the_product_and_runs_the_cleanup_kit(
    own_control_plane: ControlPlane, binaries: Binaries
) -> None:
    env = {**os.environ, "KUBECONFIG": str(own_control_plane.admin_kubeconfig)}

    def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binaries.kubectl), *args], env=env, capture_output=True, text=True, check=check
        )

    kubectl("apply", "-k", str(deploy_dir()))
    kubectl(
        "wait",
        "--for=condition=Established",
        "crd/staticegressips.staticegressips.io",
        "crd/staticegressippools.staticegressips.io",
    )
    # A pool too: deleting its CRD takes it along.
    kubectl("apply", "-f", str(deploy_dir() / "examples" / "pool.yaml"))
    kubectl("create", "namespace", "tenant")
    kubectl(
        "-n",
        "tenant",
        "apply",
        "-f",
        str(deploy_dir() / "examples" / "lab.yaml"),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "staticegress",
            "uninstall",
            "--kubeconfig",
            str(own_control_plane.admin_kubeconfig),
            "--kubectl",
            str(binaries.kubectl),
            "--timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert step in proc.stderr, proc.stderr
    # The kit ran with the image the agents ran.
    assert "image staticegress:0.1.0" in proc.stderr, proc.stderr
    # Nothing of ours is left: the CRDs (and so every StaticEgressIP and
    # pool), both namespaces, the cluster-wide identities and roles, and the
    # admission policies.
    for gone in (
        ("crd", "staticegressips.staticegressips.io"),
        ("crd", "staticegressippools.staticegressips.io"),
        ("namespace", "staticegress-system"),
        ("namespace", "staticegress-uninstall"),
        ("clusterrole", "staticegress-agent"),
        ("clusterrolebinding", "staticegress-manager"),
        ("validatingadmissionpolicy", "staticegress-agent-report"),
        ("validatingadmissionpolicy", "staticegress-pools"),
        ("validatingadmissionpolicybinding", "staticegress-pools"),
        ("clusterrole", "staticegress-edit"),
        ("clusterrole", "staticegress-view"),
    ):
        got = kubectl("get", *gone, check=False)
        assert got.returncode != 0, f"{gone} is still there"
        assert "NotFound" in got.stderr, got.stderr
    # Run again, it finds everything gone and succeeds.
    again = subprocess.run(proc.args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "CRD is not installed" in again.stderr
