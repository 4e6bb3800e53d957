"""Find or build `staticegress-gate`, the chained CNI plugin whose Go source sits next to this file.

Build tooling for the image and the tests; the agent never imports it (it
only copies a binary it is given, see `staticegress.dataplane.cnigate`).

Lookup order, first hit wins:

1. `$STATICEGRESS_CNI_GATE`, a prebuilt binary;
2. the build cache, `<cache root>/cnigate/<hash of the sources>/staticegress-gate`
   (the cache root is the control plane's: `$STATICEGRESS_CACHE`, else
   `$XDG_CACHE_HOME/staticegress`, else `~/.cache/staticegress`).

Otherwise it is built there with `CGO_ENABLED=0 go build -trimpath -ldflags
"-s -w"`: a static binary, since the runtime executes it on the host with
nothing behind it. The build is the control-plane binaries' `go_build`: a file
lock keeps two processes from building at once and the build writes a
temporary name that is renamed into place, so an interrupted build never
leaves a broken binary.
Keyed by the sources' hash, an edited plugin is rebuilt and an unchanged one
never is.

`python -m staticegress.cnigate` prints the binary's path, building it if needed.
"""

from __future__ import annotations

import os
from pathlib import Path

from staticegress.controlplane.binaries import (
    BinaryNotFoundError,
    Progress,
    cache_root,
    content_hash,
    go_build,
    is_executable,
    stderr_progress,
)

SOURCE_DIR = Path(__file__).parent
NAME = "staticegress-gate"
ENV = "STATICEGRESS_CNI_GATE"


def _sources() -> list[Path]:
    return sorted(
        p for p in SOURCE_DIR.iterdir() if p.name in ("go.mod", "go.sum") or p.suffix == ".go"
    )


def source_hash() -> str:
    """A short hash of every file the build reads, so any edit means a new binary."""
    return content_hash((p.name, p.read_bytes()) for p in _sources())


def cached_path() -> Path:
    """Where the build cache keeps the binary built from the current sources."""
    return cache_root() / "cnigate" / source_hash() / NAME


def find() -> Path | None:
    """The binary, if it exists already; builds nothing."""
    if env := os.environ.get(ENV):
        path = Path(env)
        if not is_executable(path):
            raise BinaryNotFoundError(f"{ENV}={env} is not an executable file")
        return path
    path = cached_path()
    return path if is_executable(path) else None


def build(*, progress: Progress = stderr_progress) -> Path:
    """Build the plugin into the cache unless it is there already; return its path."""
    return go_build(
        cached_path(),
        package=".",
        module=SOURCE_DIR,
        # No network: the plugin uses the standard library only.
        env={"GOPROXY": "off"},
        advice=f"install Go >= 1.22, or set {ENV} to a prebuilt binary",
        progress=progress,
    )


def ensure_gate_binary(*, progress: Progress = stderr_progress) -> Path:
    """The plugin binary, built from the current sources if no copy exists."""
    return find() or build(progress=progress)
