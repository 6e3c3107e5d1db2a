"""The vocabulary of one run: MLLM names normalized, near-duplicates merged, weak names pruned.

Two layers of merging, per domain:
1. spelling: names with the same key (case, hyphens, apostrophes, a plural last word, articles,
   "a photo of", parenthesized scientific names) are one name without asking any model;
2. meaning: keys whose text embeddings (Sentence-BERT or CLIP's text tower) reach a cosine threshold
   are merged by greedy complete linkage: two groups join only when *every* pair across them is
   above the threshold, so a chain of near neighbours ("Crimson-barred" ~ "Crimson-banded" ~
   "Crimson-spotted") cannot fold sibling species into one. Cosine alone cannot tell a synonym from a
   sibling (Sentence-BERT puts "Yellow-banded Sulphur" and "White-banded Sulphur" at 0.98), so a
   lexical guard also requires that one name only adds modifiers to the other ("Rosy Lotus" /
   "Rosy Lotus Flower") or fixes spelling ("Grey" / "Gray"); a swapped attribute word never merges.

The canonical name of a group is its most frequent surface form; support counts images, not samples.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from near_ray.errors import NearRayError
from near_ray.names import clean_surface, name_key, singular
from near_ray.refine.edits import EditedGroup, Edits, resolve

if TYPE_CHECKING:
    import pandas as pd

    from near_ray.config import RunConfig
    from near_ray.storage import Storage

log = logging.getLogger(__name__)

TextEncoder = Callable[[list[str]], np.ndarray]  # names -> L2-normalized [N, D]

class VocabularyError(NearRayError):
    pass


# ------------------------------------------------------------------------------------------ the result
@dataclass
class VocabularyEntry:
    name: str
    domain: str
    synonyms: list[str]  # every surface form seen, most frequent first (the name itself included)
    support: int  # images with at least one sample naming it

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "domain": self.domain, "synonyms": self.synonyms, "support": self.support}


@dataclass
class Vocabulary:
    entries: list[VocabularyEntry]
    merges: dict[str, Any]  # per domain: merged groups and pruned names (merges.json)
    lookup: dict[tuple[str, str], str | None] = field(default_factory=dict)  # (domain, key) -> name; None = pruned

    def canonical(self, domain: str, label: str | None) -> str | None:
        """The vocabulary name for a raw or normalized label; None for unknown or pruned names."""
        key = name_key(label)
        return None if key is None else self.lookup.get((domain, key))

    def names(self, domain: str | None = None) -> list[str]:
        return [e.name for e in self.entries if domain is None or e.domain == domain]

    def support(self) -> dict[tuple[str, str], int]:
        return {(e.domain, e.name): e.support for e in self.entries}

    def to_json(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.entries]

    @classmethod
    def from_json(cls, entries: list[dict[str, Any]], merges: dict[str, Any] | None = None) -> Vocabulary:
        vocab = cls([VocabularyEntry(e["name"], e["domain"], list(e["synonyms"]), int(e["support"])) for e in entries],
                    merges or {})
        for e in vocab.entries:
            for surface in [e.name, *e.synonyms]:
                key = name_key(surface)
                if key is not None:
                    vocab.lookup[(e.domain, key)] = e.name
        for domain, record in (merges or {}).items():
            for pruned in record.get("pruned", []):
                for surface in pruned.get("synonyms", [pruned["name"]]):
                    vocab.lookup.setdefault((domain, name_key(surface) or ""), None)
        return vocab


# ------------------------------------------------------------------------------------------ merging
def _guard_tokens(name: str) -> frozenset[str]:
    # Hyphenated compounds stay whole: "white-banded" vs "yellow-banded" is a swap, not an addition.
    s = unicodedata.normalize("NFKD", (clean_surface(name) or "").lower())
    s = "".join(c for c in s if not unicodedata.combining(c)).replace("'", "").replace("’", "")
    words = re.sub(r"[^0-9a-z\-]+", " ", s).split()
    if words:
        words[-1] = singular(words[-1])
    return frozenset(words)


def lexically_compatible(a: str, b: str) -> bool:
    """May ``a`` and ``b`` name the same thing? One adds modifiers to the other, or they differ in spelling only."""
    ta, tb = _guard_tokens(a), _guard_tokens(b)
    if ta <= tb or tb <= ta:
        return True
    only_a, only_b = sorted(ta - tb), sorted(tb - ta)
    if len(only_a) != len(only_b) or len(only_a) > 2:
        return False
    return all(any(_spelling_variant(x, y) for y in only_b) for x in only_a)


def _spelling_variant(a: str, b: str) -> bool:
    """One edit apart ("grey"/"gray", "colour"/"color"); two for long words. "eastern"/"western" is two: no."""
    limit = 2 if min(len(a), len(b)) >= 9 else 1
    if abs(len(a) - len(b)) > limit:
        return False
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1] <= limit


def complete_linkage(
    embeddings: np.ndarray,
    threshold: float,
    weights: np.ndarray | None = None,
    compatible: Callable[[int, int], bool] | None = None,
) -> list[list[int]]:
    """Groups of rows whose pairwise cosine all reach ``threshold`` (greedy, most similar pairs first).

    Only pairs above the threshold (and ``compatible``, when given) are kept, computed in blocks, so
    memory grows with the number of near-duplicates, not with V². Ties between equally similar pairs go
    to the better supported names.
    """
    n = len(embeddings)
    weights = np.zeros(n) if weights is None else np.asarray(weights, dtype=np.float64)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    close: dict[tuple[int, int], float] = {}
    block = 2048
    for start in range(0, n, block):
        sims = emb[start : start + block] @ emb.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if i < c and (compatible is None or compatible(i, c)):
                close[(i, c)] = float(sims[r, c])
    order = sorted(close, key=lambda p: (-close[p], -(weights[p[0]] + weights[p[1]]), p))
    group_of = list(range(n))
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    for i, j in order:
        a, b = group_of[i], group_of[j]
        if a == b:
            continue
        if all((min(x, y), max(x, y)) in close for x in members[a] for y in members[b]):
            for x in members[b]:
                group_of[x] = a
            members[a].extend(members.pop(b))
    return [sorted(m) for m in members.values()]


@dataclass
class _Key:
    key: str
    surfaces: Counter  # surface form -> samples
    images: set

    @property
    def representative(self) -> str:
        return _most_frequent(self.surfaces)


def _most_frequent(counts: Counter) -> str:
    # Deterministic: most samples, then a capitalized form ("Blue Jay" over "blue jay"), then alphabetical.
    return min(counts, key=lambda s: (-counts[s], s == s.lower(), s))


def _domain_keys(rows: pd.DataFrame) -> list[_Key]:
    keys: dict[str, _Key] = {}
    for image_id, label in zip(rows["image_id"].tolist(), rows["label"].tolist(), strict=True):
        surface = clean_surface(label)
        key = name_key(surface)
        if key is None:
            continue
        entry = keys.setdefault(key, _Key(key, Counter(), set()))
        entry.surfaces[surface] += 1
        entry.images.add(image_id)
    return sorted(keys.values(), key=lambda k: k.key)


def answers(labels: pd.DataFrame) -> dict[str, dict[str, str]]:
    """Per domain, each answer key of the ``ok`` rows -> its most frequent spelling: the names edits may use."""
    ok = labels[(labels["status"] == "ok") & labels["label"].notna()]
    return {d: {k.key: k.representative for k in _domain_keys(ok[ok["domain"] == d])}
            for d in sorted(labels["domain"].dropna().unique().tolist())}


def shared_images(a: set, b: set) -> float:
    """How much two names are given to the same images: |A ∩ B| / min(|A|, |B|)."""
    return len(a & b) / max(1, min(len(a), len(b)))


def _merge_domain(
    keys: list[_Key], encode: TextEncoder | None, threshold: float, guard: bool, min_shared: float,
    apart: set[frozenset[str]] | None = None,
) -> tuple[list[list[_Key]], list[float | None]]:
    if encode is None or len(keys) < 2:
        return [[k] for k in keys], [None] * len(keys)
    reps = [k.representative for k in keys]
    emb = np.asarray(encode(reps), dtype=np.float32)

    def compatible(i: int, j: int) -> bool:
        # Text says "may be one"; the images must say "are one": the same images get both names.
        # A person's keep_apart (the edits) overrides both.
        lexical = not guard or lexically_compatible(reps[i], reps[j])
        kept_apart = bool(apart) and frozenset((keys[i].key, keys[j].key)) in apart  # type: ignore[operator]
        return lexical and not kept_apart and shared_images(keys[i].images, keys[j].images) >= min_shared

    groups = complete_linkage(emb, threshold, np.array([len(k.images) for k in keys]), compatible)
    min_sims: list[float | None] = []
    for g in groups:
        if len(g) > 1:
            sub = emb[g] @ emb[g].T
            min_sims.append(round(float(sub[np.triu_indices(len(g), 1)].min()), 4))
        else:
            min_sims.append(None)
    return [[keys[i] for i in g] for g in groups], min_sims


def build_vocabulary(
    labels: pd.DataFrame,
    encode: TextEncoder | None,
    threshold: float,
    *,
    min_support: int,
    lexical_guard: bool,
    min_shared: float,
    edits: Edits | None = None,
) -> Vocabulary:
    """The vocabulary from a labels table (columns image_id, domain, label, status; only ``ok`` rows count).

    An embedding merge needs both the text (cosine ``threshold``, the lexical guard) and the images:
    at least ``min_shared`` of the images of the rarer name also got the other one
    (``refine.merge_min_shared``). A qualifier is often the class difference ("minor", "lesser",
    "juvenile", a colour): two names that each have images of their own stay apart.
    ``edits`` (a person's, ``near_ray.refine.edits``) are checked against the answers before any
    model is loaded, then applied to the automatic groups; ``merges`` records what each one did.
    """
    missing = {"image_id", "domain", "label", "status"} - set(labels.columns)
    if missing:
        raise VocabularyError(f"labels table: missing columns {sorted(missing)}")
    ok = labels[(labels["status"] == "ok") & labels["label"].notna()]
    vocab = Vocabulary([], {})
    all_keys = {d: _domain_keys(ok[ok["domain"] == d]) for d in sorted(labels["domain"].dropna().unique().tolist())}
    plans = resolve(edits, {d: {k.key: k.representative for k in ks} for d, ks in all_keys.items()}) if edits else {}
    for domain, keys in all_keys.items():
        plan = plans.get(domain)
        banned = plan.banned if plan else {}
        keys = [k for k in keys if k.key not in banned]
        apart = plan.apart([k.key for k in keys]) if plan else None
        auto, auto_sims = _merge_domain(keys, encode, threshold, lexical_guard, min_shared, apart)
        canonical = [_most_frequent(sum((k.surfaces for k in g), Counter())) for g in auto]
        edited = (plan.regroup([[k.key for k in g] for g in auto], canonical) if plan
                  else [EditedGroup([i]) for i in range(len(auto))])
        kept, merged, pruned, applied = [], [], [], []
        for eg in edited:
            group = [k for i in eg.members for k in auto[i]]
            surfaces = sum((k.surfaces for k in group), Counter())
            name = eg.name or _most_frequent(surfaces)
            forms = sorted(surfaces, key=lambda s: (-surfaces[s], s != name, s))
            entry = VocabularyEntry(name, domain, forms if name in surfaces else [name, *forms],
                                    len(set().union(*(k.images for k in group))))
            target = entry.name if eg.dropped is None and (entry.support >= min_support or eg.protected) else None
            for k in group:
                vocab.lookup[(domain, k.key)] = target
            if target is not None and name not in surfaces:  # a new name an edit gave: known by its own spelling too
                vocab.lookup[(domain, name_key(name) or "")] = target
            if len(entry.synonyms) > 1:
                by = "edit" if len(eg.members) > 1 or name not in surfaces else \
                    "embedding" if len(group) > 1 else "spelling"
                merged.append({"canonical": name, "merged": [s for s in entry.synonyms if s != name], "by": by,
                               "min_similarity": auto_sims[eg.members[0]] if by == "embedding" else None,
                               **({"edits": [e.line for e in eg.edits]} if eg.edits else {})})
            applied += [{**e.record(), "domain": domain, "name": name, "images": entry.support} for e in eg.edits]
            if target:
                kept.append(entry)
            else:
                pruned.append({"name": entry.name, "support": entry.support, "synonyms": entry.synonyms,
                               **({"by": "edit", "edit": eg.dropped.line} if eg.dropped else {})})
        kept.sort(key=lambda e: (-e.support, e.name))
        vocab.entries.extend(kept)
        vocab.merges[domain] = {
            "names_seen": len(all_keys[domain]),
            "vocabulary_size": len(kept),
            "merged": sorted(merged, key=lambda m: m["canonical"]),
            "pruned": sorted(pruned, key=lambda p: (-p["support"], p["name"])),
        }
        if plan:
            images = {k.key: len(k.images) for k in all_keys[domain]}
            applied += [{**e.record(), "domain": domain, "images": images.get(key, 0)} for key, e in banned.items()]
            vocab.merges[domain]["edits"] = sorted({(a["line"], a.get("name", "")): a for a in applied}.values(),
                                                   key=lambda a: a["line"])
        log.info("vocabulary %s: %d names seen, %d kept, %d merge groups, %d pruned%s", domain, len(all_keys[domain]),
                 len(kept), len(merged), len(pruned), f", {len(plan.edits)} edits" if plan else "")
    return vocab


# ------------------------------------------------------------------------------------------ encoders
def text_encoder(cfg: RunConfig, storage: Storage | None = None) -> TextEncoder | None:
    """The encoder ``cfg.refine.merge_encoder`` names: offline Sentence-BERT, CLIP's text tower, or none."""
    kind = cfg.refine.merge_encoder
    if kind == "none":
        return None
    if kind == "sbert":
        from near_ray.model.sentence import load_sentence_encoder

        model = load_sentence_encoder()
        return lambda names: np.asarray(model.encode(names, normalize_embeddings=True, batch_size=256, show_progress_bar=False),
                                        dtype=np.float32)
    from near_ray.model.clip import create_clip, encode_texts

    clip = create_clip(cfg.model, storage)
    return lambda names: encode_texts(clip, names, "{}")
