"""Where control-plane binaries come from: envtest variables, KUBEBUILDER_ASSETS, the cache."""

from __future__ import annotations

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
