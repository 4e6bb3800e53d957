"""The decision to refuse an eBPF dataplane that bypasses netfilter, on the facts
a node shows (link names, the uplink's tc and XDP programs, Cilium's pins)."""

from __future__ import annotations

import pytest

from staticegress.dataplane.bpfcheck import NodeFacts, refusal

PLAIN = frozenset({"lo", "eth0", "cni0", "veth1234"})


@pytest.mark.parametrize(
    "facts",
    [
        NodeFacts(links=PLAIN, uplink="eth0"),
        # Cilium with its iptables-based host routing: nothing on the uplink.
        NodeFacts(links=PLAIN | {"cilium_host", "cilium_net", "lxc12ab"}, uplink="eth0"),
        # Some other tool's tc program on the uplink, no Cilium.
        NodeFacts(links=PLAIN, uplink="eth0", tc_programs=("my_shaper",)),
        # A program named like Cilium's, but Cilium is not on this node.
        NodeFacts(links=PLAIN, uplink="eth0", tc_programs=("cil_from_netdev-eth0",)),
        # Flannel and Calico's iptables dataplane look like this.
        NodeFacts(links=PLAIN | {"flannel.1", "vxlan.calico", "tunl0"}, uplink="eth0"),
    ],
)
def test_netfilter_dataplanes_are_accepted(facts: NodeFacts) -> None:
    assert refusal(facts) is None


@pytest.mark.parametrize(
    ("facts", "seen"),
    [
        (
            NodeFacts(
                links=PLAIN | {"cilium_host", "cilium_net"},
                uplink="eth0",
                tc_programs=("cil_from_netdev-eth0", "cil_to_netdev-eth0"),
            ),
            "cil_from_netdev-eth0",
        ),
        (
            NodeFacts(
                links=PLAIN | {"cilium_host"},
                uplink="eth0",
                tc_programs=("bpf_netdev_eth0.o:[from-netdev]",),
            ),
            "from-netdev",
        ),
        (
            NodeFacts(
                links=PLAIN | {"cilium_host"}, uplink="eth0", pinned_links=("cil_from_netdev",)
            ),
            "cil_from_netdev (tcx)",
        ),
        (NodeFacts(links=PLAIN | {"cilium_host"}, uplink="eth0", xdp=True), "XDP"),
    ],
)
def test_cilium_with_programs_on_the_uplink_is_refused(facts: NodeFacts, seen: str) -> None:
    why = refusal(facts)
    assert why is not None
    assert why.startswith("Cilium")
    assert seen in why
    assert "kubeProxyReplacement=false" in why  # names the fix


@pytest.mark.parametrize(
    "facts",
    [
        NodeFacts(links=PLAIN | {"bpfin.cali", "bpfout.cali"}, uplink="eth0"),
        NodeFacts(links=PLAIN | {"bpfnatin", "bpfnatout"}, uplink="eth0"),
        NodeFacts(links=PLAIN, uplink="eth0", tc_programs=("calico_from_host_ep",)),
    ],
)
def test_calicos_ebpf_dataplane_is_refused(facts: NodeFacts) -> None:
    why = refusal(facts)
    assert why is not None
    assert why.startswith("Calico's eBPF dataplane")
    assert "linuxDataplane" in why  # names the fix
