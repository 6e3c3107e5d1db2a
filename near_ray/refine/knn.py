"""Cosine k-nearest neighbours over L2-normalized embeddings with FAISS.

Exact search (IndexFlatIP) up to ``exact_max_n`` vectors; above it an IVF index (nlist ~ 4·sqrt(N),
trained on a sample) or HNSW. A GPU index when FAISS sees GPUs and the config allows it. The query
itself is removed from its own result by *index*, never by similarity, so identical vectors
(duplicate images) still find each other.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np

from near_ray.errors import NearRayError

log = logging.getLogger(__name__)

IndexKind = Literal["auto", "flat", "ivf", "hnsw"]
_QUERY_CHUNK = 65_536  # queries per search call: bounds the [chunk, k] result buffers for millions of rows
_TRAIN_PER_LIST = 64  # IVF training vectors per list (FAISS warns below 39)
TARGET_RECALL = 0.95  # approximate indexes widen their search until a sample of queries reaches this
_TUNE_QUERIES = 256


class KnnError(NearRayError):
    pass


def _gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def wants_gpu(use_gpu: bool | str) -> bool:
    """``use_gpu``: "auto" (when FAISS sees a GPU), "yes"/True (required), "no"/False."""
    gpus = _gpu_count()
    if use_gpu in ("yes", True):
        if gpus == 0:
            raise KnnError("refine.use_gpu=yes but FAISS sees no GPU (install faiss-gpu, or set refine.use_gpu=auto)")
        return True
    return use_gpu == "auto" and gpus > 0


def choose_index(n: int, index: IndexKind, exact_max_n: int) -> str:
    if index != "auto":
        return index
    return "flat" if n <= exact_max_n else "ivf"


def _nlist(n: int) -> int:
    return max(1, min(int(4 * math.sqrt(n)), n // _TRAIN_PER_LIST or 1))


def _build(x: np.ndarray, kind: str, gpu: bool, seed: int) -> object:
    import faiss

    n, d = x.shape
    if kind == "flat":
        idx = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        idx = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = 80
        gpu = False  # FAISS has no GPU HNSW
    elif kind == "ivf":
        nlist = _nlist(n)
        idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = x
        if n > nlist * 256:  # k-means on a sample: training on millions of vectors buys nothing
            sample = x[np.random.default_rng(seed).choice(n, nlist * 256, replace=False)]
        idx.train(sample)  # nprobe is set by _tune
    else:
        raise KnnError(f"refine.index: unknown index '{kind}' (auto, flat, ivf, hnsw)")
    if gpu:
        idx = faiss.index_cpu_to_all_gpus(idx)
    idx.add(x)
    return idx


def knn(
    embeddings: np.ndarray,
    k: int,
    index: IndexKind = "auto",
    exact_max_n: int = 200_000,
    use_gpu: bool | str = "auto",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows by cosine: (indices int64 [N, k'], similarities float32 [N, k']).

    k' = min(k, N-1). Rows sorted by similarity, most similar first. Approximate indexes may find
    fewer than k' neighbours for a row; the missing slots hold index -1 and similarity NaN.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise KnnError(f"embeddings must be a 2-D array, got shape {x.shape}")
    n = len(x)
    kk = max(0, min(int(k), n - 1))
    if kk == 0:
        return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=np.float32)
    kind = choose_index(n, index, exact_max_n)
    gpu = wants_gpu(use_gpu)
    idx = _build(x, kind, gpu, seed)
    recall = _tune(idx, x, kk, kind, gpu, seed) if kind != "flat" else 1.0
    log.info("knn: %d vectors, dim %d, k=%d, index %s on %s, sampled recall %.3f",
             n, x.shape[1], kk, kind, "gpu" if gpu else "cpu", recall)
    out_i = np.full((n, kk), -1, dtype=np.int64)
    out_s = np.full((n, kk), np.nan, dtype=np.float32)
    for start in range(0, n, _QUERY_CHUNK):
        stop = min(n, start + _QUERY_CHUNK)
        sims, ids = idx.search(x[start:stop], kk + 1)
        _drop_self(ids, sims, np.arange(start, stop), out_i[start:stop], out_s[start:stop])
    return out_i, out_s


def _tune(idx: object, x: np.ndarray, kk: int, kind: str, gpu: bool, seed: int) -> float:
    """Double nprobe (IVF) or efSearch (HNSW) until a sample of queries finds TARGET_RECALL of its true neighbours.

    How far to search depends on how clustered the data is, which no fixed setting knows; exact
    search for a few hundred queries costs little next to the index itself.
    """
    import faiss

    q = x[np.random.default_rng(seed).choice(len(x), min(len(x), _TUNE_QUERIES), replace=False)]
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    truth = exact.search(q, kk + 1)[1]
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    name, value = ("nprobe", 8) if kind == "ivf" else ("efSearch", max(64, 2 * (kk + 1)))
    limit = _nlist(len(x)) if kind == "ivf" else 4096
    value = min(value, limit)
    while True:
        space.set_index_parameter(idx, name, value)
        found = idx.search(q, kk + 1)[1]
        recall = float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))
        if recall >= TARGET_RECALL or value >= limit:
            return recall
        value = min(limit, 2 * value)


def _drop_self(ids: np.ndarray, sims: np.ndarray, rows: np.ndarray, out_i: np.ndarray, out_s: np.ndarray) -> None:
    """Remove the query's own index (and FAISS's -1 padding), keep the first k' of the rest, in order."""
    keep = (ids != rows[:, None]) & (ids >= 0)
    # Stable compaction: position of each kept entry among the kept entries of its row.
    pos = np.cumsum(keep, axis=1) - 1
    kk = out_i.shape[1]
    sel = keep & (pos < kk)
    r, c = np.nonzero(sel)
    out_i[r, pos[r, c]] = ids[r, c]
    out_s[r, pos[r, c]] = sims[r, c]


def brute_force_knn(embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference kNN in numpy (for tests and small checks): same contract as :func:`knn` with a flat index."""
    x = np.asarray(embeddings, dtype=np.float32)
    n = len(x)
    kk = max(0, min(k, n - 1))
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
    return order.astype(np.int64), np.take_along_axis(sims, order, axis=1).astype(np.float32)
