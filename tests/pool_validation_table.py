"""Load tests/cases/pool_validation.yaml: one table of good and bad
StaticEgressIPPool specs that both the parser tests and the API-server tests run."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from tests.validation_table import load

_TABLE = Path(__file__).parent / "cases" / "pool_validation.yaml"


def _spec(base: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(base)
    for key, value in copy.deepcopy(entry.get("spec", {})).items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


POOL_VALID, POOL_INVALID = load(_TABLE, _spec)
