"""Ask the segment who has an IP, every `interval` seconds, and record who answers.

Run inside the lab's external host (`ip netns exec selab-ext python3 arpwatch.py
IP SECONDS`). Each round sends one ARP request from eth0 and collects every
reply for the IP until the next round; it prints one JSON object at the end:
{"rounds": [[t, [mac, ...]], ...]} with t the round's CLOCK_MONOTONIC time, which
every process on the machine shares, so the caller can line it up with its own.
Invariant 1 of docs/fault-model.md is about exactly this: how many MACs answer.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

ETH_P_ARP = 0x0806


def main() -> int:
    target = IPv4Address(sys.argv[1])
    duration = float(sys.argv[2])
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.05
    ifname = "eth0"
    mac_text = Path(f"/sys/class/net/{ifname}/address").read_text().strip()
    mac = bytes.fromhex(mac_text.replace(":", ""))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    sock.bind((ifname, ETH_P_ARP))
    src_ip = IPv4Address("198.51.100.1").packed
    request = (
        b"\xff" * 6
        + mac
        + struct.pack("!H", ETH_P_ARP)
        + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
        + mac
        + src_ip
        + b"\x00" * 6
        + target.packed
    )
    rounds: list[list[object]] = []
    start = time.monotonic()
    while time.monotonic() - start < duration:
        t0 = time.monotonic()
        sock.send(request)
        seen: set[str] = set()
        while (left := interval - (time.monotonic() - t0)) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            frame = sock.recv(128)
            if len(frame) < 42 or frame[12:14] != b"\x08\x06":
                continue
            op = struct.unpack("!H", frame[20:22])[0]
            if op == 2 and frame[28:32] == target.packed:
                seen.add(frame[22:28].hex(":"))
        rounds.append([round(t0, 4), sorted(seen)])
    print(json.dumps({"rounds": rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
