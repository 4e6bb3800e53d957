"""Build the test bed's container images on this machine, with no registry.

Two images, each saved as an OCI archive that a lab node loads with
`ctr -n k8s.io images import`:

- the pod sandbox (pause) image, `PAUSE_REFERENCE`: `pause.c` next to this
  file, compiled statically, alone in a one-file image;
- the product image, `localhost/staticegress:<version>`, from the repository's
  `Containerfile`, also left tagged in podman's local store.

The product image's base is made from Debian packages only (`mmdebstrap`,
suite `bookworm` plus its updates and security suites; a dated snapshot
mirror would pin further, but snapshot.debian.org is unreachable here, so
`STATICEGRESS_DEBIAN_MIRROR` can name one where it is not). Containers here
cannot reach PyPI (its TLS certificate chain ends in a CA only the host
trusts), so the pinned wheels of `image/requirements.txt` and
`image/build-requirements.txt` are downloaded on the host, for the base's
CPython 3.11, into the build context, and the build runs with no network.
The CNI gate plugin, when its source exists, is built on the host too.

Every output lives under `<cache root>/images/` (the control plane's cache
root, outside the repository) and is named by a hash of what went into it:
the runtime source tree (the test bed excluded, as in the image), the
requirements, the Containerfile, the base's package list, the plugin's
source. An archive whose inputs did not change is reused, never rebuilt. As
with the binaries, a file lock keeps two processes from building the same
thing and outputs are written under a temporary name, then renamed.

podman on this host needs `--ulimit nofile=20000:20000 --ulimit
nproc=4096:4096` for every container it runs: the sandbox lacks
CAP_SYS_RESOURCE, so the defaults cannot be raised to.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from staticegress import __version__
from staticegress.controlplane.binaries import (
    Progress,
    atomic_output,
    cache_root,
    content_hash,
    file_lock,
    run_with_progress,
    stderr_progress,
)

REPO = Path(__file__).resolve().parents[2]
PAUSE_SOURCE = Path(__file__).with_name("pause.c")
PAUSE_REFERENCE = "localhost/staticegress-pause:3.10"
PRODUCT_REPOSITORY = "localhost/staticegress"

DEBIAN_SUITE = "bookworm"
DEBIAN_PYTHON = "3.11"
"""The CPython of DEBIAN_SUITE: the wheels are downloaded for it."""
BASE_PACKAGES = ("python3", "python3-venv", "libnftables1", "nftables", "iproute2")
"""What the base holds beyond Debian's essential set (which brings coreutils'
`sleep`); the Containerfile's PACKAGES, so it installs nothing more."""
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"
MIRROR_ENV = "STATICEGRESS_DEBIAN_MIRROR"

PODMAN_ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096")
INPUTS_LABEL = "io.staticegress.inputs"
"""Label on the product image: the hash of its inputs, to tell a stale tag."""

TEST_BED = ("lab", "controlplane", "cnigate")
"""Subpackages of staticegress that never go into the image."""
TEST_BED_CLI = ("lab.py", "demo.py")
"""CLI modules of staticegress.cli that only drive the test bed."""
REQUIREMENTS = ("image/requirements.txt", "image/build-requirements.txt")


class ImageBuildError(RuntimeError):
    """An image could not be built; the message says why and what to do."""


@dataclass(frozen=True)
class ImageArchive:
    """A built image: its reference and the OCI archive that holds it."""

    ref: str
    """e.g. `localhost/staticegress:0.1.0`; the archive's index names the image so too."""
    archive: Path


def images_dir() -> Path:
    """Where the built images and their inputs are cached."""
    return cache_root() / "images"


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise ImageBuildError(
            f"{name} not found: run scripts/setup.sh, which installs it from Debian"
        )
    return found


def _locked(name: str) -> AbstractContextManager[None]:
    """The lock for building `name`; taking it also makes `images_dir()`."""
    return file_lock(images_dir() / f".{name}.lock")


def _run(
    cmd: list[str],
    *,
    label: str,
    progress: Progress,
    show: Callable[[str], bool] = lambda line: False,
) -> None:
    """Run `cmd` as `run_with_progress` does; a failure is an ImageBuildError."""
    run_with_progress(cmd, label=label, progress=progress, show=show, error=ImageBuildError)


def _podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("podman"), *args], capture_output=True, text=True, check=False)


def _save(reference: str, target: Path, *, progress: Progress) -> None:
    """Write `reference` from podman's store to `target` as an OCI archive, atomically."""
    with atomic_output(target) as tmp:
        _run(
            [_tool("podman"), "save", "--format", "oci-archive", "-o", str(tmp), reference],
            label=f"saving {reference}",
            progress=progress,
        )


def _prune(directory: Path, pattern: str, keep: Path) -> None:
    """Remove superseded archives, newest first kept: two builds back stay for running labs."""
    old = sorted(
        (p for p in directory.glob(pattern) if p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in old[2:]:
        path.unlink(missing_ok=True)


# --- the pause image -----------------------------------------------------------


def pause_archive_path() -> Path:
    """Where the pause image built from the current `pause.c` is cached."""
    key = content_hash([("pause.c", PAUSE_SOURCE.read_bytes()), ("ref", PAUSE_REFERENCE.encode())])
    return images_dir() / f"staticegress-pause-{key}.oci.tar"


def ensure_pause_image(*, progress: Progress = stderr_progress) -> ImageArchive:
    """The sandbox image, built and saved unless the current source's archive exists."""
    target = pause_archive_path()
    if target.is_file():
        return ImageArchive(PAUSE_REFERENCE, target)
    with _locked("pause"):
        if target.is_file():
            return ImageArchive(PAUSE_REFERENCE, target)  # built while we waited
        progress(f"building the pause image {PAUSE_REFERENCE}")
        with tempfile.TemporaryDirectory(dir=images_dir(), prefix=".pause-") as tmp:
            binary = Path(tmp) / "pause"
            _run(
                [
                    _tool("gcc"),
                    *("-static", "-Os", "-s", "-Wall", "-Werror"),
                    *("-o", str(binary), str(PAUSE_SOURCE)),
                ],
                label="compiling pause.c",
                progress=progress,
            )
            rootfs = Path(tmp) / "rootfs.tar"
            with tarfile.open(rootfs, "w") as tar:
                info = tarfile.TarInfo("pause")
                info.size = binary.stat().st_size
                info.mode = 0o755
                with open(binary, "rb") as f:
                    tar.addfile(info, f)
            _run(
                [
                    _tool("podman"),
                    "import",
                    *("--change", 'ENTRYPOINT ["/pause"]', "--change", "USER 65535:65535"),
                    *(str(rootfs), PAUSE_REFERENCE),
                ],
                label="importing the pause image",
                progress=progress,
            )
        _save(PAUSE_REFERENCE, target, progress=progress)
        _prune(images_dir(), "staticegress-pause-*.oci.tar", keep=target)
        progress(f"pause image {PAUSE_REFERENCE} -> {target}")
    return ImageArchive(PAUSE_REFERENCE, target)


# --- the Debian base ---------------------------------------------------------


def _mirror() -> str:
    return os.environ.get(MIRROR_ENV) or DEFAULT_DEBIAN_MIRROR


def _base_sources() -> list[str]:
    """Where the base's packages come from: the suite, its updates and its security fixes."""
    mirror = _mirror()
    if os.environ.get(MIRROR_ENV):
        # A user's mirror (a dated snapshot, typically) is taken as the whole truth.
        return [f"deb {mirror} {DEBIAN_SUITE} main"]
    return [
        f"deb {mirror} {DEBIAN_SUITE} main",
        f"deb {mirror} {DEBIAN_SUITE}-updates main",
        f"deb http://deb.debian.org/debian-security {DEBIAN_SUITE}-security main",
    ]


# Documentation, manual pages and translations are no use in a container and
# about 50 MB of the base; the licences stay.
_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)


def base_reference() -> str:
    """The local base image's reference, named by a hash of how it is made."""
    key = content_hash(
        [
            ("suite", DEBIAN_SUITE.encode()),
            ("packages", ",".join(BASE_PACKAGES).encode()),
            ("sources", "\n".join(_base_sources()).encode()),
            ("dpkg", "\n".join(_DPKG_EXCLUDES).encode()),
        ]
    )
    return f"localhost/staticegress-base:{DEBIAN_SUITE}-{key}"


def ensure_base_image(*, progress: Progress = stderr_progress) -> str:
    """The Debian base in podman's store, made with mmdebstrap once; returns its reference."""
    reference = base_reference()
    tar = images_dir() / f"base-{reference.rsplit(':', 1)[1]}.tar"
    with _locked("base"):
        if _podman("image", "exists", reference).returncode == 0:
            return reference
        if not tar.is_file():
            progress(
                f"making the Debian {DEBIAN_SUITE} base ({', '.join(BASE_PACKAGES)}) "
                "with mmdebstrap, about half a minute"
            )
            listing = "/usr/share/staticegress/debian-packages.txt"
            with atomic_output(tar) as tmp:
                _run(
                    [
                        _tool("mmdebstrap"),
                        "--variant=apt",
                        f"--include={','.join(BASE_PACKAGES)}",
                        *(f"--dpkgopt={opt}" for opt in _DPKG_EXCLUDES),
                        # The exact versions, for anyone auditing the image.
                        "--customize-hook="
                        f'mkdir -p "$1{Path(listing).parent}" && chroot "$1" dpkg-query -W '
                        f"-f '${{Package}}=${{Version}}\\n' > \"$1{listing}\"",
                        "--format=tar",
                        DEBIAN_SUITE,
                        str(tmp),
                        *_base_sources(),
                    ],
                    label="mmdebstrap",
                    progress=progress,
                    show=lambda line: line.startswith("I: ") and "success" in line,
                )
        _run(
            [_tool("podman"), "import", str(tar), reference],
            label="importing the base",
            progress=progress,
        )
    return reference


# --- the product image -------------------------------------------------------


def _runtime_files() -> list[tuple[str, Path]]:
    """(path in the build context, source) of every file the Containerfile reads.

    The staticegress tree leaves out the test bed here already, so an edit to
    the lab never changes the image's hash; the Containerfile removes it again
    for builds from a plain checkout.
    """
    if not (REPO / "Containerfile").is_file():
        raise ImageBuildError(f"no Containerfile in {REPO}: building the image needs a checkout")
    files = [(name, REPO / name) for name in ("Containerfile", "pyproject.toml", "README.md")]
    files += [(name, REPO / name) for name in REQUIREMENTS]
    for top in ("deploy", "staticegress"):
        for path in sorted((REPO / top).rglob("*")):
            rel = path.relative_to(REPO)
            parts = rel.parts
            if not path.is_file() or "__pycache__" in parts or path.suffix == ".pyc":
                continue
            if top == "staticegress" and len(parts) > 1 and parts[1] in TEST_BED:
                continue
            if parts[:2] == ("staticegress", "cli") and parts[-1] in TEST_BED_CLI:
                continue
            files.append((rel.as_posix(), path))
    return files


def _gate_sources() -> list[Path]:
    """The CNI gate plugin's Go sources, if it exists in this checkout."""
    directory = REPO / "staticegress" / "cnigate"
    if not (directory / "go.mod").is_file():
        return []
    return sorted(
        p for p in directory.iterdir() if p.name == "go.sum" or p.suffix in (".go", ".mod")
    )


def product_inputs_hash() -> str:
    """A hash of everything the product image is built from."""
    parts = [(name, path.read_bytes()) for name, path in _runtime_files()]
    parts += [(f"cnigate/{p.name}", p.read_bytes()) for p in _gate_sources()]
    parts += [("base", base_reference().encode()), ("arch", platform.machine().encode())]
    return content_hash(parts)


def product_reference() -> str:
    return f"{PRODUCT_REPOSITORY}:{__version__}"


def product_archive_path() -> Path:
    return images_dir() / f"staticegress-{__version__}-{product_inputs_hash()}.oci.tar"


def _manylinux_platforms() -> list[str]:
    # bookworm's glibc is 2.36; every manylinux wheel down to glibc 2.17 runs on it.
    arch = platform.machine()
    return [f"manylinux_2_{minor}_{arch}" for minor in range(36, 16, -1)]


def _requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(_normalise(line.split("==", 1)[0]))
    return names


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def ensure_wheelhouse(*, progress: Progress = stderr_progress) -> Path:
    """The pinned wheels for the base's Python, downloaded once per set of pins."""
    key = content_hash(
        [(name, (REPO / name).read_bytes()) for name in REQUIREMENTS]
        + [("platforms", " ".join(_manylinux_platforms()).encode())]
    )
    target = images_dir() / f"wheelhouse-py{DEBIAN_PYTHON}-{key}"
    if target.is_dir():
        return target
    with _locked("wheelhouse"):
        if target.is_dir():
            return target
        progress(f"downloading the pinned wheels for CPython {DEBIAN_PYTHON}")
        with atomic_output(target) as tmp:
            tmp.mkdir()
            platforms = [arg for p in _manylinux_platforms() for arg in ("--platform", p)]
            abi = DEBIAN_PYTHON.replace(".", "")
            for name in REQUIREMENTS:
                # --no-deps: the pins are the whole closure, and the image's
                # install (with dependencies, no index) proves it.
                _run(
                    [
                        *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
                        *("--only-binary=:all:", "--python-version", DEBIAN_PYTHON),
                        *("--implementation", "cp", "--abi", f"cp{abi}", "--abi", "abi3"),
                        *("--abi", "none", *platforms),
                        *("-r", str(REPO / name), "-d", str(tmp)),
                    ],
                    label=f"pip download -r {name}",
                    progress=progress,
                )
            got = {_normalise(p.name.split("-", 1)[0]) for p in tmp.glob("*.whl")}
            wanted = set().union(*(_requirement_names(REPO / n) for n in REQUIREMENTS))
            if got != wanted:
                raise ImageBuildError(
                    f"wheelhouse does not match the pins: missing {sorted(wanted - got)}, "
                    f"unpinned {sorted(got - wanted)}"
                )
    return target


def _stage_context(context: Path, *, wheelhouse: Path, gate: Path | None) -> None:
    """Copy the build context: the runtime sources, the wheels, the prebuilt plugin."""
    for name, source in _runtime_files():
        dest = context / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
    wheels = context / "image" / "wheelhouse"
    wheels.mkdir(parents=True)
    for wheel in wheelhouse.glob("*.whl"):
        os.link(wheel, wheels / wheel.name)
    cni = context / "image" / "cni"
    cni.mkdir()
    if gate is not None:
        shutil.copy2(gate, cni / "staticegress-gate")


def _image_label(reference: str) -> str | None:
    found = _podman(
        "image", "inspect", "--format", f'{{{{index .Labels "{INPUTS_LABEL}"}}}}', reference
    )
    return found.stdout.strip() if found.returncode == 0 else None


def _image_id(reference: str) -> str | None:
    found = _podman("image", "inspect", "--format", "{{.Id}}", reference)
    return found.stdout.strip() if found.returncode == 0 else None


_BUILD_STEP = re.compile(r"^(\[\d+/\d+\] )?STEP \d+/\d+: ")


def ensure_product_image(*, progress: Progress = stderr_progress) -> ImageArchive:
    """`localhost/staticegress:<version>` in podman's store and as an OCI archive.

    Built only when no archive of the current inputs exists; an existing
    archive is loaded back into podman's store if the tag there is stale.
    """
    reference = product_reference()
    inputs = product_inputs_hash()
    target = images_dir() / f"staticegress-{__version__}-{inputs}.oci.tar"
    with _locked("product"):
        if target.is_file():
            if _image_label(reference) != inputs:
                progress(f"loading {reference} from {target}")
                _run(
                    [_tool("podman"), "load", "-i", str(target)],
                    label="podman load",
                    progress=progress,
                )
            return ImageArchive(reference, target)
        base = ensure_base_image(progress=progress)
        wheelhouse = ensure_wheelhouse(progress=progress)
        gate = _gate_binary(progress) if _gate_sources() else None
        if gate is None:
            progress("no CNI gate plugin source: /opt/staticegress/cni/ stays empty")
        previous = _image_id(reference)
        progress(f"building {reference} (inputs {inputs})")
        start = time.monotonic()
        with tempfile.TemporaryDirectory(dir=images_dir(), prefix=".context-") as tmp:
            context = Path(tmp)
            _stage_context(context, wheelhouse=wheelhouse, gate=gate)
            _run(
                [
                    _tool("podman"),
                    "build",
                    *PODMAN_ULIMITS,
                    # Everything is in the context: a step that reaches out is a bug.
                    "--network=none",
                    "--pull=never",
                    "--build-arg",
                    f"BASE={base}",
                    "--build-arg",
                    f"GO_IMAGE={base}",
                    "--label",
                    f"{INPUTS_LABEL}={inputs}",
                    "--label",
                    f"org.opencontainers.image.version={__version__}",
                    "-f",
                    str(context / "Containerfile"),
                    "-t",
                    reference,
                    str(context),
                ],
                label="podman build",
                progress=progress,
                # "[2/3] STEP 5/9: RUN ...": one line per step of each stage.
                show=lambda line: _BUILD_STEP.match(line) is not None,
            )
        _save(reference, target, progress=progress)
        current = _image_id(reference)
        if previous is not None and previous != current:
            # The old build lost its tag; nothing else of ours uses it. A
            # failure (a container still using it) leaves it for the user.
            _podman("rmi", previous)
        _prune(images_dir(), f"staticegress-{__version__}-*.oci.tar", keep=target)
        progress(f"built {reference} in {time.monotonic() - start:.0f}s -> {target}")
    return ImageArchive(reference, target)


def _gate_binary(progress: Progress) -> Path:
    # Imported here: the plugin's helper is build tooling of its own, present
    # only in checkouts that carry the plugin.
    from staticegress.cnigate import ensure_gate_binary

    return ensure_gate_binary(progress=progress)
