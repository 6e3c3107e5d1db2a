"""One thread for torch compute per process: the embedding actor, the classify actor and the Serve
model replica build and run their models on ``near_ray.device.compute_thread``, whichever thread Ray
calls them from. A torch op run in another thread gives that thread an OpenMP team of its own, and
teams on the same cores slow every parallel op (see ``compute_thread``'s docstring for the figure)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from near_ray.config import ModelConfig
from near_ray.device import compute_thread, on_compute_thread
from near_ray.storage import Storage

TEAMS = """
import os, threading, torch
from concurrent.futures import ThreadPoolExecutor
from near_ray.device import on_compute_thread

torch.set_num_threads(2)
x = torch.randn(512, 1024)
op = lambda: float((x * 2 + 1).relu().sum())  # large enough for a parallel region
threads = lambda: len(os.listdir("/proc/self/task"))

callers = [ThreadPoolExecutor(1) for _ in range(3)]  # kept alive, as Ray's and Serve's threads are
for c in callers:
    c.submit(int).result()  # the callers' own threads exist before counting
base = threads()
for c in callers:
    c.submit(lambda: on_compute_thread(op)).result()
routed = threads() - base
base = threads()
for c in callers:
    c.submit(op).result()
print(routed, threads() - base)
"""


def test_torch_work_routed_through_the_compute_thread_keeps_one_openmp_team():
    out = subprocess.run([sys.executable, "-c", TEAMS], capture_output=True, text=True, timeout=120, check=True)
    routed, direct = map(int, out.stdout.split())
    # Three callers through the compute thread: the compute thread itself and one OpenMP worker.
    assert routed <= 2, out.stdout
    # The same op run in each caller directly starts a team in each of them (one worker apiece).
    assert direct >= 3, out.stdout


def test_on_compute_thread_runs_everything_on_one_thread_and_inline_when_nested():
    idents = []

    def where() -> int:
        idents.append(threading.get_ident())
        return on_compute_thread(threading.get_ident)  # nested: inline, not a deadlock

    with ThreadPoolExecutor(4) as pool:
        nested = list(pool.map(lambda _: on_compute_thread(where), range(8)))
    assert len(set(idents)) == 1 and set(nested) == set(idents)
    assert idents[0] not in {threading.get_ident()}
    assert compute_thread().submit(threading.get_ident).result() == idents[0]


def _compute_ident() -> int:
    return compute_thread().submit(threading.get_ident).result()


def test_the_embedding_actor_builds_and_encodes_on_the_compute_thread(tmp_path):
    from near_ray.refine.embed import ImageEmbedder

    uris = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
        uris.append(str(path))
    # Ray Data builds the callable in the actor's thread and calls it from a thread of its own.
    embedder = ThreadPoolExecutor(1).submit(ImageEmbedder, ModelConfig(arch="near-tiny", pretrained="random"), Storage(), 10_000_000, 2).result()
    seen = []
    embedder.clip.model.visual.register_forward_hook(lambda *_: seen.append(threading.get_ident()))
    batch = {"image_id": np.array(["a", "b", "c"]), "uri": np.array(uris), "domain": np.array(["d"] * 3)}
    out = ThreadPoolExecutor(1).submit(embedder, batch).result()
    assert seen == [_compute_ident()]
    assert out["embedding"].shape[0] == 3 and not any(out["error"])
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)


def test_the_serve_batcher_runs_batches_on_the_compute_thread():
    from near_ray.serve.batching import AdaptiveBatcher

    seen = []

    def model(items: list) -> list:
        seen.append(threading.get_ident())
        return [x + 1 for x in items]

    async def scenario() -> list:
        batcher = AdaptiveBatcher(model, max_batch_size=4)
        return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    assert asyncio.run(scenario()) == list(range(1, 11))
    assert set(seen) == {_compute_ident()}
