"""Who may hold an egress IP right now: grants, handoffs and failure detection. Pure.

The protocol is described in docs/fault-model.md; this module holds its three
state machines, each driven by an injected clock (plain float seconds of a
monotonic clock), so every failure case is unit-tested without root:

- `GrantBook` (agent): which egress IPs this node may hold, and until when,
  from the grants it accepted and from status read-backs. An IP is held only
  while some accepted grant or read-back covers it *and* the status names
  this node: both views must agree.
- `HandoffPlanner` (leader): turns the assignment into the *grant map* that
  every manager replica grants. A moved IP enters the map for its new owner
  only once the old owner confirmed the release, is gone for everyone, or
  the handoff wait has passed (its grant has surely expired).
- `classify` (leader): each candidate node's health from several views
  (the leader's ICMP, the agent's acks, peer reports), and whether the
  leader's own view is implausible (a mass failure: freeze instead of move).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from staticegress.api.types import IPAddress, NodeName

GRANT_TTL = 2.0
"""How long one grant lets a node hold its egress IPs (seconds)."""
MAP_POLL = 0.2
"""How often a standby re-reads the published grant map."""
MAP_READ_BOUND = 0.3
"""How long such a read may take and still count."""
DRIFT_BOUND = 0.1
"""Clock-rate drift over one TTL plus one network delay."""


_EPSILON = 1e-6
"""Clock readings are floats: a deadline met to the microsecond is met."""


def handoff_wait(ttl: float = GRANT_TTL) -> float:
    """After a move, how long until every grant of the old owner has surely expired."""
    return ttl + MAP_POLL + MAP_READ_BOUND + DRIFT_BOUND


# ------------------------------------------------------------------ agent side


@dataclass(frozen=True)
class Grant:
    """One authenticated grant, as decoded from the wire."""

    sender: str
    """Manager replica identity plus a per-process nonce: sequences restart with it."""
    node: NodeName
    epoch: int
    """Version of the grant map; never decreases across leaders."""
    seq: int
    sent_wall: float
    """The sender's wall clock (Unix seconds): only used to reject old replays."""
    ttl: float
    ips: frozenset[IPAddress]


class Reject(enum.Enum):
    WRONG_NODE = "addressed to another node"
    STALE = "timestamp outside the replay window"
    REPLAY = "sequence not newer than the last from this sender"
    OLD_EPOCH = "epoch older than one already seen"
    BAD_TTL = "time to live out of range"


@dataclass
class GrantBook:
    """The agent's record of the grants it holds.

    `deadlines(now, mine)` is the single answer: each egress IP this node may
    hold now, with the monotonic time its permission ends. The kernel's lease
    set is kept equal to it (timeouts = deadline - now).
    """

    node: NodeName
    replay_window: float = 5.0
    max_ttl: float = 30.0
    max_epoch: int = 0
    _grants: dict[str, tuple[Grant, float]] = field(default_factory=dict)
    """sender -> (its latest accepted grant, when it arrived)."""
    _last_seq: dict[str, int] = field(default_factory=dict)
    _readback: tuple[frozenset[IPAddress], float] = (frozenset(), float("-inf"))
    """IPs a status read-back confirmed, and the deadline that read allows."""
    last_accepted: float = float("-inf")

    def offer(self, grant: Grant, *, now: float, now_wall: float) -> Reject | None:
        """Check a decoded grant and keep it; None when accepted."""
        if grant.node != self.node:
            return Reject.WRONG_NODE
        if abs(now_wall - grant.sent_wall) > self.replay_window:
            return Reject.STALE
        if grant.seq <= self._last_seq.get(grant.sender, -1):
            return Reject.REPLAY
        if grant.epoch < self.max_epoch:
            # Seen, so a copy replayed later is a replay: the agent answers
            # such a grant (its sender is alive, only behind), once.
            self._last_seq[grant.sender] = grant.seq
            return Reject.OLD_EPOCH
        if not 0 < grant.ttl <= self.max_ttl:
            return Reject.BAD_TTL
        self._last_seq[grant.sender] = grant.seq
        if grant.epoch > self.max_epoch:
            self.max_epoch = grant.epoch
            # Grants of an older map no longer count: their map moved something.
            self._grants = {s: g for s, g in self._grants.items() if g[0].epoch >= grant.epoch}
        self._grants[grant.sender] = (grant, now)
        self.last_accepted = now
        # Forget senders long gone, so the table stays as small as the replica set.
        for sender in [s for s, (_, t) in self._grants.items() if now - t > 60]:
            del self._grants[sender]
            self._last_seq.pop(sender, None)
        return None

    def confirm_by_readback(
        self, ips: Iterable[IPAddress], *, sent_at: float, ttl: float = GRANT_TTL
    ) -> None:
        """A quorum read sent at `sent_at` showed the status naming us for `ips`.

        The permission runs from when the read was sent, not when it came back:
        a read sent after a move would have shown the move."""
        self._readback = (frozenset(ips), sent_at + ttl)

    def deadlines(self, *, now: float, mine: frozenset[IPAddress]) -> dict[IPAddress, float]:
        """Egress IPs this node may hold at `now`, and until when.

        `mine`: the IPs the status names this node for (the agent's own view).
        """
        out: dict[IPAddress, float] = {}
        for grant, arrived in self._grants.values():
            until = arrived + grant.ttl
            if until <= now or grant.epoch < self.max_epoch:
                continue
            for ip in grant.ips & mine:
                out[ip] = max(out.get(ip, until), until)
        ips, until = self._readback
        if until > now:
            for ip in ips & mine:
                out[ip] = max(out.get(ip, until), until)
        return out

    def silent_for(self, now: float) -> float:
        """Seconds since the last accepted grant (inf if none yet)."""
        return now - self.last_accepted


# ----------------------------------------------------------------- leader side


class Health(enum.Enum):
    ALIVE = "alive"
    """Reachable, and its agent acks grants: may keep and take egress IPs."""
    AGENT_LAGGING = "agent-lagging"
    """Reachable, acks missing for less than the grace: keeps its IPs, gets no new ones."""
    AGENT_DOWN = "agent-down"
    """Reachable, but its agent has been silent past the grace: its IPs move (wait path)."""
    UNREACHABLE = "unreachable"
    """The leader cannot reach it, some peer still hears it: its IPs move (wait path)."""
    GONE = "gone"
    """Nobody hears it on any channel: its IPs move at once (fast path)."""
    NOT_READY = "not-ready"
    """Its Node object says NotReady: no new IPs, and its IPs move (wait path)."""
    SUSPECT = "suspect"
    """The leader lost it moments ago: it keeps its IPs until the loss has lasted
    long enough to tell one node's death from the leader's own path failing."""


KEEPS = frozenset({Health.ALIVE, Health.AGENT_LAGGING, Health.SUSPECT})
TAKES = frozenset({Health.ALIVE})


@dataclass(frozen=True)
class NodeView:
    """What the leader knows of one candidate gateway right now."""

    icmp_up: bool
    """The leader's own ICMP heartbeats (with their hysteresis)."""
    ack_age: float
    """Seconds since the node's agent last acked a grant (inf if never)."""
    heard_by_peers: bool
    """Some other node's agent reported hearing it recently."""
    ready: bool = True
    witnessed_lost: bool = False
    """Some other node, itself answering, probes it and hears nothing either."""
    lost_for: float = float("inf")
    """How long the leader has not reached it (meaningful only while it does not)."""


@dataclass(frozen=True)
class Verdict:
    health: Mapping[NodeName, Health]
    frozen: bool
    """The leader's view looks implausible: keep every assignment as it is."""
    unreachable: tuple[NodeName, ...] = ()
    """Nodes silent to the leader (no ack) that no witness confirms lost."""


def classify(
    views: Mapping[NodeName, NodeView],
    *,
    ack_timeout: float = 0.3,
    agent_grace: float = 1.5,
    freeze_share: float = 0.5,
    freeze_min: int = 2,
    settle: float = 0.15,
) -> Verdict:
    """Each node's health, and whether to freeze.

    A node is reachable if either of the leader's channels (ICMP, grant acks)
    answers, so one filtered protocol changes nothing. The freeze triggers
    when at least `freeze_share` of the nodes, and at least `freeze_min`, have
    gone silent to the leader (no ack) without a witness confirming the loss
    (a node that answers us, probes them and hears nothing either): that is a
    fault of the leader's view or of the grant path (a filtered port, a wrong
    key), not a mass death, and moving IPs would only darken them. A loss younger than `settle`
    counts towards the freeze but moves nothing yet: the leader's probes are
    spread over a round, so its own path failing shows as losses a round apart."""
    health: dict[NodeName, Health] = {}
    lost: list[NodeName] = []
    for name, v in sorted(views.items()):
        acking = v.ack_age <= ack_timeout
        leader_reaches = v.icmp_up or acking
        if not acking and not v.witnessed_lost:
            lost.append(name)
        if not v.ready:
            health[name] = Health.NOT_READY
        elif not leader_reaches and v.lost_for < settle:
            health[name] = Health.SUSPECT
        elif not leader_reaches:
            health[name] = Health.UNREACHABLE if v.heard_by_peers else Health.GONE
        elif acking:
            health[name] = Health.ALIVE
        elif v.ack_age <= agent_grace:
            health[name] = Health.AGENT_LAGGING
        else:
            health[name] = Health.AGENT_DOWN
    frozen = len(lost) >= max(freeze_min, freeze_share * len(views)) and len(views) > 0
    return Verdict(health=health, frozen=frozen, unreachable=tuple(lost))


def eligible(verdict: Verdict) -> tuple[frozenset[NodeName], frozenset[NodeName]]:
    """(nodes that keep the egress IPs they own, nodes that may take new ones).

    Frozen, every candidate keeps what it has, whatever the view says: the view
    is what is in doubt, and a replica that starts out frozen has no earlier
    view to fall back on."""
    if verdict.frozen:
        keep = frozenset(verdict.health)
    else:
        keep = frozenset(n for n, h in verdict.health.items() if h in KEEPS)
    return keep, frozenset(n for n, h in verdict.health.items() if h in TAKES) & keep


@dataclass(frozen=True)
class Pending:
    """A moved egress IP whose new owner must wait before it is granted."""

    old: NodeName | None
    """Who may still hold it (None: unknown, e.g. after a leader change)."""
    new: NodeName
    since: float


@dataclass
class HandoffPlanner:
    """The grant map: which node every manager replica grants each egress IP to.

    `plan()` is called with the assignment the leader wants; it returns the
    map to publish and grant. Invariant: an IP enters the map for a node only
    when no other node can still hold a grant for it."""

    wait: float = field(default_factory=handoff_wait)
    granted: dict[IPAddress, NodeName] = field(default_factory=dict)
    """The current grant map."""
    pending: dict[IPAddress, Pending] = field(default_factory=dict)
    removed_at: dict[IPAddress, tuple[NodeName, float]] = field(default_factory=dict)
    """IPs taken out of the map recently: who had them, and when."""
    _unpublished: set[IPAddress] = field(default_factory=set)
    """Removals the standbys cannot know of yet: the wait starts when they can."""

    @classmethod
    def resume(
        cls, published: Mapping[IPAddress, NodeName], *, now: float, wait: float | None = None
    ) -> HandoffPlanner:
        """A new leader starts from the map its predecessor published. IPs that
        map lacks may have been moved moments ago: they wait as if just moved."""
        planner = cls(granted=dict(published))
        if wait is not None:
            planner.wait = wait
        planner._unknown_since = now
        return planner

    _unknown_since: float | None = None

    def plan(
        self,
        assignment: Mapping[IPAddress, NodeName | None],
        *,
        now: float,
        health: Mapping[NodeName, Health],
        held: Mapping[NodeName, frozenset[IPAddress]],
    ) -> dict[IPAddress, NodeName]:
        """Update and return the grant map for `assignment` (IP -> wanted gateway).

        `held`: what each node's latest fresh ack says it holds (absent: no
        fresh ack). `health`: from `classify`."""
        for ip in [ip for ip in self.granted if assignment.get(ip) != self.granted[ip]]:
            # Stop granting the old owner first, whatever comes next.
            self.removed_at[ip] = (self.granted.pop(ip), now)
            self._unpublished.add(ip)
        for ip, node in sorted(assignment.items(), key=lambda kv: str(kv[0])):
            if node is None or self.granted.get(ip) == node:
                self.pending.pop(ip, None)
                continue
            p = self.pending.get(ip)
            if p is None or p.new != node:
                old_at = self.removed_at.get(ip)
                if (
                    old_at is not None
                    and now - old_at[1] < self.wait - _EPSILON
                    and old_at[0] != node
                ):
                    p = Pending(old=old_at[0], new=node, since=old_at[1])
                elif (
                    self._unknown_since is not None
                    and now - self._unknown_since < self.wait - _EPSILON
                ):
                    p = Pending(old=None, new=node, since=self._unknown_since)
                else:
                    p = None
                if p is not None:
                    self.pending[ip] = p
            if p is None or self._released(ip, p, now=now, health=health, held=held):
                self.pending.pop(ip, None)
                self.granted[ip] = node
        for ip in [ip for ip in self.pending if assignment.get(ip) is None]:
            del self.pending[ip]
        for ip in [ip for ip, (_, t) in self.removed_at.items() if now - t >= self.wait + 1]:
            del self.removed_at[ip]
        return dict(self.granted)

    @property
    def unpublished(self) -> bool:
        """Whether the map removed something the standbys cannot know of yet."""
        return bool(self._unpublished)

    def published(self, *, at: float) -> None:
        """The map was written where the standbys read it: the handoff wait of
        what it removed runs from now, since standbys granted the old owner
        until they could read it (their read delay is part of the wait)."""
        for ip in self._unpublished:
            if ip in self.removed_at:
                node, t = self.removed_at[ip]
                self.removed_at[ip] = (node, max(t, at))
            p = self.pending.get(ip)
            if p is not None:
                self.pending[ip] = Pending(old=p.old, new=p.new, since=max(p.since, at))
        self._unpublished.clear()

    def _released(
        self,
        ip: IPAddress,
        p: Pending,
        *,
        now: float,
        health: Mapping[NodeName, Health],
        held: Mapping[NodeName, frozenset[IPAddress]],
    ) -> bool:
        if now - p.since >= self.wait - _EPSILON:
            return True  # every grant the old owner had has expired
        if p.old is None:
            return False
        if health.get(p.old) == Health.GONE:
            return True  # heard by nobody: its ARP answers reach nobody either
        # Its own word, in an ack that arrived after the move: it let go.
        return p.old in held and ip not in held[p.old] and health.get(p.old) in KEEPS
