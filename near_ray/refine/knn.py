"""Cosine k-nearest neighbours over L2-normalized embeddings.

Exact search up to ``exact_max_n`` vectors: blocked matrix products with a top-k per block (torch),
which keeps the cores in sgemm instead of FAISS's flat-index heaps (measured on 2 cores at dim 512:
~0.65 of the sgemm peak against ~0.33 for IndexFlatIP). Above it an approximate FAISS index: IVF
(nlist ~ 4·sqrt(N), trained on a sample) or HNSW. The query itself is removed from its own result by
*index*, never by similarity, so identical vectors (duplicate images) still find each other.

GPU: only where Ray assigned this process a GPU (``refine.knn_gpus`` > 0 runs the search as a Ray
task that reserves one, see ``knn_task``), and then exactly one device, never every GPU of the node.
FAISS's GPU indexes select at most ``GPU_MAX_K`` results and probe at most ``GPU_MAX_K`` lists; a
search that needs more runs on the CPU, saying so in the log.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from near_ray.errors import NearRayError

if TYPE_CHECKING:
    from near_ray.config import RefineConfig

log = logging.getLogger(__name__)

IndexKind = Literal["auto", "flat", "ivf", "hnsw"]
_QUERY_CHUNK = 65_536  # queries per approximate search call: bounds the [chunk, k] result buffers
_QUERY_BLOCK = 4_096  # exact search: query rows per matrix product (large enough for sgemm's peak)
_TILE_FLOATS = 2**27  # exact search: similarities held at once (512 MiB), so N = 1M never needs N² memory
_TRAIN_PER_LIST = 64  # IVF training vectors per list (FAISS warns below 39)
TARGET_RECALL = 0.95  # approximate indexes widen their search until a sample of queries reaches this
_TUNE_QUERIES = 256
GPU_MAX_K = 2048  # FAISS GPU k-selection limit (k and nprobe), GPU_MAX_SELECTION_K in faiss/gpu


class KnnError(NearRayError):
    pass


def assigned_gpu() -> bool:
    """Whether this process may use a GPU: Ray assigned it one (or, outside Ray, torch sees one)."""
    from near_ray.device import torch_device

    return torch_device() == "cuda"


def wants_gpu(use_gpu: bool | str) -> bool:
    """``use_gpu``: "auto" (when this process holds a GPU), "yes"/True (required), "no"/False."""
    has = assigned_gpu()
    if use_gpu in ("yes", True):
        if not has:
            raise KnnError("refine.use_gpu=yes but this process holds no GPU: set refine.knn_gpus=1 (the kNN "
                           "then runs as a Ray task that reserves one), or refine.use_gpu=auto")
        return True
    return use_gpu == "auto" and has


def choose_index(n: int, index: IndexKind, exact_max_n: int) -> str:
    if index != "auto":
        return index
    return "flat" if n <= exact_max_n else "ivf"


def _nlist(n: int) -> int:
    return max(1, min(int(4 * math.sqrt(n)), n // _TRAIN_PER_LIST or 1))


# ------------------------------------------------------------------------------------------ exact
def exact_knn(x: np.ndarray, kk: int, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """All-vs-all exact kNN by blocked matrix products: (ids int64 [N, kk], sims float32 [N, kk]).

    The diagonal of each block is set to -inf before the top-k, so a row never finds itself and its
    identical twins still do. Within a row, equal similarities are ordered by index.
    """
    import torch

    n = len(x)
    with warnings.catch_warnings():  # read-only arrays (Ray's object store) are fine: xt is never written
        warnings.simplefilter("ignore", UserWarning)
        xt = torch.from_numpy(x).to(device)
    block = max(1, min(_QUERY_BLOCK, n))
    tile = max(kk + 1, min(n, _TILE_FLOATS // block))  # database columns per product
    out_i = np.empty((n, kk), dtype=np.int64)
    out_s = np.empty((n, kk), dtype=np.float32)
    buf = torch.empty((block, tile), dtype=torch.float32, device=device)
    for q0 in range(0, n, block):
        q = xt[q0 : q0 + block]
        best_s = best_i = None
        for c0 in range(0, n, tile):
            c1 = min(n, c0 + tile)
            sims = torch.mm(q, xt[c0:c1].T, out=buf[: len(q), : c1 - c0])
            lo, hi = max(q0, c0), min(q0 + len(q), c1)
            if lo < hi:  # this tile holds some of the block's own rows: never their own neighbour
                rows = torch.arange(lo, hi, device=device)
                sims[rows - q0, rows - c0] = -math.inf
            s, i = torch.topk(sims, min(kk, c1 - c0), dim=1)
            i += c0
            if best_s is not None:  # merge with the columns seen so far
                s, j = torch.topk(torch.cat([best_s, s], 1), kk, dim=1)
                i = torch.gather(torch.cat([best_i, i], 1), 1, j)
            best_s, best_i = s, i
        assert best_s is not None and best_i is not None
        s_np, i_np = best_s.cpu().numpy(), best_i.cpu().numpy()
        order = np.lexsort((i_np, -s_np), axis=1)  # ties by index: deterministic whatever top-k chose
        out_s[q0 : q0 + len(q)] = np.take_along_axis(s_np, order, 1)
        out_i[q0 : q0 + len(q)] = np.take_along_axis(i_np, order, 1)
    return out_i, out_s


# ------------------------------------------------------------------------------------------ approximate
def _build(x: np.ndarray, kind: str, seed: int) -> Any:
    import faiss

    n, d = x.shape
    if kind == "hnsw":
        idx = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = 80
    elif kind == "ivf":
        nlist = _nlist(n)
        idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = x
        if n > nlist * 256:  # k-means on a sample: training on millions of vectors buys nothing
            sample = x[np.random.default_rng(seed).choice(n, nlist * 256, replace=False)]
        idx.train(sample)  # nprobe is set by _tune
    else:
        raise KnnError(f"refine.index: unknown index '{kind}' (auto, flat, ivf, hnsw)")
    idx.add(x)
    return idx


def _to_gpu(idx: Any) -> Any:
    import faiss

    res = faiss.StandardGpuResources()
    gpu_idx = faiss.index_cpu_to_gpu(res, 0, idx)  # the one device Ray gave this process (CUDA_VISIBLE_DEVICES)
    gpu_idx.near_ray_resources = res  # keep the resources alive as long as the index
    return gpu_idx


def gpu_refusal(kind: str, kk: int, probe: int | None = None, gpu_build: bool | None = None) -> str | None:
    """Why FAISS cannot run this search on a GPU (then it runs on the CPU), or None when it can.
    ``gpu_build``: whether the installed FAISS has GPU support (None: ask it)."""
    if gpu_build is None:
        import faiss

        gpu_build = hasattr(faiss, "StandardGpuResources")
    if not gpu_build:
        return "this FAISS build has no GPU support (faiss-cpu)"
    if kind == "hnsw":
        return "FAISS has no GPU HNSW"
    if kk + 1 > GPU_MAX_K:  # k + 1: the query finds itself first
        return f"k={kk} exceeds FAISS's GPU selection limit ({GPU_MAX_K - 1} neighbours)"
    if kind == "ivf" and probe is not None and probe > GPU_MAX_K:
        return f"nprobe={probe} exceeds FAISS's GPU limit ({GPU_MAX_K})"
    return None


def _approximate(x: np.ndarray, kk: int, kind: str, gpu: bool, seed: int) -> tuple[Any, float, bool]:
    idx = _build(x, kind, seed)
    recall, value = _tune(idx, x, kk, kind, seed)
    if gpu and (reason := gpu_refusal(kind, kk, value)):
        log.info("knn: %s; searching on the CPU", reason)
        gpu = False
    if gpu:
        idx = _to_gpu(idx)
        idx.nprobe = value
    return idx, recall, gpu


def _tune(idx: Any, x: np.ndarray, kk: int, kind: str, seed: int) -> tuple[float, int]:
    """Double nprobe (IVF) or efSearch (HNSW) until a sample of queries finds TARGET_RECALL of its true
    neighbours: (recall, the setting). How far to search depends on how clustered the data is, which
    no fixed setting knows; exact search for a few hundred queries costs little next to the index."""
    import faiss

    q = x[np.random.default_rng(seed).choice(len(x), min(len(x), _TUNE_QUERIES), replace=False)]
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    truth = exact.search(q, kk + 1)[1]
    space = faiss.ParameterSpace()
    name, value = ("nprobe", 8) if kind == "ivf" else ("efSearch", max(64, 2 * (kk + 1)))
    limit = _nlist(len(x)) if kind == "ivf" else 4096
    value = min(value, limit)
    while True:
        space.set_index_parameter(idx, name, value)
        found = idx.search(q, kk + 1)[1]
        recall = float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))
        if recall >= TARGET_RECALL or value >= limit:
            return recall, value
        value = min(limit, 2 * value)


# ------------------------------------------------------------------------------------------ the search
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
    if kind == "flat":
        out = exact_knn(x, kk, "cuda" if gpu else "cpu")
        log.info("knn: %d vectors, dim %d, k=%d, exact on %s", n, x.shape[1], kk, "gpu" if gpu else "cpu")
        return out
    idx, recall, gpu = _approximate(x, kk, kind, gpu, seed)
    log.info("knn: %d vectors, dim %d, k=%d, index %s on %s, sampled recall %.3f",
             n, x.shape[1], kk, kind, "gpu" if gpu else "cpu", recall)
    out_i = np.full((n, kk), -1, dtype=np.int64)
    out_s = np.full((n, kk), np.nan, dtype=np.float32)
    for start in range(0, n, _QUERY_CHUNK):
        stop = min(n, start + _QUERY_CHUNK)
        sims, ids = idx.search(x[start:stop], kk + 1)
        _drop_self(ids, sims, np.arange(start, stop), out_i[start:stop], out_s[start:stop])
    return out_i, out_s


def knn_task_options(rc: RefineConfig) -> dict[str, Any] | None:
    """Ray task options for the refine stage's kNN, or None to search in the calling process.

    With ``refine.knn_gpus`` > 0 the search runs as a Ray task that reserves that GPU share: the driver
    usually sits on a CPU-only head, and a GPU it used would be one Ray gave somebody else.
    """
    if rc.knn_gpus <= 0:
        return None
    return {"num_gpus": rc.knn_gpus, "num_cpus": rc.knn_cpus, "max_retries": 1,
            "name": "near_ray.refine.knn"}


def knn_for_config(vectors: np.ndarray, rc: RefineConfig, seed: int = 0) -> Any:
    """The refine stage's kNN of one domain: an ObjectRef of ``knn``'s result when it runs as a Ray
    task (``knn_task_options``), else the result itself. ``resolve`` turns either into the result."""
    options = knn_task_options(rc)
    args = (rc.k, rc.index, rc.exact_max_n, rc.use_gpu, seed)
    if options is None:
        return knn(vectors, *args)
    import ray

    # max_calls=1: the worker exits after the search, and its CUDA context and cached GPU memory with it.
    # Ray sets that for GPU tasks only when num_gpus is given to ray.remote itself, not to .options().
    return ray.remote(max_calls=1)(knn).options(**options).remote(vectors, *args)


def resolve(result: Any) -> tuple[np.ndarray, np.ndarray]:
    import ray

    return ray.get(result) if isinstance(result, ray.ObjectRef) else result


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
