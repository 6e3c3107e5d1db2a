"""Names as the MLLM gives them and as the vocabulary keeps them: one set of rules for every stage.

``clean_surface`` is a name as a reader writes it (no "a photo of", articles, scientific names in
parentheses, edge punctuation); ``title_case`` the one casing of every surface form; ``name_key`` the
spelling-insensitive identity that merges "Tennessee warblers" with "tennessee Warbler";
``majority_label`` the vote over an image's samples, with one tie-break. Pure Python: the label stage,
refine, training and evaluation all call these.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

PARENTHESIZED = re.compile(r"[\(\[\{][^\)\]\}]*[\)\]\}]")
_PHOTO_OF = re.compile(
    r"^(?:(?:this|it)\s+(?:is|appears\s+to\s+be|looks\s+like)\s+)?(?:an?\s+|the\s+)?"
    r"(?:close[- ]up\s+)?(?:photo|photograph|picture|image|pic)\s+of\s+",
    re.IGNORECASE,
)
_ARTICLE = re.compile(r"^(?:an?|the)\s+", re.IGNORECASE)
_EDGE_PUNCT = " \t\n\r.,;:!?\"'`*_-–—"
# Last words that end in "s" but are singular: left alone by the plural rule.
_SINGULAR_S = ("ss", "us", "is", "os", "ys", "species", "series")


def strip_parenthesized(text: str) -> str:
    """Drop "(Leiothlypis peregrina)", "[note]", "{x}": scientific names and asides."""
    return PARENTHESIZED.sub(" ", text)


def clean_surface(text: str | None) -> str | None:
    """A name as a reader would write it: no "a photo of", articles, scientific names or edge punctuation.

    Case is kept (the canonical name is a surface form). Idempotent: clean_surface(clean_surface(x)) ==
    clean_surface(x). Returns None when nothing is left.
    """
    if text is None:
        return None
    s = unicodedata.normalize("NFKC", str(text))
    for _ in range(4):  # a few passes reach the fixed point ("The photo of a (X) Y." -> "Y")
        before = s
        s = strip_parenthesized(s)
        s = " ".join(s.split()).strip(_EDGE_PUNCT)
        s = _PHOTO_OF.sub("", s)
        s = _ARTICLE.sub("", s)
        if s == before:
            break
    return s or None


def singular(word: str) -> str:
    if len(word) <= 3 or not word.endswith("s") or word.endswith(_SINGULAR_S):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    return word[:-1]


def name_key(text: str | None) -> str | None:
    """The spelling-insensitive identity of a name: lower case, no accents or punctuation, last word singular."""
    s = clean_surface(text)
    if s is None:
        return None
    s = unicodedata.normalize("NFKD", s.lower())
    s = "".join(c for c in s if not unicodedata.combining(c))
    s = s.replace("'", "").replace("’", "")
    s = re.sub(r"[^0-9a-z]+", " ", s).split()
    if not s:
        return None
    s[-1] = singular(s[-1])
    return " ".join(s)


def title_case(text: str) -> str:
    """One casing for every surface form: "orange-crowned WARBLER" -> "Orange-crowned Warbler".

    Words with digits or short all-capital words (BMW, M3) are kept as written, unless the whole
    answer is in capitals.
    """
    shouting = text.isupper()
    words = []
    for w in text.split(" "):
        keep = not shouting and (any(c.isdigit() for c in w) or (w.isupper() and 2 <= len(w) <= 4))
        words.append(w if keep else w[:1].upper() + w[1:].lower())
    return " ".join(words)


def majority_label(labels: Iterable[str | None], support: dict[str, int] | None = None) -> str | None:
    """The most frequent name among an image's samples (missing names ignored).

    Ties go to the name with more ``support`` (images naming it in the vocabulary), then to the
    alphabetically first name, so the result never depends on sample order.
    """
    counts = Counter(lab for lab in labels if lab)
    if not counts:
        return None
    support = support or {}
    return min(counts, key=lambda n: (-counts[n], -support.get(n, 0), n))
