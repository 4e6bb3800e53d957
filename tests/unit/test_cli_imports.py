"""The agent's and the manager's command paths never import the test bed.

The image carries neither `staticegress.lab`, `staticegress.controlplane` nor
their dependencies, so an import of them on these paths would break the
product. Each check runs in a fresh interpreter: this test process has
imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from staticegress.cli.main import TEST_BED_PACKAGES

FORBIDDEN = (*TEST_BED_PACKAGES, "cryptography")

# Makes every test-bed module unimportable, as in the image.
_WITHOUT_TEST_BED = f"""
import importlib.abc, sys
FORBIDDEN = {FORBIDDEN!r}
class WithoutTestBed(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(FORBIDDEN):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, WithoutTestBed())
"""


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("command", ["agent", "manager"])
def test_runtime_commands_import_no_test_bed(command: str) -> None:
    out = _python(
        "import json, sys\n"
        "from staticegress.cli.main import build_parser\n"
        f"args = build_parser([{command!r}]).parse_args([{command!r}])\n"
        # The handler's module is what runs on a node: import it as a run would.
        "assert callable(args.func)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert f"staticegress.cli.{command}" in loaded  # the check looked at the right path
    assert [m for m in loaded if m.startswith(FORBIDDEN)] == []


@pytest.mark.parametrize("command", ["agent", "manager"])
def test_runtime_help_works_without_the_test_bed(command: str) -> None:
    out = _python(
        _WITHOUT_TEST_BED + "from staticegress.cli.main import main\n"
        f"sys.exit(main([{command!r}, '--help']))\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: staticegress {command}")


def test_top_level_help_lists_the_test_bed_without_importing_it() -> None:
    out = _python(_WITHOUT_TEST_BED + "from staticegress.cli.main import main\nmain(['--help'])\n")
    assert out.returncode == 0, out.stderr
    for command in ("agent", "manager", "lab", "controlplane", "image", "demo"):
        assert f"    {command}" in out.stdout


@pytest.mark.parametrize(
    "argv", [["lab", "status"], ["controlplane", "binaries"], ["image", "build"], ["demo"]]
)
def test_test_bed_commands_say_they_are_not_installed(argv: list[str]) -> None:
    out = _python(
        _WITHOUT_TEST_BED + f"from staticegress.cli.main import main\nsys.exit(main({argv!r}))\n"
    )
    assert out.returncode == 1, out.stderr
    assert "is not part of this installation" in out.stderr
    assert "Traceback" not in out.stderr
