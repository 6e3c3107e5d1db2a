"""What the appearance-following annotator knows of how its images look (descriptor.py), computed once at start.

From the descriptors of a truth table's images and their true classes:

- each class's mean descriptor, per domain;
- per image, a **hardness** in [0, 1]: how atypical it is for its own class (its distance to the class
  mean, as a percentile within the class) mixed with how much it looks like another class (its own
  distance minus the distance to the nearest other class mean, as a percentile over the collection);
- per image, its **resemblance** to every other class of its domain: a softmax over negative distances
  to the class means, so look-alike images put their weight on the same class;
- per class, its **persistent confusions**: the few classes its images resemble most on average.

No randomness here: everything follows from the pixels and the truth table.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

RESEMBLED = 16


class AppearanceSettings(BaseModel):
    """The ``appearance`` section of a profile: its presence makes the annotator's errors follow appearance."""

    model_config = ConfigDict(extra="forbid")

    typicality_weight: float = Field(0.2, ge=0, le=1)
    resemblance_temperature: float = Field(0.1, gt=0)
    confusions_per_class: int = Field(2, ge=1)
    persistent_confusion: float = Field(0.8, ge=0, le=1)
    hallucinations_per_class: int = Field(2, ge=1)
    persistent_hallucination: float = Field(0.9, ge=0, le=1)
    easy_resample: float = Field(0.25, ge=0, le=1)


def _percentile(values: np.ndarray) -> np.ndarray:
    """Rank of each value in [0, 1] (0 the smallest, 1 the largest; a single value is 0.5)."""
    if len(values) == 1:
        return np.array([0.5])
    return np.argsort(np.argsort(values, kind="stable"), kind="stable") / (len(values) - 1)


class Looks:
    """Class means, hardness, resemblance and persistent confusions of a collection's images."""

    def __init__(self, descriptors: np.ndarray, classes: list[tuple[str, str]], settings: AppearanceSettings) -> None:
        """``descriptors``: standardised, one row per image; ``classes``: each image's (domain, species)."""
        self.settings = settings
        self.classes = classes
        n = len(classes)
        self.by_domain: dict[str, list[str]] = {}
        for domain, species in sorted(set(classes)):
            self.by_domain.setdefault(domain, []).append(species)
        self.members: dict[tuple[str, str], list[int]] = {}
        for i, c in enumerate(classes):
            self.members.setdefault(c, []).append(i)
        self.means = {c: descriptors[idx].mean(axis=0) for c, idx in self.members.items()}
        own, margin = np.zeros(n), np.zeros(n)
        self.resemblance: list[dict[str, float]] = [{} for _ in range(n)]
        dist: dict[int, np.ndarray] = {}  # image -> its distance to each class mean of its domain (by_domain order)
        for domain, names in self.by_domain.items():
            rows = [i for i in range(n) if classes[i][0] == domain]
            means = np.stack([self.means[(domain, s)] for s in names])
            x = descriptors[rows].astype(np.float64)
            m = means.astype(np.float64)
            sq = (x ** 2).sum(axis=1)[:, None] - 2 * x @ m.T + (m ** 2).sum(axis=1)  # no images x classes x dims array
            d = np.sqrt(np.maximum(sq, 0.0))
            column = {s: k for k, s in enumerate(names)}
            for r, i in enumerate(rows):
                dist[i] = d[r]
                own[i] = d[r, column[classes[i][1]]]
        # Resemblance compares distances in units of the typical distance of an image to its class mean.
        scale = float(np.median(own)) if n and np.median(own) > 0 else 1.0
        tau = settings.resemblance_temperature * scale
        for i, (domain, species) in enumerate(classes):
            names = self.by_domain[domain]
            others = [k for k, s in enumerate(names) if s != species]
            if not others:  # the only class of its domain
                margin[i] = -np.inf
                continue
            margin[i] = own[i] - dist[i][others].min()
            logits = -dist[i][others] / tau
            # The RESEMBLED most resembled classes only: beyond them the softmax weight is negligible, and a
            # domain of a thousand species would otherwise keep a thousand weights per image.
            top = np.argsort(-logits, kind="stable")[:RESEMBLED]
            p = np.exp(logits[top] - logits[top].max())
            self.resemblance[i] = {names[others[k]]: float(v) for k, v in zip(top, p / p.sum(), strict=True)}
        within = np.zeros(n)
        for members in self.members.values():
            within[members] = _percentile(own[members])
        w = settings.typicality_weight
        mixed = w * within + (1 - w) * (_percentile(margin) if n else margin)
        self.hardness = _percentile(mixed) if n else mixed
        self.confusions = {c: self._top_confusions(c) for c in self.members}

    def _top_confusions(self, c: tuple[str, str]) -> list[str]:
        total: dict[str, float] = {}
        for i in self.members[c]:
            for other, p in self.resemblance[i].items():
                total[other] = total.get(other, 0.0) + p
        ranked = sorted(total, key=lambda o: (-total[o], o))
        return ranked[: self.settings.confusions_per_class]
