"""The long-lived roles' process settings (staticegress.cli.service)."""

from __future__ import annotations

import subprocess
import sys

from staticegress.cli.service import GC_YOUNGEST

# In a fresh interpreter: the settings are process-wide, and this test
# process must keep its own.
_RUN = """
import gc
import staticegress.cli.service as service

async def no_api(kubeconfig):
    raise RuntimeError("no API server here")

service.api_client = no_api
before = gc.get_threshold()[0]
try:
    service.run_service(None, lambda api: None)
except RuntimeError:
    pass
print(before, gc.get_threshold()[0], gc.get_freeze_count() > 0)
"""


def test_a_role_collects_less_often_and_leaves_its_start_up_objects_alone() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _RUN], capture_output=True, text=True, timeout=60, check=True
    )
    before, after, frozen = out.stdout.split()
    assert int(before) != GC_YOUNGEST
    assert int(after) == GC_YOUNGEST
    assert frozen == "True"
