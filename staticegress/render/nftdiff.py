"""incremental_update: the nftables transactions that turn what the last batch
left into what a new batch describes, touching only what differs. Pure.

Why not replace the tables on every sync: a packet that crosses the hooks
while the kernel commits a transaction can miss sets and maps created by that
transaction. The kernel flips to the new generation first and publishes the
content of some set backends (interval sets and maps, concatenations) a moment
later, once per set. Measured on the lab's kernel with the agent's own render
(a steered pod, fresh UDP flows at full speed, the CNI's masquerade next to
us): each replacement let about four of the pod's new flows out unsteered,
masqueraded with the node's address, and the guard, whose set is replaced
with it, let them by. Elements that exist before and after a transaction,
in sets that exist before and after it, never missed: 0 out of 3.3 M
packets over 2,684 transactions. So a sync changes elements and rules in
place and leaves everything else untouched, and it runs in two transactions
("make before break"):

1. additions: new chains with their rules, new sets and maps with their
   elements, new keys in existing sets and maps; and keys leaving a release
   set (a pod no longer known is held again before its steering goes).
   Nothing a packet already matches loosens. A key whose value changes, and
   a new key of a release set, waits for the second transaction;
2. switches and removals: changed values (a pod's class), new release keys
   (a new pod becomes known, which lifts the hold; by then its steering is
   in place), changed rules (flush and re-add: rules change atomically),
   removed keys, then the ranges that replace them (an interval set refuses
   an element overlapping one it holds: a node's range collapsing with its
   neighbours', a narrowed destination), then removed sets and chains, and
   tables that are no longer wanted. Only the addresses of such a replaced
   range can miss during that commit.

A periodic resync (`reassert`) also re-adds every element and rewrites every
chain's rules, removing nothing: elements deleted and rules edited behind our
back come back.

A whole replacement is still what the agent does when it does not know what
the kernel holds (its first sync, after an error, after a table was changed
behind its back), and what this module asks for when a set's or a chain's
definition changed.

The state is modelled from the batches themselves (`table_state`): the agent
keeps the last batch the kernel accepted; the other writers (the ownership
lease's `held` elements) never appear in a batch, so they are never touched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, summarize_address_range
from typing import Any

Json = dict[str, Any]
Key = tuple[str, str]
"""(family, name) of a table."""
Obj = tuple[str, str, str]
"""(family, table, name) of a set, map or chain."""


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_PLAIN = re.compile(r"[0-9A-Za-z.:/_@-]*")
"""Strings that JSON writes as they are, between quotes."""


def _canon(value: Any) -> str:
    """One text per JSON value. Most elements are plain addresses, written as
    JSON would quote them without the encoder's cost: a sync canonicalises
    every element of every table (35,000 at 10,000 pods)."""
    if isinstance(value, str) and _PLAIN.fullmatch(value):
        return f'"{value}"'
    return _ENCODER.encode(value)


@dataclass
class SetState:
    kind: str
    """"set" or "map"."""
    definition: Json
    """The body without its elements."""
    elements: dict[str, Any] = field(default_factory=dict)
    """Canonical key -> the element as written (for a map, [key, value])."""


@dataclass
class TableState:
    definition: Json
    sets: dict[str, SetState] = field(default_factory=dict)
    chains: dict[str, Json] = field(default_factory=dict)
    """Name -> the chain's body (its hook, if any)."""
    rules: dict[str, list[Json]] = field(default_factory=dict)
    """Chain -> its rules' bodies, in order."""


def _key_of(kind: str, elem: Any) -> Any:
    return elem[0] if kind == "map" and isinstance(elem, list) else elem


def _element_key(kind: str, elem: Any) -> str:
    return _canon(_key_of(kind, elem))


def _normal(value: Any) -> Any:
    """One spelling per meaning for the address forms nft reads and writes: a /32
    prefix or a one-address range is the address, a range that is a prefix
    is the prefix (as the renderer writes them), inside concatenations too."""
    if isinstance(value, dict):
        if "prefix" in value and isinstance(value["prefix"], dict):
            pre = value["prefix"]
            if pre.get("len") == 32:
                return str(pre["addr"])
        elif "range" in value and isinstance(value["range"], list) and len(value["range"]) == 2:
            try:
                lo, hi = (IPv4Address(str(a)) for a in value["range"])
            except ValueError:
                return value
            nets = list(summarize_address_range(lo, hi))
            if len(nets) == 1:
                n = nets[0]
                if n.prefixlen == 32:
                    return str(n.network_address)
                return {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}
        elif "concat" in value and isinstance(value["concat"], list):
            return {"concat": [_normal(v) for v in value["concat"]]}
    return value


def _normal_element(kind: str, elem: Any) -> Any:
    if kind == "map" and isinstance(elem, list) and len(elem) == 2:
        return [_normal(elem[0]), elem[1]]
    return _normal(elem)


Span = tuple[tuple[int, int], ...]


def _spans(key: Any) -> Span | None:
    """Per field, the (first, last) address a key covers; None if unknown."""
    fields = key["concat"] if isinstance(key, dict) and "concat" in key else [key]
    out: list[tuple[int, int]] = []
    for f in fields:
        try:
            if isinstance(f, str):
                a = int(IPv4Address(f))
                out.append((a, a))
            elif isinstance(f, dict) and "prefix" in f:
                n = IPv4Network(f"{f['prefix']['addr']}/{f['prefix']['len']}")
                out.append((int(n.network_address), int(n.broadcast_address)))
            elif isinstance(f, dict) and "range" in f:
                lo, hi = (int(IPv4Address(str(a))) for a in f["range"])
                out.append((lo, hi))
            else:
                return None
        except (ValueError, KeyError, TypeError):
            return None
    return tuple(out)


def _overlaps_any(span: Span | None, others: Sequence[Span | None]) -> bool:
    """Whether `span` may overlap one of `others` (unknown forms: yes)."""
    for o in others:
        if span is None or o is None or len(o) != len(span):
            return True
        if all(
            a_lo <= b_hi and b_lo <= a_hi
            for (a_lo, a_hi), (b_lo, b_hi) in zip(span, o, strict=True)
        ):
            return True
    return False


def _ident(body: Json) -> Obj:
    return (str(body.get("family", "ip")), str(body["table"]), str(body["name"]))


def table_state(batches: Iterable[Json]) -> dict[Key, TableState]:
    """The tables the batches leave, applied in order to an empty ruleset
    (only what they say: a batch that adds to a table it did not create adds
    to an empty model of it)."""
    tables: dict[Key, TableState] = {}

    def table(family: str, name: str) -> TableState:
        return tables.setdefault((family, name), TableState({"family": family, "name": name}))

    for batch in batches:
        for cmd in batch.get("nftables", []):
            if not isinstance(cmd, dict) or "metainfo" in cmd:
                continue
            ((verb, obj),) = cmd.items()
            ((kind, body),) = obj.items()
            fam = str(body.get("family", "ip"))
            if kind == "table":
                key = (fam, str(body["name"]))
                if verb == "add":
                    t = table(*key)
                    t.definition = {**t.definition, **body}
                elif verb in ("delete", "destroy"):
                    tables.pop(key, None)
                elif verb == "flush":
                    t = table(*key)
                    t.rules = {c: [] for c in t.chains}
                    for s in t.sets.values():
                        s.elements.clear()
                continue
            t = table(fam, str(body["table"]))
            if kind in ("set", "map"):
                name = str(body["name"])
                if verb == "add":
                    definition = {k: v for k, v in body.items() if k != "elem"}
                    s = t.sets.setdefault(name, SetState(kind, definition))
                    for e in body.get("elem") or []:
                        e = _normal_element(kind, e)
                        s.elements[_element_key(kind, e)] = e
                elif verb == "flush" and name in t.sets:
                    t.sets[name].elements.clear()
                elif verb in ("delete", "destroy"):
                    t.sets.pop(name, None)
            elif kind == "element":
                s = t.sets[str(body["name"])]
                for e in body.get("elem") or []:
                    e = _normal_element(s.kind, e)
                    if verb == "add":
                        s.elements[_element_key(s.kind, e)] = e
                    elif verb in ("delete", "destroy"):
                        s.elements.pop(_element_key(s.kind, e), None)
            elif kind == "chain":
                name = str(body["name"])
                if verb == "add":
                    t.chains.setdefault(name, body)
                    t.rules.setdefault(name, [])
                elif verb == "flush":
                    t.rules[name] = []
                elif verb in ("delete", "destroy"):
                    t.chains.pop(name, None)
                    t.rules.pop(name, None)
            elif kind == "rule" and verb == "add":
                t.rules.setdefault(str(body["chain"]), []).append(body)
    return tables


class ReplacementNeededError(Exception):
    """The change cannot be made in place (a definition changed)."""


def _cmd(verb: str, kind: str, body: Json) -> Json:
    return {verb: {kind: body}}


def _elements(t: TableState, name: str, elems: Sequence[Any]) -> Json:
    fam = str(t.definition["family"])
    return {"family": fam, "table": t.definition["name"], "name": name, "elem": list(elems)}


def _ref(t: TableState, name: str) -> Json:
    return {"family": t.definition["family"], "table": t.definition["name"], "name": name}


def _new_table(t: TableState) -> list[Json]:
    cmds = [_cmd("add", "table", t.definition)]
    cmds += [_cmd("add", "chain", body) for body in t.chains.values()]
    for s in t.sets.values():
        body = dict(s.definition)
        if s.elements:
            body["elem"] = list(s.elements.values())
        cmds.append(_cmd("add", s.kind, body))
    cmds += [_cmd("add", "rule", r) for rules in t.rules.values() for r in rules]
    return cmds


DEFINING = frozenset({"family", "table", "name", "type", "map", "flags", "hook", "prio", "policy"})
"""What makes a set's or a chain's definition (not the kernel's handle or size,
nor a comment: this nft does not list set comments in JSON)."""


def _same_definition(a: Json, b: Json) -> bool:
    return _canon({k: v for k, v in a.items() if k in DEFINING}) == _canon(
        {k: v for k, v in b.items() if k in DEFINING}
    )


UNKNOWN_RULES: list[Json] = [{"rules": "as the kernel lists them"}]
"""The rules of a chain read from the kernel: never equal to a rendered list,
so every chain's rules are written again (rules change atomically)."""


def _value(elem: Any) -> Any:
    """An element as listed, without the attributes the kernel adds around it."""
    if isinstance(elem, dict) and isinstance(elem.get("elem"), dict):
        return elem["elem"].get("val")
    if isinstance(elem, list) and len(elem) == 2:
        return [_value(elem[0]), elem[1]]
    return elem


def kernel_table_state(
    listings: Iterable[Json], *, skip_elements: Iterable[Obj] = ()
) -> dict[Key, TableState]:
    """Tables as the kernel lists them (`list table`, JSON), for the first sync
    of a restarted agent: its elements, chains and definitions, so the sync
    changes in place what the previous run left. Rules are not compared
    (`UNKNOWN_RULES`); the elements of `skip_elements` (written by others:
    the lease's `held`) are left out, so no update ever touches them."""
    skip = set(skip_elements)
    tables: dict[Key, TableState] = {}
    for doc in listings:
        for item in doc.get("nftables", []):
            if not isinstance(item, dict):
                continue
            for kind, body in item.items():
                if not isinstance(body, dict) or kind == "metainfo":
                    continue
                fam = str(body.get("family", "ip"))
                if kind == "table":
                    tables[(fam, str(body["name"]))] = TableState(
                        {k: v for k, v in body.items() if k in ("family", "name", "comment")}
                    )
                    continue
                t = tables.get((fam, str(body.get("table"))))
                if t is None:
                    continue
                if kind in ("set", "map"):
                    name = str(body["name"])
                    definition = {k: v for k, v in body.items() if k in DEFINING}
                    st = t.sets[name] = SetState(kind, definition)
                    if (fam, str(body["table"]), name) in skip:
                        continue
                    for e in body.get("elem") or []:
                        v = _normal_element(kind, _value(e))
                        st.elements[_element_key(kind, v)] = v
                elif kind == "chain":
                    name = str(body["name"])
                    t.chains[name] = {k: v for k, v in body.items() if k in DEFINING}
                    t.rules[name] = UNKNOWN_RULES
    return tables


def _table_update(
    old: TableState, new: TableState, release: frozenset[str], reassert: bool
) -> tuple[list[Json], list[Json]]:
    """(additions, switches and removals) for one table present before and after."""
    make: list[Json] = []
    switch: list[Json] = []
    # 1. Chains first: map elements and rules refer to them by name.
    for name, body in new.chains.items():
        if name not in old.chains:
            make.append(_cmd("add", "chain", body))
        elif not _same_definition(old.chains[name], body):
            raise ReplacementNeededError(f"chain {name} changed its definition")
    for name, s in new.sets.items():
        before = old.sets.get(name)
        if before is None:
            body = dict(s.definition)
            if s.elements:
                body["elem"] = list(s.elements.values())
            make.append(_cmd("add", s.kind, body))
            continue
        if before.kind != s.kind or not _same_definition(before.definition, s.definition):
            raise ReplacementNeededError(f"{s.kind} {name} changed its definition")
        added = [e for k, e in s.elements.items() if k not in before.elements]
        changed = [
            e for k, e in s.elements.items() if k in before.elements and before.elements[k] != e
        ]
        removed = [k for k in before.elements if k not in s.elements]
        # An interval set refuses an element that overlaps one it holds: a
        # range that replaces others (collapsed with a neighbour, narrowed)
        # goes in after they are deleted, in the second transaction.
        late: list[Any] = []
        if removed and "interval" in (s.definition.get("flags") or []):
            gone = [_spans(json.loads(k)) for k in removed]
            late = [e for e in added if _overlaps_any(_spans(_key_of(s.kind, e)), gone)]
            added = [e for e in added if not any(e is x for x in late)]
        if name in release:
            late, added = late + added, []
        if added:
            make.append(_cmd("add", "element", _elements(new, name, added)))
        if reassert:
            # A periodic resync: re-add what should be there and is (a no-op
            # for the kernel when it is), in case something deleted elements
            # behind our back.
            kept = [
                e for k, e in s.elements.items() if k in before.elements and before.elements[k] == e
            ]
            if kept:
                make.append(_cmd("add", "element", _elements(new, name, kept)))
        if removed and name in release:
            # A key leaving a release set tightens the hold: first, before
            # the steering it guarded goes (a packet whose lookups straddle
            # one commit could otherwise find neither).
            keys = [json.loads(k) for k in removed]
            make.append(_cmd("delete", "element", _elements(new, name, keys)))
            removed = []
        gone_keys = [json.loads(_element_key(s.kind, e)) for e in changed]
        gone_keys += [json.loads(k) for k in removed]
        if gone_keys:
            switch.append(_cmd("delete", "element", _elements(new, name, gone_keys)))
        if changed or late:
            switch.append(_cmd("add", "element", _elements(new, name, [*changed, *late])))
    for name, rules in new.rules.items():
        if name not in old.chains:
            make += [_cmd("add", "rule", r) for r in rules]
        elif reassert or rules != old.rules.get(name, []):
            # A periodic resync rewrites every chain's rules (atomically):
            # the watchdog leaves an edit it could not tell from ours to it.
            switch.append(_cmd("flush", "chain", _ref(new, name)))
            switch += [_cmd("add", "rule", r) for r in rules]
    # Removals last, each after what refers to it: rules of doomed chains,
    # then sets, then the chains themselves.
    doomed_chains = [n for n in old.chains if n not in new.chains]
    switch += [_cmd("flush", "chain", _ref(old, n)) for n in doomed_chains]
    switch += [
        _cmd("delete", s.kind, _ref(old, n)) for n, s in old.sets.items() if n not in new.sets
    ]
    switch += [_cmd("delete", "chain", _ref(old, n)) for n in doomed_chains]
    return make, switch


def incremental_update(
    old: Mapping[Key, TableState],
    new: Mapping[Key, TableState],
    *,
    release: Mapping[Key, Iterable[str]] | None = None,
    reassert: bool = False,
) -> list[Json]:
    """The batches (zero, one or two, in order) that turn `old` into `new` in
    place; `release`: per table, the sets whose new keys go in the second
    batch. Raises ReplacementNeededError when that cannot be done in place."""
    releases = {k: frozenset(v) for k, v in (release or {}).items()}
    make: list[Json] = []
    switch: list[Json] = []
    for key, t in new.items():
        before = old.get(key)
        if before is None:
            make += _new_table(t)
            continue
        m, s = _table_update(before, t, releases.get(key, frozenset()), reassert)
        make += m
        switch += s
    for key in old:
        if key not in new:
            switch.append(_cmd("delete", "table", {"family": key[0], "name": key[1]}))
    return [{"nftables": cmds} for cmds in (make, switch) if cmds]
