"""The kernel side of the ownership lease: write and read the `held` sets.

The tables themselves are created by every sync (staticegress.render.lease);
this module only renews grants into them and reads back what the kernel
still holds (after a restart, the previous run's grants may not have lapsed).
"""

from __future__ import annotations

import json
from ipaddress import ip_address
from typing import Any, Protocol

from staticegress.api.types import IPAddress
from staticegress.dataplane.nft import NftError
from staticegress.render.lease import LEASE_TABLE


class TextAndJson(Protocol):
    async def apply_text(self, text: str) -> None: ...

    async def run(self, cmd: dict[str, Any]) -> Any: ...


class NftLease:
    """`LeaseKernel` over libnftables."""

    def __init__(self, nft: TextAndJson) -> None:
        self._nft = nft

    async def set_held(self, text: str) -> None:
        await self._nft.apply_text(text)

    async def current_held(self) -> frozenset[IPAddress]:
        """IPs in the IP family's `held` set now (both families are written together)."""
        cmd = {
            "nftables": [{"list": {"set": {"family": "ip", "table": LEASE_TABLE, "name": "held"}}}]
        }
        try:
            out = await self._nft.run(cmd)
        except NftError:
            return frozenset()
        doc: dict[str, Any] = json.loads(out) if isinstance(out, str) else out
        found: set[IPAddress] = set()
        for item in doc.get("nftables", []):
            for elem in (item.get("set") or {}).get("elem") or []:
                val = elem.get("elem", {}).get("val") if isinstance(elem, dict) else elem
                try:
                    found.add(ip_address(str(val)))
                except ValueError:
                    continue
        return frozenset(found)
