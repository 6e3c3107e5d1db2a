"""The Ray Train plumbing both trainers share (fine-tuning in ``stage``/``loop``, pretraining in ``pretrain``).

Driver side: where checkpoints live (``ray_run_config``), how many workers with which resources
(``scaling_config``), ``fit`` with a user-facing error, loading a finished checkpoint. Worker side:
the ``Session`` a loop talks to (Ray Train's, or one in-process worker for benchmarks), the seeded
per-epoch order and the per-epoch report with its checkpoint.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from near_ray.config.base import affects_results, result_fields
from near_ray.config.train import RENAMED, TrainConfig
from near_ray.console import Progress
from near_ray.errors import NearRayError
from near_ray.storage import Storage, is_s3

if TYPE_CHECKING:
    import torch

    from near_ray.config import RunConfig


class TrainError(NearRayError):
    """Training could not finish; the message says which run and where its checkpoints are."""


# ------------------------------------------------------------------------------------------ driver
# The layout of the per-sample state in a checkpoint: part of a run's name, so a checkpoint written by
# another layout is never resumed (it would not fit).
STATE_FORMAT = 2
# Settings of what happens after training (the bundle's classifier and vocabulary), not of what it learns;
# with the settings of where and how fast it trains (marked WHERE_IT_RUNS in TrainConfig), NOT_LEARNED:
# runs that differ only in these share their checkpoints.
AFTER_TRAINING = {"method", "prototype_weight", "min_label_support", "prototype_clusters", "prototype_vote"}
NOT_LEARNED = AFTER_TRAINING | {name for name, f in TrainConfig.model_fields.items() if not affects_results(f)}


def learned_settings(train: TrainConfig) -> dict[str, Any]:
    """The train settings a run's name hashes (all but NOT_LEARNED), renamed fields under their former names
    (near_ray.config.train.RENAMED): the same settings keep their run, and its checkpoints, across a rename."""
    return {RENAMED.get(k, k): v for k, v in result_fields(train, mode="json").items() if k not in AFTER_TRAINING}


def run_name(kind: str, cfg: RunConfig, *inputs: Any) -> str:
    """The Ray Train run (and checkpoint folder) of ``kind`` for this config: ``<kind>-<fingerprint>``.

    A re-run of the same config (and inputs, e.g. refine's fingerprint) resumes its checkpoints; a run
    that would learn something else (another seed, lr, loss or starting model) starts its own instead
    of resuming a stale one. Two methods whose training is the same (an ablation of the classifier
    only) share one run: the second finds it finished and only exports its bundle.
    """
    import hashlib
    import json

    blob = json.dumps([kind, STATE_FORMAT, cfg.model.model_dump(mode="json"), learned_settings(cfg.train), *inputs],
                      sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def ray_run_config(cfg: RunConfig, name: str, storage: Storage) -> Any:
    """RunConfig with checkpoints at ``{workdir}/train/{name}`` (S3 through a pyarrow filesystem)."""
    import ray.train

    base = cfg.paths.train
    if is_s3(base):
        path, fs = base[len("s3://") :], storage.pa_filesystem()
    else:
        path, fs = str(Path(base).resolve()), None
    return ray.train.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoint_keep),
    )


def scaling_config(cfg: RunConfig) -> Any:
    import ray.train

    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    return ray.train.ScalingConfig(
        num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources,
        accelerator_type=cfg.train.accelerator_type if cfg.train.use_gpu else None,
    )


def epoch_feed() -> Any:
    """Where rank 0 posts each epoch's metrics so the driver can show them (a small Ray queue actor)."""
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0})


def post_epoch(feed: Any, metrics: dict[str, Any]) -> None:
    """Worker side of ``epoch_feed``: never blocks, never fails the epoch."""
    if feed is None:
        return
    try:
        feed.put_nowait({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
    except Exception:  # a full or vanished feed only costs a progress line
        pass


def fit(trainer: Any, what: str, feed: Any = None, epochs: int | None = None, label: str | None = None,
        tracker: Any = None) -> Any:
    """``trainer.fit()`` with a user-facing error naming ``what`` when the run fails for good; with
    ``feed`` (``epoch_feed``), a progress line ``label`` per epoch while it runs, and each epoch's
    metrics to ``tracker`` (``tracking.open_tracker``: TensorBoard or MLflow) when there is one."""
    import threading

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as e:  # re-raised below, on the driver's thread
            outcome["error"] = e

    thread = threading.Thread(target=run, name="near-ray-fit", daemon=True)
    thread.start()
    bar = Progress(label or what, epochs, "epochs") if feed is not None else None
    while thread.is_alive():
        thread.join(timeout=0.5)
        while bar is not None and not feed.empty():
            m = feed.get_nowait()
            loss = f"loss {m['loss']:.4f}" if isinstance(m.get("loss"), float) else ""
            bar.update(done=int(m.get("epoch", -1)) + 1, extra=loss)
            if tracker is not None:
                tracker.log(m)
    if bar is not None:
        bar.close()
        _shutdown(feed)
    if tracker is not None:
        tracker.close()
    if "error" in outcome:
        e = outcome["error"]
        raise TrainError(f"{what}: training failed after retries: {type(e).__name__}: {e}") from e
    result = outcome["result"]
    if result.checkpoint is None:
        raise TrainError(f"{what}: training finished without a checkpoint")
    return result


def _shutdown(feed: Any) -> None:
    try:
        feed.shutdown()
    except Exception:  # already gone with its job
        pass


def load_trained_state(checkpoint: Any, clip: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a training checkpoint's weights into ``clip.model``; returns its per-sample state and meta."""
    from near_ray.train.checkpoint import load_checkpoint

    with checkpoint.as_directory() as folder:
        state, meta = load_checkpoint(folder, clip.model)
    clip.model.eval()
    return state, meta


def load_trained(checkpoint: Any, clip: Any) -> dict[str, Any]:
    """Load a training checkpoint's weights into ``clip.model``; returns its meta (epoch, history)."""
    return load_trained_state(checkpoint, clip)[1]


# ------------------------------------------------------------------------------------------ worker
class RayTrainSession:
    """What a loop needs from its runtime, served by Ray Train (the normal case)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train, self._torch = ray.train, ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint_dir(self) -> Any:
        checkpoint = self._train.get_checkpoint()
        return None if checkpoint is None else checkpoint.as_directory()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self._torch.prepare_model(model)

    def dataset(self) -> Any:
        return self._train.get_dataset_shard("train")

    def report(self, metrics: dict, folder: str | None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(folder) if folder else None
        self._train.report(metrics, checkpoint=checkpoint)


class InProcessSession:
    """One worker in the calling process, without a Ray Train worker group (benchmarks, quick runs).

    Checkpoints are copied to ``folder`` (latest kept), so the run still resumes and exports the same way.
    """

    def __init__(self, dataset: Any, folder: str, device: str = "cpu") -> None:
        import torch

        self.rank, self.world_size, self.device = 0, 1, torch.device(device)
        self._dataset, self.folder = dataset, Path(folder)

    def checkpoint_dir(self) -> Any:
        return nullcontext(str(self.folder)) if (self.folder / "meta.json").exists() else None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def dataset(self) -> Any:
        return self._dataset

    def report(self, metrics: dict, folder: str | None) -> None:
        if folder:
            tmp = self.folder.with_name(self.folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(folder, tmp)
            shutil.rmtree(self.folder, ignore_errors=True)
            tmp.rename(self.folder)


class MemoryShard:
    """A worker's shard held in memory, for the loops without Ray Data (the GPU check's first tier, which
    runs on a machine with torch and no Ray): ``iter_batches`` as Ray Data's, its local shuffle a seeded
    permutation of the whole shard."""

    def __init__(self, columns: dict[str, Any]) -> None:
        self.columns = columns
        self.rows = len(next(iter(columns.values())))

    def iter_batches(self, batch_size: int, batch_format: str = "numpy", drop_last: bool = False,
                     prefetch_batches: int = 0, local_shuffle_buffer_size: int | None = None,
                     local_shuffle_seed: int | None = None) -> Any:
        import numpy as np

        order = (np.random.default_rng(local_shuffle_seed).permutation(self.rows) if local_shuffle_buffer_size
                 else np.arange(self.rows))
        for i in range(0, self.rows, batch_size):
            rows = order[i : i + batch_size]
            if drop_last and len(rows) < batch_size:
                break
            yield {k: v[rows] for k, v in self.columns.items()}


def set_threads(tc: TrainConfig) -> None:
    """``train.torch_threads`` when set (Ray gives a worker with under 2 CPUs a single thread)."""
    import torch

    if tc.torch_threads:
        torch.set_num_threads(int(tc.torch_threads))


def shuffle_kwargs(tc: TrainConfig, epoch: int, rank: int) -> dict[str, Any]:
    """``iter_batches`` arguments for a different, reproducible order every epoch on every worker."""
    if not tc.shuffle_buffer:
        return {}
    return {"local_shuffle_buffer_size": tc.shuffle_buffer, "local_shuffle_seed": tc.seed * 100_003 + epoch * 1_009 + rank}


def prefetch_batches(tc: TrainConfig, device: Any) -> int:
    """``train.prefetch_batches``, or by default: one batch ahead on a GPU, where formatting it in Ray
    Data's thread overlaps the device's step; on a CPU worker whose step runs a team of several
    threads, none. There the prefetch thread takes a core from the team at every batch, and each
    parallel op of the step waits at its barriers for the thread it preempted: measured with
    ``benchmarks/train_throughput.py`` on 2 cores, one worker of 2 threads trained 0.85-0.97 as fast
    as the plain loop with a batch ahead (four runs) and 0.90-1.08 without. A one-thread worker keeps its batch
    ahead: it has no barriers, and the prefetch hides its wait for the next block."""
    import torch

    if tc.prefetch_batches is not None:
        return tc.prefetch_batches
    return 1 if torch.device(device).type != "cpu" or torch.get_num_threads() == 1 else 0


def epoch_batches(shard: Any, batch_size: int, device: Any, tc: TrainConfig, epoch: int, rank: int) -> Any:
    """This epoch's batches as torch tensors on ``device``, converted in the calling (training) thread.

    Not ``iter_torch_batches``: it converts numpy to torch in Ray Data's iterator threads, and a torch op
    run in another thread gives that thread an OpenMP team of its own. Two teams on the same cores make
    every parallel op of the training thread wait at barriers: measured on 2 cores, a near-tiny step took
    ~320 ms instead of ~200 ms once a second thread had run one parallel op. Here the iterator yields
    numpy only; the copy out of the (read-only) object-store block is a numpy memcpy, and the tensors
    are made in the thread that trains.
    """
    import numpy as np
    import torch

    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False,
                                    prefetch_batches=prefetch_batches(tc, device), **shuffle_kwargs(tc, epoch, rank)):
        yield {k: torch.from_numpy(np.array(v, copy=True)).to(device) for k, v in batch.items()}


def report_epoch(session: Any, metrics: dict, model: Any, optimizer: Any, state: dict[str, Any], meta: dict) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (weights, state and optimizer are replicated)."""
    from near_ray.train.checkpoint import save_checkpoint

    if session.rank != 0:
        session.report(metrics, None)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, model, optimizer, state, meta)
        session.report(metrics, folder)
