"""A classifier that names most images with one name: caught at the end of a run, with no truth needed.

When the image features cannot separate the MLLM's names (a starting model that does not see what tells
the classes apart: a backbone pretrained on other images, too small an input), training collapses onto a
few names and the predictions table reads one name for most of the collection. ``collapse`` flags a
domain whose most frequent name covers more than ``COLLAPSE_SHARE`` of its named images while its
vocabulary holds at least ``MIN_NAMES`` names; the run's closing summary and the review page say so,
with the likely cause and what to try. A hint, not a verdict: a collection where one class truly
makes up most images trips it too.
"""

from __future__ import annotations

from typing import Any

COLLAPSE_SHARE = 0.5  # the most frequent name covers more than this share of the domain's named images
MIN_NAMES = 3  # vocabularies of one or two names are left alone
MIN_IMAGES = 10  # too few images to tell


def collapse(counts: list[tuple[str, int]], vocabulary_size: int) -> dict[str, Any] | None:
    """``counts``: (name, images) of one domain, most frequent first; None unless it looks collapsed."""
    total = sum(c for _, c in counts)
    if total < MIN_IMAGES or vocabulary_size < MIN_NAMES or not counts:
        return None
    name, top = counts[0]
    if top / total <= COLLAPSE_SHARE:
        return None
    return {"name": name, "share": round(top / total, 4), "images": total,
            "names_used": sum(1 for _, c in counts if c), "vocabulary": vocabulary_size}


def collapse_message(domain: str, c: dict[str, Any], agreement: dict[str, Any] | None = None) -> str:
    """What a person reads: the collapse, the likely cause, what to try (and the held-out agreement, when the
    run chose its classifier without labels)."""
    held = ""
    if agreement and agreement.get("candidates"):
        chosen = agreement["candidates"].get(agreement.get("chosen"), {})
        held = (f" The chosen classifier agreed with the MLLM on {chosen.get('agreement', 0):.0%} of "
                f"{agreement.get('held_out')} held-out discovery images.")
    return (f"{domain}: '{c['name']}' names {c['share']:.0%} of {c['images']} images ({c['names_used']} of "
            f"{c['vocabulary']} names in use): the classifier has collapsed onto few names. The image features "
            f"likely do not separate the MLLM's names.{held} Try a starting model that sees these images "
            "(model.arch / model.pretrained), or more discovery images.")
