"""Classify stage throughput vs a plain single-process torch loop: what does the Ray Data job cost?

    python benchmarks/classify_throughput.py [--images 2000] [--arch ViT-B-32] [--batch-size 32] [--threads 2]

Both name the same images (a synthetic benchmark on local disk, PNGs of --image-size pixels) with the
same bundle (an open_clip architecture, random weights, a 50-name vocabulary), the same batch size and
the same number of torch threads:

- plain loop: one process reads each batch, decodes it with ``near_ray.images.decode_image``, applies
  the bundle's eval transform, encodes and ranks with ``Bundle.rank``, timed from loading the bundle
  (its process has imported torch and open_clip already: the stage's actor pays those imports);
- stage: ``run_classify`` end to end (listing, ledger, read/decode tasks, the image-tower actor pool,
  parquet parts, summary) on a Ray cluster already started (cluster start-up not counted; actor pool
  and model loading counted).

``ratio`` = stage / plain images/s over each one's whole run; ``steady_ratio`` the same after each
one's first output (the stage's first row written, the loop's first batch), i.e. without start-up.
Target on a 2-core machine: ratio >= 0.9. With ``--gpus 1`` both run on the GPU (half-precision
autocast); record ViT-B-16 there. Prints a line and writes
benchmarks/results/classify_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from near_ray.config import ModelConfig, load_config
from near_ray.images import decode_image
from near_ray.model.bundle import load_bundle, save_bundle
from near_ray.model.clip import create_clip, encode_texts
from near_ray.model.preprocess import encode_pixels, preprocessor
from near_ray.storage import Storage


def make_bundle(uri: str, arch: str, names: int) -> str:
    import torch

    torch.manual_seed(0)
    clip = create_clip(ModelConfig(arch=arch, pretrained="random"))
    vocab = [{"name": f"species {i}", "domain": "birds", "synonyms": [], "support": 1} for i in range(names)]
    text = encode_texts(clip, [v["name"] for v in vocab], "a photo of a {}.")
    save_bundle(uri, clip, vocab, text, prompt_template="a photo of a {}.", logit_scale=100.0)
    return uri


def plain_loop(bundle_uri: str, uris: list[str], batch_size: int, threads: int, device: str) -> dict:
    """One process doing what the stage does, batch by batch, timed from loading the bundle (as the
    stage's actor does); ``steady_images_per_s``: the images over the time after its first batch, the
    stage's steady figure's definition."""
    import torch

    torch.set_num_threads(threads)
    storage = Storage()
    start = time.perf_counter()
    bundle = load_bundle(bundle_uri, storage, device=device)
    model = bundle.clip.model
    loaded = first = time.perf_counter()
    for i in range(0, len(uris), batch_size):
        images = [decode_image(storage.read_bytes(u), u) for u in uris[i : i + batch_size]]
        prep = preprocessor(bundle.pixels)
        emb = encode_pixels(model, prep.batch([prep.pixels(im) for im in images], device), device)
        for row in bundle.probabilities(emb, "birds"):
            bundle.rank(row, "birds", 5)
        if i == 0:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"images_per_s": len(uris) / (end - start), "load_s": loaded - start,
            "first_batch_s": first - start, "steady_images_per_s": len(uris) / max(end - first, 1e-9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--arch", default="ViT-B-32", help="open_clip architecture or a near_ray model config")
    ap.add_argument("--image-size", type=int, default=160, help="side of the synthetic PNGs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both runs")
    ap.add_argument("--gpus", type=float, default=0.0, help="GPUs for the stage's actor (and the plain loop)")
    ap.add_argument("--names", type=int, default=50, help="vocabulary size")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "classify_throughput.json"))
    args = ap.parse_args()

    from near_ray.ray_session import ensure_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ensure_ray()  # a local cluster on 127.0.0.1 (all of this machine's CPUs and GPUs)
    from near_ray.classify.stage import run_classify
    from near_ray.sim.synth import generate

    device = "cuda" if args.gpus > 0 else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        bench = f"{tmp}/bench"
        species = max(2, args.images // 100)
        generate(bench, ["birds"], species=species, images_per_species=-(-args.images // species),
                 image_size=args.image_size, seed=0, test_fraction=0.5, storage=Storage())  # fmt: skip
        uris = sorted(o.uri for o in Storage().list(f"{bench}/images/birds"))[: args.images]
        Storage().write_parquet(f"{tmp}/manifest.parquet", pa.table({"uri": uris}))
        bundle = make_bundle(f"{tmp}/bundle", args.arch, args.names)
        domains = [{"name": "birds", "uri": f"{bench}/images/birds", "manifest": f"{tmp}/manifest.parquet"}]
        cfg = load_config(None, [
            f"storage.workdir={tmp}/run",
            f"data.domains={json.dumps(domains)}",
            f"classify.bundle={bundle}",
            f"classify.batch_size={args.batch_size}",
            f"classify.torch_threads={args.threads}",
            f"classify.gpus_per_actor={args.gpus}",
            "classify.calibrate=false",
        ])  # fmt: skip
        # The plain loop before and after the stage, the better of the two: a conservative ratio on a
        # machine whose load changes.
        plain = plain_loop(bundle, uris, args.batch_size, args.threads, device)
        summary = run_classify(cfg)
        plain = max(plain, plain_loop(bundle, uris, args.batch_size, args.threads, device),
                    key=lambda r: r["images_per_s"])
    t = summary["timings_s"]
    stage = summary["images_computed"] / t["classify_s"]
    steady = summary["images_computed"] / max(t["classify_s"] - (t["first_row_s"] or 0), 1e-9)
    result = {
        "stage_images_per_s": round(stage, 2),
        "plain_images_per_s": round(plain["images_per_s"], 2),
        "ratio": round(stage / plain["images_per_s"], 3),
        "steady_ratio": round(steady / plain["steady_images_per_s"], 3),
        "images": summary["images_computed"],
        "model": args.arch,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": device,
        "stage_wall_s": t["classify_s"],
        "stage_first_row_s": t["first_row_s"],  # start-up: read workers, the actor pool, the model
        "stage_steady_images_per_s": round(steady, 2),
        "plain_load_s": round(plain["load_s"], 2),
        "plain_first_batch_s": round(plain["first_batch_s"], 2),
        "plain_steady_images_per_s": round(plain["steady_images_per_s"], 2),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "ray": __import__("ray").__version__,
            "torch": __import__("torch").__version__,
            "gpu": _gpu_name(),
        },
    }
    print(json.dumps(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
