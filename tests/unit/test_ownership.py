"""The ownership state machines, each failure case on an injected clock (no root).

docs/fault-model.md lists the cases; each test names the one it covers.
"""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from staticegress.api.types import IPAddress, NodeName
from staticegress.model.ownership import (
    GRANT_TTL,
    Grant,
    GrantBook,
    HandoffPlanner,
    Health,
    NodeView,
    Reject,
    classify,
    eligible,
    handoff_wait,
)

X = ip_address("198.51.100.200")
Y = ip_address("198.51.100.201")
A, B, C = NodeName("node-1"), NodeName("node-2"), NodeName("node-3")
WALL = 1_800_000_000.0


def grant(
    *ips: IPAddress,
    node: NodeName = A,
    seq: int = 1,
    epoch: int = 1,
    sender: str = "manager-1/aa",
    wall: float = WALL,
    ttl: float = GRANT_TTL,
) -> Grant:
    return Grant(
        sender=sender, node=node, epoch=epoch, seq=seq, sent_wall=wall, ttl=ttl, ips=frozenset(ips)
    )


# ------------------------------------------------------------------ GrantBook


def test_a_grant_lets_the_node_hold_only_what_the_status_also_gives_it() -> None:
    book = GrantBook(node=A)
    assert book.offer(grant(X, Y), now=0.0, now_wall=WALL) is None
    held = book.deadlines(now=0.1, mine=frozenset({X}))
    assert held == {X: pytest.approx(GRANT_TTL)}
    assert book.deadlines(now=0.1, mine=frozenset()) == {}


def test_without_renewal_the_permission_ends_at_the_ttl() -> None:
    book = GrantBook(node=A)
    book.offer(grant(X), now=10.0, now_wall=WALL)
    mine = frozenset({X})
    assert X in book.deadlines(now=10.0 + GRANT_TTL - 0.01, mine=mine)
    assert book.deadlines(now=10.0 + GRANT_TTL, mine=mine) == {}


def test_renewals_from_any_replica_extend_the_permission() -> None:
    book = GrantBook(node=A)
    book.offer(grant(X, sender="m1/aa", seq=1), now=0.0, now_wall=WALL)
    book.offer(grant(X, sender="m2/bb", seq=1), now=1.5, now_wall=WALL)
    assert book.deadlines(now=3.0, mine=frozenset({X})) == {X: pytest.approx(1.5 + GRANT_TTL)}


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (grant(X, node=B), Reject.WRONG_NODE),
        (grant(X, wall=WALL - 60), Reject.STALE),
        (grant(X, wall=WALL + 60), Reject.STALE),
        (grant(X, ttl=0), Reject.BAD_TTL),
        (grant(X, ttl=3600), Reject.BAD_TTL),
    ],
)
def test_forged_or_malformed_grants_are_refused(bad: Grant, why: Reject) -> None:
    book = GrantBook(node=A)
    assert book.offer(bad, now=0.0, now_wall=WALL) is why
    assert book.deadlines(now=0.0, mine=frozenset({X})) == {}


def test_a_replayed_grant_is_refused() -> None:
    """Case 15: the same sequence twice, or an older one, from one sender."""
    book = GrantBook(node=A)
    assert book.offer(grant(X, seq=5), now=0.0, now_wall=WALL) is None
    assert book.offer(grant(X, seq=5), now=1.9, now_wall=WALL) is Reject.REPLAY
    assert book.offer(grant(X, seq=4), now=1.9, now_wall=WALL) is Reject.REPLAY
    assert book.deadlines(now=2.1, mine=frozenset({X})) == {}


def test_a_newer_epoch_voids_grants_of_the_older_map() -> None:
    """A standby still granting the old map cannot keep a moved IP alive."""
    book = GrantBook(node=A)
    book.offer(grant(X, sender="standby/bb", epoch=1), now=0.0, now_wall=WALL)
    # The leader's new map moved X away: it grants A nothing.
    book.offer(grant(sender="leader/aa", epoch=2), now=0.1, now_wall=WALL)
    assert book.deadlines(now=0.2, mine=frozenset({X})) == {}
    assert (
        book.offer(grant(X, sender="standby/bb", epoch=1, seq=2), now=0.3, now_wall=WALL)
        is Reject.OLD_EPOCH
    )
    assert book.deadlines(now=0.3, mine=frozenset({X})) == {}
    # Seen: the same grant again is a replay (the agent answers it only once).
    assert (
        book.offer(grant(X, sender="standby/bb", epoch=1, seq=2), now=0.4, now_wall=WALL)
        is Reject.REPLAY
    )


def test_a_read_back_renews_from_when_the_read_was_sent() -> None:
    """Case 4: grants filtered, the API answers."""
    book = GrantBook(node=A)
    book.confirm_by_readback([X], sent_at=5.0)
    assert book.deadlines(now=6.0, mine=frozenset({X})) == {X: 5.0 + GRANT_TTL}
    assert book.deadlines(now=5.0 + GRANT_TTL, mine=frozenset({X})) == {}
    # A read that no longer shows X renews nothing.
    book.confirm_by_readback([], sent_at=7.0)
    assert book.deadlines(now=7.1, mine=frozenset({X})) == {}


# ------------------------------------------------------------------- classify


def view(
    *, icmp: bool = True, ack: float = 0.0, peers: bool = True, ready: bool = True
) -> NodeView:
    return NodeView(icmp_up=icmp, ack_age=ack, heard_by_peers=peers, ready=ready)


def test_one_filtered_channel_changes_nothing() -> None:
    """Case 3: ICMP filtered, acks answer."""
    v = classify({A: view(icmp=False), B: view(icmp=False), C: view(icmp=False)})
    assert not v.frozen
    assert set(v.health.values()) == {Health.ALIVE}


def test_node_silent_to_everyone_is_gone_and_heard_by_peers_is_unreachable() -> None:
    v = classify(
        {
            A: view(icmp=False, ack=9.0, peers=False),
            B: view(icmp=False, ack=9.0, peers=True),
            C: view(),
            NodeName("node-4"): view(),
            NodeName("node-5"): view(),
        }
    )
    assert v.health[A] is Health.GONE
    assert v.health[B] is Health.UNREACHABLE
    assert not v.frozen


def test_a_dead_agent_whose_kernel_answers_ping_gets_no_new_ips_then_loses_its_own() -> None:
    """Case 7."""
    assert classify({A: view(ack=0.8)}).health[A] is Health.AGENT_LAGGING
    assert classify({A: view(ack=2.0)}).health[A] is Health.AGENT_DOWN


def test_a_fresh_loss_moves_nothing_yet_but_counts_towards_the_freeze() -> None:
    """The leader's probes are spread over a round: its own path failing shows
    as one loss, then the others a round later. The first must not move."""
    fresh = NodeView(icmp_up=False, ack_age=0.4, heard_by_peers=False, lost_for=0.05)
    v = classify({A: fresh, B: view(), C: view()})
    assert v.health[A] is Health.SUSPECT
    assert not v.frozen
    v = classify({A: fresh, B: fresh, C: view()})
    assert v.frozen
    settled = NodeView(icmp_up=False, ack_age=0.4, heard_by_peers=False, lost_for=0.2)
    assert classify({A: settled, B: view(), C: view()}).health[A] is Health.GONE


def test_every_agent_silent_while_ping_answers_freezes() -> None:
    """Case 4: the grant port filtered (or a wrong key): the agents go silent
    together, their kernels still answer. Moving IPs would only darken them."""
    silent = view(icmp=True, ack=5.0)
    v = classify({A: silent, B: silent, C: silent})
    assert v.frozen
    assert set(v.health.values()) == {Health.AGENT_DOWN}


def test_frozen_every_candidate_keeps_what_it_has_and_nobody_takes_more() -> None:
    """A replica that starts out frozen has no earlier view: it must not unassign."""
    silent = view(icmp=True, ack=5.0)
    keep, take = eligible(classify({A: silent, B: silent, C: view()}))
    assert keep == {A, B, C}
    assert take == {C}
    keep, take = eligible(classify({A: silent, B: view(), C: view()}))
    assert keep == {B, C}


def test_one_dead_node_and_one_dead_agent_are_two_faults_not_a_detector_fault() -> None:
    dead = NodeView(icmp_up=False, ack_age=5.0, heard_by_peers=False, witnessed_lost=True)
    v = classify({A: dead, B: view(ack=5.0), C: view()})
    assert not v.frozen
    assert v.health[A] is Health.GONE
    assert v.health[B] is Health.AGENT_DOWN


def test_half_the_candidates_lost_at_once_freezes() -> None:
    """Case 5: the leader's own path is cut."""
    lost = view(icmp=False, ack=5.0, peers=True)
    v = classify({A: lost, B: lost, C: view()})
    assert v.frozen
    assert v.unreachable == (A, B)
    # One of three is a plausible failure: no freeze.
    assert not classify({A: lost, B: view(), C: view()}).frozen


def test_a_mass_loss_that_a_surviving_witness_confirms_is_not_frozen() -> None:
    """Two of three gateways really died: the third answers and hears neither."""
    dead = NodeView(icmp_up=False, ack_age=5.0, heard_by_peers=False, witnessed_lost=True)
    v = classify({A: dead, B: dead, C: view()})
    assert not v.frozen
    assert v.health[A] is Health.GONE
    # With no witness at all (the leader hears nobody), it is the leader's fault.
    silent = NodeView(icmp_up=False, ack_age=5.0, heard_by_peers=False)
    assert classify({A: silent, B: silent, C: silent}).frozen


# --------------------------------------------------------------- HandoffPlanner

ALIVE = {A: Health.ALIVE, B: Health.ALIVE, C: Health.ALIVE}


def test_first_assignment_is_granted_at_once() -> None:
    p = HandoffPlanner()
    assert p.plan({X: A}, now=0.0, health=ALIVE, held={}) == {X: A}


def test_a_move_off_an_unreachable_owner_waits_until_its_grant_has_expired() -> None:
    """Case 2 and 7: the old owner may still hold a grant."""
    p = HandoffPlanner()
    p.plan({X: A}, now=0.0, health=ALIVE, held={})
    health = {**ALIVE, A: Health.UNREACHABLE}
    assert p.plan({X: B}, now=10.0, health=health, held={}) == {}
    p.published(at=10.05)
    wait = handoff_wait()
    assert wait > GRANT_TTL
    assert p.plan({X: B}, now=10.05 + wait - 0.01, health=health, held={}) == {}
    assert p.plan({X: B}, now=10.05 + wait, health=health, held={}) == {X: B}


def test_the_wait_runs_from_when_the_removal_was_published() -> None:
    p = HandoffPlanner()
    p.plan({X: A}, now=0.0, health=ALIVE, held={})
    health = {**ALIVE, A: Health.AGENT_DOWN}
    p.plan({X: B}, now=1.0, health=health, held={})
    # The Lease write took a second: standbys granted A until then.
    p.published(at=2.0)
    assert p.plan({X: B}, now=1.0 + handoff_wait(), health=health, held={}) == {}
    assert p.plan({X: B}, now=2.0 + handoff_wait(), health=health, held={}) == {X: B}


def test_a_confirmed_release_hands_over_in_one_round_trip() -> None:
    """Case 8: the gateway label removed from a healthy node."""
    p = HandoffPlanner()
    p.plan({X: A}, now=0.0, health=ALIVE, held={})
    assert p.plan({X: B}, now=1.0, health=ALIVE, held={A: frozenset({X})}) == {}
    assert p.plan({X: B}, now=1.1, health=ALIVE, held={A: frozenset()}) == {X: B}


def test_a_release_claimed_by_an_unreachable_node_does_not_count() -> None:
    p = HandoffPlanner()
    p.plan({X: A}, now=0.0, health=ALIVE, held={})
    health = {**ALIVE, A: Health.AGENT_DOWN}
    assert p.plan({X: B}, now=1.0, health=health, held={A: frozenset()}) == {}


def test_an_owner_gone_for_everyone_is_replaced_at_once() -> None:
    """Case 1: the sub-second path."""
    p = HandoffPlanner()
    p.plan({X: A}, now=0.0, health=ALIVE, held={})
    health = {**ALIVE, A: Health.GONE}
    assert p.plan({X: B}, now=5.0, health=health, held={}) == {X: B}


def test_moving_back_to_the_old_owner_is_immediate_and_others_are_untouched() -> None:
    p = HandoffPlanner()
    p.plan({X: A, Y: C}, now=0.0, health=ALIVE, held={})
    health = {**ALIVE, A: Health.UNREACHABLE}
    assert p.plan({X: B, Y: C}, now=1.0, health=health, held={}) == {Y: C}
    assert p.plan({X: A, Y: C}, now=1.2, health=ALIVE, held={}) == {X: A, Y: C}


def test_a_new_leader_waits_for_what_its_predecessor_may_have_moved() -> None:
    """Case 12: a leader change in the middle of a handoff."""
    p = HandoffPlanner.resume({Y: C}, now=100.0)
    # X is absent from the published map: its old owner is unknown.
    assert p.plan({X: B, Y: C}, now=100.1, health=ALIVE, held={}) == {Y: C}
    assert p.plan({X: B, Y: C}, now=100.0 + handoff_wait(), health=ALIVE, held={}) == {
        X: B,
        Y: C,
    }


def test_an_unassigned_ip_stops_being_granted() -> None:
    p = HandoffPlanner()
    p.plan({X: A}, now=0.0, health=ALIVE, held={})
    assert p.plan({X: None}, now=1.0, health=ALIVE, held={}) == {}
    assert not p.pending
