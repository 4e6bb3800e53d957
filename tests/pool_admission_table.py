"""Load tests/cases/pool_admission.yaml: the namespace-grant and pinned-selector
cases that both the Python twins and the admission policy judge."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_TABLE = Path(__file__).parent / "cases" / "pool_admission.yaml"


@dataclass(frozen=True)
class SelectorCase:
    name: str
    selector: dict[str, Any]
    expected: bool

    def for_namespace(self, namespace: str) -> dict[str, Any]:
        """The selector with `$NS` replaced by `namespace`."""
        loaded: dict[str, Any] = json.loads(json.dumps(self.selector).replace("$NS", namespace))
        return loaded


def load() -> tuple[dict[str, str], list[SelectorCase], list[SelectorCase]]:
    table = yaml.safe_load(_TABLE.read_text())
    grants = [
        SelectorCase(name=c["name"], selector=c["selector"], expected=c["granted"])
        for c in table["grants"]["cases"]
    ]
    pinned = [
        SelectorCase(name=c["name"], selector=c["selector"], expected=c["pinned"])
        for c in table["pinned"]
    ]
    return dict(table["grants"]["labels"]), grants, pinned


NAMESPACE_LABELS, GRANT_CASES, PINNED_CASES = load()
