"""Load tests/cases/validation.yaml: one table of good and bad StaticEgressIP specs
that both the parser tests and the API-server tests run."""

from __future__ import annotations

import copy
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


def load() -> tuple[list[Case], list[Case]]:
    table = yaml.safe_load(_TABLE.read_text())
    base = table["base"]
    valid = [Case(name=e["name"], spec=_spec(base, e)) for e in table["valid"]]
    invalid = [
        Case(
            name=e["name"],
            spec=_spec(base, e),
            field=e["field"],
            message=e["message"],
            server_message=e.get("server_message", e["message"]),
        )
        for e in table["invalid"]
    ]
    return valid, invalid


VALID, INVALID = load()
