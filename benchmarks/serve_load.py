"""Closed-loop HTTP load on loopback: the Ray Serve application vs a plain FastAPI + uvicorn server.

Both serve the same bundle (random init: weights do not change speed) and the same PNG; the plain
server is one process that classifies each request on its own (no batching), with as many torch
threads as the model replica has CPUs. Each model in
``--models`` (``ARCH:CPUS_PER_REPLICA``) is measured in turn; the first is the headline
(``concurrency`` in the JSON), the others go under ``other_models``. The default headline is
ViT-B-32 at 224 px, a production-class CLIP; near-tiny (64 px, the demo's model) shows the other end:
a model so small that per-request HTTP and RPC work, not the forward pass, is the cost. Prints a
table and writes benchmarks/results/serve_load.json.

    python benchmarks/serve_load.py [--models ViT-B-32:2,near-tiny:1] [--levels 1,8,32] [--seconds 20] [--colocate] [--direct-ingress]
"""

import argparse
import asyncio
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "serve_load.json"


def make_bundle(uri: str, arch: str) -> str:
    import torch

    from near_ray.config import ModelConfig
    from near_ray.model.bundle import save_bundle
    from near_ray.model.clip import create_clip, encode_texts

    torch.manual_seed(0)
    clip = create_clip(ModelConfig(arch=arch, pretrained="random"))
    names = [f"Species {i}" for i in range(50)]
    vocab = [{"name": n, "domain": "birds", "synonyms": [], "support": 1} for n in names]
    save_bundle(uri, clip, vocab, encode_texts(clip, names, "a photo of a {}."), prompt_template="a photo of a {}.", logit_scale=50.0)
    return uri


def test_image() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ plain server
def plain_server(bundle: str, port: int, threads: int) -> None:
    """The baseline: one uvicorn process, each request decoded and classified alone, on one worker
    thread that also built the model (one OpenMP team, as near_ray's replicas keep: see
    ``near_ray.device.compute_thread``)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from near_ray.model.bundle import load_bundle
    from near_ray.serve.images import ApiError, decode_upload

    torch.set_num_threads(threads)  # the model replica's: serve.cpus_per_replica
    compute = ThreadPoolExecutor(max_workers=1)
    model = compute.submit(load_bundle, bundle).result()
    app = FastAPI()

    def work(body: bytes) -> JSONResponse:
        try:
            pred = model.classify([decode_upload(body, 40_000_000)], top_k=5)[0]
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        scored = [{"name": n, "score": s} for n, s in zip(pred.names, pred.scores, strict=True)]
        return JSONResponse({"predictions": scored, "abstained": pred.abstained, "model_version": model.model_version})

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        return await asyncio.get_running_loop().run_in_executor(compute, work, await request.body())

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start_plain(bundle: str, threads: int) -> tuple[subprocess.Popen, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import free_port, wait_for_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--plain-server", bundle, "--port", str(port),
                             "--plain-threads", str(threads)])
    wait_for_port(port, timeout=120)
    return proc, f"http://127.0.0.1:{port}/v1/classify"


# ------------------------------------------------------------------------------------------ serve
def start_serve(bundle: str, args: argparse.Namespace, cpus_per_replica: float, colocate: bool = False,
                direct: bool = False) -> str:
    """Deploy and return the classify URL: Serve's proxy, or with ``direct`` the ingress replica's own
    port (serve.direct_ingress, on a cluster of its own started with Serve's direct-ingress switch)."""
    import ray

    from near_ray.ray_session import ensure_ray
    from near_ray.serve.app import DIRECT_INGRESS_ENV, direct_urls

    if ray.is_initialized() and (os.environ.get(DIRECT_INGRESS_ENV) == "1") != direct:
        from ray import serve as _serve

        _serve.shutdown()
        ray.shutdown()  # Serve reads the switch when its controller starts: a new local cluster
    if direct:
        os.environ[DIRECT_INGRESS_ENV] = "1"
    else:
        os.environ.pop(DIRECT_INGRESS_ENV, None)
    ensure_ray(num_cpus=4)  # a local cluster on 127.0.0.1, before anything imports ray
    from ray import serve

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import free_port

    from near_ray.config import ServeConfig
    from near_ray.serve.app import application

    serve.shutdown()  # the previous model's application and proxy
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeConfig(
        bundle=bundle,
        min_replicas=args.replicas,
        max_replicas=args.replicas,
        cpus_per_replica=cpus_per_replica,  # also the replica's torch threads (Ray sets OMP_NUM_THREADS)
        ingress_cpus=0.5,
        max_batch_size=args.max_batch_size,
        decode_threads=4,
        colocate=colocate,
        direct_ingress=direct,
        app_name="bench",
        route_prefix="/bench",
    )
    if args.batch_wait is not None:
        settings.batch_wait_timeout_s = args.batch_wait
    args.batch_wait = settings.batch_wait_timeout_s
    serve.run(application(settings), name=settings.app_name, route_prefix=settings.route_prefix, blocking=False)
    if direct:
        return direct_urls(settings)[0] + "/v1/classify"
    return f"http://127.0.0.1:{port}/bench/v1/classify"


# ------------------------------------------------------------------------------------------ load
async def closed_loop(url: str, body: bytes, concurrency: int, max_requests: int, seconds: float) -> dict:
    """``concurrency`` clients, each sending its next request when the last one answered."""
    import httpx

    latencies: list[float] = []
    hops: list[dict[str, float]] = []  # the Serve app's server-timing header, per answered request
    errors = 0
    sent = 0
    deadline = 0.0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal errors, sent
        while sent < max_requests and time.perf_counter() < deadline:
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await c.post(url, content=body, headers={"content-type": "image/png"})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
                if "server-timing" in r.headers:
                    hops.append(server_timing(r.headers["server-timing"]) | {"client": latencies[-1] * 1000})
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        # Warm-up, outside the measurement: connections, lazy imports, first batches.
        await asyncio.gather(*(c.post(url, content=body, headers={"content-type": "image/png"}) for _ in range(concurrency)))
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    out = {
        "rps": round(len(latencies) / elapsed, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "errors": errors,
        "requests": len(latencies) + errors,
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }
    if hops:
        out["hops_p50_ms"] = hop_breakdown(hops)
    return out


def server_timing(header: str) -> dict[str, float]:
    """``read;dur=0.1, decode;dur=2.0, …`` -> {"read": 0.1, "decode": 2.0, …} (ms)."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def hop_breakdown(hops: list[dict[str, float]]) -> dict[str, float]:
    """Median ms per hop: client <-> proxy (incl. the HTTP client itself), proxy -> ingress -> response,
    inside the ingress (body read, decode), ingress -> model replica and back (RPC, queue, batching),
    and the model's forward pass."""
    med = {k: float(np.median([h[k] for h in hops if k in h])) for k in hops[0]}
    return {
        "client_total": round(med["client"], 2),
        "client_and_proxy": round(med["client"] - med["ingress"], 2),
        "ingress_read": round(med.get("read", 0.0), 2),
        "ingress_decode": round(med.get("decode", 0.0), 2),
        "ingress_other": round(med["ingress"] - med.get("read", 0.0) - med.get("decode", 0.0) - med["model"], 2),
        "ingress_to_model_rpc": round(med["model"] - med["forward"], 2),
        "model_forward": round(med["forward"], 2),
    }


def measure(arch: str, cpus_per_replica: float, args: argparse.Namespace, tmp: str) -> dict:
    """Plain, then Serve, at every level, for one model."""
    levels = [int(x) for x in args.levels.split(",")]
    body = test_image()
    results: dict = {str(c): {} for c in levels}
    bundle = make_bundle(os.path.join(tmp, f"bundle-{arch}"), arch)
    # One server at a time: on a small machine they would otherwise compete for the same cores.
    proc, plain_url = start_plain(bundle, max(1, math.ceil(cpus_per_replica)))
    try:
        for c in levels:
            results[str(c)]["plain"] = asyncio.run(closed_loop(plain_url, body, c, args.max_requests, args.seconds))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    serve_url = start_serve(bundle, args, cpus_per_replica)
    for c in levels:
        results[str(c)]["serve"] = asyncio.run(closed_loop(serve_url, body, c, args.max_requests, args.seconds))
    if args.colocate:  # serve.colocate: the model inside the ingress replica, one hop less
        serve_url = start_serve(bundle, args, cpus_per_replica, colocate=True)
        for c in levels:
            results[str(c)]["serve_colocated"] = asyncio.run(closed_loop(serve_url, body, c, args.max_requests, args.seconds))
    if args.direct_ingress:  # colocated, and the client talks to the ingress replica's own HTTP server
        serve_url = start_serve(bundle, args, cpus_per_replica, colocate=True, direct=True)
        for c in levels:
            results[str(c)]["serve_direct"] = asyncio.run(closed_loop(serve_url, body, c, args.max_requests, args.seconds))
    from near_ray.model.clip import resolve_model_config

    size = resolve_model_config(arch)["vision_cfg"]["image_size"]
    return {
        "concurrency": results,
        "model": {"arch": arch, "image_size": size, "weights": "random init", "vocabulary": 50, "image": "128x96 PNG"},
        "serve": {"replicas": args.replicas, "cpus_per_replica": cpus_per_replica, "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait},
    }


def run(args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models.split(","):
            arch, _, cpus = spec.partition(":")
            runs.append(measure(arch, float(cpus or 1), args, tmp))
            print_table(runs[-1])
    return {
        **runs[0],
        "other_models": runs[1:],
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # before, after: other work shares the cores
        },
        "note": "closed loop on loopback; client, servers and Ray share the machine's cores",
    }


LAYOUTS = ("serve", "serve_colocated", "serve_direct")  # two deployments; serve.colocate; + serve.direct_ingress


def print_table(report: dict) -> None:
    print(f"{report['model']['arch']} ({report['model']['image_size']} px), {report['serve']['cpus_per_replica']} CPU per model replica")
    print(f"{'conc':>5} {'server':>15} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6} {'load':>5}")
    for c, row in report["concurrency"].items():
        for name in [n for n in ("plain", *LAYOUTS) if n in row]:
            r = row[name]
            print(f"{c:>5} {name:>15} {r['rps']:>8} {r['p50_ms']:>8} {r['p95_ms']:>8} {r['p99_ms']:>8} {r['errors']:>6} {r['load_avg_1m']:>5}")
        for name in [n for n in LAYOUTS if n in row]:
            if "hops_p50_ms" in row[name]:
                print(f"{'':>5} {name} hops p50 ms: {row[name]['hops_p50_ms']}")
            row[f"{name}_overhead_p50_ms"] = round(row[name]["p50_ms"] - row["plain"]["p50_ms"], 2)
    one = report["concurrency"].get("1", {})
    print(f"p50 overhead at concurrency 1 (target < 10 ms): Serve {one.get('serve_overhead_p50_ms')} ms, "
          f"colocated {one.get('serve_colocated_overhead_p50_ms')} ms, direct ingress {one.get('serve_direct_overhead_p50_ms')} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--seconds", type=float, default=20.0, help="time bound per level and server")
    p.add_argument("--max-requests", type=int, default=2000, help="count bound per level and server")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32)
    # ARCH:CPUS: the model replica's CPUs (= its torch threads). A tiny model wants 1 on a 2-core machine
    # (2 oversubscribes the cores the proxy and ingress need); a large one wants the cores for its forward pass.
    p.add_argument("--models", default="ViT-B-32:2,near-tiny:1")
    p.add_argument("--batch-wait", type=float, default=None, help="default: serve.batch_wait_timeout_s")
    p.add_argument("--colocate", action="store_true", help="also measure serve.colocate (the model inside the ingress)")
    p.add_argument("--direct-ingress", action="store_true",
                   help="also measure serve.colocate + serve.direct_ingress (no proxy hop)")
    p.add_argument("--plain-server", metavar="BUNDLE", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--plain-threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.plain_server:
        plain_server(args.plain_server, args.port, args.plain_threads)
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    report = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
