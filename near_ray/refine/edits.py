"""Vocabulary edits: what a person decided after reading the review, read back by refine and train.

An edits file is a YAML list, one edit per item (``refine.edits``, or ``--edits FILE``)::

    - rename: Sooty Grosbeak              # the name (with its synonyms) is called this from now on
      to: Sooty Red-crowned Grosbeak
    - merge: [White-crowned Grosbeak, Mountain Grosbeak]
      into: Mountain White-crowned Grosbeak   # one name: the groups of all of them
    - drop: Bird                          # the name and its synonyms leave the vocabulary
    - ban: unknown bird                   # this answer (any spelling) counts as no answer
    - keep_apart: [Crimson-barred Warbler, Crimson-spotted Warbler]   # never merged automatically
      domain: birds                       # any edit: only this domain (default: every domain with the names)

rename, merge and drop act on a name of the vocabulary with every answer merged into it; ban and
keep_apart act on one answer (a surface form, matched by its key: case, plural, punctuation). Names
an edit asks for (rename and merge targets, kept-apart names) are never pruned for low support.

``check`` (the file and the run's domains: kinds, fields, conflicts, cycles, a merge into a dropped
name) runs before any slow work; ``resolve`` (against the labels table's answers) says which edits
apply where; ``DomainPlan.regroup`` applies them to the automatic merge groups. Errors name file:line.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from near_ray.errors import NearRayError
from near_ray.names import name_key

KINDS = ("rename", "merge", "drop", "ban", "keep_apart")
_TARGET = {"rename": "to", "merge": "into"}  # the field naming where a rename or merge goes
_COMMON = ("domain", "note")  # fields any edit may carry


class EditsError(NearRayError):
    """An edits file that cannot be applied; the message names the file and line."""


@dataclass(frozen=True)
class Edit:
    kind: str
    names: tuple[str, ...]  # rename, drop, ban: one name; merge: the names merged; keep_apart: two or more
    line: int
    target: str | None = None  # rename: to; merge: into
    domain: str | None = None  # None: every domain that has the names
    note: str | None = None

    def referenced(self) -> list[str]:
        """The names that must exist for the edit to apply (a rename's new name need not)."""
        return [*self.names, self.target] if self.kind == "merge" and self.target else list(self.names)

    def edges(self) -> list[tuple[str, str]]:
        """(from key, to key): where a rename or merge sends each name (none to itself)."""
        if self.target is None:
            return []
        to = _key(self.target)
        return [(k, to) for k in (_key(n) for n in self.names) if k != to]

    def record(self) -> dict[str, Any]:
        out = {"line": self.line, "kind": self.kind, "names": list(self.names),
               _TARGET.get(self.kind, "target"): self.target, "domain": self.domain, "note": self.note}
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class Edits:
    source: str  # the file, as errors name it
    edits: list[Edit] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """What the edits do, not where they sit in the file: a comment or a reordered file recomputes nothing."""
        body = sorted(json.dumps([e.kind, [_key(n) for n in e.names], e.target, e.domain]) for e in self.edits)
        return hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16]

    def error(self, edit: Edit | int, message: str) -> EditsError:  # file:line: editors and terminals link it
        return EditsError(f"{self.source}:{edit if isinstance(edit, int) else edit.line}: {message}")

    def in_scope(self, domain: str) -> list[Edit]:
        return [e for e in self.edits if e.domain in (None, domain)]

    def record(self) -> dict[str, Any]:
        return {"file": self.source, "fingerprint": self.fingerprint, "edits": [e.record() for e in self.edits]}


def _key(name: str) -> str:
    return name_key(name) or ""


def _did_you_mean(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(set(options)), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ------------------------------------------------------------------------------------------ reading
def read_edits(uri: str, storage: Any) -> Edits:
    """Parse the edits file at ``uri`` (local or s3://) with ``storage``; errors name ``uri:line``."""
    try:
        text = storage.read_text(uri)
    except (NearRayError, OSError, UnicodeDecodeError) as e:
        raise EditsError(f"{uri}: cannot read the edits file (refine.edits): {e}") from None
    return parse_edits(text, uri)


def parse_edits(text: str, source: str) -> Edits:
    """The edits in ``text``; an empty file is no edits. Line numbers come from the YAML nodes."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise EditsError(f"{source}:{line}: not valid YAML: {' '.join(str(getattr(e, 'problem', None) or e).split())}") from None
    edits = Edits(source)
    if root is None:
        return edits
    if not isinstance(root, yaml.SequenceNode):
        raise edits.error(root.start_mark.line + 1, "an edits file is a list of edits ('- rename: A' / '  to: B', "
                                                     f"'- merge: [A, B]', …; kinds: {', '.join(KINDS)})")
    for item in root.value:
        edits.edits.append(_parse_item(item, edits))
    return edits


def _parse_item(node: yaml.Node, edits: Edits) -> Edit:
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode):
        raise edits.error(line, f"an edit is a mapping such as 'rename: A' with 'to: B' (kinds: {', '.join(KINDS)})")
    fields: dict[str, yaml.Node] = {}
    for k, v in node.value:
        name = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
        if name in fields:
            raise edits.error(k.start_mark.line + 1, f"'{name}' is given twice in one edit")
        fields[name] = v
    kinds = [k for k in fields if k in KINDS]
    if len(kinds) != 1:
        unknown = [k for k in fields if k not in KINDS and k not in _COMMON and k not in _TARGET.values()]
        what = (f"unknown edit kind '{unknown[0]}'{_did_you_mean(unknown[0], KINDS)}" if unknown and not kinds
                else f"one edit per item, found {', '.join(kinds) or 'none'}")
        raise edits.error(line, f"{what}; an edit is one of {', '.join(KINDS)}")
    kind = kinds[0]
    allowed = {kind, *_COMMON, *([_TARGET[kind]] if kind in _TARGET else [])}
    for k, v in fields.items():
        if k not in allowed:
            raise edits.error(v.start_mark.line + 1, f"'{k}' is not a field of a {kind} edit (fields: {', '.join(sorted(allowed))})")
    if kind in _TARGET and _TARGET[kind] not in fields:
        raise edits.error(line, f"a {kind} edit needs '{_TARGET[kind]}:' (the name it becomes)")
    names = _names(fields[kind], edits, many=kind in ("merge", "keep_apart"))
    target = _names(fields[_TARGET[kind]], edits)[0] if kind in _TARGET else None
    if kind == "keep_apart" and len({_key(n) for n in names}) < 2:
        raise edits.error(line, "keep_apart needs two or more different names")
    if kind == "merge" and all(_key(n) == _key(target or "") for n in names):
        raise edits.error(line, "merge needs at least one name besides 'into'")
    return Edit(kind, tuple(names), line, target,
                _names(fields["domain"], edits)[0] if "domain" in fields else None,
                str(fields["note"].value) if "note" in fields and isinstance(fields["note"], yaml.ScalarNode) else None)


def _names(node: yaml.Node, edits: Edits, many: bool = False) -> list[str]:
    items = node.value if many and isinstance(node, yaml.SequenceNode) else [node]
    for item in items or [node]:
        if not isinstance(item, yaml.ScalarNode) or name_key(str(item.value).strip()) is None:
            raise edits.error(item.start_mark.line + 1, "expected a list of names ([A, B])" if many else "expected a name")
    return [str(item.value).strip() for item in items]


# ------------------------------------------------------------------------------------------ checking
def check(edits: Edits, domains: Iterable[str]) -> None:
    """What the file alone shows to be wrong, per domain of the run (``domains``: the configured ones)."""
    domains = sorted(set(domains))
    for e in edits.edits:
        if e.domain is not None and domains and e.domain not in domains:
            raise edits.error(e, f"domain '{e.domain}' is not one of the run's domains "
                                 f"({', '.join(domains)}){_did_you_mean(e.domain, domains)}")
    for d in domains or sorted({e.domain or "" for e in edits.edits}):
        _check_scope(edits, edits.in_scope(d) if d else edits.edits, f" in domain '{d}'" if d else "")


def _check_scope(edits: Edits, scope: list[Edit], where: str) -> None:
    banned = {_key(e.names[0]): e for e in scope if e.kind == "ban"}
    for e in scope:
        if e.kind == "ban":
            continue
        for n in [*e.names, *([e.target] if e.target else [])]:
            if _key(n) in banned:
                raise edits.error(e, f"'{n}' is banned on line {banned[_key(n)].line}: a banned answer is no name")
    moves: dict[str, tuple[str, Edit]] = {}
    for e in scope:
        for a, b in e.edges():
            if a in moves and moves[a][0] != b:
                raise edits.error(e, f"'{_display(scope, a)}' already goes elsewhere on line {moves[a][1].line}{where}")
            moves[a] = (b, e)

    def terminal(k: str) -> str:
        path = [k]
        while k in moves:
            k = moves[k][0]
            if k in path:
                ring = path[path.index(k):]  # named at its last edit: the one that closed the cycle
                last = max((moves[x][1] for x in ring), key=lambda e: e.line)
                cycle = " → ".join(_display(scope, x) for x in [*ring, k])
                raise edits.error(last, f"the renames and merges go round in a cycle{where}: {cycle}")
            path.append(k)
        return k

    dropped = {terminal(_key(e.names[0])): e for e in scope if e.kind == "drop"}
    for e in scope:
        if e.target is not None and (drop := dropped.get(terminal(_key(e.target)))) and drop is not e:
            raise edits.error(e, f"{e.kind} into '{e.target}', which line {drop.line} drops{where}")
        if e.kind == "keep_apart":
            ends = {}
            for n in e.names:
                t = terminal(_key(n))
                if t in ends:
                    raise edits.error(e, f"keep_apart '{ends[t]}' and '{n}', but the edits make them one name "
                                         f"('{_display(scope, t)}'){where}")
                ends[t] = n


def _display(scope: list[Edit], key: str) -> str:
    """A key as the file spells it (first spelling)."""
    for e in scope:
        for n in [*e.names, *([e.target] if e.target else [])]:
            if _key(n) == key:
                return n
    return key


# ------------------------------------------------------------------------------------------ applying
@dataclass
class EditedGroup:
    """Automatic merge groups joined by the edits into one vocabulary entry (or dropped)."""

    members: list[int]  # indices of the automatic groups
    name: str | None = None  # the name an edit gives it; None: the automatic canonical name
    dropped: Edit | None = None
    edits: list[Edit] = field(default_factory=list)  # the edits that shaped it, file order
    protected: bool = False  # an edit asked for this name: never pruned for low support


Node = tuple[str, Any]  # ("g", automatic group index) or ("v", key of a new name)


@dataclass
class DomainPlan:
    """The edits that apply in one domain, checked against the answers the labels table holds there."""

    domain: str
    edits: list[Edit]  # file order
    source: Edits

    @property
    def banned(self) -> dict[str, Edit]:
        return {_key(e.names[0]): e for e in self.edits if e.kind == "ban"}

    def apart(self, seen: Iterable[str]) -> set[frozenset[str]]:
        """Pairs of answer keys the automatic merging must not join: the kept-apart names, and the answers
        the edits send to them."""
        moves = {a: b for e in self.edits for a, b in e.edges()}

        def terminal(key: str) -> str:
            while key in moves:  # acyclic: checked when the plan was made
                key = moves[key]
            return key

        ends = {k: terminal(k) for k in seen}
        pairs: set[frozenset[str]] = set()
        for e in [e for e in self.edits if e.kind == "keep_apart"]:
            sets = [{k for k, t in ends.items() if t == terminal(_key(n))} | {_key(n)} for n in e.names]
            for i, a in enumerate(sets):
                for b in sets[i + 1 :]:
                    pairs.update(frozenset((x, y)) for x in a for y in b if x != y)
        return pairs

    def regroup(self, groups: list[list[str]], canonical: list[str]) -> list[EditedGroup]:
        """The automatic groups (lists of answer keys; ``canonical``: each one's name) after the edits."""
        group_of = {k: i for i, g in enumerate(groups) for k in g}
        err = self.source.error

        def node(key: str) -> Node:
            return ("g", group_of[key]) if key in group_of else ("v", key)

        def label(n: Node) -> str:
            return canonical[n[1]] if n[0] == "g" else _display(self.edits, n[1])

        out: dict[Node, tuple[Node, Edit]] = {}
        named: dict[Node, tuple[str, Edit]] = {}

        def send(src: Node, dst: Node, e: Edit) -> None:
            if src == dst:
                return
            if src in out and out[src][0] != dst:
                raise err(e, f"'{label(src)}' is one name with answers that line {out[src][1].line} sends elsewhere "
                             f"(merged automatically in domain '{self.domain}'); split them first with keep_apart")
            out[src] = (dst, e)

        for e in self.edits:
            if e.kind == "rename":
                src, to = node(_key(e.names[0])), _key(e.target or "")
                if to in group_of and ("g", group_of[to]) != src:
                    raise err(e, f"rename to '{e.target}': that is already the name '{label(node(to))}' in domain "
                                 f"'{self.domain}'; to join the two, use merge")
                dst = src if to in group_of else ("v", to)
                named.setdefault(dst, (e.target or "", e))
                send(src, dst, e)
            elif e.kind == "merge":
                named.setdefault(dst := node(_key(e.target or "")), (e.target or "", e))
                for n in e.names:
                    send(node(_key(n)), dst, e)

        def sink(n: Node) -> Node:
            path = [n]
            while n in out:
                n = out[n][0]
                if n in path:
                    ring = path[path.index(n):]
                    raise err(max((out[x][1] for x in ring), key=lambda e: e.line), "the renames and merges go round "
                              f"in a cycle in domain '{self.domain}': " + " → ".join(label(x) for x in [*ring, n]))
                path.append(n)
            return n

        clusters: dict[Node, EditedGroup] = {}
        for i in range(len(groups)):
            clusters.setdefault(sink(("g", i)), EditedGroup([])).members.append(i)
        for src, (_, e) in out.items():
            clusters[sink(src)].edits.append(e)
        for n, (name, e) in named.items():
            c = clusters[sink(n)]
            if sink(n) == n:
                c.name, c.protected = name, True
            c.edits.append(e)
        for e in self.edits:
            if e.kind == "drop":
                c = clusters[sink(node(_key(e.names[0])))]
                into = [x for x in c.edits if x.kind in _TARGET]
                if into:
                    raise err(into[0], f"{into[0].kind} into '{into[0].target}', which line {e.line} drops "
                                       f"('{e.names[0]}' is one name with it in domain '{self.domain}')")
                c.dropped = e
                c.edits.append(e)
            elif e.kind == "keep_apart":
                for n in e.names:
                    c = clusters[sink(node(_key(n)))]
                    c.protected = True
                    c.edits.append(e)
        for c in clusters.values():
            c.edits = sorted({id(e): e for e in c.edits}.values(), key=lambda e: e.line)
        return sorted(clusters.values(), key=lambda c: c.members[0])


def resolve(edits: Edits, seen: dict[str, dict[str, str]]) -> dict[str, DomainPlan]:
    """Per domain, the edits that apply there. ``seen``: per domain, every answer key -> a surface form.

    An edit applies in a domain when each name it refers to is an answer there, or a name an earlier
    applied rename gave. An edit naming its domain must apply there; one without a domain, somewhere.
    """
    plans, applied = {}, set()
    for e in edits.edits:
        if e.domain is not None and e.domain not in seen:
            raise edits.error(e, f"domain '{e.domain}' has no answers in the labels table "
                                 f"(domains: {', '.join(sorted(seen))}){_did_you_mean(e.domain, seen)}")
    for d, answers in sorted(seen.items()):
        known, pending, applies = set(answers), edits.in_scope(d), []
        progress = True
        while progress:
            progress = False
            for e in list(pending):
                if all(_key(n) in known for n in e.referenced()):
                    applies.append(e)
                    pending.remove(e)
                    progress = True
                    if e.kind == "rename":
                        known.add(_key(e.target or ""))
        for e in pending:
            if e.domain == d:
                raise _missing(edits, e, known, answers, f"domain '{d}'")
        applies.sort(key=lambda e: e.line)
        _check_scope(edits, applies, f" in domain '{d}'")
        plans[d] = DomainPlan(d, applies, edits)
        applied.update(id(e) for e in applies)
    everything = {k for answers in seen.values() for k in answers} | {_key(e.target or "") for e in edits.edits
                                                                        if e.kind == "rename"}
    surfaces = {k: s for answers in seen.values() for k, s in answers.items()}
    for e in edits.edits:
        if e.domain is None and id(e) not in applied:
            raise _missing(edits, e, everything, surfaces, "any domain")
    return plans


def _missing(edits: Edits, e: Edit, known: set[str], answers: dict[str, str], where: str) -> EditsError:
    absent = [n for n in e.referenced() if _key(n) not in known]
    if not absent:
        return edits.error(e, f"its names ({', '.join(e.referenced())}) are never all in one domain")
    return edits.error(e, f"{e.kind}: no name '{absent[0]}' in {where}{_did_you_mean(absent[0], answers.values())}")
