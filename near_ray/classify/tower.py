"""The image tower as a Ray Data job: read + decode in tasks, the bundle's CLIP in an actor pool.

    from_items(URIs) -> read_images (tasks: read, hash, ask the ledger, decode, resize/crop to the
    bundle's input size, uint8 pixels) -> ImageTower (actors: normalize, encode, rank) -> rows

The tasks ship uint8 pixels at the model's input size (4x fewer bytes than float tensors), made by
the bundle's preprocessor and encoded with ``encode_pixels`` (``near_ray.model.preprocess``, the one
pixel path every stage takes), so the pixels and the answers are those of ``Bundle.classify`` on the
same file. Failures never stop the job: an image that cannot be read or
decoded becomes a ``bad_image`` row naming the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from near_ray.classify.calibration import temperature_scale
from near_ray.classify.table import as_table
from near_ray.device import on_compute_thread
from near_ray.errors import NearRayError
from near_ray.images import decode_image, fetch
from near_ray.model.preprocess import PixelSpec, encode_pixels, preprocessor
from near_ray.storage import Storage

if TYPE_CHECKING:
    import ray.data

    from near_ray.config import RunConfig
    from near_ray.parts import ResumeLedger

PIXELS_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("uri", pa.string()), ("domain", pa.string()), ("pixels", pa.binary()),
     ("error", pa.string())]
)  # fmt: skip


@dataclass(frozen=True)
class Target:
    """Where one domain's images go: a bundle (by URI), the vocabulary domain inside it, its pixel spec."""

    bundle: str
    inner: str | None  # the bundle's domain to rank over (None: its whole vocabulary)
    model_version: str
    spec: PixelSpec  # the bundle's (config.json "preprocess")


# ------------------------------------------------------------------------------------------ read tasks

def read_images(
    batch: pa.Table,
    *,
    storage: Storage,
    targets: dict[str, Target],
    ledger: ResumeLedger | None,
    max_pixels: int,
    min_side: int,
) -> pa.Table:
    """Read, hash, plan, decode: pixel rows for what is still to do (error rows for bad files)."""
    items = batch.select(["uri", "domain"]).to_pylist()
    fetched = fetch(storage, [it["uri"] for it in items])
    plans = (ledger.plan([(it["uri"], it["domain"], i) for it, (_, i) in zip(items, fetched, strict=True)])
             if ledger is not None else [[0]] * len(items))  # fmt: skip
    rows = []
    for it, (blob, iid), plan in zip(items, fetched, plans, strict=True):
        if not plan:  # skipped (a row of this version exists) or copied (identical bytes)
            continue
        row = {"image_id": iid, "uri": it["uri"], "domain": it["domain"], "pixels": b"", "error": None}
        if not isinstance(blob, bytes):
            row["error"] = f"{it['uri']}: {blob}"
        else:
            try:
                im = decode_image(blob, it["uri"], max_pixels, min_side, setting="label.image")
                row["pixels"] = preprocessor(targets[it["domain"]].spec).pixels(im).tobytes()
            except NearRayError as e:
                row["error"] = str(e)
            except Exception as e:  # a transform failing on an odd image must not stop the job
                row["error"] = f"{it['uri']}: cannot prepare the image: {type(e).__name__}: {e}"
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=PIXELS_SCHEMA)


# ------------------------------------------------------------------------------------------ the actor
class ImageTower:
    """Ray Data callable class: pixel rows -> prediction rows (and, for calibration, probability rows)."""

    def __init__(self, targets: dict[str, Target], storage: Storage, top_k: int, abstain_threshold: float | None,
                 temperatures: dict[str, float], threads: int, with_probs: bool = False) -> None:  # fmt: skip
        on_compute_thread(self._load, {t.bundle for t in targets.values()}, storage, threads)
        self.targets, self.top_k, self.threshold = targets, top_k, abstain_threshold
        self.temperatures, self.with_probs = temperatures, with_probs

    def _load(self, uris: set[str], storage: Storage, threads: int) -> None:
        import torch

        from near_ray.device import torch_device
        from near_ray.model.bundle import load_bundle

        torch.set_num_threads(max(1, threads))  # fractional-CPU actors must not spawn one thread per core
        self.device = torch_device()
        self.bundles = {uri: load_bundle(uri, storage, device=self.device) for uri in uris}

    def __call__(self, batch: pa.Table) -> pa.Table:
        """On the process's compute thread (``near_ray.device.compute_thread``), like the model's load."""
        return on_compute_thread(self._classify, batch)

    def _classify(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[dict[str, Any] | None] = [None] * len(rows)
        probs_out: list[list[float] | None] = [None] * len(rows)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            target = self.targets[r["domain"]]
            if r["error"]:
                out[i] = {**_base(r, target), "status": "bad_image", "source": "none", "error": r["error"]}
            else:
                groups.setdefault(target.bundle, []).append(i)
        for uri, idx in groups.items():
            bundle, spec = self.bundles[uri], self.targets[rows[idx[0]]["domain"]].spec
            pixels = [np.frombuffer(rows[i]["pixels"], dtype=np.uint8).reshape(spec.size, spec.size, 3) for i in idx]
            emb = encode_pixels(bundle.clip.model, preprocessor(spec).batch(pixels, self.device), self.device)
            by_domain: dict[str, list[int]] = {}
            for j, i in enumerate(idx):
                by_domain.setdefault(rows[i]["domain"], []).append(j)
            for domain, js in by_domain.items():
                target = self.targets[domain]
                probs = bundle.probabilities(emb[js], target.inner)
                conf = temperature_scale(probs, self.temperatures.get(target.bundle, 1.0)).max(axis=1)
                mask = bundle.domain_mask(target.inner)
                for j, p, c in zip(js, probs, conf, strict=True):
                    out[idx[j]] = self._row(rows[idx[j]], target, bundle, p, float(c))
                    if self.with_probs:
                        probs_out[idx[j]] = p[mask].astype(np.float32).tolist()
        table = as_table([r for r in out if r is not None])  # every row got one: a prediction or bad_image
        if self.with_probs:
            table = table.append_column("probs", pa.array(probs_out, pa.list_(pa.float32())))
        return table

    def _row(self, row: dict[str, Any], target: Target, bundle: Any, probs: np.ndarray, confidence: float) -> dict:
        pred = bundle.rank(probs, target.inner, self.top_k, self.threshold)
        return {
            **_base(row, target),
            "name": None if pred.abstained else pred.names[0],
            "score": pred.scores[0],
            "confidence": confidence,
            "top_k_names": pred.names,
            "top_k_scores": pred.scores,
            "abstained": pred.abstained,
            "source": "none" if pred.abstained else "clip",
            "status": "abstained" if pred.abstained else "ok",
        }


def _base(row: dict[str, Any], target: Target) -> dict[str, Any]:
    return {"image_id": row["image_id"], "uri": row["uri"], "domain": row["domain"], "abstained": False,
            "new_name": False, "model_version": target.model_version, "error": None, "mllm_cost_usd": 0.0}  # fmt: skip


# ------------------------------------------------------------------------------------------ the dataset
def tower_dataset(
    items: list[dict[str, str]],
    cfg: RunConfig,
    targets: dict[str, Target],
    storage: Storage,
    *,
    temperatures: dict[str, float] | None = None,
    ledger: ResumeLedger | None = None,
    with_probs: bool = False,
) -> ray.data.Dataset:
    """``items`` ({"uri", "domain"}) -> a dataset of prediction rows (SCHEMA, plus ``probs`` when asked)."""
    import ray.data

    cc = cfg.classify
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / cc.batch_size)))
    ds = ds.map_batches(
        read_images,
        fn_kwargs={"storage": storage, "targets": targets, "ledger": ledger,
                   "max_pixels": cfg.label.image.max_pixels, "min_side": cfg.label.image.min_side},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=cc.read_cpus,
        # Decoding may hold a max_pixels canvas; asking for that memory also keeps the reads a task
        # operator of their own (not fused into the actors), so decoding scales with the cluster.
        memory=min(4 * cfg.label.image.max_pixels, 2**30),
    )  # fmt: skip
    threads = cc.torch_threads or max(1, math.ceil(cc.actor_cpus))
    return ds.map_batches(
        ImageTower,
        fn_constructor_kwargs={"targets": targets, "storage": storage, "top_k": cc.top_k,
                               "abstain_threshold": cc.abstain_threshold, "temperatures": temperatures or {},
                               "threads": threads, "with_probs": with_probs},
        batch_size=cc.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cc.pool_size),
        num_cpus=cc.actor_cpus,
        num_gpus=cc.gpus_per_actor,
    )  # fmt: skip
