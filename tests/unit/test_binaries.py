"""Where the test bed's binaries come from: envtest variables, KUBEBUILDER_ASSETS, the cache,
Debian; and how the node binaries are built."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from staticegress.controlplane import binaries as b

ETCD = next(c for c in b.COMPONENTS if c.name == "etcd")
APISERVER = next(c for c in b.COMPONENTS if c.name == "kube-apiserver")


def _exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for c in b.COMPONENTS:
        monkeypatch.delenv(c.env, raising=False)
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    monkeypatch.setenv("STATICEGRESS_CACHE", str(tmp_path / "cache"))


def test_per_binary_variable_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = _exe(tmp_path / "my-etcd")
    _exe(tmp_path / "assets" / "etcd")
    monkeypatch.setenv("TEST_ASSET_ETCD", str(mine))
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path / "assets"))
    assert b.find(ETCD) == mine


def test_per_binary_variable_must_be_executable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etcd").write_text("not executable")
    monkeypatch.setenv("TEST_ASSET_ETCD", str(tmp_path / "etcd"))
    with pytest.raises(b.BinaryNotFoundError, match="TEST_ASSET_ETCD"):
        b.find(ETCD)


def test_kubebuilder_assets_then_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assets = tmp_path / "assets"
    _exe(assets / "kube-apiserver")
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    assert b.find(APISERVER) == assets / "kube-apiserver"
    # Not in the assets directory: fall back to the versioned cache.
    assert b.find(ETCD) is None
    cached = _exe(b.cached_path(ETCD))
    assert b.find(ETCD) == cached


def test_cache_directory_is_versioned_and_outside_the_repo() -> None:
    path = b.cached_path(APISERVER)
    assert path.parent.name == f"kubernetes-{b.module_version('kubernetes')}"
    assert b.module_version("kubernetes").startswith("v1.")
    assert b.module_version("etcd").startswith("v3.")
    assert Path(__file__).resolve().parents[2] not in path.parents


def test_cached_binary_is_not_rebuilt(monkeypatch: pytest.MonkeyPatch) -> None:
    _exe(b.cached_path(ETCD))
    monkeypatch.setenv("PATH", "/nonexistent")  # no Go: a build attempt would fail
    assert b.find(ETCD) == b.cached_path(ETCD)


def test_missing_go_gives_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(b.BinaryNotFoundError, match="KUBEBUILDER_ASSETS"):
        b.build(ETCD, progress=lambda s: None)


# --- node binaries -----------------------------------------------------------

NODE = {c.name: c for c in b.NODE_COMPONENTS}


@pytest.fixture
def debian_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A runc and a CNI directory of our own, so no test depends on the host's packages."""
    monkeypatch.setenv("TEST_ASSET_RUNC", str(_exe(tmp_path / "debian" / "runc")))
    cni = tmp_path / "debian" / "cni"
    for plugin in b.REQUIRED_CNI_PLUGINS:
        _exe(cni / plugin)
    monkeypatch.setenv(b.CNI_BIN_DIR_ENV, str(cni))
    return tmp_path / "debian"


@pytest.fixture(autouse=True)
def _clean_node_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for c in b.NODE_COMPONENTS:
        monkeypatch.delenv(c.env, raising=False)
    monkeypatch.delenv("TEST_ASSET_RUNC", raising=False)
    monkeypatch.delenv(b.CNI_BIN_DIR_ENV, raising=False)


def test_node_binaries_from_variables_and_cache_build_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, debian_tools: Path
) -> None:
    kubelet = _exe(tmp_path / "mine" / "kubelet")
    monkeypatch.setenv("TEST_ASSET_KUBELET", str(kubelet))
    for name in ("kube-proxy", "containerd", "ctr", "containerd-shim-runc-v2"):
        _exe(b.cached_path(NODE[name]))
    monkeypatch.setenv("PATH", "/nonexistent")  # no Go: any build attempt would fail
    found = b.ensure_node_binaries(progress=lambda s: None)
    assert found.kubelet == kubelet
    assert found.kube_proxy == b.cached_path(NODE["kube-proxy"])
    assert found.shim == b.cached_path(NODE["containerd-shim-runc-v2"])
    assert found.runc == debian_tools / "runc"
    assert found.cni_bin_dir == debian_tools / "cni"


def test_node_binaries_are_cached_per_module_version() -> None:
    assert b.module_version("containerd") == "v2.4.2"
    assert b.cached_path(NODE["kubelet"]).parent == b.cached_path(APISERVER).parent
    assert b.cached_path(NODE["containerd"]).parent.name == "containerd-v2.4.2"
    assert b.cached_path(NODE["ctr"]).parent == b.cached_path(NODE["containerd"]).parent


def test_node_binaries_are_not_part_of_the_control_plane() -> None:
    """The fast path (`ensure_binaries`) must never wait for a kubelet or containerd build."""
    control_plane = {c.name for c in b.COMPONENTS}
    assert not control_plane & set(NODE)
    assert {f.name for f in dataclasses.fields(b.Binaries)} == {
        c.name.replace("-", "_") for c in b.COMPONENTS
    }


def test_missing_runc_says_run_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(b, "_SYSTEM_BIN_DIRS", str(tmp_path))
    with pytest.raises(b.BinaryNotFoundError, match=r"runc not found: run scripts/setup\.sh"):
        b.ensure_node_binaries(progress=lambda s: None)


def test_missing_cni_plugins_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEST_ASSET_RUNC", str(_exe(tmp_path / "runc")))
    _exe(tmp_path / "cni" / "loopback")
    monkeypatch.setenv(b.CNI_BIN_DIR_ENV, str(tmp_path / "cni"))
    with pytest.raises(b.BinaryNotFoundError, match="bridge, host-local, portmap, ptp") as err:
        b.ensure_node_binaries(progress=lambda s: None)
    assert "containernetworking-plugins" in str(err.value)


def test_version_ldflags() -> None:
    """kubelet must not report v0.0.0-master, nor containerd `+unknown`."""
    assert "k8s.io/component-base/version.gitVersion=v1.36.3" in b._ldflags(NODE["kubelet"])
    assert "k8s.io/component-base/version.gitVersion=v1.36.3" in b._ldflags(NODE["kube-proxy"])
    containerd = b._ldflags(NODE["containerd"])
    assert "github.com/containerd/containerd/v2/version.Version=v2.4.2" in containerd
    assert b._ldflags(NODE["containerd-shim-runc-v2"]) == containerd
    assert "no_btrfs" in NODE["containerd"].tags
    assert "no_grpc" in NODE["containerd-shim-runc-v2"].tags


def test_every_built_package_is_pinned_by_its_module() -> None:
    """`go mod tidy` keeps only what tools.go imports: a package missing there cannot build."""
    for component in (*b.COMPONENTS, *b.NODE_COMPONENTS):
        if component.module_dir is None or component.package == ".":
            continue
        tools = (b.GOMOD_DIR / component.module_dir / "tools.go").read_text()
        assert f'_ "{component.package}"' in tools, component.name
