"""Which images a capped run asks the MLLM about: the discovery set (``label.select``, ``data.max_images``).

- ``random`` (default): a seeded uniform random sample. Per domain, the images with the smallest seeded
  hash of their URI: uniform, independent of listing order, and kept in memory a sample at a time while
  the listing streams (a bottom-k sketch). Samples nest: the sample of k is the first k of the sample of
  10·k, which is how ``diversity`` draws its candidates.
- ``first``: the listing's first ``max_images`` images, domain after domain (streamed, as before this
  option existed).
- ``diversity``: k-center greedy (farthest point first) in the image-embedding space of the run's model
  (``model.*``, embedded by refine's embedder), per domain, over a seeded random sample of
  ``label.select_pool`` × the domain's share. The first pick is the candidate nearest the domain's mean
  embedding; each next one is the candidate farthest from every pick so far.

``random`` and ``diversity`` split ``max_images`` across the domains in proportion to their listed sizes
(largest remainder: exactly the budget, never more). Without ``max_images`` every image is asked about,
whatever the rule. The choice, and why (rule, budget per domain, each image's rank and distance), is
written to ``labels/_selection.json`` with a fingerprint of what it depends on: a rerun whose fingerprint
matches lists and embeds nothing and asks about the same images, so the resume ledger never pays twice.

The compute (``split_budget``, ``BottomK``, ``k_center``, ``choose_diverse``) is numpy only; ray comes in
with the embedder, in ``choose`` only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from near_ray.data.collections import domain_uris, listing_chunks
from near_ray.errors import NearRayError
from near_ray.parts.keys import SEP, digests

if TYPE_CHECKING:
    from near_ray.config import RunConfig
    from near_ray.storage import Storage

log = logging.getLogger(__name__)

_LIST_BATCH = 10_000


class SelectionError(NearRayError):
    """A discovery-set rule that cannot run as configured."""


# ------------------------------------------------------------------------------------------ budgets
def split_budget(sizes: dict[str, int], budget: int | None) -> dict[str, int]:
    """``budget`` images split across domains in proportion to ``sizes`` (largest remainder, ties to the
    larger domain, then to the earlier one): the shares add up to exactly ``min(budget, total)``, and none
    exceeds its domain. ``None`` (no cap), or a budget of every image, gives each domain all of its own."""
    total = sum(sizes.values())
    if budget is None or budget >= total:
        return dict(sizes)
    budget = max(0, int(budget))
    shares = {d: budget * n // total for d, n in sizes.items()}
    position = {d: i for i, d in enumerate(sizes)}
    order = sorted(sizes, key=lambda d: (-(budget * sizes[d] % total), -sizes[d], position[d]))
    for d in order[: budget - sum(shares.values())]:
        shares[d] += 1
    return shares


# ------------------------------------------------------------------------------------------ random
def sample_keys(uris: list[str], seed: int) -> np.ndarray:
    """(n, 2) uint64: a seeded, uniform-looking 128-bit key per URI, the random sample's order."""
    return digests([f"{seed}{SEP}{u}" for u in uris])


class BottomK:
    """The ``k`` URIs with the smallest sample keys of a stream, and how many the stream held."""

    def __init__(self, k: int, seed: int) -> None:
        self.k, self.seed, self.count = max(0, k), seed, 0
        self.keys = np.zeros((0, 2), np.uint64)
        self.uris: list[str] = []

    def add(self, uris: list[str]) -> None:
        self.count += len(uris)
        if not uris or not self.k:
            return
        self.keys = np.concatenate([self.keys, sample_keys(uris, self.seed)])
        self.uris.extend(uris)
        if len(self.uris) > 2 * self.k:
            self._trim()

    def _trim(self) -> None:
        order = np.lexsort((self.keys[:, 1], self.keys[:, 0]))[: self.k]
        self.keys, self.uris = self.keys[order], [self.uris[i] for i in order]

    def result(self) -> list[str]:
        """The sample, smallest key first."""
        self._trim()
        return list(self.uris)


# ------------------------------------------------------------------------------------------ diversity
def k_center(vectors: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """k-center greedy: ``min(budget, n)`` row indices of ``vectors`` in pick order, and each pick's
    Euclidean distance when picked (the first: to the mean, it being the row nearest the mean; each next:
    to the nearest earlier pick, it being the row farthest from all of them). Deterministic: ties go to
    the lower index."""
    x = np.asarray(vectors, dtype=np.float64)
    k = min(max(0, int(budget)), len(x))
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    sq = np.einsum("ij,ij->i", x, x)

    def dist(c: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(sq - 2.0 * (x @ c) + c @ c, 0.0))

    to_mean = dist(x.mean(axis=0))
    picks, dists = [int(np.argmin(to_mean))], [float(to_mean.min())]
    nearest = dist(x[picks[0]])
    nearest[picks[0]] = -np.inf  # a pick is never picked again, duplicates or not
    for _ in range(1, k):
        i = int(np.argmax(nearest))
        picks.append(i)
        dists.append(float(nearest[i]))
        nearest = np.minimum(nearest, dist(x[i]))
        nearest[picks] = -np.inf
    return np.array(picks, np.int64), np.array(dists, np.float64)


def choose_diverse(vectors: dict[str, np.ndarray], budgets: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per domain, ``k_center`` of its candidates' vectors with its share of the budget."""
    return {d: k_center(v, budgets.get(d, 0)) for d, v in vectors.items()}


# ------------------------------------------------------------------------------------------ the stage's hook
def selected_chunks(cfg: RunConfig, storage: Storage) -> Iterator[list[dict[str, str]]]:
    """The label stage's listing: {uri, domain} rows in chunks of ``label.listing_chunk``. Streamed from the
    listing with ``first`` or without a cap; otherwise the chosen images (chosen, or read back)."""
    if cfg.label.select == "first" or cfg.data.max_images is None or labeled_before_select(cfg, storage):
        yield from listing_chunks(cfg, storage)
        return
    rows = [{"uri": r["uri"], "domain": r["domain"]} for r in choose(cfg, storage)["images"]]
    size = cfg.label.listing_chunk
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def labeled_before_select(cfg: RunConfig, storage: Storage) -> bool:
    """A capped workdir labeled before ``label.select`` existed (a label summary, no selection record) and a
    rule left at its default: it keeps asking about the images it was labeled with (the listing's first),
    so an upgrade never pays for a new sample. Naming ``label.select`` chooses anew."""
    if "select" in cfg.label.model_fields_set or storage.exists(cfg.paths.label_selection):
        return False
    if not storage.exists(cfg.paths.label_summary):
        return False
    log.warning("label: %s was labeled under data.max_images before label.select existed: asking about the "
                "listing's first %d images as then (set label.select to choose otherwise)", cfg.paths.labels,
                cfg.data.max_images)
    return True


def check_select(cfg: RunConfig) -> None:
    """Before any slow work: a rule that cannot run here fails now, naming its field."""
    if cfg.label.select == "diversity" and cfg.data.max_images is not None:
        missing = [m for m in ("torch", "open_clip") if importlib.util.find_spec(m) is None]
        if missing:
            raise SelectionError(f"label.select=diversity embeds images with model.arch={cfg.model.arch}, but "
                                 f"{' and '.join(missing)} cannot be imported here; run the label stage in the "
                                 "model's environment, or use label.select=random")


def fingerprint(cfg: RunConfig) -> str:
    """What the choice depends on: the rule, the budget, the seed, the collections (and for diversity the
    candidates' count, the model and the image guard). Compute resources are not part of it."""
    lc = cfg.label
    parts: dict[str, Any] = {
        "rule": lc.select, "budget": cfg.data.max_images, "seed": lc.select_seed,
        "domains": [[d.name, d.uri, d.manifest] for d in cfg.data.domains],
        "extensions": sorted(cfg.data.image_extensions),
    }  # fmt: skip
    if lc.select == "diversity":
        parts.update(pool=lc.select_pool, model=cfg.model.model_dump(mode="json"), max_pixels=lc.image.max_pixels)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def choose(cfg: RunConfig, storage: Storage) -> dict[str, Any]:
    """The selection record (``labels/_selection.json``): the one on storage when its fingerprint matches,
    else a new choice, written before any image is asked about."""
    uri, fp = cfg.paths.label_selection, fingerprint(cfg)
    if storage.exists(uri):
        record = storage.read_json(uri)
        if record.get("fingerprint") == fp:
            log.info("label: %s selection unchanged, asking about the %d images of %s", cfg.label.select,
                     len(record["images"]), uri)
            return record
        log.info("label: selection settings changed since %s: choosing again", uri)
    record = _choose(cfg, storage, fp)
    storage.write_json(uri, record)
    per_domain = {d: v["chosen"] for d, v in record["domains"].items()}
    log.info("label: %s selection of %d images %s written to %s", cfg.label.select, len(record["images"]),
             per_domain, uri)
    return record


def _choose(cfg: RunConfig, storage: Storage, fp: str) -> dict[str, Any]:
    lc, budget = cfg.label, int(cfg.data.max_images or 0)
    keep = budget * (lc.select_pool if lc.select == "diversity" else 1)
    samples: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for d in cfg.data.domains:  # every domain listed in full, holding its sample only
        sketch, batch = BottomK(keep, lc.select_seed), []
        for u in domain_uris(d, cfg, storage):
            batch.append(u)
            if len(batch) >= _LIST_BATCH:
                sketch.add(batch)
                batch = []
        sketch.add(batch)
        samples[d.name], sizes[d.name] = sketch.result(), sketch.count
    budgets = split_budget(sizes, budget)
    domains = {d: {"listed": sizes[d], "budget": budgets[d]} for d in sizes}
    images: list[dict[str, Any]] = []
    if lc.select == "random" or budget >= sum(sizes.values()):
        for d, uris in samples.items():
            chosen = uris[: budgets[d]]
            domains[d].update(candidates=len(uris), chosen=len(chosen))
            images += [{"uri": u, "domain": d, "rank": r, "distance": None} for r, u in enumerate(chosen)]
    else:
        pools = {d: uris[: lc.select_pool * budgets[d]] for d, uris in samples.items()}
        vectors, ids, failed = _embed(pools, cfg, storage)
        for d, (picks, dists) in choose_diverse(vectors, budgets).items():
            domains[d].update(candidates=len(pools[d]), unreadable=failed.get(d, 0), chosen=len(picks))
            if len(picks) < budgets[d]:
                log.warning("label: domain %s: %d readable candidates for a share of %d", d, len(picks), budgets[d])
            images += [{"uri": ids[d][i], "domain": d, "rank": r, "distance": round(float(x), 6)}
                       for r, (i, x) in enumerate(zip(picks.tolist(), dists.tolist(), strict=True))]
    return {"fingerprint": fp, "rule": lc.select, "budget": budget, "seed": lc.select_seed,
            "pool": lc.select_pool if lc.select == "diversity" else None,
            "distance": "euclidean, L2-normalized image embeddings" if lc.select == "diversity" else None,
            "domains": domains, "images": images}  # fmt: skip


def _embed(pools: dict[str, list[str]], cfg: RunConfig, storage: Storage
           ) -> tuple[dict[str, np.ndarray], dict[str, list[str]], dict[str, int]]:  # fmt: skip
    """The candidates' embeddings by refine's embedder (a Ray Data actor pool), per domain in URI order:
    (vectors, their URIs, unreadable count). An image that cannot be read is no candidate."""
    import pandas as pd

    from near_ray.refine.embed import embed_images

    rows = [(u, d) for d, uris in pools.items() for u in uris]
    frame = pd.DataFrame({"image_id": [u for u, _ in rows], "uri": [u for u, _ in rows],
                          "domain": [d for _, d in rows]})  # fmt: skip
    log.info("label: embedding %d candidates to choose %s diverse images", len(frame), cfg.data.max_images)
    emb = embed_images(frame, cfg, storage)  # rows sorted by (domain, image_id = uri): deterministic
    vectors, ids, failed = {}, {}, {}
    domain_of = emb.meta["domain"].to_numpy() if len(emb.meta) else np.zeros(0, object)
    for d in pools:
        mask = domain_of == d
        vectors[d] = emb.vectors[mask] if mask.any() else np.zeros((0, 1), np.float32)
        ids[d] = emb.meta["uri"][mask].tolist() if mask.any() else []
        failed[d] = sum(1 for f in emb.failures if f["domain"] == d)
    return vectors, ids, failed
