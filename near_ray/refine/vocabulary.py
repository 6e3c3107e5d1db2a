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


def shared_images(a: set, b: set) -> float:
    """How much two names are given to the same images: |A ∩ B| / min(|A|, |B|)."""
    return len(a & b) / max(1, min(len(a), len(b)))


def _merge_domain(
    keys: list[_Key], encode: TextEncoder | None, threshold: float, guard: bool, min_shared: float
) -> tuple[list[list[_Key]], list[float | None]]:
    if encode is None or len(keys) < 2:
        return [[k] for k in keys], [None] * len(keys)
    reps = [k.representative for k in keys]
    emb = np.asarray(encode(reps), dtype=np.float32)

    def compatible(i: int, j: int) -> bool:
        # Text says "may be one"; the images must say "are one": the same images get both names.
        lexical = not guard or lexically_compatible(reps[i], reps[j])
        return lexical and shared_images(keys[i].images, keys[j].images) >= min_shared

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
) -> Vocabulary:
    """The vocabulary from a labels table (columns image_id, domain, label, status; only ``ok`` rows count).

    An embedding merge needs both the text (cosine ``threshold``, the lexical guard) and the images:
    at least ``min_shared`` of the images of the rarer name also got the other one
    (``refine.merge_min_shared``). A qualifier is often the class difference ("minor", "lesser",
    "juvenile", a colour): two names that each have images of their own stay apart.
    """
    missing = {"image_id", "domain", "label", "status"} - set(labels.columns)
    if missing:
        raise VocabularyError(f"labels table: missing columns {sorted(missing)}")
    ok = labels[(labels["status"] == "ok") & labels["label"].notna()]
    vocab = Vocabulary([], {})
    for domain in sorted(labels["domain"].dropna().unique().tolist()):
        keys = _domain_keys(ok[ok["domain"] == domain])
        groups, min_sims = _merge_domain(keys, encode, threshold, lexical_guard, min_shared)
        kept, merged, pruned = [], [], []
        for group, min_sim in zip(groups, min_sims, strict=True):
            surfaces = sum((k.surfaces for k in group), Counter())
            name = _most_frequent(surfaces)
            entry = VocabularyEntry(name, domain, sorted(surfaces, key=lambda s: (-surfaces[s], s != name, s)),
                                    len(set().union(*(k.images for k in group))))
            target = entry.name if entry.support >= min_support else None
            for k in group:
                vocab.lookup[(domain, k.key)] = target
            if len(surfaces) > 1:
                merged.append({"canonical": name, "merged": [s for s in entry.synonyms if s != name],
                               "by": "embedding" if len(group) > 1 else "spelling", "min_similarity": min_sim})
            (kept if target else pruned).append(entry)
        kept.sort(key=lambda e: (-e.support, e.name))
        vocab.entries.extend(kept)
        vocab.merges[domain] = {
            "names_seen": len(keys),
            "vocabulary_size": len(kept),
            "merged": sorted(merged, key=lambda m: m["canonical"]),
            "pruned": [{"name": e.name, "support": e.support, "synonyms": e.synonyms}
                       for e in sorted(pruned, key=lambda e: (-e.support, e.name))],
        }
        log.info("vocabulary %s: %d names seen, %d kept, %d merge groups, %d pruned",
                 domain, len(keys), len(kept), len(merged), len(pruned))
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
