"""A UDP prober for the lab: send a numbered datagram every `interval` seconds to an
external server and record the source address each reply reports.

The lab's servers answer `<source> <payload>`, so every reply says which
address the traffic left with. The summary answers the questions the e2e
tests and benchmarks ask: did any reply show a source other than the egress
IP, how many probes were lost, and how long was the longest run of losses.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import sys
import time
from dataclasses import asdict, dataclass, field


@dataclass
class ProbeResult:
    sent: int = 0
    received: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    """Reply source address -> number of replies."""
    longest_gap_ms: float = 0.0
    """Longest run of consecutive lost probes, in milliseconds of sending time."""
    first_reply_ms: float | None = None
    """Time from the first probe to the first reply."""
    gaps: list[tuple[int, int]] = field(default_factory=list)
    """Runs of lost probes as (first lost sequence number, count)."""

    @property
    def lost(self) -> int:
        return self.sent - self.received

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "lost": self.lost})


def probe_command(*, server: str, port: int, interval: float, duration: float) -> list[str]:
    """The argv that runs the prober (`lab probe-run`); `lab exec` wraps it for a pod."""
    return [
        sys.executable,
        "-m",
        "staticegress",
        "lab",
        "probe-run",
        "--server",
        server,
        "--port",
        str(port),
        "--interval",
        str(interval),
        "--duration",
        str(duration),
    ]


def run_probe(
    *, server: str, port: int, interval: float, duration: float, grace: float = 1.0
) -> ProbeResult:
    """Probe for `duration` seconds, then wait `grace` seconds for late replies."""
    res = ProbeResult()
    replies: dict[int, str] = {}
    sent_at: dict[int, float] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        start = time.monotonic()
        next_send = start
        end = start + duration
        seq = 0
        while True:
            now = time.monotonic()
            if now >= end + grace:
                break
            if now >= next_send and now < end:
                with contextlib.suppress(OSError):  # unreachable for now: counts as lost
                    s.sendto(f"{seq}".encode(), (server, port))
                sent_at[seq] = now
                seq += 1
                next_send += interval
            timeout = max(0.0, min(next_send if now < end else end + grace, end + grace) - now)
            ready, _, _ = select.select([s], [], [], timeout)
            if not ready:
                continue
            while True:
                try:
                    data, _ = s.recvfrom(2048)
                except BlockingIOError:
                    break
                parts = data.decode(errors="replace").split(" ", 1)
                if len(parts) == 2 and parts[1].isdigit():
                    n = int(parts[1])
                    if n not in replies:
                        replies[n] = parts[0]
                        if res.first_reply_ms is None:
                            res.first_reply_ms = (time.monotonic() - start) * 1000
        res.sent = seq
    res.received = len(replies)
    for src in replies.values():
        res.sources[src] = res.sources.get(src, 0) + 1
    run_start, run_len = None, 0
    for n in range(res.sent + 1):
        if n < res.sent and n not in replies:
            if run_start is None:
                run_start, run_len = n, 0
            run_len += 1
            continue
        if run_start is not None:
            res.gaps.append((run_start, run_len))
            res.longest_gap_ms = max(res.longest_gap_ms, run_len * interval * 1000)
            run_start = None
    return res
