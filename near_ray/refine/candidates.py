"""Candidate label sets: an image's own MLLM names plus the names of its nearest neighbours.

S_i = own labels ∪ labels of kNN_K(i). Initial confidence of a name c for image i:

    own_i(c) + neighbour_weight · Σ_j s_ij · own_j(c) / Σ_j s_ij,      normalized to sum 1,

where own_i(c) is the fraction of i's parsed samples naming c and s_ij ≥ 0 the cosine similarity of
neighbour j. Both terms are distributions, so ``neighbour_weight`` reads as "how much one image's
whole neighbourhood counts against its own samples", whatever S and K are. An image whose own
samples are all unparsable gets its candidates from its neighbours alone.

A name that only neighbours gave joins S_i when its vote is worth at least ``min_neighbour_votes``
whole neighbours (vote mass ≥ min_neighbour_votes / number of voting neighbours). In a neighbourhood
of mixed species every stray name would otherwise enter: measured on the synthetic benchmark with the
pretrained near-tiny CLIP (neighbour purity 0.27 at K=10), S_i held 10.6 names on average; with a
threshold of one neighbour it holds 3 besides the own names and still contains the species' usual
name for 95% of images (98% without the threshold, 79% from the own samples alone).

By default (``refine.neighbour_votes: above_chance``) the neighbour term of an image with own answers
counts only what the neighbourhood says beyond chance: each name's vote minus its base rate in the
domain, max(0, ·), not normalized again (``_above_chance``); the floor above then applies to that
excess. The published formula above is ``similarity``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

VOTES = ("above_chance", "similarity", "agreement")  # refine.neighbour_votes


@dataclass(frozen=True)
class CandidateSet:
    candidates: list[str]  # most confident first
    confidences: list[float]  # same order, sum 1 (empty when the image has no named neighbour either)


def own_distribution(own_labels: Sequence[str]) -> dict[str, float]:
    counts = Counter(own_labels)
    total = sum(counts.values())
    return {name: c / total for name, c in counts.items()} if total else {}


def candidate_sets(
    own_labels: Sequence[Sequence[str]],
    neighbors: np.ndarray,
    similarities: np.ndarray,
    neighbour_weight: float,
    min_neighbour_votes: float,
    neighbour_votes: str = "above_chance",
) -> list[CandidateSet]:
    """One candidate set per image. ``neighbors``/``similarities`` as returned by ``knn`` (-1 = no neighbour);
    the two weights are ``refine.neighbour_weight`` and ``refine.min_neighbour_votes``; ``neighbour_votes``
    is ``refine.neighbour_votes`` ("above_chance", "similarity" or "agreement", see ``_neighbour_votes``
    and ``_above_chance``). The images passed are one domain's: "above_chance" takes its base rates
    over them."""
    if neighbour_votes not in VOTES:
        raise ValueError(f"refine.neighbour_votes: '{neighbour_votes}' is not one of {', '.join(VOTES)}")
    owns = [own_distribution(o) for o in own_labels]
    base = _base_rates(owns) if neighbour_votes == "above_chance" else None
    out = []
    for i, own in enumerate(owns):
        scores = dict(own)
        votes, voters = (_neighbour_votes(owns, neighbors[i], similarities[i], own if neighbour_votes == "agreement" else None)
                         if neighbors.shape[1] else ({}, 0))
        if base is not None and own:
            votes = _above_chance(votes, base)
        # Without own names the neighbours are all there is: then every name they gave stays.
        floor = min_neighbour_votes / voters if own and voters else 0.0
        votes = {n: v for n, v in votes.items() if n in own or v >= floor - 1e-9}
        for name, v in votes.items():
            scores[name] = scores.get(name, 0.0) + neighbour_weight * v
        if neighbour_weight == 0:  # names only neighbours gave still belong to S_i, with no initial mass
            for name in votes:
                scores.setdefault(name, 0.0)
        out.append(_normalized(scores))
    return out


def _neighbour_votes(owns: list[dict[str, float]], ids: np.ndarray, sims: np.ndarray,
                     agree_with: dict[str, float] | None = None) -> tuple[dict[str, float], int]:
    """Similarity-weighted average of the neighbours' own label distributions (sums to 1, or empty), and
    the number of neighbours that voted.

    With ``agree_with`` (the image's own distribution: ``refine.neighbour_votes: agreement``) each
    neighbour's weight is also multiplied by how much its answers corroborate the image's own,
    ``Σ_c own_i(c)·own_j(c)``, the chance that one answer about each names the same thing. A neighbour
    of another class shares no name with the image and drops out, however close its embedding; with
    an annotator whose answers scatter, few neighbours corroborate and the set stays near the image's
    own names. An image without own names keeps plain similarity weights.
    """
    votes: dict[str, float] = {}
    total, voters = 0.0, 0
    for j, s in zip(ids.tolist(), sims.tolist(), strict=True):
        if j < 0 or not owns[j]:
            continue
        w = max(float(s), 0.0) if np.isfinite(s) else 0.0
        w = w or 1e-6  # an orthogonal neighbour still votes, barely: its names stay in the set
        if agree_with:
            w *= sum(p * owns[j].get(name, 0.0) for name, p in agree_with.items())
            if w <= 0:
                continue
        total += w
        voters += 1
        for name, p in owns[j].items():
            votes[name] = votes.get(name, 0.0) + w * p
    return ({n: v / total for n, v in votes.items()} if total else {}), voters


def _base_rates(owns: list[dict[str, float]]) -> dict[str, float]:
    """Each name's mean answer fraction over the images with answers: the vote a name gets from
    neighbours drawn at random. An image's own answers count in it, though an image is never its own
    neighbour: for a name the image did not give, chance reads low by a factor (N − 1)/N."""
    rates: dict[str, float] = {}
    answered = [o for o in owns if o]
    for o in answered:
        for name, p in o.items():
            rates[name] = rates.get(name, 0.0) + p / len(answered)
    return rates


def _above_chance(votes: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """``refine.neighbour_votes: above_chance``: what the neighbourhood says beyond chance,
    ``max(0, vote(c) − base(c))``. A name that the neighbours give no more often than images at random
    do (a coarse name the annotator gives every image, the frequent answer of a mixed neighbourhood)
    tells nothing about this image, and stays out. A pure neighbourhood keeps nearly its whole vote
    (1 − base), a neighbourhood at chance none, so the neighbour term weighs as much as the
    neighbourhood is informative: where features are poor, NeaR falls back towards its own samples.
    Images without own answers keep the plain votes: the neighbours are all they have."""
    return {n: v - base.get(n, 0.0) for n, v in votes.items() if v - base.get(n, 0.0) > 1e-12}


def _normalized(scores: dict[str, float]) -> CandidateSet:
    if not scores:
        return CandidateSet([], [])
    total = sum(scores.values())
    if total <= 0:
        probs = {n: 1.0 / len(scores) for n in scores}
    else:
        probs = {n: v / total for n, v in scores.items()}
    names = sorted(probs, key=lambda n: (-probs[n], n))
    return CandidateSet(names, [probs[n] for n in names])
