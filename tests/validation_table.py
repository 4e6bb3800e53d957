"""Load tests/cases/validation.yaml: one table of good and bad StaticEgressIP specs
that both the parser tests and the API-server tests run."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_TABLE = Path(__file__).parent / "cases" / "validation.yaml"


@dataclass(frozen=True)
class Case:
    name: str
    spec: dict[str, Any]
    field: str | None = None
    message: str | None = None
    server_message: str | None = None


def _spec(base: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    if "spec" in entry:
        return copy.deepcopy(entry["spec"])
    rule = copy.deepcopy(base)
    for key, value in entry.get("rule", {}).items():
        if value is None:
            rule.pop(key, None)
        else:
            rule[key] = value
    return {"rules": [rule]}


SpecOf = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
"""(the table's base, one entry) -> the spec that entry stands for."""


def load(path: Path = _TABLE, spec_of: SpecOf = _spec) -> tuple[list[Case], list[Case]]:
    """The valid and invalid cases of one two-judge table."""
    table = yaml.safe_load(path.read_text())
    base = table["base"]
    valid = [Case(name=e["name"], spec=spec_of(base, e)) for e in table["valid"]]
    invalid = [
        Case(
            name=e["name"],
            spec=spec_of(base, e),
            field=e["field"],
            message=e["message"],
            server_message=e.get("server_message", e["message"]),
        )
        for e in table["invalid"]
    ]
    return valid, invalid


VALID, INVALID = load()
