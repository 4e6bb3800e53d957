"""Virtual time for tests of timing code: sleepers wake only when the test
advances the clock, so schedules are checked exactly and instantly."""

from __future__ import annotations

import asyncio


async def settle(rounds: int = 20) -> None:
    """Let every task that can run, run."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Clock:
    """A monotonic clock and its `sleep`, both virtual."""

    def __init__(self, *, step: float = 0.05) -> None:
        self.now = 0.0
        self.step = step
        """How far `advance` moves time between rounds of woken tasks."""
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + max(seconds, 0.0), fut))
        await fut

    async def advance(self, seconds: float, step: float | None = None) -> None:
        """Move time forward in small steps, letting every woken task run."""
        step = self.step if step is None else step
        await settle()
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = min(end, self.now + step)
            for deadline, fut in list(self._sleepers):
                if deadline <= self.now + 1e-9 and not fut.done():
                    fut.set_result(None)
            self._sleepers = [(d, f) for d, f in self._sleepers if not f.done()]
            await settle()
