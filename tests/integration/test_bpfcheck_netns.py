"""eBPF dataplane detection against the real kernel, in a throwaway network
namespace: a trivial tc program attached to the uplink under Cilium's name,
Calico's NAT links, Cilium's tcx pins; and the agent refusing to program such a
node (not Ready, nothing applied) until the program is gone."""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import AsyncIPRoute

from staticegress.dataplane import bpfcheck
from tests.unit.test_agent_sync import make_agent

SYS_BPF = 321  # x86_64
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3


def _load_pass_program(name: str) -> int:
    """A two-instruction tc program (return TC_ACT_UNSPEC: carry on) named `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    insns = ctypes.create_string_buffer(
        struct.pack("<BBhi", 0xB7, 0, 0, -1) + struct.pack("<BBhi", 0x95, 0, 0, 0), 16
    )
    license = ctypes.create_string_buffer(b"GPL")
    attr = bytearray(128)
    struct.pack_into(
        "<IIQQ",
        attr,
        0,
        BPF_PROG_TYPE_SCHED_CLS,
        2,
        ctypes.addressof(insns),
        ctypes.addressof(license),
    )
    attr[48 : 48 + len(name)] = name.encode()  # bpf_attr.prog_name, 16 bytes
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    fd: int = libc.syscall(SYS_BPF, BPF_PROG_LOAD, buf, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        pytest.skip(f"cannot load a BPF program here: {os.strerror(err)}")
    return fd


async def _attach(netns: str, dev: str, *, program: str, filter_name: str) -> None:
    fd = _load_pass_program(program)
    try:
        async with AsyncIPRoute(netns=netns) as ipr:
            (index,) = await ipr.link_lookup(ifname=dev)
            await ipr.tc("add", "clsact", index)
            await ipr.tc(
                "add-filter",
                "bpf",
                index,
                ":1",
                fd=fd,
                name=filter_name,
                parent="ffff:fff2",
                classid=1,
                direct_action=True,
            )
    finally:
        os.close(fd)  # the filter keeps the program alive


def _ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        raise AssertionError("eBPF detection tests need root (network namespaces, bpf)")
    name = f"setest-bpf-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        _ip(name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


async def test_a_plain_node_is_accepted(netns: str, tmp_path: Path) -> None:
    facts = await bpfcheck.gather("eth0", netns=netns, bpffs=tmp_path)
    assert facts.links == {"lo", "eth0", "eth0p"}
    assert facts.tc_programs == ()
    assert not facts.xdp
    assert await bpfcheck.check("eth0", netns=netns, bpffs=tmp_path) is None


async def test_cilium_programs_on_the_uplink_are_refused(netns: str, tmp_path: Path) -> None:
    _ip(netns, "link", "add", "cilium_host", "type", "veth", "peer", "name", "cilium_net")
    assert await bpfcheck.check("eth0", netns=netns, bpffs=tmp_path) is None, (
        "Cilium alone (iptables host routing) must be accepted"
    )
    await _attach(netns, "eth0", program="cil_from_netdev", filter_name="cil_from_netdev-eth0")
    facts = await bpfcheck.gather("eth0", netns=netns, bpffs=tmp_path)
    assert facts.tc_programs == ("cil_from_netdev-eth0",)
    why = bpfcheck.refusal(facts)
    assert why is not None
    assert "cil_from_netdev-eth0" in why


async def test_another_tools_program_on_the_uplink_is_accepted(netns: str, tmp_path: Path) -> None:
    _ip(netns, "link", "add", "cilium_host", "type", "veth", "peer", "name", "cilium_net")
    await _attach(netns, "eth0", program="shaper", filter_name="shaper-eth0")
    assert await bpfcheck.check("eth0", netns=netns, bpffs=tmp_path) is None


async def test_cilium_tcx_pins_for_the_uplink_are_refused(netns: str, tmp_path: Path) -> None:
    _ip(netns, "link", "add", "cilium_host", "type", "veth", "peer", "name", "cilium_net")
    links = tmp_path / "cilium" / "devices" / "eth0" / "links"
    links.mkdir(parents=True)
    (links / "cil_to_netdev").touch()
    why = await bpfcheck.check("eth0", netns=netns, bpffs=tmp_path)
    assert why is not None
    assert "cil_to_netdev (tcx)" in why


async def test_calicos_nat_links_are_refused(netns: str, tmp_path: Path) -> None:
    _ip(netns, "link", "add", "bpfin.cali", "type", "veth", "peer", "name", "bpfout.cali")
    why = await bpfcheck.check("eth0", netns=netns, bpffs=tmp_path)
    assert why is not None
    assert "bpfin.cali" in why


async def test_the_agent_refuses_to_program_until_the_program_is_gone(
    netns: str, tmp_path: Path
) -> None:
    _ip(netns, "link", "add", "cilium_host", "type", "veth", "peer", "name", "cilium_net")
    await _attach(netns, "eth0", program="cil_to_netdev", filter_name="cil_to_netdev-eth0")
    agent, nft, netlink = make_agent(netns=netns, bpffs=str(tmp_path))
    try:
        assert await agent._check_dataplane()
        await agent.sync(True)
        assert nft.batches == [], "a refused node must not be programmed"
        assert netlink.specs == []
        ready, why = agent._ready()
        assert not ready
        assert "refusing to program this node" in why
        assert "cil_to_netdev-eth0" in why

        _ip(netns, "link", "delete", "cilium_host")  # Cilium removed from the node
        await agent.sync(True)
        assert agent.refused is None
        assert nft.batches, "programmed once the eBPF dataplane is gone"
        assert agent._ready()[0]
    finally:
        await asyncio.gather(*agent._node_events, return_exceptions=True)
        await agent.api.close()
