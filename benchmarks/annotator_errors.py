"""Where the simulated annotator's errors fall: its answer mix, and whether look-alike images share wrong names.

    python benchmarks/annotator_errors.py [--profiles strong,appearance-strong,weak,appearance-weak]

On the demo's benchmark (`near-ray synth` defaults: birds and flowers, 8 species each, 24 images per
species, 64 px, seed 0), every image is asked the label stage's defaults (3 samples at temperature
0.7) under each profile, for annotator seeds 0-4 (figures are their means). Reported per profile: the answer mix; the share of wrong
species names (sibling, unrelated, hallucinated) whose image's nearest neighbour also received that
name among its samples, with the nearest neighbour taken in the annotator's pixel-descriptor space and
in the shipped starting CLIP's (near-tiny, "synthetic") image space, beside the same share for a random
image of the domain (chance) and of the same class (what class-level persistence alone gives; a nearest
neighbour above it means errors follow appearance); the majority answer's accuracy; and how consistent the
samples of easy and hard images are. Prints and writes benchmarks/results/annotator_errors.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from near_ray.sim.config import SynthConfig
from near_ray.sim.descriptor import standardise
from near_ray.sim.lookalike import describe_images, noise_model
from near_ray.sim.noise import OUTCOMES, load_profile, load_truth
from near_ray.sim.synth import generate
from near_ray.storage import Storage

SAMPLES, TEMPERATURE = 3, 0.7
WRONG_NAMES = ("sibling", "unrelated", "hallucinated")


def nearest_neighbours(x: np.ndarray, domains: list[str]) -> np.ndarray:
    """Each row's nearest other row of the same domain (Euclidean)."""
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    same = np.array(domains)[:, None] == np.array(domains)[None, :]
    d[~same] = np.inf
    np.fill_diagonal(d, np.inf)
    return d.argmin(axis=1)


def clip_embeddings(root: str, paths: list[str]) -> np.ndarray:
    from near_ray.config import ModelConfig
    from near_ray.model.clip import create_clip, encode_images

    clip = create_clip(ModelConfig(arch="near-tiny", pretrained="synthetic", precision="fp32"))
    return encode_images(clip, [Image.open(Path(root, p)).convert("RGB") for p in paths])


def shared_share(answers: list[list[tuple[str, str]]], wrong: list[tuple[int, str]], other: np.ndarray,
                 species: list[str], as_error: bool) -> float:
    """The share of wrong names (image, name) that image ``other[image]`` also received: as a wrong name of
    its own (``as_error``), or at all (a neighbour whose true class it is says it too, and backs the error)."""
    if not wrong:
        return float("nan")
    return float(np.mean([name in {n for _, n in answers[other[i]]} and (not as_error or name != species[other[i]])
                          for i, name in wrong]))


def _majority_correct(samples: list[tuple[str, str]]) -> bool:
    outcome_of = dict((n, o) for o, n in samples)
    top, _ = Counter(n for _, n in samples).most_common(1)[0]
    return outcome_of[top] in ("exact", "synonym")


def measure(root: str, profile: str, seed: int, neighbours: dict[str, np.ndarray],
            random: dict[str, np.ndarray]) -> dict:
    st = Storage()
    known, taxonomy, _ = load_truth(root, st)
    model = noise_model(load_profile(profile), known, taxonomy, seed, root, st)
    answers = [[(d.outcome, d.name) for d in (model.answer(i, s, TEMPERATURE) for s in range(SAMPLES))]
               for i in range(len(known))]
    mix = Counter(o for a in answers for o, _ in a)
    total = sum(mix.values())
    species = [k.species for k in known]
    wrong = [(i, n) for i, a in enumerate(answers) for o, n in a if o in WRONG_NAMES]
    hard = [model.is_hard(i) for i in range(len(known))]
    distinct = [len({n for _, n in a}) for a in answers]
    return {
        "mix": {o: round(mix[o] / total, 3) for o in OUTCOMES},
        "wrong_names": len(wrong),
        "distinct_wrong_names": len({n for _, n in wrong}),
        "nn_same_wrong_name": {space: round(shared_share(answers, wrong, nn, species, True), 3)
                               for space, nn in neighbours.items()},
        "nn_said_the_wrong_name": {space: round(shared_share(answers, wrong, nn, species, False), 3)
                                   for space, nn in neighbours.items()},
        **{f"{kind}_same_wrong_name": round(shared_share(answers, wrong, other, species, True), 3)
           for kind, other in random.items()},
        **{f"{kind}_said_the_wrong_name": round(shared_share(answers, wrong, other, species, False), 3)
           for kind, other in random.items()},
        "majority_correct": round(float(np.mean([_majority_correct(a) for a in answers])), 3),
        "distinct_answers_per_image": {
            "easy": round(float(np.mean([d for d, h in zip(distinct, hard, strict=True) if not h])), 2),
            "hard": round(float(np.mean([d for d, h in zip(distinct, hard, strict=True) if h])), 2)},
    }


def mean_of(results: list[dict]) -> dict:
    """The mean of each number over the annotator seeds' results (same keys, nested dicts alike)."""
    first = results[0]
    if isinstance(first, dict):
        return {k: mean_of([r[k] for r in results]) for k in first}
    return round(float(np.mean(results)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", default="strong,appearance-strong,weak,appearance-weak")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="annotator seeds; every figure is their mean")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "annotator_errors.json"))
    args = parser.parse_args()
    s = SynthConfig()
    seeds = [int(x) for x in args.seeds.split(",")]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp, "bench"))
        generate(out=root, domains=s.domains, species=s.species, images_per_species=s.images_per_species,
                 image_size=s.image_size, seed=s.seed, test_fraction=s.test_fraction, storage=Storage())
        known, _, _ = load_truth(root, Storage())
        domains = [k.domain for k in known]
        neighbours = {"descriptor": nearest_neighbours(standardise(describe_images(root, known, Storage())), domains),
                      "clip": nearest_neighbours(clip_embeddings(root, [k.path for k in known]), domains)}
        # What chance gives: a random other image of the same domain, and of the same class (what class-level
        # persistence alone gives; a nearest neighbour above it means the errors follow appearance).
        rng = np.random.default_rng(0)
        random = {kind: np.array([rng.choice([j for j, o in enumerate(known) if same(o, k) and j != i])
                                  for i, k in enumerate(known)])
                  for kind, same in (("random_image", lambda o, k: o.domain == k.domain),
                                     ("random_same_class_image", lambda o, k: o.species == k.species))}
        result = {"benchmark": {"domains": s.domains, "species": s.species, "images_per_species": s.images_per_species,
                                "image_size": s.image_size, "seed": s.seed, "images": len(known)},
                  "samples": SAMPLES, "temperature": TEMPERATURE, "annotator_seeds": seeds,
                  "profiles": {p: mean_of([measure(root, p, seed, neighbours, random) for seed in seeds])
                               for p in args.profiles.split(",")}}
    result["seconds"] = round(time.monotonic() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
