"""The GPU check's first tier: near_ray's compute core on one GPU, with torch and a few small wheels only.

    python scripts/gpu_check_core.py [--json OUT.json] [--rehearse-on-cpu] [--only device,embed,...]

For a bare GPU machine with a CUDA torch, before any cluster image exists: no Ray, no vLLM, no FAISS,
no network at run time. Besides torch (and numpy, Pillow, PyYAML, which come with most torch
installs) it needs open_clip_torch, ftfy, wcwidth, pydantic and pydantic-core, which
``scripts/gpu_check_wheels.sh DIR`` downloads beforehand (``--dry-run`` lists them), and this
repository on PYTHONPATH. Sections, in the order they run, each written to the JSON as it finishes (a
killed run keeps what it measured):

  device  the one device rule (near_ray.device.torch_device), the GPU, its capability and bf16 support
  embed   refine's embedder path (encode_images: the model's preprocessor, then encode_pixels at the
          device's precision) over synthetic images: images/s, and the cosine drift of fp16 (what
          near_ray runs) and bf16 autocast against fp32 on the same GPU
  knn     refine's exact kNN (near_ray.refine.knn.exact_knn, blocked matrix products) on CUDA at 200 k
          and 1 M x 512: seconds, peak GPU memory, recall@10 against a float64 search of sampled queries
  train   the training loop (near_ray.train.loop.train_loop) in this process on CUDA, NeaR with 2 k names
          over 4 domains, text tower and both towers, with and without gradient checkpointing: images/s
          and peak GPU memory (MiB, and MiB per name); then a one-epoch resume from the checkpoint
  bundle  the trained model saved as a bundle, loaded on CUDA and on the CPU, the same images classified:
          top-1 agreement

Random-init ViT-B-16 (QuickGELU) and synthetic data: nothing is downloaded. About 8 minutes on one
H100-class GPU. ``--rehearse-on-cpu`` runs every section on the CPU at toy sizes (seconds), as the
test suite does; it also records whether ``ray`` was imported (it must not be).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTIONS = ("device", "embed", "knn", "train", "bundle")


@dataclass(frozen=True)
class Plan:
    device: str = "cuda"
    arch: str = "ViT-B-16-quickgelu"
    embed_images: int = 2048
    knn_sizes: tuple[int, ...] = (200_000, 1_000_000)
    knn_dim: int = 512
    names_per_domain: int = 500  # 4 domains: 2 k names
    train_images: int = 1024
    batch: int = 128


REHEARSAL = Plan(device="cpu", arch="near-tiny", embed_images=32, knn_sizes=(2_000,), knn_dim=64,
                 names_per_domain=10, train_images=48, batch=16)


def _peak_mib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _images(n: int, size: int = 256) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (8, size, size, 3), dtype=np.uint8)  # 8 looks, jittered: images that differ
    return [Image.fromarray(np.clip(base[i % 8].astype(np.int16) + rng.integers(-20, 20, (size, size, 3)), 0, 255)
                            .astype(np.uint8)) for i in range(n)]


# ------------------------------------------------------------------------------------------ sections
def check_device(plan: Plan) -> dict[str, Any]:
    import torch

    from near_ray.device import torch_device

    out: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
                           "device_rule": torch_device(), "cuda_available": torch.cuda.is_available()}
    if plan.device == "cuda":
        if out["device_rule"] != "cuda":
            raise RuntimeError(f"the device rule chose {out['device_rule']} on a machine with a GPU")
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   bf16=torch.cuda.is_bf16_supported())
    return out


def check_embed(plan: Plan) -> dict[str, Any]:
    import numpy as np
    import torch

    from near_ray.config import ModelConfig
    from near_ray.model.clip import create_clip, encode_images
    from near_ray.model.preprocess import preprocessor

    clip = create_clip(ModelConfig(arch=plan.arch, pretrained="random"))
    clip.model.to(plan.device).eval()
    images = _images(plan.embed_images)
    encode_images(clip, images[:64])  # warm-up: kernels, autotuning
    t0 = time.perf_counter()
    emb = encode_images(clip, images, batch_size=256 if plan.device == "cuda" else 16)
    if plan.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    sample = images[:256]
    prep = preprocessor(clip.pixels)
    x = prep.batch([prep.pixels(im) for im in sample], plan.device)
    drift = {}
    with torch.no_grad():
        ref = torch.nn.functional.normalize(clip.model.encode_image(x).float(), dim=-1)
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            if plan.device != "cuda":
                continue
            with torch.autocast("cuda", dtype=dtype):
                got = torch.nn.functional.normalize(clip.model.encode_image(x).float(), dim=-1)
            cos = (got * ref).sum(dim=1).cpu().numpy()
            drift[name] = {"cosine_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 6)}
    ours = np.sum(emb[: len(sample)] * ref.cpu().numpy(), axis=1)  # encode_images' own precision against fp32
    return {"images": len(images), "images_per_s": round(len(images) / seconds, 1), "dim": int(emb.shape[1]),
            "drift_vs_fp32": drift, "encode_images_cosine_min": round(float(ours.min()), 6)}


def check_knn(plan: Plan) -> dict[str, Any]:
    import numpy as np

    from near_ray.refine.knn import exact_knn

    out = {}
    rng = np.random.default_rng(0)
    for n in plan.knn_sizes:
        x = rng.standard_normal((n, plan.knn_dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        _reset_peak(plan.device)
        t0 = time.perf_counter()
        ids, _ = exact_knn(x, 10, device=plan.device)
        seconds = time.perf_counter() - t0
        queries = rng.choice(n, size=min(100, n), replace=False)
        hits = 0
        for q in queries:  # float64 brute force of a sample of rows: the reference
            sims = x.astype(np.float64) @ x[q].astype(np.float64)
            sims[q] = -np.inf
            hits += len(set(np.argpartition(-sims, 10)[:10].tolist()) & set(ids[q].tolist()))
        out[str(n)] = {"seconds": round(seconds, 2), "peak_gpu_mib": _peak_mib(plan.device),
                       "recall_at_10": round(hits / (10 * len(queries)), 4)}
    return out


def _training_job(plan: Plan, towers: str, checkpointing: bool, epochs: int) -> tuple[Any, Any]:
    import numpy as np

    from near_ray.config import ModelConfig, TrainConfig
    from near_ray.model.clip import create_clip
    from near_ray.storage import Storage
    from near_ray.train.data import CandidateArrays, TrainPixels
    from near_ray.train.loop import FineTuneJob
    from near_ray.train.runner import MemoryShard

    model = ModelConfig(arch=plan.arch, pretrained="random")
    clip = create_clip(model)
    domains, per = 4, plan.names_per_domain
    n, v = plan.train_images, domains * per
    rng = np.random.default_rng(0)
    domain_of = np.arange(n) % domains
    mask = np.zeros((domains, v), dtype=bool)
    for d in range(domains):
        mask[d, d * per:(d + 1) * per] = True
    cand = np.stack([np.sort(rng.choice(per, 3, replace=False)) + d * per for d in domain_of]).astype(np.int64)
    w0 = np.full(cand.shape, 1 / 3, dtype=np.float32)
    neighbours = np.stack([rng.choice(np.nonzero(domain_of == d)[0], 5) for d in domain_of]).astype(np.int64)
    arrays = CandidateArrays(cand, w0, domain_of.astype(np.int64), mask, neighbours)
    size = clip.pixels.size
    pixels = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    train = TrainConfig(epochs=epochs, warmup_epochs=1, batch_size=plan.batch, train_towers=towers,
                        grad_checkpointing=checkpointing, num_workers=1, shuffle_buffer=4096)
    job = FineTuneJob(method="near", model=model, train=train, storage=Storage(),
                      prompts=[f"a photo of a species number {i}." for i in range(v)], arrays=arrays,
                      pixels=TrainPixels.for_model(clip, True))
    return job, MemoryShard({"idx": np.arange(n, dtype=np.int64), "image": pixels})


def check_train(plan: Plan, work: Path) -> dict[str, Any]:
    from near_ray.train.loop import train_loop
    from near_ray.train.runner import InProcessSession

    out: dict[str, Any] = {"names": 4 * plan.names_per_domain, "images": plan.train_images, "batch": plan.batch}
    for towers in ("text", "both"):
        for checkpointing in (False, True):
            job, shard = _training_job(plan, towers, checkpointing, epochs=1)
            folder = work / f"train-{towers}-{checkpointing}"
            _reset_peak(plan.device)
            t0 = time.perf_counter()
            train_loop({"job": job}, InProcessSession(shard, str(folder), device=plan.device))
            seconds = time.perf_counter() - t0
            peak = _peak_mib(plan.device)
            meta = json.loads((folder / "meta.json").read_text())
            out[f"{towers}{'_checkpointing' if checkpointing else ''}"] = {
                "seconds": round(seconds, 2), "images_per_s": meta["history"][-1]["images_per_s"],
                "peak_gpu_mib": peak, "mib_per_name": round(peak / out["names"], 3) if peak else None}
    job, shard = _training_job(plan, "text", False, epochs=2)  # one more epoch from the text run's checkpoint
    folder = work / "train-text-False"
    train_loop({"job": job}, InProcessSession(shard, str(folder), device=plan.device))
    meta = json.loads((folder / "meta.json").read_text())
    if meta["starts"] != [0, 1]:
        raise RuntimeError(f"the resumed run started at epochs {meta['starts']}, not [0, 1]")
    out["resume"] = {"starts": meta["starts"], "epochs": len(meta["history"])}
    return out


def check_bundle(plan: Plan, work: Path) -> dict[str, Any]:
    import numpy as np

    from near_ray.config import ModelConfig
    from near_ray.model.bundle import load_bundle, save_bundle
    from near_ray.model.clip import create_clip, encode_texts
    from near_ray.train.checkpoint import load_checkpoint

    clip = create_clip(ModelConfig(arch=plan.arch, pretrained="random"))
    load_checkpoint(work / "train-text-False", clip.model)
    names = [f"species number {i}" for i in range(4 * plan.names_per_domain)]
    vocab = [{"name": n, "domain": f"d{i // plan.names_per_domain}", "synonyms": [], "support": 1}
             for i, n in enumerate(names)]
    uri = str(work / "bundle")
    save_bundle(uri, clip, vocab, encode_texts(clip, names, "a photo of a {}."), prompt_template="a photo of a {}.",
                logit_scale=50.0)
    images = _images(min(256, plan.embed_images))
    top = {d: load_bundle(uri, device=d).predict(images, domain="d0") for d in {plan.device, "cpu"}}
    agree = float(np.mean(top[plan.device] == top["cpu"]))
    return {"images": len(images), "top1_agreement_with_cpu_fp32": round(agree, 4)}


# ------------------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_check_core.json", help="where the results go (written as they come)")
    parser.add_argument("--rehearse-on-cpu", action="store_true", help="every section on the CPU at toy sizes")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections ({', '.join(SECTIONS)})")
    args = parser.parse_args(argv)
    import torch

    plan = REHEARSAL if args.rehearse_on_cpu else Plan()
    report: dict[str, Any] = {"plan": plan.__dict__ | {"knn_sizes": list(plan.knn_sizes)},
                              "machine": {"python": platform.python_version(), "cpus": os.cpu_count()}, "sections": {}}
    out = Path(args.json)
    failed = []
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("no GPU: every section skipped (use --rehearse-on-cpu to run them on the CPU)")
        report["sections"] = {s: {"status": "skipped", "why": "no GPU"} for s in args.only.split(",")}
        out.write_text(json.dumps(report, indent=1) + "\n")
        return 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_core_") as tmp:
        for name in args.only.split(","):
            if name not in SECTIONS:
                parser.error(f"--only: unknown section '{name}' ({', '.join(SECTIONS)})")
            t0 = time.perf_counter()
            try:
                fn = globals()[f"check_{name}"]
                result = fn(plan, Path(tmp)) if name in ("train", "bundle") else fn(plan)
                entry = {"status": "ok", **result}
            except Exception as e:  # a section that fails says why; the others still run
                entry = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                failed.append(name)
            entry["wall_s"] = round(time.perf_counter() - t0, 2)
            report["sections"][name] = entry
            report["ray_imported"] = "ray" in sys.modules
            out.write_text(json.dumps(report, indent=1, default=str) + "\n")
            shown = {k: v for k, v in entry.items() if k not in ("traceback",)}
            print(f"{name:7} {json.dumps(shown, default=str)}", flush=True)
    print(f"{'FAILED: ' + ', '.join(failed) if failed else 'all sections passed'}; ray imported: "
          f"{report['ray_imported']}; written {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
