"""How long the CLIP work of a run will take on CPUs, said before it starts.

On a machine without a GPU, refine's embedding and training are the slow parts (a ViT-B-16 takes
about a second an image on two cores). Before they start, the preflight times two batches of the
configured architecture here (random pixels, random weights: the speed does not depend on them) with
the threads one embedding actor or training worker gets, scales that by the number of images, actors,
workers and epochs, and says which setting shortens it. It is an estimate from this machine: a cluster's
workers may be faster or slower, and the text tower's share of a training step is not in it.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from near_ray.config import RANDOM_INIT

if TYPE_CHECKING:
    from near_ray.config import RunConfig
    from near_ray.storage import Storage

COUNT_LIMIT = 200_000  # images counted at most (a listing of millions of objects is itself slow)
COUNT_SECONDS = 5.0
LONG_S = 60.0  # below this the estimate is not worth a log line
FEW_PASSES = 500  # image passes (embedding + epochs × images) below which nothing is timed
TIMED_BATCH = 2  # images per timed batch: enough for a per-image time, cheap for a ViT-B on a loaded CPU


def count_images(cfg: RunConfig, storage: Storage) -> tuple[int, bool]:
    """(images the run will embed, whether the count stopped early) from the domains' listings."""
    from near_ray.data.collections import domain_uris

    cap = min(cfg.data.max_images or COUNT_LIMIT, COUNT_LIMIT)
    n, deadline = 0, time.monotonic() + COUNT_SECONDS
    for d in cfg.data.domains:
        for _ in domain_uris(d, cfg, storage):
            n += 1
            if n >= cap or time.monotonic() > deadline:
                return n, n < (cfg.data.max_images or math.inf)
    return n, False


def seconds_per_image(clip: Any, threads: int, backward: bool, batch: int = TIMED_BATCH) -> float:
    """Wall seconds per image of the image tower here: the second of two timed batches (the first warms up)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pixels = torch.randn(batch, 3, clip.image_size, clip.image_size)
        elapsed = 0.0
        for _ in range(2):
            t0 = time.perf_counter()
            with torch.set_grad_enabled(backward):
                out = clip.model.encode_image(pixels)
                if backward:
                    out.float().pow(2).mean().backward()
            elapsed = time.perf_counter() - t0
        return elapsed / batch
    finally:
        torch.set_num_threads(previous)


def cpu_estimate(cfg: RunConfig, command: str, storage: Storage) -> tuple[str, float]:
    """(one line: the estimated CPU time of refine's embedding and of training and the setting that shortens
    it, the estimated seconds)."""
    from near_ray.device import torch_device

    if torch_device() == "cuda":  # the project's one device rule (before Ray: a visible GPU is this process's)
        return "a GPU is visible here: no CPU estimate", 0.0
    refine = command in ("refine", "run") and cfg.refine.embed_gpus == 0
    train = command in ("train", "run") and not cfg.train.use_gpu
    if not (refine or train):
        return "GPUs configured (refine.embed_gpus, train.use_gpu): no CPU estimate", 0.0
    images, more = count_images(cfg, storage)
    n = f"{'at least ' if more else ''}{images:,} images"
    passes = images * ((1 if refine else 0) + (cfg.train.epochs if train else 0))
    if passes < FEW_PASSES:  # timing costs seconds of imports: not worth it where the work is short anyway
        return f"{n}, {passes} image passes through the CLIP: short work, not timed", 0.0
    from near_ray.model.clip import create_clip

    clip = create_clip(cfg.model.model_copy(update={"pretrained": RANDOM_INIT}))  # the speed is the weights'
    measured: dict[tuple[int, bool], float] = {}

    def timed(threads: int, backward: bool) -> float:
        if (threads, backward) not in measured:
            measured[threads, backward] = seconds_per_image(clip, threads, backward)
        return measured[threads, backward]

    parts, total = [], 0.0
    if refine:
        threads = max(1, math.ceil(cfg.refine.embed_actor_cpus))
        s = timed(threads, False)
        t = s * images / cfg.refine.embed_actors
        total += t
        parts.append(f"refine embeds {n} in about {_duration(t)} of compute ({s:.3f} s an image on {threads} thread(s) here, "
                     f"{cfg.refine.embed_actors} actor(s); refine.embed_gpus: 1 on a GPU node, or more "
                     "refine.embed_actors on more cores, shortens it)")
    if train:
        threads = cfg.train.torch_threads or max(1, math.ceil(cfg.train.cpus_per_worker))
        backward = cfg.train.train_towers != "text"
        s = timed(threads, backward)
        t = s * images * cfg.train.epochs / cfg.train.num_workers
        total += t
        parts.append(f"training passes {n} {cfg.train.epochs} times in about {_duration(t)} of compute per method (the image "
                     f"tower{' forward and backward' if backward else ', forward only'}: {s:.3f} s an image on "
                     f"{threads} thread(s) here, {cfg.train.num_workers} worker(s); train.use_gpu: true on GPU "
                     "nodes, or fewer train.epochs, shortens it)")
    return "no GPU here: " + "; ".join(parts), total


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
