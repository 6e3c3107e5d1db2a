"""Label stage throughput vs the backend alone: is the Ray pipeline ever the bottleneck?

    python benchmarks/label_throughput.py [--images 20000] [--latency 0.2] [--pool-size 2] [--concurrency 16]

Both runs talk to the simulated annotator (its own process) over HTTP with a fixed latency per request and the same
total number of requests in flight (pool size x per-actor concurrency):

- backend alone: the same async client (ChatClient) driven directly, from pre-encoded images;
- stage: ``run_label`` end to end (listing, read, hash, decode/resize, actor pool, parsing,
  parquet parts), on a Ray cluster already started (cluster start-up is not counted).

With an endpoint-bound workload the stage should reach >= 0.9 x the backend's images/s. ``ratio`` is
over the whole stage, start-up included (actor pool, first tasks: ~7 s here); the default 20,000 images
(~2 minutes at the endpoint's pace) keep that one-off from dominating, as it does not in a real
labeling job; ``stage_steady_images_per_s`` excludes it. Prints a line and writes
benchmarks/results/label_throughput.json. Everything answered is simulated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from near_ray.config import ImageConfig, OpenAIBackendConfig, load_config
from near_ray.label.backends.openai import ChatClient
from near_ray.label.images import image_id, prepare_image
from near_ray.label.prompts import prompt_for, sample_seed, schema_text
from near_ray.label.stage import run_label
from near_ray.sim.synth import generate
from near_ray.storage import Storage


def backend_alone(base_url: str, uris: list[str], samples: int, concurrency: int) -> float:
    """Images/s of the async client alone, all requests issued at once under the same concurrency."""
    storage = Storage()
    system, user = prompt_for("bird", "v1")
    rows = []
    for uri in uris:
        data = storage.read_bytes(uri)
        prepared = prepare_image(data, ImageConfig())
        for s in range(samples):
            rows.append({"uri": uri, "sample": s, "seed": sample_seed(0, image_id(data), s), "temperature": 0.7,
                         "system_prompt": system, "user_prompt": user, "json_schema": schema_text(True),
                         "image": prepared.data, "mime": prepared.mime})  # fmt: skip

    async def run() -> float:
        client = ChatClient(OpenAIBackendConfig(base_url=base_url, concurrency=concurrency), concurrency=concurrency)
        try:
            start = time.perf_counter()
            results = await asyncio.gather(*(client.label(r) for r in rows))
            wall = time.perf_counter() - start
        finally:
            await client.close()
        failed = sum(r["status"] != "ok" for r in results)
        if failed:
            print(f"backend alone: {failed} failed requests", file=sys.stderr)
        return wall

    return len(uris) / asyncio.run(run())


@contextlib.contextmanager
def annotator_process(bench: str, latency: float) -> Iterator[str]:
    """The simulated annotator in its own process (as a real endpoint would be), on a free local port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    faults = json.dumps({"latency_s": latency})
    cmd = [sys.executable, "-m", "near_ray.cli", "annotator", "--truth", bench, "--port", str(port), "--faults", faults]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"the annotator exited with code {proc.returncode}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000, help="images in the benchmark (one domain)")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--latency", type=float, default=0.2, help="annotator latency per request (s)")
    ap.add_argument("--pool-size", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight per actor")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "label_throughput.json"))
    args = ap.parse_args()

    from near_ray.ray_session import ensure_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ensure_ray()  # a local cluster on 127.0.0.1
    total = args.pool_size * args.concurrency
    with tempfile.TemporaryDirectory() as tmp:
        bench = f"{tmp}/bench"
        species = max(2, args.images // 50)
        generate(bench, ["birds"], species=species, images_per_species=max(2, args.images // species), image_size=64,
                 seed=0, test_fraction=0.5, storage=Storage())  # fmt: skip
        with annotator_process(bench, args.latency) as base_url:
            cfg = load_config(None, [
                f"storage.workdir={tmp}/run",
                f"label.backend.base_url={base_url}",
                f"label.samples={args.samples}",
                f"label.pool_size={args.pool_size}",
                f"label.backend.concurrency={args.concurrency}",
                f"label.batch_size={args.batch_size}",
                f"data.domains={json.dumps([{'name': 'birds', 'uri': f'{bench}/images/birds', 'meta_class': 'bird'}])}",
            ])  # fmt: skip
            uris = [o.uri for o in Storage().list(f"{bench}/images/birds")]
            # The backend alone before and after the stage, the better of the two: a conservative ratio on a
            # machine whose load changes.
            backend = backend_alone(base_url, uris, args.samples, total)
            summary = run_label(cfg)
            stage = summary["images_labeled"] / summary["wall_s"]
            backend = max(backend, backend_alone(base_url, uris, args.samples, total))
    result = {
        "stage_images_per_s": round(stage, 2),
        "backend_images_per_s": round(backend, 2),
        "ratio": round(stage / backend, 3),
        "concurrency": total,
        "latency_s": args.latency,
        "images": summary["images_labeled"],
        "samples": args.samples,
        "pool_size": args.pool_size,
        "batch_size": args.batch_size,
        "stage_wall_s": summary["wall_s"],
        "stage_first_answer_s": summary["first_answer_s"],  # start-up: workers, actors, first request
        "stage_steady_images_per_s": round(
            summary["images_labeled"] / max(summary["wall_s"] - (summary["first_answer_s"] or 0), 1e-9), 2
        ),
        "simulated": True,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "ray": __import__("ray").__version__,
        },  # fmt: skip
    }
    print(json.dumps(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
