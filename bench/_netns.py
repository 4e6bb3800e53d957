"""Shared plumbing for the dataplane benchmarks: throwaway network namespaces
and iperf3 runs inside them.

Every namespace is named `sebench-<tag>-<role>` (a random tag per run) and
removed in `finally`, with every process started in it; nothing outside the
namespaces is touched. The machine's lab lock (`/tmp/staticegress-lab.lock`,
which the lab, the integration tests and CI take) is held for the whole run:
`lab()` takes it, or proceeds if the run was started under
`flock /tmp/staticegress-lab.lock ...` already.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import IO, Any

LOCK = "/tmp/staticegress-lab.lock"


class BenchError(RuntimeError):
    """A setup step or a measurement failed; the message says which and why."""


def sh(*argv: str, stdin: str | None = None) -> str:
    """Run a command, return its stdout; raise BenchError with its stderr if it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, input=stdin, timeout=120)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    return pids


def _held_by_ancestor(inode: int) -> bool:
    """Whether a flock on `inode` belongs to this process or one that started it."""
    mine = _ancestors()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].endswith(f":{inode}"):
                with contextlib.suppress(ValueError):
                    if int(parts[4]) in mine:
                        return True
    return False


@contextlib.contextmanager
def lab_lock() -> Iterator[None]:
    """Hold the machine's lab lock (or rely on an enclosing `flock` holding it)."""
    f: IO[str] = open(LOCK, "a")  # noqa: SIM115 (held until the end of the block)
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not _held_by_ancestor(os.fstat(f.fileno()).st_ino):
                print(f"waiting for {LOCK} (another lab run holds it)...", flush=True)
                fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        f.close()


@dataclass
class Lab:
    """Namespaces and processes of one benchmark run, all removed by `close`."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def netns(self, role: str, *, forwarding: bool = False) -> str:
        """A new namespace with loopback up; `forwarding`: a router (a node).
        Reverse-path filtering is off: the lab's links are its only paths."""
        name = f"sebench-{self.tag}-{role}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        settings = {
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
            "net.ipv4.ip_forward": "1" if forwarding else "0",
            "net.ipv4.conf.all.send_redirects": "0",
            "net.ipv4.conf.default.send_redirects": "0",
        }
        self.sysctl(name, settings)
        return name

    @staticmethod
    def sysctl(ns: str, settings: dict[str, str]) -> None:
        args = [f"{k}={v}" for k, v in settings.items()]
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", *args)

    @staticmethod
    def ip(ns: str, *commands: str) -> None:
        """`ip -n ns` for each command line, in one process."""
        sh("ip", "-n", ns, "-batch", "-", stdin="\n".join(commands) + "\n")

    @staticmethod
    def veth(a: str, a_if: str, b: str, b_if: str) -> None:
        """A veth pair from namespace `a` (`a_if`) to namespace `b` (`b_if`), both up."""
        sh("ip", "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b)
        sh("ip", "-n", a, "link", "set", a_if, "up")
        sh("ip", "-n", b, "link", "set", b_if, "up")

    @staticmethod
    def nft(ns: str, text: str) -> None:
        sh("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=text)

    def spawn(self, ns: str, *argv: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    """A Lab under the machine's lab lock, torn down whatever happens."""
    if os.geteuid() != 0:
        raise SystemExit("needs root: the benchmark builds network namespaces")
    with lab_lock():
        bench = Lab()
        try:
            yield bench
        finally:
            bench.close()


NftSize = tuple[int, int]


def nft_size(ns: str, *, skip: tuple[str, ...] = ()) -> NftSize:
    """(rules, set and map elements) in the namespace's ruleset, tables in `skip` aside."""
    text = sh("ip", "netns", "exec", ns, "nft", "-j", "list", "ruleset")
    listed: dict[str, Any] = json.loads(text)
    rules = elements = 0
    for obj in listed.get("nftables", []):
        for kind in ("rule", "set", "map"):
            body = obj.get(kind)
            if body is None or body.get("table") in skip:
                continue
            if kind == "rule":
                rules += 1
            else:
                elements += len(body.get("elem", []))
    return rules, elements


@dataclass
class Iperf:
    """An iperf3 server in namespace `ns` on `addr`, and client runs against it."""

    lab: Lab
    ns: str
    addr: IPv4Address
    port: int = 5201
    seconds: float = 5.0
    omit: int = 1
    """Seconds left out at the start of each run (ARP, slow start, conntrack)."""
    pin: bool = field(default_factory=lambda: (os.cpu_count() or 1) >= 2)
    """Client on CPU 0, server on CPU 1: less scheduler noise between runs."""

    def start(self) -> None:
        pin = ("-A", "1") if self.pin else ()
        argv = ("iperf3", "-s", "-J", "-B", str(self.addr), "-p", str(self.port), *pin)
        self.lab.spawn(self.ns, *argv)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            listening = sh("ip", "netns", "exec", self.ns, "ss", "-Htln", f"sport = {self.port}")
            if listening.strip():
                return
            time.sleep(0.1)
        raise BenchError(f"iperf3 server in {self.ns} did not start listening")

    def _client(self, ns: str, src: IPv4Address, *extra: str) -> dict[str, Any]:
        argv = [
            "ip", "netns", "exec", ns, "iperf3", "-c", str(self.addr), "-B", str(src),
            "-p", str(self.port), "-t", f"{self.seconds:g}", "-O", str(self.omit),
            "--json", "--get-server-output", *(("-A", "0") if self.pin else ()), *extra,
        ]  # fmt: skip
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=self.seconds + self.omit + 60
        )
        try:
            out: dict[str, Any] = json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise BenchError(f"iperf3 from {src}: {proc.stderr.strip() or proc.stdout}") from exc
        if "error" in out:
            raise BenchError(f"iperf3 from {src}: {out['error']}")
        return out

    @staticmethod
    def _seen(out: dict[str, Any]) -> str:
        """The source address the server saw (after every NAT on the way)."""
        server = out.get("server_output_json") or {}
        connected = server.get("start", {}).get("connected") or [{}]
        if "remote_host" in connected[0]:
            return str(connected[0]["remote_host"])
        found = re.search(r"connected to (\S+) port", out.get("server_output_text", ""))
        return found.group(1) if found else "?"

    def udp_pps(self, ns: str, src: IPv4Address, *, length: int = 64) -> tuple[float, str]:
        """Packets per second the server received (unlimited send rate), and
        the source it saw."""
        out = self._client(ns, src, "-u", "-l", str(length), "-b", "0")
        received = out["end"]["sum_received"]
        seconds = float(received["seconds"])
        if seconds <= 0:
            raise BenchError(f"iperf3 from {src}: no server-side UDP figures")
        return int(received["bytes"]) / length / seconds, self._seen(out)

    def tcp_gbps(self, ns: str, src: IPv4Address) -> tuple[float, str]:
        """Gbit/s the server received over one TCP stream, and the source it saw."""
        out = self._client(ns, src)
        bps = float(out["end"]["sum_received"]["bits_per_second"])
        return bps / 1e9, self._seen(out)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
