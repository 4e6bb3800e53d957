"""A streaming UDP prober for bench/realization.py: which source the external
server sees, packet by packet, from inside a lab pod.

It starts in the host namespace and waits for commands on stdin, one a line:

- `netns NAME`: enter network namespace NAME (waiting for it to appear, so a
  pod's namespace can be named before its kubelet has made it) and probe from
  it: every `--interval` seconds, one datagram from a fresh socket (a new
  source port: a new flow, which NAT decides afresh) and one from a socket
  kept open (one ongoing flow, whose NAT binding was made on its first packet);
- `idle`: stop probing, close the sockets and go back to the host namespace
  (so that a pod's teardown, which kills what runs in its namespace, spares
  us), then print `I`;
- end of input: exit.

The lab's UDP servers answer `<source> <payload>`; the payload is
`<seq> <kind>` (kind `n`: fresh flow, `o`: ongoing flow). Every reply is
printed at once as `R <seq> <sent> <kind> <source>`, `sent` being the
CLOCK_MONOTONIC nanoseconds at which that probe was sent (the clock every
process of the machine shares, whatever its network namespace). A datagram
that cannot be sent yet (no address, no route) counts as lost.

    python bench/_udpstream.py --server 203.0.113.20 --port 9000 --interval 0.005
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import socket
import sys
import time
from collections import deque

CLONE_NEWNET = 0x40000000
FRESH_LIFETIME = 0.5
"""Seconds a fresh socket stays open for its reply."""


def setns(path: str) -> None:
    """Move this (single-threaded) process into the network namespace at `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Prober:
    def __init__(self, server: str, port: int, interval: float) -> None:
        self.home_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        """Our first namespace, kept open so we can always go back."""
        self.addr = (server, port)
        self.interval = interval
        self.wanted: str | None = None
        """The namespace asked for and not entered yet."""
        self.active = False
        self.ongoing: socket.socket | None = None
        self.fresh: deque[tuple[float, socket.socket]] = deque()
        self.sent: dict[int, int] = {}
        self.seq = 0
        self.next_send = time.monotonic()

    def close(self) -> None:
        self.active = False
        if self.ongoing is not None:
            self.ongoing.close()
            self.ongoing = None
        while self.fresh:
            self.fresh.popleft()[1].close()
        self.sent.clear()

    def command(self, line: str) -> None:
        words = line.split()
        if words[:1] == ["netns"] and len(words) == 2:
            self.close()
            self.wanted = words[1]
        elif words == ["idle"]:
            self.close()
            self.wanted = None
            setns(f"/proc/self/fd/{self.home_fd}")
            print("I", flush=True)

    def try_enter(self) -> None:
        assert self.wanted is not None
        try:
            setns(f"/run/netns/{self.wanted}")
        except OSError:
            return  # not made (or not mounted) yet
        self.ongoing = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.ongoing.setblocking(False)
        print(f"A {self.wanted}", flush=True)
        self.wanted = None
        self.active = True
        self.next_send = time.monotonic()

    def send(self, now: float) -> None:
        assert self.ongoing is not None
        self.seq += 1
        sent = time.monotonic_ns()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        with contextlib.suppress(OSError):
            s.sendto(f"{self.seq} n".encode(), self.addr)
        self.fresh.append((now + FRESH_LIFETIME, s))
        with contextlib.suppress(OSError):
            self.ongoing.sendto(f"{self.seq} o".encode(), self.addr)
        self.sent[self.seq] = sent
        self.sent.pop(self.seq - 1000, None)
        self.next_send += self.interval
        if self.next_send < now:  # we were late: no burst to catch up
            self.next_send = now + self.interval

    def receive(self, s: socket.socket) -> None:
        while True:
            try:
                data = s.recv(2048)
            except (BlockingIOError, ConnectionRefusedError):
                return
            parts = data.decode(errors="replace").split()
            if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) in self.sent:
                src, seq, kind = parts[0], int(parts[1]), parts[2]
                print(f"R {seq} {self.sent[seq]} {kind} {src}", flush=True)

    def run(self) -> None:
        stdin = sys.stdin.fileno()
        os.set_blocking(stdin, False)
        pending = b""
        while True:
            now = time.monotonic()
            if self.wanted is not None:
                self.try_enter()
            if self.active and now >= self.next_send:
                self.send(now)
            while self.fresh and self.fresh[0][0] < now:
                self.fresh.popleft()[1].close()
            socks = [s for _, s in self.fresh]
            if self.ongoing is not None:
                socks.append(self.ongoing)
            if self.active:
                timeout = max(0.0, self.next_send - time.monotonic())
            else:
                timeout = 0.001 if self.wanted is not None else 1.0
            ready, _, _ = select.select([stdin, *socks], [], [], timeout)
            for r in ready:
                if isinstance(r, socket.socket):
                    self.receive(r)
            if stdin in ready:  # last: a command may close the sockets
                chunk = os.read(stdin, 4096)
                if not chunk:
                    self.close()
                    return
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self.command(line.decode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", required=True)
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--interval", type=float, default=0.005)
    args = ap.parse_args()
    Prober(args.server, args.port, args.interval).run()


if __name__ == "__main__":
    main()
