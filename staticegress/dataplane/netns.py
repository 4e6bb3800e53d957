"""Run blocking kernel calls on one thread, optionally inside a named network namespace.

The agent runs in its node's namespace and needs none of this; tests drive the
dataplane of a throwaway namespace from outside. Network namespace membership
is per thread (setns), so a single dedicated thread that entered the
namespace once runs every libnftables call, sysctl write and raw-socket send.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000


def _enter(netns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsRunner:
    """A one-thread executor living in `netns` (None: the process's own namespace)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"netns-{netns or 'self'}",
            initializer=(lambda: _enter(netns)) if netns else None,
        )

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
