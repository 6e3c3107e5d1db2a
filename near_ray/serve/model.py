"""The model deployment: loaded bundles behind one dynamically batched classify call.

A replica holds a ``Loaded`` snapshot (bundles + domain routes). ``reconfigure`` (Serve's
``user_config``) loads new bundles first and then swaps the snapshot in one assignment, so a batch
always runs on one consistent snapshot and requests in flight are never dropped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve

from near_ray.config import StorageConfig
from near_ray.device import compute_thread, torch_device
from near_ray.errors import NearRayError
from near_ray.model.preprocess import encode_pixels, preprocessor
from near_ray.serve.batching import AdaptiveBatcher
from near_ray.serve.metrics import ModelMetrics
from near_ray.serve.routing import RouteError, Routes

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """One consistent set of bundles and how public domain names route into them."""

    bundles: list[Any]
    routes: Routes
    specs: list[dict[str, Any]]  # per bundle, its pixel spec (``PixelSpec.to_config``) and its ``key``
    loaded_at: float = field(default_factory=time.time)


def bundle_sources(user_config: dict[str, Any]) -> list[tuple[str | None, str]]:
    """``{"bundles": {domain: uri}}`` or ``{"bundle": "uri[,uri…]"}`` -> [(alias or None, uri)]."""
    mapping = user_config.get("bundles") or {}
    if mapping:
        return [(str(d), str(u)) for d, u in mapping.items()]
    uris = [u.strip() for u in str(user_config.get("bundle") or "").split(",") if u.strip()]
    if not uris:
        raise NearRayError("serve: no bundle to serve: set serve.bundle (URI, or a comma-separated list) or serve.bundles")
    return [(None, u) for u in uris]


def load_bundles(sources: list[tuple[str | None, str]], storage_cfg: StorageConfig, device: str) -> Loaded:
    from near_ray.model.bundle import domain_in_bundle, load_bundle
    from near_ray.storage import Storage

    storage = Storage.from_config(storage_cfg)
    bundles, routes = [], {}
    for i, (alias, uri) in enumerate(sources):
        b = load_bundle(uri, storage, device=device)
        bundles.append(b)
        try:  # the same rule as classify's (near_ray.model.bundle.domain_in_bundle)
            names = {alias: domain_in_bundle(alias, b.domains, uri)} if alias else {d: d for d in sorted(set(b.domains)) if d}
        except NearRayError as e:
            raise NearRayError(f"serve.bundles: {e}") from None
        for public, in_bundle in names.items():
            if public in routes:
                raise NearRayError(f"serve: domain '{public}' is served by two bundles ({sources[routes[public][0]][1]}, {uri})")
            routes[public] = (i, in_bundle)
    return Loaded(bundles, Routes(routes, len(bundles)), [{**b.pixels.to_config(), "key": b.pixels.key} for b in bundles])


def top_k_result(bundle: Any, probs: np.ndarray, domain: str | None, top_k: int, threshold: float | None) -> dict[str, Any]:
    """``Bundle.rank`` (the one ranking every stage uses) as the API's JSON."""
    p = bundle.rank(probs, domain, top_k, threshold)
    return {
        "predictions": [{"name": n, "score": s} for n, s in zip(p.names, p.scores, strict=True)],
        "abstained": p.abstained,
        "domain": p.domain,
        "model_version": bundle.model_version,
    }


@serve.deployment(name="Classifier")
class Classifier:
    """Holds the bundles; ``classify`` receives preprocessed pixels and is batched by Serve."""

    def __init__(self, storage: StorageConfig | None = None, device: str | None = None) -> None:

        self._storage = storage or StorageConfig()
        self._device = device or torch_device()
        self._loaded: Loaded | None = None
        self._sources: list[tuple[str | None, str]] = []
        self._abstain_threshold: float | None = None  # serve.abstain_threshold; None = each bundle's own
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._served = 0
        self._batcher_kind = "adaptive"
        # Placeholders: reconfigure() sets the real values from serve.max_batch_size / batch_wait_timeout_s.
        self._batcher = AdaptiveBatcher(self._run_batch, max_batch_size=16)
        self._metrics = ModelMetrics()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the configured bundles, then swap them in; batches already running keep the old ones."""
        # A partial user_config (e.g. only {"bundle": uri}) keeps the current batching settings.
        if "batcher" in user_config:
            self._batcher_kind = str(user_config["batcher"])
        if "max_batch_size" in user_config:  # both batchers, so that switching keeps the settings
            self._batcher.max_batch_size = size = int(user_config["max_batch_size"])
            self._classify_serve_batch.set_max_batch_size(size)
        if "batch_wait_timeout_s" in user_config:
            self._batcher.batch_wait_timeout_s = wait = float(user_config["batch_wait_timeout_s"])
            self._classify_serve_batch.set_batch_wait_timeout_s(wait)
        if "abstain_threshold" in user_config:
            value = user_config["abstain_threshold"]
            self._abstain_threshold = None if value is None else float(value)
        sources = bundle_sources(user_config)
        if sources != self._sources or self._loaded is None:
            loaded = await asyncio.get_running_loop().run_in_executor(  # where the batches will run them
                compute_thread(), load_bundles, sources, self._storage, self._device)
            self._loaded, self._sources = loaded, sources
            self._metrics.serving([b.model_version for b in loaded.bundles])
            log.info("serving %s", [(a, u, b.model_version) for (a, u), b in zip(sources, loaded.bundles, strict=True)])

    def describe(self) -> dict[str, Any]:
        """What the ingress needs: routes, preprocessing, vocabularies, versions."""
        loaded = self._require()
        return {
            "routes": loaded.routes.to_json(),
            "bundles": [
                {"uri": b.uri, "model_version": b.model_version, "preprocess": spec, "vocabulary": b.vocabulary}
                for b, spec in zip(loaded.bundles, loaded.specs, strict=True)
            ],
            "replica": os.getpid(),
        }

    def versions(self) -> list[str]:
        """Cheap readiness probe: the model versions of the loaded bundles."""
        return [b.model_version for b in self._require().bundles]

    def stats(self) -> dict[str, Any]:
        import torch

        return {
            "replica": os.getpid(),
            "device": self._device,
            "requests": self._served,
            "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
            "batcher": self._batcher_kind,
            "torch_threads": torch.get_num_threads(),
            "model_versions": [b.model_version for b in self._require().bundles],
        }

    def _require(self) -> Loaded:
        if self._loaded is None:
            raise NearRayError("serve: the model replica has no bundle loaded yet")
        return self._loaded

    async def classify(self, item: dict[str, Any]) -> dict[str, Any]:
        """item: {"pixels": uint8 [H, W, 3], "domain", "top_k", "key"} -> a result or an error; batched."""
        if self._batcher_kind == "serve":
            return await self._classify_serve_batch(item)
        return await self._batcher.submit(item)

    # serve.batcher: serve. Placeholders: reconfigure() sets the values from the serve config.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _classify_serve_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(compute_thread(), self._run_batch, items)

    def _run_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        loaded = self._require()  # one snapshot for the whole batch, even if a swap lands meanwhile
        self._batch_sizes[len(items)] += 1
        self._served += len(items)
        self._metrics.batch(len(items))
        t0 = time.perf_counter()
        results = self._classify_batch(loaded, items)
        seconds = time.perf_counter() - t0
        self._metrics.answered(results)
        return [dict(r, batch_s=seconds) if "error" not in r else r for r in results]

    def _classify_batch(self, loaded: Loaded, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = [{} for _ in items]
        by_bundle: dict[int, list[int]] = collections.defaultdict(list)
        for j, item in enumerate(items):
            try:
                i, _ = loaded.routes.route(item.get("domain"))
            except RouteError as e:
                results[j] = {"error": {"code": e.code, "message": str(e)}}
                continue
            if item["key"] != loaded.specs[i]["key"]:
                results[j] = {"error": {"code": "stale_preprocessing", "message": "the model was updated; retry"}}
                continue
            by_bundle[i].append(j)
        for i, idx in by_bundle.items():
            bundle = loaded.bundles[i]
            x = preprocessor(bundle.pixels).batch([items[j]["pixels"] for j in idx], self._device)
            emb = encode_pixels(bundle.clip.model, x, self._device)
            for row, j in enumerate(idx):
                inner = loaded.routes.route(items[j].get("domain"))[1]
                probs = bundle.probabilities(emb[row : row + 1], inner)[0]
                result = top_k_result(bundle, probs, inner, int(items[j]["top_k"]), self._abstain_threshold)
                results[j] = dict(result, batch_size=len(items))
        return results
