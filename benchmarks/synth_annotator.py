"""Speed of the synthetic benchmark generator and of the simulated annotator over HTTP.

    python benchmarks/synth_annotator.py [--images 4000] [--requests 1000] [--concurrency 64]

Prints and writes benchmarks/results/synth_annotator.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from near_ray.sim.annotator import AnnotatorServer, FaultConfig
from near_ray.sim.synth import generate
from near_ray.storage import Storage

DOMAINS = ["birds", "flowers", "mushrooms", "butterflies"]


def bench_generate(root: str, images: int) -> dict:
    species = 50
    per = max(2, images // (len(DOMAINS) * species))
    t0 = time.perf_counter()
    summary = generate(out=root, domains=DOMAINS, species=species, images_per_species=per, image_size=64, seed=0,
                       test_fraction=0.5, storage=Storage())
    dt = time.perf_counter() - t0
    return {"images": summary["images"], "seconds": round(dt, 2), "images_per_s": round(summary["images"] / dt, 1)}


async def _fire(base_url: str, bodies: list[dict], concurrency: int) -> list[float]:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def one(body: dict) -> None:
            async with sem:
                t = time.perf_counter()
                (await c.post("/chat/completions", json=body)).raise_for_status()
                latencies.append(time.perf_counter() - t)
        await asyncio.gather(*(one(b) for b in bodies))
    return latencies


def bench_annotator(root: str, requests: int, concurrency: int, latency_s: float) -> dict:
    truth = Storage().read_parquet(f"{root}/truth.parquet").to_pylist()
    bodies = []
    for i in range(requests):
        buf = io.BytesIO()
        Image.open(f"{root}/{truth[i % len(truth)]['path']}").convert("RGB").save(buf, "JPEG", quality=85)
        url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        bodies.append({"model": "m", "seed": i, "temperature": 0.7, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Name this."}, {"type": "image_url", "image_url": {"url": url}}]}]})
    t0 = time.perf_counter()
    with AnnotatorServer(root, profile="strong", faults=FaultConfig(latency_s=latency_s)) as ann:
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        lat = sorted(asyncio.run(_fire(ann.base_url, bodies, concurrency)))
        dt = time.perf_counter() - t1
        unknown = ann.stats()["outcomes"]["unknown_image"]
    return {"requests": requests, "concurrency": concurrency, "injected_latency_s": latency_s,
            "startup_s": round(startup, 2), "seconds": round(dt, 2), "requests_per_s": round(requests / dt, 1),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 1), "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 1),
            "unknown_image": unknown}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "bench")
        result = {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
                  "generate": bench_generate(root, args.images),
                  "annotator": bench_annotator(root, args.requests, args.concurrency, 0.0),
                  "annotator_with_latency": bench_annotator(root, args.requests, args.concurrency, 0.2)}
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "synth_annotator.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
