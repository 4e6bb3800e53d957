"""`python -m staticegress.cnigate`: print the CNI gate binary's path, building it if needed."""

from __future__ import annotations

import sys

from staticegress.cnigate import ensure_gate_binary
from staticegress.controlplane.binaries import BinaryNotFoundError


def main() -> int:
    try:
        print(ensure_gate_binary())
    except BinaryNotFoundError as exc:
        print(f"staticegress: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
