"""Experiment tracking on the driver: each epoch's metrics, as rank 0 posts them to the epoch feed,
also go to TensorBoard or MLflow when ``train.tracking`` says so (Ray Train keeps its own copy).

Written on the driver, not in the workers: one writer per run whatever the worker count, no tracker
package needed on the GPU nodes, and a worker restart never writes an epoch twice into two runs. A
tracker that fails (server down, bucket gone) logs one warning and never fails the training.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from near_ray.errors import NearRayError
from near_ray.storage import Storage, is_s3, join, storage_for

if TYPE_CHECKING:
    from near_ray.config import RunConfig

log = logging.getLogger(__name__)


class TrackingError(NearRayError):
    """A tracker that cannot start: the message names ``train.tracking`` and what to install or fix."""


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics a tracker can plot: numbers, without the step (``epoch``) itself."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}


class TensorBoardTracker:
    """Event files at ``{uri}/{run}``; on S3 written locally and uploaded whole after every epoch."""

    def __init__(self, uri: str, run: str, storage: Storage) -> None:
        try:
            from tensorboardX.event_file_writer import EventsWriter
        except ImportError as e:
            raise TrackingError("train.tracking.backend=tensorboard needs the tensorboardX package") from e
        self.uri, self.storage = join(uri, run), storage
        self.local = Path(tempfile.mkdtemp(prefix="near_ray_tb_")) if is_s3(self.uri) else Path(self.uri)
        self.local.mkdir(parents=True, exist_ok=True)
        # The synchronous writer: SummaryWriter's queue thread may still hold an epoch when we upload.
        self.writer = EventsWriter(str(self.local / "events"))

    def log(self, metrics: dict[str, Any]) -> None:
        from tensorboardX.proto import event_pb2, summary_pb2

        values = [summary_pb2.Summary.Value(tag=f"train/{k}", simple_value=v) for k, v in numeric(metrics).items()]
        self.writer.write_event(event_pb2.Event(wall_time=time.time(), step=int(metrics.get("epoch", 0)),
                                                summary=summary_pb2.Summary(value=values)))
        self.writer.flush()
        if is_s3(self.uri):
            for path in self.local.rglob("*"):
                if path.is_file():
                    self.storage.write_bytes(join(self.uri, path.relative_to(self.local).as_posix()), path.read_bytes())

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """One MLflow run per (workdir, method): a resubmitted job continues the run it started."""

    def __init__(self, uri: str | None, experiment: str, run: str, params: dict[str, Any]) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise TrackingError("train.tracking.backend=mlflow needs the mlflow package (pip install mlflow)") from e
        self.client = MlflowClient(tracking_uri=uri or os.environ.get("MLFLOW_TRACKING_URI"))
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        key = f"{params['workdir']}#{run}"
        previous = self.client.search_runs([exp_id], filter_string=f"tags.near_ray_run = '{key}'",
                                           order_by=["attributes.start_time DESC"], max_results=1)
        if previous and previous[0].info.status != "FINISHED":
            self.run_id = previous[0].info.run_id
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run, tags={"near_ray_run": key}).info.run_id
            for name, value in params.items():
                self.client.log_param(self.run_id, name, value)

    def log(self, metrics: dict[str, Any]) -> None:
        step = int(metrics.get("epoch", 0))
        for key, value in numeric(metrics).items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class SafeTracker:
    """Tracking is for watching: a failing tracker warns once and stops, the training goes on."""

    def __init__(self, tracker: Tracker, where: str) -> None:
        self.tracker, self.where, self.failed = tracker, where, False

    def log(self, metrics: dict[str, Any]) -> None:
        self._call(self.tracker.log, metrics)

    def close(self) -> None:
        self._call(self.tracker.close)

    def _call(self, fn: Any, *args: Any) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as e:  # the tracker's own errors: say so once, keep training
            self.failed = True
            log.warning("tracking to %s stopped: %s: %s", self.where, type(e).__name__, e)


def open_tracker(cfg: RunConfig, run: str) -> SafeTracker | None:
    """The tracker ``train.tracking`` configures for the training run ``run`` (a method name), or None."""
    tc = cfg.train.tracking
    if tc.backend == "none":
        return None
    if tc.backend == "tensorboard":
        uri = tc.uri or cfg.paths.tensorboard
        tracker: Tracker = TensorBoardTracker(uri, run, storage_for(cfg))
        where = join(uri, run)
    else:
        params = {"workdir": cfg.storage.workdir, "method": run, "arch": cfg.model.arch,
                  "pretrained": cfg.model.pretrained, "epochs": cfg.train.epochs, "lr": cfg.train.lr,
                  "batch_size": cfg.train.batch_size, "num_workers": cfg.train.num_workers}
        tracker = MLflowTracker(tc.uri, tc.experiment, run, params)
        where = f"MLflow {tc.uri or 'MLFLOW_TRACKING_URI'} ({tc.experiment}/{run})"
    log.info("train %s: metrics also to %s", run, where)
    return SafeTracker(tracker, where)
