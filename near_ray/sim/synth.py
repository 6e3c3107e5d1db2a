"""The synthetic fine-grained benchmark: images in a dataset layout, a ground-truth table, captions.

Layout under ``out`` (local folder or s3:// prefix)::

    images/<domain>/<split>/<domain>_<nnnnn>.png   file names never reveal the species
    truth.parquet      path, domain, species, genus, family, split, sha256 (of the PNG bytes)
    taxonomy.json      per domain: meta-class and species → synonyms, scientific name, genus, family, attribute
    captions.parquet   path, caption: attribute descriptions, never a species/genus/family name

Images are written first and the three tables last, so an interrupted run never leaves a truth table
that points at missing images. Every image draws from its own numpy Generator seeded by
(seed, domain, index): the same seed gives the same bytes on every run and machine.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from near_ray.sim.render import render
from near_ray.sim.taxonomy import (
    PALETTE,
    TEMPLATES,
    DomainTaxonomy,
    DomainTemplate,
    Species,
    SynthError,
    build_taxonomy,
    domain_rng,
)
from near_ray.storage import Storage, join

log = logging.getLogger(__name__)

SIMPLE_COLOUR = {c.name.lower(): c.simple for c in PALETTE}
CAPTION_TEMPLATES = (
    "a {size} {colour} {meta} with {a} and {b} on a {bg} background",
    "a photo of a {colour} {meta} with {a}, {b} and {shape}",
    "{a} and {b}: a {size} {colour} {meta}",
    "close-up of a {meta} showing {a}; its colour is {colour}, the background {bg}",
    "a {colour} {meta} with {shape} and {a}",
)


def _check(domains: list[str], species: int, images_per_species: int, image_size: int, test_fraction: float) -> None:
    if not domains:
        raise SynthError("domains: give at least one domain")
    unknown = [d for d in domains if d not in TEMPLATES]
    if unknown:
        raise SynthError(f"domains: unknown domain(s) {unknown}; known domains: {', '.join(sorted(TEMPLATES))}")
    if len(set(domains)) != len(domains):
        raise SynthError(f"domains: duplicate domains in {domains}")
    if species < 2:
        raise SynthError(f"species: need at least 2 species per domain, got {species}")
    if species > 1000:
        raise SynthError(f"species: at most 1000 species per domain, got {species}")
    if images_per_species < 2:
        raise SynthError(f"images_per_species: need at least 2 (one train, one test), got {images_per_species}")
    if image_size < 16:
        raise SynthError(f"image_size: need at least 16 px, got {image_size}")
    if not 0 < test_fraction < 1:
        raise SynthError(f"test_fraction: must be strictly between 0 and 1, got {test_fraction}")


def _plan(tax: DomainTaxonomy, domain: str, images_per_species: int, test_fraction: float,
          seed: int) -> list[dict[str, Any]]:
    """One row per image (species, split, file number); numbers are shuffled so they do not follow species."""
    n_test = min(images_per_species - 1, max(1, round(images_per_species * test_fraction)))
    rows = [
        {"species": s, "split": "test" if k < n_test else "train"}
        for s in tax.species
        for k in range(images_per_species)
    ]
    order = domain_rng(seed, domain, 1).permutation(len(rows))
    digits = max(5, len(str(len(rows))))
    for number, idx in enumerate(order):
        rows[idx]["number"] = number
        rows[idx]["path"] = f"images/{domain}/{rows[idx]['split']}/{domain}_{number:0{digits}d}.png"
    return rows


def _captions(sp: Species, t: DomainTemplate, bg: str, rng: np.random.Generator, n: int = 2) -> list[str]:
    """Attribute descriptions of one image; the distinguishing attribute is in most of them."""
    phrases = {ax.name: ax.phrases[sp.attributes[ax.name]] for ax in t.axes}
    out = []
    for template in rng.permutation(CAPTION_TEMPLATES)[:n]:
        others = [p for k, p in phrases.items() if k != sp.axis]
        a = sp.attribute if rng.random() < 0.85 else str(rng.choice(others))
        b = str(rng.choice([p for p in others if p != a]))
        out.append(str(template).format(
            size=sp.attributes["size"], colour=SIMPLE_COLOUR[sp.attributes["colour"]], meta=t.meta_class, a=a, b=b,
            bg=bg, shape=t.shape_phrases[sp.attributes["shape"]],
        ))
    return out


def _encode(domain: str, sp: Species, image_size: int, seed: int, number: int) -> tuple[bytes, str]:
    rng = domain_rng(seed, domain, 2, number)
    img, bg = render(domain, sp.attributes, image_size, rng)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), bg


def generate(out: str, domains: list[str], species: int, images_per_species: int, image_size: int, seed: int,
             test_fraction: float, storage: Storage) -> dict[str, Any]:
    """Write the synthetic benchmark under ``out`` and return a summary (counts per domain and split)."""
    _check(domains, species, images_per_species, image_size, test_fraction)
    import pyarrow as pa

    t0 = time.monotonic()
    truth: list[dict[str, Any]] = []
    captions: list[dict[str, str]] = []
    taxonomy: dict[str, Any] = {}
    summary: dict[str, Any] = {"out": out, "domains": {}}
    # Rendering is CPU-bound and sequential; uploads overlap with it (S3 PUTs are latency-bound).
    with ThreadPoolExecutor(max_workers=8) as pool:
        for domain in domains:
            tax = build_taxonomy(domain, species, seed)
            taxonomy[domain] = tax.to_json()
            counts = {"train": 0, "test": 0}
            pending = []
            for row in _plan(tax, domain, images_per_species, test_fraction, seed):
                sp: Species = row["species"]
                data, bg = _encode(domain, sp, image_size, seed, row["number"])
                pending.append(pool.submit(storage.write_bytes, join(out, row["path"]), data))
                truth.append({"path": row["path"], "domain": domain, "species": sp.canonical, "genus": sp.genus,
                              "family": sp.family, "split": row["split"], "sha256": hashlib.sha256(data).hexdigest()})
                cap_rng = domain_rng(seed, domain, 3, row["number"])
                captions += [{"path": row["path"], "caption": c}
                             for c in _captions(sp, tax.template, bg, cap_rng)]
                counts[row["split"]] += 1
            for f in pending:
                f.result()  # surface the first failed write before any table is written
            summary["domains"][domain] = {"species": len(tax.species), "images": counts}
    truth.sort(key=lambda r: r["path"])
    captions.sort(key=lambda r: r["path"])
    storage.write_json(join(out, "taxonomy.json"), {
        "domains": taxonomy,
        "generator": {"domains": domains, "species": species, "images_per_species": images_per_species,
                      "image_size": image_size, "seed": seed, "test_fraction": test_fraction},
    })
    storage.write_parquet(join(out, "captions.parquet"), pa.Table.from_pylist(captions))
    storage.write_parquet(join(out, "truth.parquet"), pa.Table.from_pylist(truth))  # last: marks completion
    summary["images"] = len(truth)
    summary["captions"] = len(captions)
    summary["seconds"] = round(time.monotonic() - t0, 2)
    log.info("synthetic benchmark: %d images, %d domains → %s (%.1f s)", len(truth), len(domains), out,
             summary["seconds"])
    return summary
