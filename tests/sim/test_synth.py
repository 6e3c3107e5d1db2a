"""The synthetic fine-grained benchmark: layout, determinism, taxonomy structure, captions, S3, bad input."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from near_ray.errors import NearRayError
from near_ray.sim.synth import generate
from near_ray.sim.taxonomy import TEMPLATES, SynthError, build_taxonomy
from near_ray.storage import Storage, join

DOMAINS = ["birds", "flowers", "mushrooms", "butterflies"]


def _gen(out: str, seed: int = 0, **kw) -> dict:
    args = dict(domains=["birds", "flowers"], species=6, images_per_species=4, image_size=48, seed=seed,
                test_fraction=0.5, storage=Storage())
    args.update(kw)
    return generate(out=out, **args)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth") / "bench")
    _gen(out, domains=DOMAINS, species=8, images_per_species=6, image_size=64)
    return out


def test_layout_columns_and_counts(bench: str) -> None:
    st = Storage()
    truth = st.read_parquet(join(bench, "truth.parquet")).to_pandas()
    assert list(truth.columns) == ["path", "domain", "species", "genus", "family", "split", "sha256"]
    assert len(truth) == 4 * 8 * 6
    for row in truth.itertuples():
        assert re.fullmatch(rf"images/{row.domain}/{row.split}/{row.domain}_\d{{5}}\.png", row.path)
        data = st.read_bytes(join(bench, row.path))
        assert Image.open(io.BytesIO(data)).size == (64, 64)
    per = truth.groupby(["domain", "species", "split"]).size()
    assert (per == 3).all()  # test_fraction 0.5 of 6 images, for every species
    tax = st.read_json(join(bench, "taxonomy.json"))
    assert set(tax["domains"]) == set(DOMAINS)
    assert tax["domains"]["birds"]["meta_class"] == "bird"
    entry = next(iter(tax["domains"]["flowers"]["species"].values()))
    assert {"synonyms", "scientific_name", "genus", "family", "attribute"} <= set(entry)
    assert tax["generator"]["seed"] == 0


def test_sha256_matches_file_bytes(bench: str) -> None:
    import hashlib

    st = Storage()
    truth = st.read_parquet(join(bench, "truth.parquet")).to_pylist()
    for row in truth[:40]:
        assert hashlib.sha256(st.read_bytes(join(bench, row["path"]))).hexdigest() == row["sha256"]
    assert len({r["sha256"] for r in truth}) == len(truth)  # every image is distinct


def test_file_numbers_do_not_follow_species(bench: str) -> None:
    truth = Storage().read_parquet(join(bench, "truth.parquet")).to_pandas()
    birds = truth[truth.domain == "birds"].sort_values("path")
    runs = (birds.species != birds.species.shift()).sum()
    assert runs > len(birds) // 2  # consecutive files mostly change species: numbering was shuffled


def test_names_never_in_paths_or_captions(bench: str) -> None:
    st = Storage()
    tax = st.read_json(join(bench, "taxonomy.json"))["domains"]
    captions = st.read_parquet(join(bench, "captions.parquet")).to_pandas()
    truth = st.read_parquet(join(bench, "truth.parquet")).to_pandas()
    assert set(captions.path) == set(truth.path)
    names = set()
    for d in tax.values():
        for canonical, s in d["species"].items():
            names |= {canonical, *s["synonyms"], s["scientific_name"], s["genus"], s["family"], s["genus_common"]}
    text = " ".join(captions.caption).lower()
    paths = " ".join(truth.path).lower()
    for n in names:
        assert n.lower() not in text, n
        assert n.lower() not in paths, n
    assert captions.caption.nunique() > len(captions) // 3  # varied phrasings


def test_siblings_differ_in_exactly_one_visible_attribute() -> None:
    for domain in DOMAINS:
        tax = build_taxonomy(domain, 24, seed=3)
        by_name = {s.canonical: s for s in tax.species}
        assert len(by_name) == 24
        for s in tax.species:
            assert s.siblings, s.canonical
            for sib in (by_name[n] for n in s.siblings):
                diff = [k for k in s.attributes if s.attributes[k] != sib.attributes[k]]
                assert diff == [s.axis], (s.canonical, sib.canonical, diff)
                assert s.genus == sib.genus and s.family == sib.family
        genera = {s.genus: (s.attributes["colour"], s.attributes["size"], s.family) for s in tax.species}
        assert len(set(genera.values())) == len(genera)  # genera differ in colour/size or family


def test_sibling_images_differ_locally() -> None:
    """Regenerating one image as its sibling species changes only part of it (same nuisance draw)."""
    from near_ray.sim.render import render
    from near_ray.sim.taxonomy import domain_rng

    tax = build_taxonomy("birds", 8, seed=0)
    a = tax.species[0]
    b = next(s for s in tax.species if s.canonical == a.siblings[0])
    ia = np.asarray(render("birds", a.attributes, 64, domain_rng(0, "birds", 9))[0], dtype=np.float32)
    ib = np.asarray(render("birds", b.attributes, 64, domain_rng(0, "birds", 9))[0], dtype=np.float32)
    changed = np.abs(ia - ib).max(axis=2) > 40
    assert 3 <= changed.sum() <= 0.15 * 64 * 64  # visible, yet a small region


def test_deterministic_for_a_seed(tmp_path) -> None:
    s1 = _gen(str(tmp_path / "a"), seed=7)
    _gen(str(tmp_path / "b"), seed=7)
    _gen(str(tmp_path / "c"), seed=8)
    st = Storage()
    ta = st.read_parquet(str(tmp_path / "a" / "truth.parquet")).to_pylist()
    tb = st.read_parquet(str(tmp_path / "b" / "truth.parquet")).to_pylist()
    tc = st.read_parquet(str(tmp_path / "c" / "truth.parquet")).to_pylist()
    assert ta == tb
    assert st.read_bytes(str(tmp_path / "a" / "captions.parquet")) == st.read_bytes(str(tmp_path / "b" / "captions.parquet"))
    assert {r["sha256"] for r in ta}.isdisjoint({r["sha256"] for r in tc})
    assert s1["domains"]["birds"]["images"] == {"train": 12, "test": 12}


def test_on_moto_s3(bucket: str) -> None:
    out = f"{bucket}/bench"
    summary = _gen(out, domains=["mushrooms", "butterflies"], species=4, images_per_species=3)
    st = Storage()
    truth = st.read_parquet(f"{out}/truth.parquet").to_pylist()
    assert summary["images"] == len(truth) == 2 * 4 * 3
    listed = {o.uri[len(out) + 1:] for o in st.list(f"{out}/images", suffixes=[".png"])}
    assert listed == {r["path"] for r in truth}
    assert st.exists(f"{out}/taxonomy.json") and st.exists(f"{out}/captions.parquet")


@pytest.mark.parametrize("kw, field", [
    ({"domains": ["birds", "spaceships"]}, "spaceships"),
    ({"species": 1}, "species"),
    ({"images_per_species": 1}, "images_per_species"),
    ({"image_size": 8}, "image_size"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"domains": []}, "domains"),
])
def test_bad_input_is_a_clear_error(tmp_path, kw: dict, field: str) -> None:
    with pytest.raises(NearRayError, match=field) as e:
        _gen(str(tmp_path / "x"), **kw)
    if field == "spaceships":
        assert all(d in str(e.value) for d in TEMPLATES)
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_large_species_counts_build() -> None:
    tax = build_taxonomy("flowers", 200, seed=0)
    names = [s.canonical.lower() for s in tax.species]
    assert len(set(names)) == 200
    surface = names + [syn.lower() for s in tax.species for syn in s.synonyms]
    assert len(set(surface)) == len(surface)  # no synonym collides with another species' name
    with pytest.raises(SynthError):
        build_taxonomy("dragons", 8, seed=0)
