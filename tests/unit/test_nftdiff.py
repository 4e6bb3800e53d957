"""incremental_update: syncs change the kernel in place. For a series of changes
to the `mixed` scenario (pods come and go, rules change, a gateway moves), on
a director and a gateway, in both transports: the updates lead from the old
tables to exactly what a whole replacement would, never remove what stays,
and lift the hold of a new pod only after its steering is in."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest

from staticegress.model.desired import compute_desired
from staticegress.render import nftdiff
from staticegress.render.lease import render_lease_tables
from staticegress.render.nft import render_ruleset
from staticegress.render.nftdiff import (
    Key,
    ReplacementNeededError,
    TableState,
    incremental_update,
    table_state,
)
from tests import scenario

Json = dict[str, Any]
RELEASE = {("ip", "staticegress"): ["known_local_pods"]}


def _batch(data: dict[str, Any], transport: str) -> Json:
    desired = compute_desired(scenario.snapshot(data), scenario.config(data, transport))
    batch = render_ruleset(desired, transport=transport)
    batch["nftables"] += render_lease_tables(desired.named, arp_ips=desired.egress_ips)
    return batch


def _canon(tables: Mapping[Key, TableState]) -> dict[Key, Any]:
    def c(v: Any) -> str:
        return json.dumps(v, sort_keys=True)

    return {
        key: (
            {n: (s.kind, c(s.definition), {k: c(e) for k, e in s.elements.items()})
             for n, s in t.sets.items()},
            {n: c(body) for n, body in t.chains.items()},
            {n: [c(r) for r in rules] for n, rules in t.rules.items() if n in t.chains},
        )
        for key, t in tables.items()
    }  # fmt: skip


def _add_pod(data: dict[str, Any]) -> None:
    data["pods"].append(
        {"namespace": "default", "name": "fe-new", "node": "node-1", "ip": "10.244.1.20",
         "labels": {"app": "frontend"}}
    )  # fmt: skip


def _add_billing_pod(data: dict[str, Any]) -> None:
    data["pods"].append(
        {"namespace": "payments", "name": "bill-3", "node": "node-2", "ip": "10.244.2.30",
         "labels": {"app": "billing"}}
    )  # fmt: skip


def _drop_pod(data: dict[str, Any]) -> None:
    data["pods"] = [p for p in data["pods"] if p["name"] != "bill-2"]


def _narrow_rule(data: dict[str, Any]) -> None:
    rule = data["staticegressips"][1]["spec"]["rules"][0]
    rule["cidrs"] = ["203.0.113.0/24"]


def _widen_rule(data: dict[str, Any]) -> None:
    rule = data["staticegressips"][0]["spec"]["rules"][0]
    rule["cidr"] = "203.0.113.0/28"


def _move_gateway(data: dict[str, Any]) -> None:
    data["staticegressips"][0]["status"]["egressIPs"][0]["gateway"] = "node-3"
    data["staticegressips"][1]["status"]["egressIPs"][0]["gateway"] = "node-2"


def _remove_everything(data: dict[str, Any]) -> None:
    data["staticegressips"] = []


def _node_joins(data: dict[str, Any]) -> None:
    """node-0's range and address collapse with the others' in `cluster_ranges`."""
    data["nodes"].append({"name": "node-0", "ip": "198.51.100.10", "podCIDR": "10.244.0.0/24"})


def _narrow_a_piece(data: dict[str, Any]) -> None:
    rule = data["staticegressips"][1]["spec"]["rules"][0]
    rule["cidrs"] = ["203.0.113.0/24", "192.0.2.0/25"]


CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "node joins": _node_joins,
    "piece narrowed": _narrow_a_piece,
    "new local pod": _add_pod,
    "new remote pod": _add_billing_pod,
    "pod gone": _drop_pod,
    "rule narrowed": _narrow_rule,
    "rule widened": _widen_rule,
    "gateways moved": _move_gateway,
    "everything removed": _remove_everything,
}


def _pairs(node: str) -> Iterable[tuple[str, dict[str, Any], dict[str, Any]]]:
    base = scenario.load("mixed")
    base["node"] = node
    for name, change in CHANGES.items():
        after = copy.deepcopy(base)
        change(after)
        yield name, base, after
        yield f"undo {name}", after, base


def _no_overlap_on_the_way(old: Mapping[Key, TableState], updates: list[Json], what: str) -> None:
    """Plays the batches against interval semantics, command by command: the
    kernel refuses an element that overlaps one its set holds (the whole
    transaction with it)."""
    from staticegress.render.nftdiff import _key_of, _overlaps_any, _spans

    held: dict[tuple[str, str], tuple[bool, str, dict[str, Any]]] = {
        (t.definition["name"], n): (
            "interval" in (st.definition.get("flags") or []),
            st.kind,
            {k: json.loads(k) for k in st.elements},
        )
        for t in old.values()
        for n, st in t.sets.items()
    }
    for batch in updates:
        for cmd in batch["nftables"]:
            ((verb, obj),) = cmd.items()
            ((kind, body),) = obj.items()
            if kind in ("set", "map") and verb == "add":
                elems = {
                    json.dumps(_key_of(kind, e), sort_keys=True, separators=(",", ":")): _key_of(
                        kind, e
                    )
                    for e in body.get("elem") or []
                }
                held[(body["table"], body["name"])] = (
                    "interval" in (body.get("flags") or []), kind, elems,
                )  # fmt: skip
            elif kind == "element":
                interval, skind, elems = held[(body["table"], body["name"])]
                for e in body["elem"]:
                    key = _key_of(skind, e) if verb == "add" else e
                    k = json.dumps(key, sort_keys=True, separators=(",", ":"))
                    if verb == "delete":
                        elems.pop(k, None)
                        continue
                    if interval and k not in elems:
                        others = [_spans(v) for v in elems.values()]
                        assert not _overlaps_any(_spans(key), others), (
                            f"{what}: {body['name']} {k} overlaps an element it holds"
                        )
                    elems[k] = key


def _elements_of(batch: Json, verb: str) -> set[tuple[str, str, str]]:
    out = set()
    for cmd in batch["nftables"]:
        body = cmd.get(verb, {}).get("element")
        if body is None:
            continue
        for e in body["elem"]:
            key = e[0] if isinstance(e, list) else e
            out.add((body["table"], body["name"], json.dumps(key, sort_keys=True)))
    return out


@pytest.mark.parametrize("transport", ["direct", "vxlan"])
@pytest.mark.parametrize("node", ["node-1", "node-2", "node-3"])
def test_updates_lead_where_a_replacement_would_and_keep_what_stays(
    node: str, transport: str
) -> None:
    for what, before, after in _pairs(node):
        old_batch, new_batch = _batch(before, transport), _batch(after, transport)
        old, new = table_state([old_batch]), table_state([new_batch])
        updates = incremental_update(old, new, release=RELEASE)
        assert len(updates) <= 2
        reached = table_state([old_batch, *updates])
        assert _canon(reached) == _canon(new), what
        _no_overlap_on_the_way(old, updates, what)
        # Nothing that is there before and after is removed on the way: no
        # table, set or chain deleted, no element deleted whose value stays.
        for cmd in (c for u in updates for c in u["nftables"]):
            if "delete" in cmd:
                ((kind, body),) = cmd["delete"].items()
                if kind == "table":
                    assert (body["family"], body["name"]) not in new, what
                elif kind in ("set", "map", "chain"):
                    t = new.get((body["family"], body["table"]))
                    assert t is None or body["name"] not in {**t.sets, **t.chains}, what
        deleted = set().union(*(_elements_of(u, "delete") for u in updates))
        for table, name, key in deleted:
            t_old, t_new = old[("ip", table)], new.get(("ip", table))
            if t_new is None or name not in t_new.sets:
                continue
            after_elem = t_new.sets[name].elements.get(key)
            assert after_elem is None or json.dumps(after_elem, sort_keys=True) != json.dumps(
                t_old.sets[name].elements[key], sort_keys=True
            ), f"{what}: {name} {key} deleted though it stays"


def test_a_new_pod_is_steered_in_the_first_batch_and_known_only_in_the_second() -> None:
    before = scenario.load("mixed")
    after = copy.deepcopy(before)
    _add_pod(after)
    old, new = table_state([_batch(before, "direct")]), table_state([_batch(after, "direct")])
    make, switch = incremental_update(old, new, release=RELEASE)
    pod = json.dumps("10.244.1.20")
    assert ("staticegress", "steer_pods", pod) in _elements_of(make, "add")
    assert ("staticegress", "known_local_pods", pod) not in _elements_of(make, "add")
    assert ("staticegress", "known_local_pods", pod) in _elements_of(switch, "add")
    # Its class existed already: nothing else changes for it.
    assert not any("chain" in c.get("add", {}) for c in make["nftables"])


def test_an_unchanged_state_needs_no_batch_and_a_resync_rewrites_without_removing() -> None:
    """A periodic resync re-adds every element (deleted behind our back?) and
    rewrites every chain's rules (edited behind our back?), removing nothing."""
    data = scenario.load("mixed")
    state = table_state([_batch(data, "direct")])
    assert incremental_update(state, state, release=RELEASE) == []
    batches = incremental_update(state, state, release=RELEASE, reassert=True)
    verbs = {(v, next(iter(o))) for b in batches for c in b["nftables"] for v, o in c.items()}
    assert verbs == {("add", "element"), ("flush", "chain"), ("add", "rule")}
    every = {
        (t.definition["name"], n, json.dumps(json.loads(k), sort_keys=True))
        for t in state.values() for n, st in t.sets.items() for k in st.elements
    }  # fmt: skip
    assert set().union(*(_elements_of(b, "add") for b in batches)) == every
    assert _canon(table_state([_batch(data, "direct"), *batches])) == _canon(state)


def test_a_changed_definition_asks_for_a_replacement() -> None:
    data = scenario.load("mixed")
    old = table_state([_batch(data, "direct")])
    new = table_state([_batch(data, "direct")])
    new[("ip", "staticegress")].chains["prerouting"] = {
        **new[("ip", "staticegress")].chains["prerouting"],
        "prio": -80,
    }
    with pytest.raises(ReplacementNeededError, match="prerouting"):
        incremental_update(old, new, release=RELEASE)


def test_class_names_do_not_depend_on_the_other_classes() -> None:
    """A class keeps its name (so its map is left alone) when others come and go."""
    base = scenario.load("mixed")
    fewer = copy.deepcopy(base)
    _remove_everything(fewer)
    fewer["staticegressips"] = [base["staticegressips"][1]]  # billing only

    def chains(data: dict[str, Any]) -> set[str]:
        return {n for n in table_state([_batch(data, "direct")])[("ip", "staticegress")].chains}

    kept = {n for n in chains(fewer) if "_class_" in n}
    assert kept
    assert kept <= chains(base)


@pytest.mark.parametrize(
    "value",
    [
        "10.244.1.2",
        "steer_class_0123456789ab",
        "@cluster_ranges",
        "",
        'a"quote',
        "back\\slash",
        "tab\there",
        "café",
        {"prefix": {"addr": "10.0.0.0", "len": 8}},
        ["10.0.0.1", {"jump": {"target": "x"}}],
        {"concat": ["10.0.0.1", {"range": ["1.1.1.1", "1.1.1.9"]}]},
        7,
        None,
    ],
)
def test_an_element_key_is_its_canonical_json(value: Any) -> None:
    """The fast path for plain strings writes exactly what JSON would, and
    anything else goes through the encoder (a key must never collide)."""
    assert nftdiff._canon(value) == json.dumps(value, sort_keys=True, separators=(",", ":"))
