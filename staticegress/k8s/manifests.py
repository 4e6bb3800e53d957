"""Locate and load the project's Kubernetes manifests from `deploy/`.

In a wheel they are packaged as `staticegress/_deploy`; in a source checkout
(editable install, tests) they are read from the repository's `deploy/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).resolve().parents[1]


def deploy_dir() -> Path:
    """The directory holding the project's manifests."""
    for candidate in (_PACKAGE / "_deploy", _PACKAGE.parent / "deploy"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("staticegress manifests not found (no _deploy/ or deploy/)")


CRD_FILE = "crd/staticegressips.io_staticegressips.yaml"
POOL_CRD_FILE = "crd/staticegressips.io_staticegressippools.yaml"
MEMBERS_CRD_FILE = "crd/staticegressips.io_staticegressipmembers.yaml"
ADMISSION_FILE = "admission/pools.yaml"
"""The pool admission policy and its binding."""
TENANT_ROLES_FILE = "rbac/tenants.yaml"
"""The aggregated ClusterRoles for namespace admins, editors and viewers."""
UNINSTALL_KIT = "uninstall"
"""The uninstall kit, `kubectl apply -k deploy/uninstall/`."""


def load(relative: str) -> list[dict[str, Any]]:
    """Every YAML document of `deploy/<relative>`, anchors resolved."""
    # Imported here: the agent and manager never read manifests, and their
    # image need not carry a YAML parser.
    import yaml

    with open(deploy_dir() / relative) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def crd() -> dict[str, Any]:
    """The StaticEgressIP CustomResourceDefinition."""
    (doc,) = load(CRD_FILE)
    return doc


def pool_crd() -> dict[str, Any]:
    """The StaticEgressIPPool CustomResourceDefinition."""
    (doc,) = load(POOL_CRD_FILE)
    return doc


def crds() -> list[dict[str, Any]]:
    """Every CustomResourceDefinition of the product, the StaticEgressIP one first."""
    (members,) = load(MEMBERS_CRD_FILE)
    return [crd(), pool_crd(), members]
