"""From an MLLM's answer to a normalized name (or None when it names nothing).

Answers arrive as JSON (``{"name": …}``, structured output) or free text wrapped in sentences,
markdown, quotes, scientific names and lists. ``parse_answer`` keeps only the name and puts it in
one casing, so that "tennessee warbler", "**Tennessee Warbler**" and "This appears to be a
Tennessee Warbler (Leiothlypis peregrina)." all become "Tennessee Warbler" and count as one surface
form when the vocabulary is built. The raw answer is stored verbatim beside it.
"""

from __future__ import annotations

import json
import re

from near_ray.names import clean_surface, strip_parenthesized, title_case

MAX_WORDS = 10  # longer "names" are descriptions, not names

_JSON_KEYS = ("name", "label", "species", "answer", "class", "category")

_REFUSAL = re.compile(
    r"\b(?:cannot|can ?not|can't|unable to|not able to|impossible to|not possible to|not sure|unsure|"
    r"don't know|do not know|no idea|sorry|apologi[sz]e|unclear|unknown|unidentifiable|not enough|"
    r"insufficient|hard to (?:say|tell)|difficult to (?:say|tell|determine))\b",
    re.IGNORECASE,
)
# "… hard to tell, but it looks like a X": the hedge is a refusal only when no name follows.
_BUT_CLAUSE = re.compile(r"\bbut\s+(.*)$", re.IGNORECASE | re.DOTALL)

# Lead-ins, stripped repeatedly from the front (case-insensitive).
_LEADS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"^based on [^,]*,\s*",
        r"^(?:answer|name|species|label|class|category|identification|result|final answer|possibly|probably|"
        r"likely|maybe|perhaps)\s*:\s*",
        r"^i\s+(?:think|believe|guess|would say|'d say|suspect)\s+(?:that\s+)?",
        # "This appears to be", "It is", "The bird in the image is", "This looks like", "The image shows"
        r"^(?:the|this|that|it|it's|its)\b[^.:,\n]{0,40}?\b(?:is|are|be|shows?|depicts?|like|of)\s+",
        r"^(?:it's|its|this's|that's|here is|here's|i see)\s+",
        r"^(?:most\s+|very\s+|quite\s+)?(?:likely|probably|possibly|perhaps|maybe|definitely|certainly|clearly)\s+",
        r"^(?:an?\s+|the\s+)?(?:photo|picture|image|close-up|closeup|drawing)\s+(?:of|showing)\s+",
        r"^(?:a|an|the)\s+",
        r"^(?:species|type|kind|variety)\s+(?:of\s+)?(?=\S)",
    )
]

_MARKDOWN = re.compile(r"[*_`#>]+")
_QUOTES = "\"'“”‘’«»`"
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
_LIST_SPLIT = re.compile(r"\s*(?:[,;/|]|\bor\b|\s-\s|—|–)\s*", re.IGNORECASE)
# "X perched on a branch": scene description after the name
_SCENE = re.compile(
    r"\s+(?:perched|sitting|standing|flying|swimming|growing|resting|in the|on the|on an?|with an?|with its|against)\b.*$",
    re.IGNORECASE,
)


def parse_answer(raw: str | None) -> str | None:
    """A normalized name from a raw answer (JSON or free text); None for refusals and empty answers."""
    if raw is None:
        return None
    text = raw.strip()
    if not text:
        return None
    from_json = _from_json(text)
    if from_json is not None:
        text = from_json
    return normalize_name(text)


def normalize_name(text: str) -> str | None:
    """Clean one free-text answer down to a title-cased name."""
    text = _first_line(_MARKDOWN.sub("", text))
    if _is_refusal(text):
        rest = _BUT_CLAUSE.search(text)
        if not rest or _is_refusal(rest.group(1)):
            return None
        text = rest.group(1)
    text = strip_parenthesized(text)
    text = _strip_leads(text.strip().strip(_QUOTES).strip())
    text = _LIST_SPLIT.split(text, maxsplit=1)[0]
    text = text.split(". ", 1)[0]  # a second sentence is commentary
    text = _SCENE.sub("", text)
    text = _strip_leads(text.strip().strip(_QUOTES).strip())
    text = clean_surface(text.strip().strip(_QUOTES)) or ""
    text = text.strip(_QUOTES).strip()
    if not text or not any(c.isalpha() for c in text) or len(text.split()) > MAX_WORDS:
        return None
    return title_case(text)


def _from_json(text: str) -> str | None:
    """The name inside a JSON answer (possibly in a ```json fence), or None when the text is not JSON."""
    body = text
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", body, re.DOTALL | re.IGNORECASE)
    if fence:
        body = fence.group(1)
    if not body.startswith(("{", "[", '"')):
        return None
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return _from_broken_json(body)
    if isinstance(obj, list) and obj:
        obj = obj[0]
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for key in _JSON_KEYS:
            value = obj.get(key)
            if isinstance(value, str):
                return value
            if isinstance(value, list) and value and isinstance(value[0], str):
                return value[0]
        return ""  # JSON without a name: nothing to parse
    return None


_KEYS_ALT = "|".join(_JSON_KEYS)
_JSON_FIELD = re.compile(rf'"({_KEYS_ALT})"\s*:\s*(\[\s*)?"((?:[^"\\]|\\.)*)"', re.IGNORECASE)


def _from_broken_json(body: str) -> str | None:
    """An answer that starts like JSON but is not (cut off at max_tokens, a stray brace, ...).

    A name field whose string is complete is kept ('{"name": "Tennessee Warbler", "conf'); anything
    else is no name at all (""), never the JSON text itself: '{"name": "Tennessee Warb' must not
    become a vocabulary entry.
    """
    if body.startswith("["):
        return ""
    if not body.startswith("{"):
        return None  # a quoted free-text answer: parsed as text
    match = _JSON_FIELD.search(body)
    if match is None:
        return ""
    try:
        return json.loads(f'"{match.group(3)}"')
    except (json.JSONDecodeError, ValueError):
        return ""


def _first_line(text: str) -> str:
    """The first line that carries content; a list's first item without its bullet."""
    lines = [ln for ln in (ln.strip() for ln in text.splitlines()) if ln]
    if not lines:
        return ""
    first = lines[0]
    # "Possibly one of:\n1. A\n2. B" -> the first item
    if first.endswith(":") and len(lines) > 1:
        first = lines[1]
    return _BULLET.sub("", first)


def _is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text))


def _strip_leads(text: str) -> str:
    changed = True
    while changed and text:
        changed = False
        for pattern in _LEADS:
            stripped = pattern.sub("", text, count=1)
            if stripped != text and stripped.strip():
                text, changed = stripped.strip(), True
    return text
