"""Grants and acks on the wire: manager replicas -> candidate gateways -> back.

A grant says "node N may hold these egress IPs for `ttl` seconds, under map
epoch E"; the ack says what the node holds now, what it withholds, and which
peers it hears. Both are small JSON documents behind a magic and an
HMAC-SHA256 over the body, keyed with the cluster's grant key (a Secret that
only the manager and agent service accounts read): a node never acts on a
datagram it cannot authenticate, and a grant is still only half of the
permission, since the agent also requires the status to name it.

Transport: UDP to the agent's port 9811 on the node's InternalIP; the agent
answers to the address the grant came from. The sender is one socket per
manager process, so every replica receives the acks to its own grants.

Replays: each grant carries the sender's identity with a random per-process
nonce, a sequence number and the sender's wall clock; the agent's
`GrantBook` rejects old sequences, old epochs and timestamps outside its
window (staticegress.model.ownership).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from staticegress.api.types import IPAddress, NodeName
from staticegress.model.ownership import Grant

log = logging.getLogger(__name__)

GRANT_PORT = 9811
MAGIC = b"SEG1"
MAX_DATAGRAM = 60000
MAX_IPS = 1024


class WireError(ValueError):
    """A datagram that is not a valid, authentic grant or ack."""


def load_key(path: str | Path) -> bytes:
    """The cluster's grant key from a file (a mounted Secret): hex or raw bytes, >= 16 bytes."""
    raw = Path(path).read_bytes().strip()
    try:
        key = bytes.fromhex(raw.decode())
    except ValueError:
        key = raw
    if len(key) < 16:
        raise ValueError(f"grant key in {path} is shorter than 16 bytes")
    return key


def new_key() -> str:
    """A fresh key, as hex, for a Secret or a lab file."""
    return secrets.token_hex(32)


def _seal(key: bytes, body: dict[str, Any]) -> bytes:
    data = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return MAGIC + hmac.new(key, data, hashlib.sha256).digest() + data


def _open(key: bytes, packet: bytes) -> dict[str, Any]:
    if len(packet) < len(MAGIC) + 32 or not packet.startswith(MAGIC):
        raise WireError("not a staticegress datagram")
    mac, data = packet[len(MAGIC) : len(MAGIC) + 32], packet[len(MAGIC) + 32 :]
    if not hmac.compare_digest(mac, hmac.new(key, data, hashlib.sha256).digest()):
        raise WireError("bad authentication code")
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise WireError(f"bad JSON: {exc}") from exc
    if not isinstance(body, dict) or body.get("v") != 1:
        raise WireError("unknown version")
    return body


def _ips(raw: Any) -> frozenset[IPAddress]:
    if not isinstance(raw, list) or len(raw) > MAX_IPS:
        raise WireError("bad address list")
    try:
        return frozenset(ip_address(str(a)) for a in raw)
    except ValueError as exc:
        raise WireError(str(exc)) from exc


def encode_grant(key: bytes, grant: Grant) -> bytes:
    return _seal(
        key,
        {
            "v": 1,
            "k": "grant",
            "s": grant.sender,
            "n": grant.node,
            "e": grant.epoch,
            "q": grant.seq,
            "t": grant.sent_wall,
            "ttl": grant.ttl,
            "ips": sorted(str(ip) for ip in grant.ips),
        },
    )


def decode_grant(key: bytes, packet: bytes) -> Grant:
    body = _open(key, packet)
    try:
        if body["k"] != "grant":
            raise WireError("not a grant")
        return Grant(
            sender=str(body["s"])[:128],
            node=NodeName(str(body["n"])),
            epoch=int(body["e"]),
            seq=int(body["q"]),
            sent_wall=float(body["t"]),
            ttl=float(body["ttl"]),
            ips=_ips(body["ips"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"bad grant: {exc}") from exc


@dataclass(frozen=True)
class Ack:
    """A node's answer to a grant."""

    node: NodeName
    seq: int
    """The sequence of the grant it answers."""
    held: frozenset[IPAddress]
    withheld: frozenset[IPAddress]
    """IPs the status gives it that it does not hold (no live grant): fenced."""
    peers: frozenset[NodeName]
    """Peer nodes it heard recently (its own ICMP probes)."""
    epoch: int
    silent: frozenset[NodeName] = frozenset()
    """Peer nodes it probes and has not heard recently: a witness of their loss."""


def encode_ack(key: bytes, ack: Ack) -> bytes:
    return _seal(
        key,
        {
            "v": 1,
            "k": "ack",
            "n": ack.node,
            "q": ack.seq,
            "e": ack.epoch,
            "held": sorted(str(ip) for ip in ack.held),
            "withheld": sorted(str(ip) for ip in ack.withheld),
            "peers": sorted(ack.peers)[:MAX_IPS],
            "silent": sorted(ack.silent)[:MAX_IPS],
        },
    )


def decode_ack(key: bytes, packet: bytes) -> Ack:
    body = _open(key, packet)
    try:
        if body["k"] != "ack":
            raise WireError("not an ack")
        peers, silent = body["peers"], body.get("silent", [])
        for names in (peers, silent):
            if not isinstance(names, list) or len(names) > MAX_IPS:
                raise WireError("bad peer list")
        return Ack(
            node=NodeName(str(body["n"])),
            seq=int(body["q"]),
            epoch=int(body["e"]),
            held=_ips(body["held"]),
            withheld=_ips(body["withheld"]),
            peers=frozenset(NodeName(str(p)) for p in peers),
            silent=frozenset(NodeName(str(p)) for p in silent),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"bad ack: {exc}") from exc


class UdpEndpoint:
    """One UDP socket with a packet callback; `send` never blocks or raises.

    A plain non-blocking socket read by the loop, rather than an asyncio
    transport, so that `drain()` can hand over what waits in the socket right
    now: after the loop was busy, an ack that arrived meanwhile must be
    counted before anyone judges a node silent."""

    def __init__(self, on_packet: Callable[[bytes, tuple[str, int]], None]) -> None:
        self._on_packet = on_packet
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    async def open(self, host: str = "0.0.0.0", port: int = 0, *, sock: Any = None) -> None:
        """Bind `host:port`, or adopt `sock` (made inside another network namespace)."""
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((host, port))
            except BaseException:
                sock.close()
                raise
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self.drain)

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    def drain(self) -> int:
        """Hand every datagram waiting in the socket to the callback; how many."""
        n = 0
        while self._sock is not None:
            try:
                data, addr = self._sock.recvfrom(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # An ICMP error queued on the socket (port unreachable while an
                # agent restarts): the next round retries.
                log.debug("grant socket: %s", exc)
                continue
            n += 1
            self._on_packet(data, (str(addr[0]), int(addr[1])))
        return n

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._sock is None or len(data) > MAX_DATAGRAM:
            return
        try:
            self._sock.sendto(data, addr)
        except OSError as exc:  # a full buffer or no route: the next round retries
            log.debug("grant to %s not sent: %s", addr, exc)

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


def sender_identity(name: str) -> str:
    """A replica's name plus a nonce, so a restarted process restarts its sequence safely."""
    return f"{name}/{secrets.token_hex(4)}"


def ips_text(ips: Iterable[IPAddress]) -> str:
    return ",".join(sorted(map(str, ips))) or "-"
