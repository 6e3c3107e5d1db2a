"""The simulated annotator's appearance-following profiles, and the old profiles left exactly as they were."""

from __future__ import annotations

import hashlib

import numpy as np
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
def bench(synth_bench) -> str:
    return synth_bench(species=16, images_per_species=4, image_size=64)


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


# ------------------------------------------------------------------------------------------ appearance family
@pytest.fixture(scope="module")
def looks_bench(tmp_path_factory) -> dict:
    """A small birds benchmark plus two constructed images of one species A: a look-alike drawn with the
    attributes of B (a species of another genus), an atypical one (A drawn, then its colours inverted),
    nothing else changed. Returns the folder and the paths and names involved."""
    import io

    import pyarrow as pa
    from PIL import ImageOps

    from near_ray.sim.render import render
    from near_ray.sim.taxonomy import build_taxonomy, domain_rng

    out = str(tmp_path_factory.mktemp("looks") / "bench")
    generate(out=out, domains=["birds"], species=6, images_per_species=10, image_size=64, seed=0,
             test_fraction=0.5, storage=Storage())
    st = Storage()
    tax = build_taxonomy("birds", 6, seed=0)
    a = tax.species[0]
    b = next(s for s in tax.species if s.genus != a.genus)
    rows = st.read_parquet(f"{out}/truth.parquet").to_pylist()
    made = {}
    for kind, attrs, invert in (("lookalike", b.attributes, False), ("atypical", a.attributes, True)):
        img, _ = render("birds", attrs, 64, domain_rng(99, "birds", 2, len(made)))
        img = ImageOps.invert(img) if invert else img
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        path = f"images/birds/train/constructed_{kind}.png"
        st.write_bytes(f"{out}/{path}", buf.getvalue())
        rows.append({**next(r for r in rows if r["species"] == a.canonical), "path": path,
                     "sha256": hashlib.sha256(buf.getvalue()).hexdigest()})
        made[kind] = path
    st.write_parquet(f"{out}/truth.parquet", pa.Table.from_pylist(rows))
    return {"root": out, "a": a.canonical, "b": b.canonical, "b_genus": {b.canonical, *b.siblings}, **made}


def _appearance_model(root: str, profile: str = "appearance-strong", seed: int = 0):
    from near_ray.sim.lookalike import AppearanceNoiseModel, noise_model

    st = Storage()
    known, taxonomy, _ = load_truth(root, st)
    model = noise_model(load_profile(profile), known, taxonomy, seed, root, st)
    assert isinstance(model, AppearanceNoiseModel)
    return model, {k.path: i for i, k in enumerate(known)}


def test_lookalike_image_gets_the_class_it_resembles(looks_bench: dict) -> None:
    model, at = _appearance_model(looks_bench["root"])
    a = looks_bench["a"]
    confusions, _ = model.persistent_names("birds", a)
    lookalike = at[looks_bench["lookalike"]]
    members = [at[p] for p in at if model.known[at[p]].species == a and "constructed" not in p]
    typical = min(members, key=model.hardness)  # the image of A that looks most like an A
    b_genus = looks_bench["b_genus"]  # B, or B's siblings: they differ from B in one small marking
    assert max(model.looks.resemblance[lookalike], key=model.looks.resemblance[lookalike].get) in b_genus

    def named(i: int) -> list[str]:
        return [model.answer(i, s, 1.0).name for s in range(300)]

    odd, usual = named(lookalike), named(typical)
    shared = {*b_genus, *confusions}
    assert sum(n in shared for n in odd) / 300 >= 0.3
    assert sum(n in shared for n in odd) > 3 * sum(n in shared for n in usual)
    like_b = sum(n in b_genus for n in odd)
    assert like_b > sum(n in confusions for n in odd) and sum(n in b_genus for n in usual) <= 3


def test_atypical_image_is_hard(looks_bench: dict) -> None:
    model, at = _appearance_model(looks_bench["root"])
    for kind in ("atypical", "lookalike"):
        assert model.is_hard(at[looks_bench[kind]]), kind
    assert sum(model.is_hard(i) for i in range(len(model.known))) == round(0.2 * len(model.known))
    correct = [sum(model.answer(at[looks_bench["atypical"]], s, 1.0).outcome in ("exact", "synonym")
                   for s in range(200)) / 200]
    assert correct[0] < 0.3  # hard: answered wrongly most of the time


def test_persistent_wrong_names_recur_across_images_and_samples(looks_bench: dict) -> None:
    model, _ = _appearance_model(looks_bench["root"])
    old = NoiseModel(load_profile("strong"), model.known, {"domains": model.domains}, seed=0)
    by_class: dict[str, list] = {}
    old_hallucinated = []
    for i, k in enumerate(model.known):
        for s in range(20):
            by_class.setdefault(k.species, []).append((i, model.answer(i, s, 1.0)))
            d = old.answer(i, s, 1.0)
            old_hallucinated += [d.name] if d.outcome == "hallucinated" else []
    persistent_made_up = persistent_wrong = made_up_total = wrong_total = 0
    for species, draws in by_class.items():
        confusions, hallucinations = model.persistent_names("birds", species)
        wrong = [(i, d.name) for i, d in draws if d.outcome in ("sibling", "unrelated")]
        made_up = [(i, d.name) for i, d in draws if d.outcome == "hallucinated"]
        persistent_made_up += sum(m in hallucinations for _, m in made_up)
        persistent_wrong += sum(m in confusions for _, m in wrong)
        made_up_total, wrong_total = made_up_total + len(made_up), wrong_total + len(wrong)
        if len(made_up) >= 4:  # a made-up name recurs on several images of its class
            assert max(len({i for i, m in made_up if m == n}) for n in hallucinations) >= 2, species
    assert persistent_made_up >= 0.75 * made_up_total  # 0.9 expected: the class's own few made-up names
    assert persistent_wrong >= 0.6 * wrong_total  # wrong species names are mostly the class's few confusions
    # The old profiles invent a fresh name nearly every time.
    assert len(set(old_hallucinated)) >= 0.8 * len(old_hallucinated)


def test_samples_vary_with_hardness(looks_bench: dict) -> None:
    model, _ = _appearance_model(looks_bench["root"])
    distinct = [len({model.answer(i, s, 0.7).name for s in range(10)}) for i in range(len(model.known))]
    hard = [d for i, d in enumerate(distinct) if model.is_hard(i)]
    easy = [d for i, d in enumerate(distinct) if not model.is_hard(i)]
    assert np.mean(hard) > np.mean(easy) + 0.5
    assert all(len({model.answer(i, s, 0.0).name for s in range(4)}) == 1 for i in range(len(model.known)))
    again, _ = _appearance_model(looks_bench["root"])  # same seed, same answers
    assert [again.answer(i, 3, 0.7).name for i in range(20)] == [model.answer(i, 3, 0.7).name for i in range(20)]


def test_appearance_profiles_load_by_name_and_file_and_serve(looks_bench: dict, tmp_path) -> None:
    import json

    import httpx
    import yaml

    from near_ray.errors import NearRayError
    from near_ray.sim.annotator import AnnotatorServer

    for name in ("appearance-strong", "appearance-weak"):
        assert load_profile(name).appearance is not None
    spec = yaml.safe_load(load_profile("appearance-strong").model_dump_json())
    spec.update(name="mine", hard_fraction=0.4)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(spec))
    model, _ = _appearance_model(looks_bench["root"], str(path))
    assert sum(model.is_hard(i) for i in range(len(model.known))) == round(0.4 * len(model.known))
    spec["appearance"]["resemblance"] = 1.0
    path.write_text(json.dumps(spec))
    with pytest.raises(NearRayError, match="appearance.resemblance"):
        load_profile(str(path))
    root = looks_bench["root"]
    with AnnotatorServer(root, profile="appearance-strong", seed=0) as ann:
        import base64

        data = (Storage().read_bytes(f"{root}/{looks_bench['lookalike']}"))
        body = {"model": "m", "temperature": 0.0, "seed": 1, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What bird is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}]}]}
        r = httpx.post(f"{ann.base_url}/chat/completions", json=body, timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert ann.stats()["profile"] == "appearance-strong" and ann.stats()["outcomes"]["unknown_image"] == 0


def test_appearance_profiles_keep_their_outcome_mix(bench: str) -> None:
    """Only where the errors fall changes: the mix over images and samples is still the profile's."""
    for profile in ("appearance-strong", "appearance-weak"):
        model, _ = _appearance_model(bench, profile, seed=1)
        draws = [model.answer(i, s, 0.7).outcome for i in range(len(model.known)) for s in range(6)]
        share = {o: draws.count(o) / len(draws) for o in set(draws)}
        want = model.profile.outcomes
        for outcome in ("exact", "coarse", "hallucinated", "refusal"):
            assert abs(share.get(outcome, 0) - want[outcome]) <= 0.07, (profile, outcome, share)
        named = share.get("sibling", 0) + share.get("unrelated", 0)
        assert abs(named - want["sibling"] - want["unrelated"]) <= 0.07, (profile, share)
