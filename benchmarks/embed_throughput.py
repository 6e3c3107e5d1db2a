"""The refine stage's embedding step (Ray Data actor pool) against a plain single-process torch loop.

    python benchmarks/embed_throughput.py [--images 2000] [--arch ViT-S-32] [--batch 64] [--cpus 1,1.5]

Same images (the synthetic benchmark's PNGs on local disk), same model (random init: weights do not
change speed), same batch size, same torch threads (``--cpus`` = refine.embed_actor_cpus = the
plain loop's threads). The baseline reads, decodes (``near_ray.images.decode_image``), transforms and
encodes batch by batch in one process, reading a batch's files with the same 8 threads the actor uses.
images/s for each, end to end (model build included on both sides; the Ray side also starts its
actor pool), and their ratio. Writes benchmarks/results/embed_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "embed_throughput.json"


def images(root: str, n: int) -> list[str]:
    from near_ray.sim.synth import generate
    from near_ray.storage import Storage

    per_species = max(2, math.ceil(n / 20))
    generate(root, ["birds"], species=20, images_per_species=per_species, image_size=96, seed=0,
             test_fraction=0.1, storage=Storage())  # fmt: skip
    return sorted(o.uri for o in Storage().list(f"{root}/images", suffixes=[".png"]))[:n]


def plain_loop(uris: list[str], arch: str, batch: int, threads: int) -> dict:
    import torch

    from near_ray.config import ModelConfig
    from near_ray.images import decode_image
    from near_ray.model.clip import create_clip
    from near_ray.model.preprocess import Preprocessor, encode_pixels
    from near_ray.storage import Storage

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    clip = create_clip(ModelConfig(arch=arch, pretrained="random"))
    clip.model.eval()
    prep = Preprocessor(clip.pixels)
    st, pool = Storage(), ThreadPoolExecutor(8)
    out = []
    for start in range(0, len(uris), batch):
        chunk = uris[start : start + batch]
        x = prep.batch(list(pool.map(lambda u: prep.pixels(decode_image(st.read_bytes(u), u)), chunk)))
        out.append(encode_pixels(clip.model, x, "cpu"))
    end = time.perf_counter()
    return _rates(len(uris), t0, end)


def ray_pool(uris: list[str], arch: str, batch: int, cpus: float) -> dict:
    import pandas as pd

    from near_ray.config import RunConfig
    from near_ray.ray_session import ensure_ray
    from near_ray.refine import embed
    from near_ray.storage import Storage

    ensure_ray()
    cfg = RunConfig.model_validate({"model": {"arch": arch},
                                    "refine": {"embed_batch_size": batch, "embed_actor_cpus": cpus, "embed_actors": 1}})
    df = pd.DataFrame({"image_id": [f"{i:06d}" for i in range(len(uris))], "uri": uris, "domain": "birds"})
    t0 = time.perf_counter()
    emb = embed.embed_images(df, cfg, Storage())
    end = time.perf_counter()
    assert len(emb.meta) == len(uris) and not emb.failures
    return _rates(len(uris), t0, end)


def _rates(n: int, t0: float, end: float) -> dict:
    return {"images": n, "seconds": round(end - t0, 2), "images_per_s": round(n / (end - t0), 2)}


def measure(uris: list[str], arch: str, batch: int, cpus: float) -> dict:
    threads = max(1, math.ceil(cpus))
    plain = plain_loop(uris, arch, batch, threads)
    print(f"plain loop   {plain}  ({threads} torch threads)")
    pool = ray_pool(uris, arch, batch, cpus)
    print(f"Ray Data     {pool}  (one actor of {cpus} CPUs)")
    ratio = round(pool["images_per_s"] / plain["images_per_s"], 3)
    print(f"ratio Ray Data / plain: {ratio} (target >= 0.9); Ray's extra time {pool['seconds'] - plain['seconds']:.1f} s")
    return {"torch_threads": threads, "embed_actor_cpus": cpus, "plain": plain, "ray_data": pool, "ratio": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--arch", default="ViT-S-32")
    ap.add_argument("--batch", type=int, default=64)
    # 1 CPU leaves a core of a 2-core machine to Ray's own processes (raylet, GCS, Ray Data's executor),
    # as any cluster node does; 1.5 = 2 torch threads on 2 cores, where those processes take turns
    # with the forward pass's two threads.
    ap.add_argument("--cpus", default="1,1.5",
                    help="refine.embed_actor_cpus, comma-separated (the first is the headline); the plain loop's torch threads = ceil")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        uris = images(tmp, args.images)
        runs = [measure(uris, args.arch, args.batch, float(c)) for c in args.cpus.split(",")]
    out = {"model": args.arch, "batch": args.batch, **runs[0], "target": 0.9, "other_configs": runs[1:],
           "note": "both end to end, each building the model once; the Ray side includes the actor pool's start-up",
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_average_1m": [load_before, round(os.getloadavg()[0], 2)]}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
