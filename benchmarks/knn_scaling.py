"""kNN for the refine stage: exact search against the machine's sgemm peak, approximate indexes' build,
search and recall.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/knn_scaling.py \
        [--exact 10000,30000,100000] [--approx 100000,1000000] [--dim 512] [--k 10]

Exact, side by side in one run: ``near_ray.refine.knn.knn(index="flat")`` (blocked torch matmul +
top-k) and the baseline FAISS ``IndexFlatIP`` search, each as achieved GFLOP/s (2·N²·d per all-vs-all
graph) over the sgemm peak measured here first (numpy and torch, 4096x512 @ 512x8192 float32).
Approximate: IVF and HNSW, build and search timed apart, recall@k on 500 queries against exact
search. Data: clustered unit vectors (like image embeddings of many classes). OPENBLAS_CORETYPE /
OPENBLAS_L2_SIZE (set on some machines for old OpenBLAS builds) slow a current numpy: unset them in
this command only; the JSON records which BLAS kernel ran. Writes benchmarks/results/knn_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from near_ray.refine import knn as knn_mod

RESULTS = Path(__file__).resolve().parent / "results" / "knn_scaling.json"


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(2, n // 50), d)).astype(np.float32)
    x = centers[rng.integers(len(centers), size=n)] + 0.7 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sgemm_peak(d: int, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of one large float32 matrix product, numpy and torch (the best of ``repeats``)."""
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4096, d)).astype(np.float32), rng.normal(size=(d, 8192)).astype(np.float32)
    flops = 2 * 4096 * 8192 * d
    out = {}
    for name, fn in (("numpy", lambda: a @ b), ("torch", lambda ta=torch.from_numpy(a), tb=torch.from_numpy(b): ta @ tb)):
        fn()
        best = min(_timed(fn) for _ in range(repeats))
        out[name] = round(flops / best / 1e9, 1)
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def recall(x: np.ndarray, ids: np.ndarray, k: int, queries: int = 500) -> float:
    rows = np.random.default_rng(1).choice(len(x), min(queries, len(x)), replace=False)
    sims = x[rows] @ x.T
    sims[np.arange(len(rows)), rows] = -np.inf
    truth = np.argpartition(-sims, k, axis=1)[:, :k]
    return float(np.mean([len(set(ids[r]) & set(t)) / k for r, t in zip(rows, truth, strict=True)]))


def faiss_flat(x: np.ndarray, k: int) -> None:
    import faiss

    idx = faiss.IndexFlatIP(x.shape[1])
    idx.add(x)
    for start in range(0, len(x), 65_536):
        idx.search(x[start : start + 65_536], k + 1)


def exact_rows(sizes: list[int], d: int, k: int, peak: float, rows: list[dict], done: Callable[[], None]) -> None:
    for n in sizes:
        x = clustered(n, d)
        flops = 2.0 * n * n * d
        for name, fn in (("near_ray", lambda x=x: knn_mod.knn(x, k, index="flat", use_gpu="no")),
                         ("faiss_flat", lambda x=x: faiss_flat(x, k))):
            seconds = _timed(fn)
            gflops = flops / seconds / 1e9
            rows.append({"n": n, "dim": d, "k": k, "method": name, "seconds": round(seconds, 3),
                         "gflops": round(gflops, 1), "of_peak": round(gflops / peak, 3)})
            print(f"exact {n:>8} {name:>10} {seconds:8.2f} s {gflops:7.1f} GFLOP/s ({gflops / peak:.2f} of peak)")
            done()


def approx_rows(sizes: list[int], d: int, k: int, rows: list[dict], done: Callable[[], None]) -> None:
    for n in sizes:
        x = clustered(n, d)
        for kind in ("ivf", "hnsw"):
            t0 = time.perf_counter()
            idx = knn_mod._build(x, kind, seed=0)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            sampled, value = knn_mod._tune(idx, x, k, kind, seed=0)
            tune = time.perf_counter() - t0
            t0 = time.perf_counter()
            ids = np.full((n, k), -1, np.int64)
            sims = np.full((n, k), np.nan, np.float32)
            for start in range(0, n, 65_536):
                s, i = idx.search(x[start : start + 65_536], k + 1)
                knn_mod._drop_self(i, s, np.arange(start, min(n, start + 65_536)), ids[start:start + 65_536],
                                   sims[start:start + 65_536])
            search = time.perf_counter() - t0
            r = recall(x, ids, k)
            rows.append({"n": n, "dim": d, "k": k, "index": kind, "build_s": round(build, 2), "tune_s": round(tune, 2),
                         "search_s": round(search, 2), "total_s": round(build + tune + search, 2),
                         "setting": {"ivf": "nprobe", "hnsw": "efSearch"}[kind], "value": value,
                         "recall_at_k": round(r, 4)})
            print(f"approx {n:>8} {kind:>5} build {build:7.1f} s tune {tune:6.1f} s search {search:7.1f} s "
                  f"recall {r:.3f} ({rows[-1]['setting']} {value})")
            done()


def cpu_model() -> str:
    """The CPU's model name (Linux), which platform.processor() leaves empty: BLAS speed depends on it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def machine() -> dict:
    import faiss
    from threadpoolctl import threadpool_info

    blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"platform": platform.platform(), "processor": platform.processor() or cpu_model(), "cpus": os.cpu_count(),
            "faiss": faiss.__version__, "faiss_omp_threads": faiss.omp_get_max_threads(), "blas": blas,
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"), "load_average_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exact", default="10000,30000,100000", help="N for exact search ('' to skip)")
    ap.add_argument("--approx", default="100000,1000000", help="N for IVF and HNSW ('' to skip)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    sizes = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    load_before = round(os.getloadavg()[0], 2)
    peak = sgemm_peak(args.dim)
    print(f"sgemm peak: numpy {peak['numpy']} GFLOP/s, torch {peak['torch']} GFLOP/s")
    out: dict = {"sgemm_peak_gflops": peak, "exact": [], "approximate": [], "complete": False}

    def write() -> None:  # after every row: a run stopped early (N = 1M takes long) keeps what it measured
        out["machine"] = {**machine(), "load_average_1m_before": load_before}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    exact_rows(sizes(args.exact), args.dim, args.k, peak["numpy"], out["exact"], write)
    approx_rows(sizes(args.approx), args.dim, args.k, out["approximate"], write)
    out["complete"] = True
    write()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
