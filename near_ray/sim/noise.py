"""What the simulated MLLM answers: noise profiles, image recognition by content, structured noise.

The noise model (docs/simulation.md) has three layers, each drawn from its own seeded
numpy Generator so no global RNG state is involved:

- per class: the share of its wrong answers that name a sibling (Beta-distributed around the profile's
  mean) and the ONE sibling it is persistently confused with;
- per image: hard or easy (hard images are answered correctly far less often), and a mode answer —
  what the model says at temperature 0;
- per sample: with probability min(1, T / temperature_full) the answer is re-drawn from the image's
  distribution, else the mode answer is repeated. The marginal mix over images and samples equals the
  profile's ``outcomes`` at every temperature.

Profiles with an ``appearance`` section get lookalike.AppearanceNoiseModel instead, whose errors follow a
pixel descriptor of each image; this model is the one every other profile keeps, unchanged.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from near_ray.errors import NearRayError
from near_ray.sim.appearance import AppearanceSettings
from near_ray.storage import Storage, join

log = logging.getLogger(__name__)

OUTCOMES = ("exact", "synonym", "coarse", "sibling", "unrelated", "hallucinated", "refusal")
THUMB = 16  # images are recognised by a 16x16 thumbnail: robust to re-encoding and resizing
# Nearest-thumbnail matching (RMS distance, 0-255 scale): re-encoding at 64 px moves a thumbnail by
# ~2-4, down-scaling to half size with heavy JPEG by up to ~12, while two different benchmark images
# are ≥ ~12 apart. So: a close match is taken as is; a looser one only if clearly nearer than the runner-up.
MATCH_RMS = 8.0
LOOSE_RMS = 24.0
LOOSE_RATIO = 1.5
REFUSALS = (
    "I'm sorry, but I can't identify the exact species in this image.",
    "I cannot determine what this is from the image provided.",
    "Unable to identify.",
    "The image is too small and unclear for me to identify the {meta} reliably.",
)
UNKNOWN_ANSWERS = (
    "I'm not sure what this image shows; it looks like an abstract pattern.",
    "This image does not appear to contain a recognizable subject.",
    "It is difficult to tell; it may be a piece of fabric or a painting.",
)


class AnnotatorError(NearRayError):
    """The simulated annotator cannot start: a bad profile, fault config or ground truth."""


class Profile(BaseModel):
    """A noise profile; the YAML files in near_ray/sim/profiles document every knob."""

    model_config = ConfigDict(extra="forbid")

    name: str
    model: str = "simulated-annotator"
    outcomes: dict[str, float]
    class_concentration: float = Field(3.0, gt=0)
    persistent_sibling: float = Field(0.85, ge=0, le=1)
    hard_fraction: float = Field(0.2, ge=0, lt=1)
    hard_correct_factor: float = Field(0.2, ge=0, le=1)
    temperature_full: float = Field(1.0, gt=0)
    format_noise: float = Field(0.4, ge=0, le=1)
    format_styles: dict[str, float]
    coarse_forms: dict[str, float]
    synonym_forms: dict[str, float]
    # Present in the appearance-following profiles only (appearance.py, lookalike.py); absent, the
    # annotator behaves exactly as the profiles written before it did.
    appearance: AppearanceSettings | None = None

    @model_validator(mode="after")
    def _check(self) -> Profile:
        missing = set(OUTCOMES) - set(self.outcomes)
        extra = set(self.outcomes) - set(OUTCOMES)
        if missing or extra:
            raise ValueError(f"outcomes: need exactly {list(OUTCOMES)} (missing {sorted(missing)}, unknown {sorted(extra)})")
        total = sum(self.outcomes.values())
        if abs(total - 1) > 1e-6 or min(self.outcomes.values()) < 0:
            raise ValueError(f"outcomes: shares must be ≥ 0 and sum to 1, they sum to {total:.4f}")
        correct = self.outcomes["exact"] + self.outcomes["synonym"]
        if correct * (1 - self.hard_fraction * self.hard_correct_factor) / (1 - self.hard_fraction) > 1:
            raise ValueError("hard_fraction/hard_correct_factor: easy images would need a correct rate above 1")
        return self


def load_profile(profile: str) -> Profile:
    """A profile by name (near_ray/sim/profiles/NAME.yaml) or a path to a YAML/JSON file."""
    path = Path(profile)
    try:
        if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
            text, source = path.read_text(), str(path)
        else:
            res = resources.files("near_ray.sim") / "profiles" / f"{profile}.yaml"
            if not res.is_file():
                known = sorted(p.name[:-5] for p in (resources.files("near_ray.sim") / "profiles").iterdir()
                               if p.name.endswith(".yaml"))
                raise AnnotatorError(f"profile '{profile}': no such file or built-in profile (built-in: {known})")
            text, source = res.read_text(), f"profile '{profile}'"
        return Profile.model_validate(yaml.safe_load(text))
    except ValidationError as e:
        raise AnnotatorError(f"{source}: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}"
                                                     for x in e.errors())) from None
    except yaml.YAMLError as e:
        raise AnnotatorError(f"{profile}: not valid YAML: {e}") from None


def rng_for(*parts: int | str | float) -> np.random.Generator:
    """A Generator keyed by a tuple of ints/strings/floats (strings and floats hashed stably)."""
    key = []
    for p in parts:
        if isinstance(p, str):
            key.append(zlib.crc32(p.encode()))
        elif isinstance(p, float):
            key.append(zlib.crc32(repr(round(p, 6)).encode()))
        else:
            key.append(int(p) & 0xFFFFFFFF)
    return np.random.default_rng(key)


def choose(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


# ------------------------------------------------------------------------------------------ images
def thumbnail(data: bytes) -> np.ndarray:
    """The content signature of an image: RGB, box-filtered to 16x16, as a float vector (0-255)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        small = img.convert("RGB").resize((THUMB, THUMB), Image.BOX)
    return np.asarray(small, dtype=np.float32).reshape(-1)


def exact_key(thumb: np.ndarray) -> str:
    return hashlib.sha256((thumb.astype(np.uint8) >> 3).tobytes()).hexdigest()


class ImageIndex:
    """Recognises a (possibly re-encoded, resized) benchmark image: exact key first, else nearest thumbnail."""

    SEEN_MAX = 200_000  # remembered answers by exact bytes

    def __init__(self, thumbs: np.ndarray) -> None:
        self.thumbs = thumbs
        self._norms = (thumbs.astype(np.float64) ** 2).sum(axis=1)  # for distances by one mat-vec product
        self.keys: dict[str, int] = {}
        for i, t in enumerate(thumbs):
            self.keys.setdefault(exact_key(t), i)
        if len(self.keys) < len(thumbs):
            log.warning("simulated annotator: %d images share a content key", len(thumbs) - len(self.keys))
        # Bytes already seen -> their answer: the S samples of an image (identical bytes) and retries
        # cost one decode and search, so the simulator behaves like a remote endpoint, latency-bound
        # rather than bound by its own CPU. Bounded; cleared when full.
        self._seen: dict[bytes, int | None] = {}

    def lookup(self, data: bytes) -> int | None:
        key = hashlib.blake2b(data, digest_size=16).digest()
        if key in self._seen:
            return self._seen[key]
        found = self._search(data)
        if len(self._seen) >= self.SEEN_MAX:
            self._seen.clear()
        self._seen[key] = found
        return found

    def _search(self, data: bytes) -> int | None:
        thumb = thumbnail(data)
        hit = self.keys.get(exact_key(thumb))
        if hit is not None:
            return hit
        if not len(self.thumbs):
            return None
        sq = self._norms - 2.0 * (self.thumbs @ thumb).astype(np.float64) + float(thumb.astype(np.float64) @ thumb)
        rms = np.sqrt(np.maximum(sq, 0.0) / thumb.size)
        best = int(rms.argmin())
        if rms[best] <= MATCH_RMS:
            return best
        runner_up = float(np.partition(rms, 1)[1]) if len(rms) > 1 else math.inf
        return best if rms[best] <= LOOSE_RMS and runner_up >= LOOSE_RATIO * rms[best] else None


# ------------------------------------------------------------------------------------------ truth
@dataclass
class Known:
    """One benchmark image: where it is and what it shows."""

    path: str
    domain: str
    species: str


def benchmark_root(truth: str) -> str:
    """The folder of a synthetic benchmark given as its folder or its truth.parquet."""
    return truth.rsplit("/", 1)[0] if truth.endswith(".parquet") else truth


def load_truth(truth: str, storage: Storage) -> tuple[list[Known], dict[str, Any], ImageIndex]:
    """(images, taxonomy, index) of a synthetic benchmark at ``truth`` (its folder or its truth.parquet)."""
    root = benchmark_root(truth)
    table = storage.read_parquet(join(root, "truth.parquet"))
    missing = {"path", "domain", "species"} - set(table.column_names)
    if missing:
        raise AnnotatorError(f"{join(root, 'truth.parquet')}: missing columns {sorted(missing)}")
    rows = sorted(table.select(["path", "domain", "species"]).to_pylist(), key=lambda r: r["path"])
    taxonomy = storage.read_json(join(root, "taxonomy.json"))
    known = [Known(**r) for r in rows]
    for k in known:
        if k.species not in taxonomy.get("domains", {}).get(k.domain, {}).get("species", {}):
            raise AnnotatorError(f"{root}: species '{k.species}' of {k.path} is not in taxonomy.json")

    def thumb(k: Known) -> np.ndarray:
        try:
            return thumbnail(storage.read_bytes(join(root, k.path)))
        except (UnidentifiedImageError, OSError) as e:
            raise AnnotatorError(f"{join(root, k.path)}: not a readable image: {e}") from e

    with ThreadPoolExecutor(max_workers=16) as pool:
        thumbs = np.stack(list(pool.map(thumb, known))) if known else np.zeros((0, THUMB * THUMB * 3), np.float32)
    return known, taxonomy, ImageIndex(thumbs)


# ------------------------------------------------------------------------------------------ answers
@dataclass
class Draw:
    """One simulated answer before formatting."""

    outcome: str
    name: str  # the name said (or the refusal sentence)
    scientific: str | None  # a scientific name a sentence may add in parentheses
    alternative: str | None  # a second name for list answers
    style: str  # "plain" or one of the profile's format styles


class NoiseModel:
    """Structured, seeded answers about known images, following one profile."""

    def __init__(self, profile: Profile, known: list[Known], taxonomy: dict[str, Any], seed: int) -> None:
        self.profile, self.known, self.seed = profile, known, seed
        self.domains: dict[str, dict[str, Any]] = taxonomy.get("domains", {})
        o = profile.outcomes
        self.correct = o["exact"] + o["synonym"]
        self.sibling_share = o["sibling"] / (1 - self.correct) if self.correct < 1 else 0.0
        self._classes: dict[tuple[str, str], tuple[float, str | None]] = {}

    # -------------------------------------------------------------------- structure
    def class_params(self, domain: str, species: str) -> tuple[float, str | None]:
        """(share of wrong answers naming a sibling, the persistent confusion) of one class."""
        key = (domain, species)
        if key not in self._classes:
            rng = rng_for(self.seed, "class", domain, species)
            k, w = self.profile.class_concentration, self.sibling_share
            rate = float(rng.beta(k * w, k * (1 - w))) if 0 < w < 1 else w
            sibs = self.domains[domain]["species"][species].get("siblings") or self._others(domain, species)
            self._classes[key] = (rate, str(rng.choice(sibs)) if sibs else None)
        return self._classes[key]

    def distribution(self, i: int) -> dict[str, float]:
        """The answer distribution of image ``i``: its difficulty and its class's confusion applied."""
        p, img = self.profile, self.known[i]
        hard = self.is_hard(i)
        c_hard = self.correct * p.hard_correct_factor
        c = c_hard if hard else (self.correct - p.hard_fraction * c_hard) / (1 - p.hard_fraction)
        w_c, _ = self.class_params(img.domain, img.species)
        o = p.outcomes
        rest = 1 - self.correct - o["sibling"]
        dist = {"exact": c * o["exact"] / self.correct if self.correct else 0.0,
                "synonym": c * o["synonym"] / self.correct if self.correct else 0.0,
                "sibling": (1 - c) * w_c}
        for name in ("coarse", "unrelated", "hallucinated", "refusal"):
            dist[name] = (1 - c) * (1 - w_c) * o[name] / rest if rest > 0 else 0.0
        return dist

    def is_hard(self, i: int) -> bool:
        return bool(rng_for(self.seed, "image", self.known[i].path).random() < self.profile.hard_fraction)

    # -------------------------------------------------------------------- sampling
    def answer(self, i: int, request_seed: int, temperature: float, choice: int = 0) -> Draw:
        """Image ``i``'s answer: its mode at temperature 0, re-drawn with probability growing with T."""
        img = self.known[i]
        dist = self.distribution(i)
        if temperature > 0:
            rng = rng_for(self.seed, "sample", img.path, request_seed, float(temperature), choice)
            if rng.random() < self.resample_probability(i, temperature):
                return self._draw(i, dist, rng)
        return self._draw(i, dist, rng_for(self.seed, "mode", img.path))

    def resample_probability(self, i: int, temperature: float) -> float:
        """The chance that a sample at ``temperature`` re-draws image ``i``'s answer instead of repeating its mode."""
        return min(1.0, temperature / self.profile.temperature_full)

    def _draw(self, i: int, dist: dict[str, float], rng: np.random.Generator) -> Draw:
        img = self.known[i]
        entry = self.domains[img.domain]["species"][img.species]
        meta = self.domains[img.domain].get("meta_class") or "object"
        outcome = choose(rng, dist)
        sci: str | None = None
        if outcome == "exact":
            name, sci = img.species, entry.get("scientific_name")
        elif outcome == "synonym":
            form = choose(rng, self.profile.synonym_forms)
            syns = entry.get("synonyms") or []
            name = str(rng.choice(syns)) if form == "synonym" and syns else entry.get("scientific_name") or img.species
        elif outcome == "coarse":
            form = choose(rng, self.profile.coarse_forms)
            name = meta.capitalize() if form == "meta_class" else entry.get(form) or meta.capitalize()
        elif outcome in ("sibling", "unrelated"):
            outcome, name = self._confused(i, outcome, rng)
            sci = self.domains[img.domain]["species"].get(name, {}).get("scientific_name")
        elif outcome == "hallucinated":
            name = self._hallucinated(i, rng)
        else:
            return Draw("refusal", str(rng.choice(REFUSALS)).format(meta=meta), None, None, "plain")
        style = choose(rng, self.profile.format_styles) if rng.random() < self.profile.format_noise else "plain"
        alt = self.class_params(img.domain, img.species)[1] if style == "list" else None
        return Draw(outcome, name, sci if rng.random() < 0.7 else None, alt, style)

    def _confused(self, i: int, outcome: str, rng: np.random.Generator) -> tuple[str, str]:
        """(outcome, the species named) of a sibling or unrelated answer about image ``i``."""
        img = self.known[i]
        entry = self.domains[img.domain]["species"][img.species]
        if outcome == "sibling":
            _, confused = self.class_params(img.domain, img.species)
            sibs = entry.get("siblings") or []
            if rng.random() >= self.profile.persistent_sibling and sibs:
                confused = str(rng.choice(sibs))
            return outcome, confused or img.species
        others = self._others(img.domain, img.species, exclude_genus=entry.get("genus")) or [img.species]
        return outcome, str(rng.choice(others))

    def _hallucinated(self, i: int, rng: np.random.Generator) -> str:
        return self._hallucinate(self.known[i].domain, rng)

    def _others(self, domain: str, species: str, exclude_genus: str | None = None) -> list[str]:
        return sorted(n for n, e in self.domains[domain]["species"].items()
                      if n != species and (exclude_genus is None or e.get("genus") != exclude_genus))

    def _hallucinate(self, domain: str, rng: np.random.Generator) -> str:
        from near_ray.sim.taxonomy import PALETTE, SPECIES_PREFIXES, TEMPLATES

        existing = {n.lower() for n in self.domains[domain]["species"]}
        heads = TEMPLATES[domain].heads if domain in TEMPLATES else tuple(
            n.split()[-1] for n in self.domains[domain]["species"])
        name = ""
        for _ in range(20):
            name = f"{rng.choice(SPECIES_PREFIXES)} {PALETTE[int(rng.integers(len(PALETTE)))].name} {rng.choice(heads)}"
            if name.lower() not in existing:
                break
        return name


def format_answer(d: Draw, meta: str) -> str:
    """The plain-text message content for a draw, wrapped per its format style."""
    name = d.name
    if d.style == "sentence":
        sci = f" ({d.scientific})" if d.scientific else ""
        return f"This appears to be a {name}{sci}." if d.scientific else f"The {meta} in this image is a {name}."
    if d.style == "list":
        return f"Possibly: {name}, {d.alternative}" if d.alternative and d.alternative != name else f"Possibly: {name}"
    if d.style == "markdown":
        return f"**{name}**"
    if d.style == "period":
        return f"{name}."
    if d.style == "lowercase":
        return name.lower()
    if d.style == "article":
        return f"{'An' if name[:1].lower() in 'aeiou' else 'A'} {name}"
    return name


def format_value(d: Draw) -> str:
    """The name inside a structured (JSON) answer: format noise only within the value, and milder."""
    if d.outcome == "refusal":
        return "unknown"
    if d.style in ("sentence", "list") and d.scientific:
        return f"{d.name} ({d.scientific})"
    if d.style == "lowercase":
        return d.name.lower()
    if d.style == "period":
        return f"{d.name}."
    return d.name
