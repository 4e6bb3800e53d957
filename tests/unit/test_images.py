"""What the product image is built from: the runtime source without the test bed, exact pins
that cover the runtime dependencies, and a hash that moves only with those inputs."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from staticegress.controlplane import images

REPO = Path(__file__).resolve().parents[2]


def _pins(relative: str) -> dict[str, str]:
    pins = {}
    for raw in (REPO / relative).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{relative}: {line!r} is not pinned with =="
        assert version, f"{relative}: {line!r} has no version"
        pins[_norm(name)] = version
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_runtime_files_leave_out_the_test_bed() -> None:
    names = {name for name, _ in images._runtime_files()}
    assert {"Containerfile", "pyproject.toml", "image/requirements.txt"} <= names
    assert "staticegress/agent/agent.py" in names
    assert "staticegress/cli/main.py" in names
    assert any(n.startswith("deploy/") for n in names)  # the wheel packages deploy/
    leaked = [
        n
        for n in names
        if n.startswith(tuple(f"staticegress/{t}/" for t in images.TEST_BED))
        or n in {f"staticegress/cli/{m}" for m in images.TEST_BED_CLI}
        or "__pycache__" in n
    ]
    assert leaked == []


def test_containerfile_removes_the_same_test_bed() -> None:
    """A plain `podman build .` sees the whole tree; the Containerfile must drop the same parts."""
    text = (REPO / "Containerfile").read_text()
    removed = re.search(r"RUN rm -rf ([^&]+)&&", text, re.DOTALL)
    assert removed is not None
    paths = set(shlex.split(removed.group(1).replace("\\\n", " ")))
    assert {f"staticegress/{t}" for t in images.TEST_BED} <= paths
    assert {f"staticegress/cli/{m}" for m in images.TEST_BED_CLI} <= paths


def test_containerfile_packages_are_the_base_packages() -> None:
    """The host-made base holds exactly what the Containerfile would otherwise install."""
    text = (REPO / "Containerfile").read_text()
    m = re.search(r'^ARG PACKAGES="([^"]+)"', text, re.MULTILINE)
    assert m is not None
    assert tuple(m.group(1).split()) == images.BASE_PACKAGES


def test_pins_cover_the_runtime_dependencies_and_nothing_of_the_test_bed() -> None:
    pins = _pins("image/requirements.txt")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    direct = [Requirement(r) for r in project["dependencies"]]
    for req in direct:
        assert _norm(req.name) in pins, f"{req.name} is a dependency but not pinned"
        assert req.specifier.contains(pins[_norm(req.name)]), (req, pins[_norm(req.name)])
    # The closure, as the installed distributions declare it.
    closure: set[str] = set()
    todo = [req.name for req in direct]
    while todo:
        name = _norm(todo.pop())
        if name in closure:
            continue
        closure.add(name)
        for spec in importlib.metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    assert set(pins) == closure
    assert "cryptography" not in pins


def test_build_requirements_are_pinned() -> None:
    pins = _pins("image/build-requirements.txt")
    backend = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    for spec in backend:
        req = Requirement(spec)
        assert req.specifier.contains(pins[_norm(req.name)])


@pytest.fixture
def tiny_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkout with one file of each kind the image hash looks at (or must not)."""
    for name in (
        "Containerfile",
        "pyproject.toml",
        "README.md",
        *images.REQUIREMENTS,
        "deploy/agent.yaml",
        "staticegress/agent/agent.py",
        "staticegress/cli/main.py",
        "staticegress/cli/demo.py",
        "staticegress/lab/lab.py",
        "staticegress/controlplane/images.py",
        "staticegress/cnigate/go.mod",
        "staticegress/cnigate/main.go",
    ):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{name}\n")
    monkeypatch.setattr(images, "REPO", tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("edited", "rebuilds"),
    [
        ("staticegress/agent/agent.py", True),
        ("deploy/agent.yaml", True),
        ("image/requirements.txt", True),
        ("Containerfile", True),
        ("staticegress/cnigate/main.go", True),  # the plugin goes into the image
        ("staticegress/lab/lab.py", False),
        ("staticegress/controlplane/images.py", False),
        ("staticegress/cli/demo.py", False),
    ],
)
def test_image_inputs_hash(tiny_repo: Path, edited: str, rebuilds: bool) -> None:
    before = images.product_inputs_hash()
    assert images.product_inputs_hash() == before
    with open(tiny_repo / edited, "a") as f:
        f.write("edited\n")
    assert (images.product_inputs_hash() != before) is rebuilds


def test_base_is_named_by_its_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    before = images.base_reference()
    assert before.startswith(f"localhost/staticegress-base:{images.DEBIAN_SUITE}-")
    monkeypatch.setattr(images, "BASE_PACKAGES", (*images.BASE_PACKAGES, "curl"))
    assert images.base_reference() != before
