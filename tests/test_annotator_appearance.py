"""The simulated annotator's appearance-following profiles, and the old profiles left exactly as they were."""

from __future__ import annotations

import hashlib

import pytest

from near_ray.sim.noise import NoiseModel, format_answer, load_profile, load_truth
from near_ray.sim.synth import generate
from near_ray.storage import Storage

# Answers of the profiles that existed before the appearance family, computed on that code: a digest of
# every image's answers (3 request seeds x temperatures 0 and 0.7, annotator seed 3) and a few answers spelt out.
PINNED = {
    "strong": ("856c969f5e2d37b7", ["coarse|Chrycorcichla", "sibling|Teal White-winged Thrush",
                                    "exact|**Teal White-winged Thrush**",
                                    "coarse|The bird in this image is a Melcorlanius."]),
    "weak": ("03df1e5f84375713", ["coarse|The bird in this image is a Bird.", "unrelated|Azure Bunting",
                                  "coarse|The bird in this image is a Thrush.", "unrelated|Northern Spot-tailed Swallow."]),
    "confuser": ("6389b5aa1bf8523e", ["sibling|Azure Bunting", "sibling|Teal White-winged Thrush",
                                      "exact|**Teal White-winged Thrush**",
                                      "sibling|This appears to be a Greater Coral Pipit (Melcorlanius concolor)."]),
    "cautious": ("6300183d8427dc84", ["coarse|The bird in this image is a Ochrbelidae.", "coarse|Thrush",
                                      "synonym|The bird in this image is a Halmore Thrush.", "coarse|Bird."]),
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("appearance") / "bench")
    generate(out=out, domains=["birds", "flowers"], species=16, images_per_species=4, image_size=64, seed=0,
             test_fraction=0.5, storage=Storage())
    return out


@pytest.mark.parametrize("profile", sorted(PINNED))
def test_old_profiles_answer_as_before(bench: str, profile: str) -> None:
    known, taxonomy, _ = load_truth(bench, Storage())
    model = NoiseModel(load_profile(profile), known, taxonomy, seed=3)
    texts = []
    for i in range(len(known)):
        for s in range(3):
            for t in (0.0, 0.7):
                d = model.answer(i, s, t)
                texts.append(f"{d.outcome}|{format_answer(d, 'bird')}")
    digest, spelt = PINNED[profile]
    assert [texts[k] for k in (1, 7, 50, 101)] == spelt
    assert hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16] == digest
