"""A minimal Prometheus text-format registry: counters, gauges and one histogram.

The agent exports a handful of series; a client library would add a
dependency for no gain. Names follow Prometheus conventions (`_total`,
`_seconds`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        counts = self.counts or [0] * len(self.buckets)
        for bound, c in zip(self.buckets, counts, strict=True):
            running += c
            out.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        out += [
            f'{self.name}_bucket{{le="+Inf"}} {self.n}',
            f"{self.name}_sum {self.total}",
            f"{self.name}_count {self.n}",
        ]
        return out


@dataclass
class Registry:
    """Named scalar series plus histograms, rendered in registration order."""

    prefix: str = "staticegress"
    _scalars: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    _histograms: dict[str, Histogram] = field(default_factory=dict)

    def histogram(
        self, name: str, help: str, buckets: tuple[float, ...] | None = None
    ) -> Histogram:
        h = Histogram(f"{self.prefix}_{name}", help)
        if buckets is not None:
            h.buckets = buckets
        self._histograms[name] = h
        return h

    def declare(self, name: str, kind: str, help: str) -> None:
        self._scalars.setdefault(name, (kind, help, 0.0))

    def set(self, name: str, value: float) -> None:
        kind, help, _ = self._scalars[name]
        self._scalars[name] = (kind, help, float(value))

    def inc(self, name: str, by: float = 1.0) -> None:
        kind, help, value = self._scalars[name]
        self._scalars[name] = (kind, help, value + by)

    def get(self, name: str) -> float:
        return self._scalars[name][2]

    def render(self) -> str:
        lines: list[str] = []
        for name, (kind, help, value) in self._scalars.items():
            full = f"{self.prefix}_{name}"
            lines += [f"# HELP {full} {help}", f"# TYPE {full} {kind}", f"{full} {value:g}"]
        for h in self._histograms.values():
            lines += h.render()
        return "\n".join(lines) + "\n"
