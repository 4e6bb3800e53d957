"""The lab's external servers: they tell each client the source address they saw.

- TCP (HTTP/1.0-style): any request gets `200 OK` with body `<source>\\n`;
- UDP: a datagram gets back `<source> <payload>`.

One process serves every address given, each socket bound to its own
address so replies leave from the address the client used.
"""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address
from typing import cast

log = logging.getLogger(__name__)

_MAX_REQUEST = 8192


async def _handle_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    source = str(peer[0]) if peer else "unknown"
    try:
        # Read the request head (bounded) so clients that send one see a clean
        # response rather than a reset; the content does not matter.
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        pass
    except ConnectionError:
        writer.close()
        return
    body = f"{source}\n".encode()
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        writer.write(head + body)
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(addr[0].encode() + b" " + data[:_MAX_REQUEST], addr)


async def serve(addresses: list[IPv4Address], *, http_port: int, udp_port: int) -> None:
    """Serve HTTP and UDP on every address until cancelled."""
    loop = asyncio.get_running_loop()
    servers = []
    transports = []
    for addr in addresses:
        servers.append(
            await asyncio.start_server(
                _handle_http, host=str(addr), port=http_port, limit=_MAX_REQUEST
            )
        )
        transport, _ = await loop.create_datagram_endpoint(_Echo, local_addr=(str(addr), udp_port))
        transports.append(transport)
        log.info("serving http=%s:%d udp=%s:%d", addr, http_port, addr, udp_port)
    try:
        await asyncio.Event().wait()
    finally:
        for s in servers:
            s.close()
        for t in transports:
            t.close()
