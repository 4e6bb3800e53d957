"""Apply rendered nftables batches through libnftables' JSON interface.

One applier per process: libnftables is blocking, so it runs on one
dedicated worker thread (optionally inside a named network namespace, for
tests), and two batches never interleave. A batch is one kernel
transaction: when it fails, the previous table stays as it was and the error
text says why.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from staticegress.dataplane.netns import NetnsRunner

log = logging.getLogger(__name__)


class NftError(RuntimeError):
    """The kernel or libnftables refused a batch; nothing was changed."""


class NftApplier:
    """Send JSON batches to libnftables, one at a time."""

    def __init__(self, runner: NetnsRunner | None = None) -> None:
        self._runner = runner or NetnsRunner()
        self._nft: Any = None

    def _ctx(self) -> Any:
        # libnftables opens its netlink socket when the context is created, so
        # the context must be made on the runner's thread, inside its namespace.
        if self._nft is None:
            import nftables  # needs Debian's libnftables1

            self._nft = nftables.Nftables()
            self._nft.set_json_output(True)
        return self._nft

    def _run(self, batch: dict[str, Any]) -> Any:
        rc, out, err = self._ctx().json_cmd(batch)
        if rc != 0:
            raise NftError(str(err).strip() or f"libnftables returned {rc}")
        return out

    def _run_text(self, text: str) -> None:
        rc, _, err = self._ctx().cmd(text)
        if rc != 0:
            raise NftError(str(err).strip() or f"libnftables returned {rc}")

    async def apply_text(self, text: str) -> None:
        """Run nft commands in the text syntax (for what JSON cannot say, such
        as sub-second element timeouts) as one transaction."""
        await self._runner.run(lambda: self._run_text(text))

    async def apply(self, batch: dict[str, Any]) -> None:
        """Run one batch as one transaction."""
        await self._runner.run(lambda: self._run(batch))

    async def apply_all(self, batches: list[dict[str, Any]]) -> None:
        """Run batches in order, each as one transaction, in one trip to the
        runner's thread; stops at the first the kernel refuses."""

        def run_all() -> None:
            for batch in batches:
                self._run(batch)

        await self._runner.run(run_all)

    async def run(self, cmd: dict[str, Any]) -> Any:
        """Run one JSON command document and return libnftables' output."""
        return await self._runner.run(lambda: self._run(cmd))

    async def list_table(self, family: str, name: str) -> dict[str, Any] | None:
        """The table as libnftables JSON, or None if it does not exist."""
        cmd = {"nftables": [{"list": {"table": {"family": family, "name": name}}}]}
        try:
            out = await self._runner.run(lambda: self._run(cmd))
        except NftError:
            return None
        result: dict[str, Any] = json.loads(out) if isinstance(out, str) else out
        return result
