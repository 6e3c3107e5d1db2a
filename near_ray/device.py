"""The compute core's device rule (which device a process may use) and its one compute thread. No Ray import:
a process inside Ray is recognised by the ``ray`` module it has already imported."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from near_ray.errors import NearRayError


class DeviceError(NearRayError):
    """Ray gave this process GPUs that torch cannot use."""


def torch_device() -> str:
    """The device this process may use: "cuda" only when Ray assigned it GPUs.

    Ray 2.60 no longer hides a node's GPUs from workers that reserved none, so
    ``torch.cuda.is_available()`` alone would let a 0-GPU actor (or a driver, which Ray never assigns
    GPUs) take a GPU that Ray gave someone else. Outside Ray (a plain script), a visible GPU is used.
    A process Ray assigned GPUs that torch cannot see is an error, not a quiet fall back to the CPU:
    on a node whose driver is older than the CUDA build of torch needs, every embed, classify and serve
    actor would otherwise run in fp32 on the CPU, holding GPUs it never uses.
    """
    import torch

    ray = sys.modules.get("ray")  # a Ray worker has always imported ray; a plain script need not
    gpu_ids = ray.get_gpu_ids() if ray is not None and ray.is_initialized() else None
    if not torch.cuda.is_available():
        if gpu_ids:
            raise DeviceError(
                f"Ray assigned GPU(s) {gpu_ids} to this process but torch {torch.__version__} sees no CUDA device "
                f"(built for CUDA {torch.version.cuda or 'none'}; CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): the node's NVIDIA driver may be older than "
                "this torch needs, or this torch is a CPU build. Fix the node's image, or ask for no GPUs "
                "(refine.embed_gpus, refine.knn_gpus, classify.gpus_per_actor, serve.gpus_per_replica: 0)"
            )
        return "cpu"
    if gpu_ids is not None:
        return "cuda" if gpu_ids else "cpu"
    return "cuda"


T = TypeVar("T")
_compute: ThreadPoolExecutor | None = None
_compute_lock = threading.Lock()
_compute_ident: int | None = None


def compute_thread() -> ThreadPoolExecutor:
    """This process's one thread for torch compute: actors and replicas build and run their models here.

    Torch's CPU kernels parallelize with OpenMP, and every thread that runs a parallel op gets an OpenMP
    team of its own. Ray runs user code in threads of its choosing (an actor's ``__init__`` in one,
    Ray Data's batches in another, Serve's sync calls in a pool), so a model built in one thread and
    run in another, or batches landing on different pool threads, leave several teams waiting on the
    same cores, and every parallel op of the forward pass pays for it at its barriers (measured on 2
    cores: a near-tiny training step ~200 ms with one team, ~320 ms once a second thread had run one
    parallel op). Running all torch work through this one thread keeps one team per process.
    """
    global _compute, _compute_ident
    with _compute_lock:
        if _compute is None:
            _compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="near-ray-compute")
            _compute_ident = _compute.submit(threading.get_ident).result()
        return _compute


def on_compute_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the compute thread, waiting for it (inline when already there)."""
    pool = compute_thread()
    if threading.get_ident() == _compute_ident:
        return fn(*args, **kwargs)
    return pool.submit(fn, *args, **kwargs).result()
