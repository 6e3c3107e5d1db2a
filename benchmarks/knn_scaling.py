"""kNN graph build time and recall vs N for the refine stage's FAISS indexes.

    python benchmarks/knn_scaling.py [--sizes 1000,10000,100000] [--dim 512] [--k 10]

Data: clustered unit vectors (like image embeddings of many classes). Recall is measured on 500
random queries against exact search. Prints a table and writes benchmarks/results/knn_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from near_ray.refine.knn import knn


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(2, n // 50), d)).astype(np.float32)
    x = centers[rng.integers(len(centers), size=n)] + 0.7 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall(x: np.ndarray, ids: np.ndarray, k: int, queries: int = 500) -> float:
    rows = np.random.default_rng(1).choice(len(x), min(queries, len(x)), replace=False)
    sims = x[rows] @ x.T
    sims[np.arange(len(rows)), rows] = -np.inf
    truth = np.argpartition(-sims, k, axis=1)[:, :k]
    return float(np.mean([len(set(ids[r]) & set(t)) / k for r, t in zip(rows, truth, strict=True)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "knn_scaling.json"))
    args = ap.parse_args()
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        x = clustered(n, args.dim)
        for kind in ("flat", "ivf", "hnsw"):
            t0 = time.perf_counter()
            ids, _ = knn(x, args.k, index=kind, use_gpu="auto")
            seconds = time.perf_counter() - t0
            row = {"n": n, "dim": args.dim, "k": args.k, "index": kind, "seconds": round(seconds, 3),
                   "images_per_s": round(n / seconds, 1), "recall_at_k": round(recall(x, ids, args.k), 4)}
            results.append(row)
            print(f"{n:>9} {kind:>5} {seconds:8.2f} s {row['images_per_s']:>10.0f} img/s recall {row['recall_at_k']:.3f}")
    import faiss

    out = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "faiss": faiss.__version__, "gpus": faiss.get_num_gpus(),
                       "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
