"""train.tracking: the driver's per-epoch metrics as TensorBoard event files (local and S3) or MLflow runs."""

from __future__ import annotations

import importlib.util

import pytest
from support.training import scalars

from near_ray.config import RunConfig
from near_ray.storage import Storage
from near_ray.train.tracking import open_tracker

EPOCHS = [{"epoch": 0, "loss": 2.5, "clean_fraction": 0.4, "method": "near"},
          {"epoch": 1, "loss": 1.75, "clean_fraction": 0.6, "method": "near"}]


def config(workdir: str, **tracking) -> RunConfig:
    return RunConfig.model_validate({"storage": {"workdir": workdir}, "train": {"tracking": tracking}})


def test_no_tracker_unless_configured(tmp_path):
    assert open_tracker(config(str(tmp_path)), "near") is None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_tensorboard_tracker_writes_every_epoch_below_the_workdir(where, tmp_path, request):
    workdir = str(tmp_path / "run") if where == "local" else f"{request.getfixturevalue('bucket')}/run"
    tracker = open_tracker(config(workdir, backend="tensorboard"), "near")
    for metrics in EPOCHS:
        tracker.log(metrics)
        files = [o.uri for o in Storage().list(f"{workdir}/tensorboard/near") if "tfevents" in o.uri]
        assert len(files) == 1  # visible after each epoch, not only when training ends
    tracker.close()
    points = scalars(Storage().read_bytes(files[0]))
    assert {(t, s, v) for t, s, v in points if t == "train/loss"} == {("train/loss", 0, 2.5), ("train/loss", 1, 1.75)}
    assert {t for t, _, _ in points} == {"train/loss", "train/clean_fraction"}  # strings and the step are not scalars


def test_a_failing_tracker_warns_once_and_never_raises(bucket, caplog):
    tracker = open_tracker(config(f"{bucket}/run", backend="tensorboard"), "near")
    Storage().s3.delete_bucket(Bucket=bucket.removeprefix("s3://"))  # the bucket goes away mid-training
    for metrics in EPOCHS:
        tracker.log(metrics)
    tracker.close()
    warnings = [r.getMessage() for r in caplog.records if "tracking to" in r.getMessage()]
    assert len(warnings) == 1 and "bucket does not exist" in warnings[0], warnings


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                    reason="mlflow is not installed in this environment (install it where the job's driver runs)")
def test_mlflow_tracker_logs_epochs_and_a_resumed_run_continues_it(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"file://{tmp_path / 'mlruns'}"
    cfg = config(str(tmp_path / "run"), backend="mlflow", uri=uri, experiment="near_ray_test")
    first = open_tracker(cfg, "near")
    first.log(EPOCHS[0])
    run_id = first.tracker.run_id  # a driver that dies leaves the run unfinished
    again = open_tracker(cfg, "near")
    again.log(EPOCHS[1])
    again.close()
    assert again.tracker.run_id == run_id
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.5), (1, 1.75)]
