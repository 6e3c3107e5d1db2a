"""CLIP image embeddings as a Ray Data actor-pool stage.

Each actor builds the CLIP model once, reads its batch's images from storage with a few threads
(object-store reads are I/O bound), decodes them with the same guard as the label stage and brings
them to the model's input pixels (the model's preprocessor, ``near_ray.model.preprocess``, in those
threads), then normalizes and encodes the batch in the actor's own thread with ``encode_pixels``
(its precision rule: fp16 autocast when the actor holds a GPU). No torch op runs in the read threads:
a thread that runs one gets an OpenMP team of its own, and teams competing for the same cores slow
every parallel op of the forward pass. An image
that cannot be read or decoded becomes a failure row naming its URI; the run goes on without it.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from near_ray.console import Progress
from near_ray.device import on_compute_thread, torch_device
from near_ray.errors import NearRayError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from near_ray.config import ModelConfig, RunConfig
    from near_ray.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    """Embedded images (one row per image_id) and the images that could not be embedded."""

    meta: pd.DataFrame  # image_id, uri, domain
    vectors: np.ndarray  # [N, D] float32, L2-normalized, row i belongs to meta row i
    failures: list[dict[str, str]]  # {"image_id", "uri", "domain", "error"}
    # seconds from the start of embed_images to its first batch of embeddings (the actor pool's start-up:
    # worker processes, imports, the model) and how many images that batch held; None without a batch
    first_batch_s: float | None = None
    first_batch_images: int = 0


def unique_images(labels: pd.DataFrame) -> pd.DataFrame:
    """One row per image_id (identical bytes at two URIs are one image): image_id, uri, domain."""
    df = labels[["image_id", "uri", "domain"]].dropna(subset=["image_id", "uri"])
    return df.sort_values(["domain", "image_id", "uri"]).drop_duplicates("image_id").reset_index(drop=True)


class ImageEmbedder:
    """Ray Data callable class: a batch of (image_id, uri, domain) -> embeddings and per-row errors."""

    def __init__(self, model_cfg: ModelConfig, storage: Storage, max_pixels: int, threads: int = 1) -> None:
        from near_ray.model.preprocess import Preprocessor

        self.storage = storage
        self.max_pixels = max_pixels
        on_compute_thread(self._build, model_cfg, threads)
        self.preprocessor = Preprocessor(self.clip.pixels)  # geometry in the read threads, normalization per batch
        self.pool = ThreadPoolExecutor(max_workers=8)

    def _build(self, model_cfg: ModelConfig, threads: int) -> None:
        import torch

        from near_ray.model.clip import create_clip

        torch.set_num_threads(max(1, threads))  # fractional-CPU actors must not spawn one thread per core
        self.clip = create_clip(model_cfg, self.storage)
        self.device = torch_device()
        self.clip.model.to(self.device).eval()

    def _load(self, uri: str) -> Any:
        from near_ray.images import decode_image

        try:
            return self.preprocessor.pixels(decode_image(self.storage.read_bytes(uri), uri, self.max_pixels))
        except NearRayError as e:
            return str(e)
        except Exception as e:  # a transform failing on an odd image must not take the actor down
            return f"{uri}: {type(e).__name__}: {e}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        loaded = list(self.pool.map(self._load, batch["uri"].tolist()))
        good = [i for i, x in enumerate(loaded) if not isinstance(x, str)]
        dim = int(self.clip.model_config["embed_dim"])
        vectors = np.zeros((len(loaded), dim), dtype=np.float32)
        if good:
            vectors[good] = on_compute_thread(self._encode, [loaded[i] for i in good])
        errors = np.array([x if isinstance(x, str) else "" for x in loaded], dtype=object)
        return {"image_id": batch["image_id"], "uri": batch["uri"], "domain": batch["domain"],
                "embedding": vectors, "error": errors}

    def _encode(self, pixels: list[np.ndarray]) -> np.ndarray:
        from near_ray.model.preprocess import encode_pixels

        return encode_pixels(self.clip.model, self.preprocessor.batch(pixels, self.device), self.device)


def embed_images(images: pd.DataFrame, cfg: RunConfig, storage: Storage) -> Embeddings:
    """Embed ``images`` (image_id, uri, domain) with ``cfg.model`` on a Ray Data actor pool."""
    import pandas as pd
    import ray

    t0 = time.monotonic()
    rc = cfg.refine
    if images.empty:
        return Embeddings(images.iloc[:0][["image_id", "uri", "domain"]], np.zeros((0, 0), np.float32), [])
    # Enough blocks that every actor gets work, few enough that blocks stay a handful of batches each.
    blocks = max(1, min(len(images), max(2 * rc.embed_actors, math.ceil(len(images) / (4 * rc.embed_batch_size)))))
    # Blocks cut here, not by Dataset.repartition: that is a shuffle of 1-CPU tasks, which starve
    # (the job hangs) when the embedding actors hold all but a fraction of a CPU of the cluster.
    rows = images[["image_id", "uri", "domain"]].reset_index(drop=True)
    ds = ray.data.from_pandas([rows.iloc[part] for part in np.array_split(np.arange(len(rows)), blocks)])
    ds = ds.map_batches(
        ImageEmbedder,
        fn_constructor_kwargs={"model_cfg": cfg.model, "storage": storage, "max_pixels": cfg.label.image.max_pixels,
                               "threads": max(1, math.ceil(rc.embed_actor_cpus))},
        batch_size=rc.embed_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=rc.embed_actors),
        num_cpus=rc.embed_actor_cpus,
        num_gpus=rc.embed_gpus,
    )
    metas, vecs, failures = [], [], []
    first: tuple[float, int] | None = None
    bar = Progress("embed", len(images), "images")
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        first = first or (round(time.monotonic() - t0, 3), len(b["uri"]))
        bar.update(len(b["uri"]))
        err = b["error"].astype(str)
        ok = err == ""
        for i in np.nonzero(~ok)[0]:
            log.warning("refine: skipping image %s: %s", b["uri"][i], err[i])
            failures.append({"image_id": str(b["image_id"][i]), "uri": str(b["uri"][i]),
                             "domain": str(b["domain"][i]), "error": str(err[i])})
        metas.append(pd.DataFrame({k: b[k][ok].astype(str) for k in ("image_id", "uri", "domain")}))
        vecs.append(np.asarray(b["embedding"][ok], dtype=np.float32))
    bar.close()
    first_s, first_n = first or (None, 0)
    if not metas:
        return Embeddings(images.iloc[:0][["image_id", "uri", "domain"]], np.zeros((0, 0), np.float32), failures,
                          first_s, first_n)
    meta = pd.concat(metas, ignore_index=True)
    vectors = np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32)
    order = np.lexsort((meta["image_id"].to_numpy(), meta["domain"].to_numpy()))  # deterministic row order
    return Embeddings(meta.iloc[order].reset_index(drop=True), vectors[order], failures, first_s, first_n)


# ------------------------------------------------------------------------------------------ parquet
def embeddings_table(emb: Embeddings) -> pa.Table:
    """image_id, uri, domain, embedding: list<float32> (the embeddings.parquet contract)."""
    import pyarrow as pa

    n, d = emb.vectors.shape if emb.vectors.size else (len(emb.meta), 0)
    values = pa.array(emb.vectors.reshape(-1), type=pa.float32())
    if n * d < 2**31:
        vectors = pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * d, type=pa.int32()), values)
    else:  # beyond ~4M images x 512 floats the list offsets overflow int32
        vectors = pa.LargeListArray.from_arrays(pa.array(np.arange(n + 1) * d, type=pa.int64()), values)
    return pa.table({
        "image_id": pa.array(emb.meta["image_id"].tolist(), pa.string()),
        "uri": pa.array(emb.meta["uri"].tolist(), pa.string()),
        "domain": pa.array(emb.meta["domain"].tolist(), pa.string()),
        "embedding": vectors,
    })


def read_embeddings(uri: str, storage: Storage) -> Embeddings:
    """embeddings.parquet back into metadata + an [N, D] float32 matrix."""
    table = storage.read_parquet(uri)
    meta = table.select(["image_id", "uri", "domain"]).to_pandas()
    col = table.column("embedding").combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    vectors = values.reshape(len(meta), -1) if len(meta) else np.zeros((0, 0), np.float32)
    return Embeddings(meta, vectors, [])
