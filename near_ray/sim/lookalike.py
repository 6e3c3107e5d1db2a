"""The appearance-following noise model: a simulated MLLM whose mistakes follow what the image looks like.

It keeps NoiseModel's outcome mix, formats and temperature-0 mode, and changes where errors fall
(docs/simulation.md lists every assumption):

- hard images are the ones that look atypical for their class or like another class (appearance.py's
  hardness from the pixel descriptor), not a hash of the file path;
- a wrong species name (the profile's sibling + unrelated share) names a class in proportion to how much
  the image resembles it, mostly among its class's few persistent confusions and the class it looks
  most like; whether that is a sibling or an unrelated species follows from the name;
- a hallucinated name is mostly one of a few names made up once per class, so it recurs;
- at temperature T a sample re-draws with probability min(1, T / temperature_full) scaled from
  ``easy_resample`` (the easiest image) to 1 (the hardest): easy images answer consistently.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError

from near_ray.sim.appearance import AppearanceSettings, Looks
from near_ray.sim.descriptor import BLOCKS, describe, standardise
from near_ray.sim.noise import AnnotatorError, Known, NoiseModel, Profile, benchmark_root, choose, rng_for
from near_ray.storage import Storage, join


class AppearanceNoiseModel(NoiseModel):
    """Structured, seeded answers whose errors follow a pixel descriptor of each image."""

    def __init__(self, profile: Profile, known: list[Known], taxonomy: dict[str, Any], seed: int,
                 descriptors: np.ndarray) -> None:
        """``descriptors``: one standardised descriptor per image of ``known`` (descriptor.standardise)."""
        super().__init__(profile, known, taxonomy, seed)
        self.settings: AppearanceSettings = profile.appearance or AppearanceSettings()
        self.looks = Looks(descriptors, [(k.domain, k.species) for k in known], self.settings)
        n = len(known)
        # The hard images: the round(hard_fraction * n) hardest-looking ones.
        order = np.argsort(-self.looks.hardness, kind="stable")
        self._hard = np.zeros(n, bool)
        self._hard[order[: round(profile.hard_fraction * n)]] = True
        self._hallucinations: dict[tuple[str, str], list[str]] = {}

    # -------------------------------------------------------------------- structure
    def hardness(self, i: int) -> float:
        """How hard image ``i`` looks, in [0, 1] (its rank over the collection)."""
        return float(self.looks.hardness[i])

    def is_hard(self, i: int) -> bool:
        return bool(self._hard[i])

    def persistent_names(self, domain: str, species: str) -> tuple[list[str], list[str]]:
        """(persistent confusions, persistent hallucinated names) of one class."""
        return self.looks.confusions[(domain, species)], self._class_hallucinations(domain, species)

    def class_params(self, domain: str, species: str) -> tuple[float, str | None]:
        confusions = self.looks.confusions.get((domain, species)) or [None]
        return self.sibling_share, confusions[0]  # the second name of a list answer

    def distribution(self, i: int) -> dict[str, float]:
        """The profile's mix with the image's difficulty applied; every wrong species name is under "sibling"
        until the name is drawn (it is a sibling or not depending on which class the image resembles)."""
        p = self.profile
        c_hard = self.correct * p.hard_correct_factor
        c = c_hard if self.is_hard(i) else (self.correct - p.hard_fraction * c_hard) / (1 - p.hard_fraction)
        o, wrong = p.outcomes, 1 - self.correct
        dist = {"exact": c * o["exact"] / self.correct if self.correct else 0.0,
                "synonym": c * o["synonym"] / self.correct if self.correct else 0.0,
                "sibling": (1 - c) * (o["sibling"] + o["unrelated"]) / wrong if wrong > 0 else 0.0,
                "unrelated": 0.0}
        for name in ("coarse", "hallucinated", "refusal"):
            dist[name] = (1 - c) * o[name] / wrong if wrong > 0 else 0.0
        return dist

    def resample_probability(self, i: int, temperature: float) -> float:
        e = self.settings.easy_resample
        return super().resample_probability(i, temperature) * (e + (1 - e) * self.hardness(i))

    # -------------------------------------------------------------------- names
    def _confused(self, i: int, outcome: str, rng: np.random.Generator) -> tuple[str, str]:
        img = self.known[i]
        resemblance = self.looks.resemblance[i]
        if not resemblance:  # the only class of its domain: nothing else to confuse it with
            return "sibling", img.species
        pool = resemblance
        if rng.random() < self.settings.persistent_confusion:
            # The class's persistent confusions, and the class this image looks most like: an image of A
            # that looks like B is called B, whatever A's usual confusions are.
            likeliest = max(resemblance, key=lambda c: (resemblance[c], c))
            pool = {c: resemblance[c] for c in [*self.looks.confusions[(img.domain, img.species)], likeliest]}
        if sum(pool.values()) <= 0:  # every weight underflowed: the look gives no preference
            pool = dict.fromkeys(pool, 1.0)
        name = choose(rng, pool)
        siblings = self.domains[img.domain]["species"][img.species].get("siblings") or []
        return ("sibling" if name in siblings else "unrelated"), name

    def _hallucinated(self, i: int, rng: np.random.Generator) -> str:
        img = self.known[i]
        if rng.random() >= self.settings.persistent_hallucination:
            return self._hallucinate(img.domain, rng)
        names = self._class_hallucinations(img.domain, img.species)
        return choose(rng, {n: 1 / (k + 1) for k, n in enumerate(names)})  # the first name most often

    def _class_hallucinations(self, domain: str, species: str) -> list[str]:
        """A few plausible made-up names per class, fixed for the annotator's seed: its genus's head
        noun with its own colour or another, so they read like a real sibling's name."""
        key = (domain, species)
        if key not in self._hallucinations:
            from near_ray.sim.taxonomy import PALETTE, SPECIES_PREFIXES

            rng = rng_for(self.seed, "hallucinations", domain, species)
            entry = self.domains[domain]["species"][species]
            head = entry.get("genus_common") or species.split()[-1]
            colour = str(entry.get("attributes", {}).get("colour", "")).capitalize()
            existing = {n.lower() for n in self.domains[domain]["species"]}
            names: list[str] = []
            for _ in range(50 * self.settings.hallucinations_per_class):
                hue = colour if colour and rng.random() < 0.6 else PALETTE[int(rng.integers(len(PALETTE)))].name
                name = f"{rng.choice(SPECIES_PREFIXES)} {hue} {head}"
                if name.lower() not in existing and name not in names:
                    names.append(name)
                if len(names) == self.settings.hallucinations_per_class:
                    break
            self._hallucinations[key] = names or [self._hallucinate(domain, rng)]
        return self._hallucinations[key]


def describe_images(truth: str, known: list[Known], storage: Storage) -> np.ndarray:
    """Raw descriptors (descriptor.describe) of a benchmark's images, read from its folder."""
    root = benchmark_root(truth)

    def one(k: Known) -> np.ndarray:
        try:
            return describe(storage.read_bytes(join(root, k.path)))
        except (UnidentifiedImageError, OSError) as e:
            raise AnnotatorError(f"{join(root, k.path)}: not a readable image: {e}") from e

    with ThreadPoolExecutor(max_workers=16) as pool:
        rows = list(pool.map(one, known))
    return np.stack(rows) if rows else np.zeros((0, sum(n for n, _ in BLOCKS.values())), np.float32)


def noise_model(profile: Profile, known: list[Known], taxonomy: dict[str, Any], seed: int, truth: str,
                storage: Storage) -> NoiseModel:
    """The noise model a profile asks for: appearance-following when it has an ``appearance`` section."""
    if profile.appearance is None:
        return NoiseModel(profile, known, taxonomy, seed)
    return AppearanceNoiseModel(profile, known, taxonomy, seed, standardise(describe_images(truth, known, storage)))
