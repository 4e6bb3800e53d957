"""Which of this node's pod addresses belong to this boot. Pure.

The hold (`staticegress.model.desired`) trusts every local pod address the
agent knows: an address it knows is steered or left alone, one it does not is
held towards the open rules' destinations. That is only as good as the
addresses are current, and after a reboot none are: every local Pod object
still shows its pre-reboot address until kubelet writes that pod's status
again, and nothing bounds when (kubelet is starting, throttled by the API
server, or slow to reach it; some kubelets keep the old address until the
new sandbox is reported). The agent may sync, and open the CNI gate, before
that, and the IPAM may give a new sandbox an address such a stale status
still shows. If that stale pod was unselected, the new pod's address counts
as known and unselected, so it is neither steered nor held, and a selected
pod's first packets leave with the node's IP until kubelet reports it.

The criterion: a local pod's address counts only if kubelet has reported its
sandbox up since this node booted, i.e. `Pod.sandbox_since >= boot`:
- kubelet writes podIPs in the same status as the PodReadyToStartContainers
  condition, and after a boot that condition cannot stay True from before:
  kubelet's first status for a pod without a sandbox says False, so when it
  says True again its lastTransitionTime is the new sandbox's, not older
  than the boot. A status from before the boot never passes, nor does one
  whose condition is False now (its sandbox is gone or being replaced: the
  address it shows is the old sandbox's);
- kubelets that do not write the condition (it is a feature gate before it
  is on by default): a container started since the boot ran in a sandbox of
  this boot, whose addresses the same status carries. A pod with neither
  has no container running this boot, so holding its address stops nothing
  it sends;
- `boot` is the kernel's boot time in whole seconds, and kubelet writes times
  in whole seconds from the same node clock. A report made in the boot's own
  second passes (the comparison is not strict), and only a report from the
  last second before the boot would pass wrongly: nothing reports sandboxes
  while a node shuts down and its firmware and kernel start;
- an agent restart without a reboot changes nothing: every sandbox running
  now was reported since the boot;
- a clock stepped forward after the boot by more than the time from the boot
  to a pod's report makes that report look older than the boot: the pod stays
  held (fail closed) until its sandbox is reported again. `pods_unreported`
  counts such pods.

A pod that fails the criterion is kept, without an address: as far as the
hold is concerned it has no sandbox on this node yet, so a new sandbox with
the address its stale status shows is held like any unknown one until kubelet
reports it, and the stale pod is neither steered nor SNATed. Pods of other
nodes are left alone: their node's boot is not ours to judge.
"""

from __future__ import annotations

from dataclasses import replace

from staticegress.api.core import Pod
from staticegress.api.types import NodeName
from staticegress.model.desired import Snapshot


def reported_since(pod: Pod, boot: int) -> bool:
    """Whether kubelet has reported `pod`'s sandbox up since `boot` (Unix seconds)."""
    return pod.sandbox_since is not None and pod.sandbox_since >= boot


def trust_since_boot(
    snapshot: Snapshot, *, node: NodeName, boot: int
) -> tuple[Snapshot, tuple[Pod, ...]]:
    """`snapshot` with the addresses of `node`'s pods that kubelet has not
    reported since `boot` taken away, and those pods (as they were)."""
    stale = tuple(
        p
        for p in snapshot.pods
        if p.node == node
        and p.ip is not None
        and not p.host_network
        and not reported_since(p, boot)
    )
    if not stale:
        return snapshot, ()
    untrusted = set(stale)
    pods = tuple(replace(p, ip=None) if p in untrusted else p for p in snapshot.pods)
    return replace(snapshot, pods=pods), stale
