"""The lab fixture: one lab per CNI mode, brought up and down through the CLI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.labkit import Lab, require_no_lab, staticegress
from staticegress.controlplane.binaries import Binaries
from staticegress.lab import lab as lablib
from staticegress.lab import plan
from tests.conftest import binaries  # noqa: F401 - the shared session fixture


@pytest.fixture(scope="module", params=plan.CNIS)
def lab(request: pytest.FixtureRequest, binaries: Binaries) -> Iterator[Lab]:  # noqa: F811
    """A 3-node lab in each CNI mode, shared by the tests of one module."""
    require_no_lab()
    cni = request.param
    start = time.monotonic()
    staticegress("lab", "up", "--nodes", "3", "--cni", cni)
    print(f"\nlab up ({cni}) took {time.monotonic() - start:.1f}s")
    try:
        yield Lab(
            cni=cni,
            nodes=3,
            kubeconfig=Path(lablib.state_dir() / "admin.kubeconfig"),
            binaries=binaries,
        )
    finally:
        start = time.monotonic()
        staticegress("lab", "down")
        print(f"\nlab down ({cni}) took {time.monotonic() - start:.1f}s")
