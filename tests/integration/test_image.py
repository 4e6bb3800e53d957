"""The images built on this machine: the product image runs the agent and the manager and
carries no test bed; the pause image stops at once on SIGTERM; an unchanged tree rebuilds
nothing. Uses podman (root) and the images `scripts/setup.sh` builds (built here if missing).

Containers run with `--network none`, so no test touches the host's networking.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from staticegress import __version__
from staticegress.controlplane import images

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("podman") or not shutil.which("mmdebstrap"),
    reason="needs root, podman and mmdebstrap (scripts/setup.sh installs them)",
)

RUN = ["podman", "run", "--rm", "--network", "none", *images.PODMAN_ULIMITS]


@pytest.fixture(scope="module")
def product() -> images.ImageArchive:
    return images.ensure_product_image(progress=lambda line: None)


@pytest.fixture(scope="module")
def pause() -> images.ImageArchive:
    return images.ensure_pause_image(progress=lambda line: None)


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RUN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _layer_paths(archive: Path) -> set[str]:
    """Every path in the archive's layers: what `ctr images import` puts on a node."""
    paths: set[str] = set()
    with tarfile.open(archive) as outer:
        for member in outer.getmembers():
            blob = outer.extractfile(member) if member.isfile() else None
            if blob is None or not member.name.startswith("blobs/"):
                continue
            try:
                with tarfile.open(fileobj=io.BytesIO(blob.read())) as layer:
                    paths.update(name.removeprefix("./") for name in layer.getnames())
            except tarfile.ReadError:
                continue  # the config or a manifest, not a layer
    return paths


def test_product_image_carries_the_program_and_no_test_bed(product: images.ImageArchive) -> None:
    assert product.ref == f"localhost/staticegress:{__version__}"
    paths = _layer_paths(product.archive)
    site = "opt/staticegress/venv/lib/python3.11/site-packages"
    assert f"{site}/staticegress/agent/agent.py" in paths
    assert f"{site}/staticegress/manager/manager.py" in paths
    leaked = sorted(
        p
        for p in paths
        if p.startswith(tuple(f"{site}/staticegress/{t}" for t in images.TEST_BED))
        or p.startswith((f"{site}/cryptography", f"{site}/pip/", f"{site}/kubectl"))
        or p in {f"{site}/staticegress/cli/{m}" for m in images.TEST_BED_CLI}
    )
    assert leaked == []
    assert "usr/bin/sleep" in paths  # the uninstall DaemonSet's pods idle with it
    assert "opt/staticegress/cni" in paths
    gate = "opt/staticegress/cni/staticegress-gate" in paths
    assert gate == bool(images._gate_sources())


@pytest.mark.parametrize("command", ["agent", "manager"])
def test_product_image_runs_the_program(product: images.ImageArchive, command: str) -> None:
    as_root = _run(product.ref, command, "--help")
    assert as_root.returncode == 0, as_root.stderr
    assert as_root.stdout.startswith(f"usage: staticegress {command}")
    # As the deploy kit may run it: read-only root, not root.
    confined = _run("--read-only", "--user", "65532:65532", product.ref, command, "--help")
    assert confined.returncode == 0, confined.stderr


def test_product_image_refuses_the_test_bed(product: images.ImageArchive) -> None:
    out = _run(product.ref, "lab", "status")
    assert out.returncode == 1
    assert "not part of this installation" in out.stderr


def test_unchanged_inputs_reuse_the_archive(product: images.ImageArchive) -> None:
    mtime = product.archive.stat().st_mtime_ns
    started = time.monotonic()
    again = images.ensure_product_image(progress=lambda line: None)
    assert again == product
    assert again.archive.stat().st_mtime_ns == mtime
    assert time.monotonic() - started < 10
    # podman's tag is the build of these inputs.
    template = f'{{{{index .Labels "{images.INPUTS_LABEL}"}}}}'
    label = subprocess.run(
        ["podman", "image", "inspect", "--format", template, product.ref],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert label == images.product_inputs_hash()


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"staticegress-test-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, check=False)


def test_pause_stops_at_once_on_sigterm(pause: images.ImageArchive, container_name: str) -> None:
    assert _layer_paths(pause.archive) == {"pause"}
    detached = ["podman", "run", "-d", "--name", container_name, "--network", "none"]
    subprocess.run(
        [*detached, *images.PODMAN_ULIMITS, pause.ref],
        capture_output=True,
        text=True,
        check=True,
    )
    started = time.monotonic()
    # Without its own handler PID 1 ignores SIGTERM: podman would wait 10 s, then kill.
    subprocess.run(["podman", "stop", "-t", "10", container_name], capture_output=True, check=True)
    assert time.monotonic() - started < 5
    code = subprocess.run(
        ["podman", "inspect", "--format", "{{.State.ExitCode}}", container_name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert code == "0"
