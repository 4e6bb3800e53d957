"""SyncRunner: one coalescing trigger for a function that recomputes everything.

Callers only `poke()`; the runner decides when `fn` runs:
- never more often than `min_interval` (a burst of events becomes one run);
- at least every `max_interval` even without pokes (a periodic full resync
  that repairs drift, e.g. rules someone deleted by hand);
- after a failure, again after `retry_interval`, doubling up to
  `max_interval`, with `force=True` so nothing is skipped as "unchanged";
- with `force=True` too after `poke(force=True)` (the table was lost).

`pending_age()` tells how long the oldest change not yet applied has waited:
health means freshness, not merely being alive. Time comes from injected
`clock` and `sleep`, so tests run on virtual time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

SyncFn = Callable[[bool], Awaitable[None]]
"""The work: called with `force` (True for periodic and retry runs)."""


class SyncRunner:
    def __init__(
        self,
        fn: SyncFn,
        *,
        min_interval: float = 0.05,
        max_interval: float = 60.0,
        retry_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._fn = fn
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.retry_interval = retry_interval
        self._clock = clock
        self._sleep = sleep
        self._event = asyncio.Event()
        self._pending_since: float | None = None
        self._generation = 0
        self._last_start = float("-inf")
        self._force = True  # the first run applies everything
        self.failures = 0
        self.runs = 0
        self.last_success: float | None = None

    def poke(self, *, force: bool = False) -> None:
        """Ask for a run; cheap, safe to call from any watch callback. `force`:
        apply everything even if the desired state looks unchanged (the kernel
        lost what was applied)."""
        if force:
            self._force = True
        if self._pending_since is None:
            self._pending_since = self._clock()
        self._generation += 1
        self._event.set()

    def pending_age(self) -> float:
        """Seconds the oldest unapplied change has waited (0 when none)."""
        return 0.0 if self._pending_since is None else self._clock() - self._pending_since

    async def _wait_for_poke(self, seconds: float) -> bool:
        if self._event.is_set():
            return True
        waiter = asyncio.ensure_future(self._event.wait())
        sleeper = asyncio.ensure_future(self._sleep(max(seconds, 0.0)))
        done, pending = await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return waiter in done

    async def run(self) -> None:
        """Run forever; only cancellation stops it."""
        while True:
            since = self._clock() - self._last_start
            poked = await self._wait_for_poke(self.max_interval - since)
            if not poked:
                self._force = True  # periodic full resync
            gap = self._last_start + self.min_interval - self._clock()
            if gap > 0:
                await self._sleep(gap)
            self._event.clear()
            generation = self._generation
            force, self._force = self._force, False
            self._last_start = self._clock()
            self.runs += 1
            try:
                await self._fn(force)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                delay = min(self.retry_interval * 2 ** (self.failures - 1), self.max_interval)
                log.error(
                    "sync failed (attempt %d, retry in %.1fs): %s",
                    self.failures,
                    delay,
                    exc,
                    exc_info=not isinstance(exc, TemporaryError),
                )
                self._force = True
                await self._sleep(delay)
                self.poke()
                continue
            self.failures = 0
            self.last_success = self._clock()
            if self._generation == generation:
                self._pending_since = None
            else:
                # Poked while running: those changes are still pending.
                self._pending_since = self._last_start


class TemporaryError(Exception):
    """A sync that failed for a reason worth retrying (API or kernel refused)."""
