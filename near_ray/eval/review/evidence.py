"""How much each view of an image agrees with the name it got, and what follows for names and changes.

Three views can speak about an image, each as a distribution over the domain's names:

- ``mllm``: its own parsed samples (the share naming each name; a name refine or training dropped
  keeps its share, outside every kept name), or the cascade's answer for a routed image;
- ``neighbours``: the names its K nearest discovery images (refine's kNN graph) got, cosine-weighted;
- ``clip``: classify's top-k probabilities for it.

The **agreement** of an image with its name y is the mean over the views it has of p_view(y); the
page ranks as suspect the images of lowest agreement among those with at least two views (one view
alone cannot disagree with itself). It is a plain disagreement score, not cleanlab's confident
learning: that needs out-of-sample predicted probabilities per image, and here the CLIP was trained
on these very images and the MLLM's samples are where the names came from; only the neighbours are
out of sample, and many names carry two or three images, too few for per-class thresholds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from near_ray.eval.collapse import collapse
from near_ray.eval.metrics import hungarian_match
from near_ray.eval.review.gather import DomainData, ImageView
from near_ray.names import majority_label

NO_NAME = "(no name)"
SUSPECT_BELOW = 2 / 3  # agreement under two thirds: a third or more of the evidence names something else
MIN_CONFUSION = 0.5  # images' worth of evidence for another name before the page calls two names confused


@dataclass
class NameSummary:
    name: str
    images: list[ImageView]  # the images named so, most agreeing first
    support: int  # images with at least one MLLM sample naming it (refine's vocabulary)
    train_support: int | None  # training images that ended up labelled with it (the bundle's vocabulary)
    surfaces: Counter  # MLLM surface form -> samples
    raw_examples: list[str]
    confused: list[tuple[str, float]] = field(default_factory=list)  # (other name, images' worth)
    in_vocabulary: bool = True  # False: a name only the cascade's MLLM gave
    truth_class: str | None = None  # the true class matched to it (Hungarian), with truth
    truth_correct: int = 0
    truth_images: int = 0


@dataclass
class Change:
    kind: str  # "merge" | "pruned"
    name: str  # the merged surface form, or the pruned name
    into: str | None  # merge: the name it joined
    stage: str  # "refine" | "train"
    reason: str
    destinations: Counter  # where the images that were given it went: name (or NO_NAME) -> images
    majority: int = 0  # images whose samples gave it most often: a pruned name many images mostly got may be a lost class


@dataclass
class DomainReview:
    data: DomainData
    names: list[NameSummary]
    changes: list[Change]
    suspects: list[ImageView]  # lowest agreement first, at most the number asked for
    suspect_count: int  # every image under the threshold
    unnamed: int
    accuracy: dict[str, Any] | None
    collapse: dict[str, Any] | None = None  # one name for most images (near_ray.eval.collapse)


def _share(names: list[str]) -> dict[str, float]:
    counts = Counter(names)
    return {n: c / len(names) for n, c in counts.items()} if names else {}


def _neighbour_vote(view: ImageView, images: dict[str, ImageView]) -> dict[str, float]:
    votes: Counter = Counter()
    total = 0.0
    for uri, sim in view.neighbours:
        other = images.get(uri)
        if other is None or other.name is None:
            continue
        w = max(sim, 0.0) or 1e-6  # an orthogonal neighbour still counts, barely
        votes[other.name] += w
        total += w
    return {n: v / total for n, v in votes.items()} if total else {}


def score_images(data: DomainData) -> None:
    """Fill each image's evidence, agreement with its name, and the name the evidence prefers instead."""
    for view in data.images.values():
        views = {"mllm": view.mllm or _share(view.said), "neighbours": _neighbour_vote(view, data.images),
                 "clip": view.clip}  # fmt: skip
        view.evidence = {k: v for k, v in views.items() if v}
        if view.name is None or not view.evidence:
            continue
        view.agreement = sum(v.get(view.name, 0.0) for v in view.evidence.values()) / len(view.evidence)
        pooled: Counter = Counter()
        for v in view.evidence.values():
            pooled.update({n: p / len(view.evidence) for n, p in v.items() if n != view.name})
        view.suggestion = max(pooled, key=lambda n: (pooled[n], n)) if pooled else None


def _truth_match(named: list[ImageView]) -> dict[str, str]:
    """Name -> the true class the Hungarian matching (cACC's) gives it, over the images with truth."""
    pairs = [(v.name or NO_NAME, v.truth) for v in named if v.truth is not None]
    return hungarian_match([t for _, t in pairs], [p for p, _ in pairs])[0]


def _destinations(images: list[ImageView]) -> Counter:
    return Counter(v.name or NO_NAME for v in images)


def _pruned(name: str, stage: str, reason: str, images: list[ImageView]) -> Change:
    majority = sum(majority_label(v.said) == name for v in images)
    return Change("pruned", name, None, stage, reason, _destinations(images), majority)


def _changes(data: DomainData, cfg_min: dict[str, int]) -> list[Change]:
    said = {}  # refine name -> images with a sample naming it
    for v in data.images.values():
        for n in set(v.said):
            said.setdefault(n, []).append(v)
    by_surface: dict[str, list[ImageView]] = {}
    out: list[Change] = []
    for m in data.merges.get("merged", []):
        canonical = m["canonical"]
        for surface in m["merged"]:
            by_surface[surface] = [v for v in said.get(canonical, []) if surface in v.surfaces]
            if m["by"] == "spelling":
                reason = "spelling: the same name once case, punctuation, articles and plurals are set aside"
            else:
                reason = (f"meaning: text embeddings at cosine ≥ {m.get('min_similarity')}, one name only adds words to "
                          "the other, and the same images got both")
            out.append(Change("merge", surface, canonical, "refine", reason, _destinations(by_surface[surface])))
    for p in data.merges.get("pruned", []):
        reason = f"{p['support']} image(s) named it, fewer than refine.min_support = {cfg_min['refine']}"
        out.append(_pruned(p["name"], "refine", reason, said.get(p["name"], [])))
    for p in data.train_pruned:
        reason = (f"after refinement {p.get('train_support', 0)} training image(s) kept it as their label, fewer than "
                  f"train.min_label_support = {cfg_min['train']}")
        out.append(_pruned(p["name"], "train", reason, said.get(p["name"], [])))
    return out


def review_domain(data: DomainData, cfg_min: dict[str, int], suspects: int) -> DomainReview:
    """Everything the page shows for one domain; ``cfg_min``: refine.min_support and train.min_label_support."""
    score_images(data)
    named = [v for v in data.images.values() if v.name is not None]
    by_name: dict[str, list[ImageView]] = {}
    for v in named:
        by_name.setdefault(v.name, []).append(v)  # type: ignore[arg-type]
    support = {e["name"]: int(e["support"]) for e in data.vocabulary}
    train_support = {p["name"]: p.get("train_support") for p in data.train_pruned}
    match = _truth_match(list(data.images.values())) if data.has_truth else {}
    summaries = []
    for name in [*data.names, *sorted(set(by_name) - set(data.names))]:
        images = sorted(by_name.get(name, []), key=lambda v: (-(v.agreement if v.agreement is not None else -1), v.uri))
        s = NameSummary(name, images, support.get(name, 0), train_support.get(name), data.surfaces.get(name, Counter()),
                        data.raw_examples.get(name, []), in_vocabulary=name in data.names)  # fmt: skip
        pooled: Counter = Counter()
        for v in images:
            for ev in v.evidence.values():
                pooled.update({n: p / len(v.evidence) for n, p in ev.items() if n != name})
        s.confused = [(n, round(w, 1)) for n, w in pooled.most_common(3) if w >= MIN_CONFUSION]
        if data.has_truth:
            s.truth_class = match.get(name)
            with_truth = [v for v in images if v.truth is not None]
            s.truth_images = len(with_truth)
            s.truth_correct = sum(v.truth == s.truth_class for v in with_truth) if s.truth_class else 0
        summaries.append(s)
    summaries.sort(key=lambda s: (-len(s.images), s.name))
    ranked = sorted((v for v in named if v.agreement is not None and len(v.evidence) >= 2
                     and v.agreement < SUSPECT_BELOW), key=lambda v: (v.agreement, -len(v.evidence), v.uri))  # fmt: skip
    accuracy = None
    if data.has_truth:
        with_truth = [v for v in data.images.values() if v.truth is not None]
        correct = sum(v.truth == match.get(v.name or NO_NAME) for v in with_truth)
        accuracy = {"images": len(with_truth), "correct": correct,
                    "cacc": correct / len(with_truth) if with_truth else None,
                    "suspects_wrong": sum(v.truth != match.get(v.name or "") for v in ranked[:suspects] if v.truth)}
    counts = sorted(((s.name, len(s.images)) for s in summaries), key=lambda x: (-x[1], x[0]))
    return DomainReview(data, summaries, _changes(data, cfg_min), ranked[:suspects], len(ranked),
                        sum(v.name is None for v in data.images.values()), accuracy,
                        collapse(counts, len(data.names)) if any(v.named_by == "classify" for v in named) else None)

