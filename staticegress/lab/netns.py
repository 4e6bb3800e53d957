"""Thin wrappers over iproute2, sysctl and iptables for building the lab.

The lab is test-bed plumbing, not the product's dataplane: it drives the
standard tools the way an operator would by hand, which keeps each step
readable in `lab up`'s progress and in failure messages. Every command is
checked; a failure raises `LabError` with the command and its stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from staticegress.controlplane.cluster import pid_alive


class LabError(RuntimeError):
    """A lab step failed; the message says which command and why."""


def run(*argv: str, check: bool = True, stdin: str | None = None) -> str:
    """Run a command and return its stdout."""
    proc = subprocess.run(argv, capture_output=True, text=True, input=stdin, timeout=60)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def ip_batch(commands: list[str], *, netns: str | None = None) -> None:
    """Run many `ip` commands in one process; stops at the first failure."""
    if not commands:
        return
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    run(*argv, stdin="\n".join(commands) + "\n")


async def arun(*argv: str, check: bool = True) -> str:
    """`run` for the event loop."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {err.decode().strip() or out.decode().strip()}")
    return out.decode()


def netns_list() -> list[str]:
    """Names of the named network namespaces."""
    out = run("ip", "-j", "netns", "list", check=False).strip()
    if not out:
        return []
    return [str(e["name"]) for e in json.loads(out)]


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def sysctl(netns: str, key: str, value: str | int) -> None:
    """Set a sysctl inside `netns` (net.* sysctls are per namespace)."""
    run("ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}")


async def asysctl(netns: str, key: str, value: str | int) -> None:
    await arun("ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}")


def link_json(netns: str, link: str) -> dict[str, Any] | None:
    out = run("ip", "-j", "-n", netns, "link", "show", link, check=False).strip()
    if not out:
        return None
    items: list[dict[str, Any]] = json.loads(out)
    return items[0] if items else None


def pids_in(netns: str) -> list[int]:
    """Processes whose network namespace is `netns`."""
    out = run("ip", "netns", "pids", netns, check=False)
    return [int(p) for p in out.split()]


def kill_pids(pids: list[int], *, grace: float = 3.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL what is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def kill_netns_processes(netns: str, *, grace: float = 3.0) -> int:
    """Stop every process inside `netns`; return how many there were."""
    pids = pids_in(netns)
    kill_pids(pids, grace=grace)
    return len(pids)


def delete_netns(name: str) -> None:
    kill_netns_processes(name, grace=1.0)
    run("ip", "netns", "delete", name, check=False)
