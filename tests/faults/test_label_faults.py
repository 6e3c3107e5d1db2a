"""Faults in the label stage: a killed driver, a failing annotator, corrupt files in the bucket.

Real runs: the session's Ray cluster, moto S3 over HTTP, the simulated annotator over HTTP. What must
hold is checked on storage (the labels table) and on the annotator's own counters (/stats).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import boto3
import pytest
from PIL import Image

from near_ray.config import load_config
from near_ray.label.stage import run_label
from near_ray.label.table import read_labels, read_labels_table
from near_ray.sim.annotator import AnnotatorServer
from near_ray.sim.synth import generate
from near_ray.storage import Storage

pytestmark = pytest.mark.slow  # real runs of a stage each, with a fault

SAMPLES = 2


@pytest.fixture(scope="module")
def bench(s3_endpoint) -> str:
    """A synthetic benchmark on moto S3: birds and flowers, 5 species x 10 images each (100 images)."""
    name = f"faults-bench-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    out = f"s3://{name}/bench"
    generate(out, ["birds", "flowers"], species=5, images_per_species=10, image_size=32, seed=0,
             test_fraction=0.2, storage=Storage())  # fmt: skip
    return out


def _overrides(workdir: str, base_url: str, domains: list[dict], *extra: str) -> list[str]:
    return [
        f"storage.workdir={workdir}",
        f"label.backend.base_url={base_url}",
        f"label.samples={SAMPLES}",
        "label.backend.backoff_base_s=0.05",
        "label.backend.backoff_max_s=0.5",
        f"data.domains={json.dumps(domains)}",
        *extra,
    ]


def _domains(bench: str) -> list[dict]:
    return [{"name": "birds", "uri": f"{bench}/images/birds", "meta_class": "bird"},
            {"name": "flowers", "uri": f"{bench}/images/flowers"}]


def _images(bench: str) -> list[str]:
    return sorted(o.uri for d in _domains(bench) for o in Storage().list(d["uri"], suffixes=[".png"]))


def _exactly_once(df, uris: list[str]) -> int:
    """Rows of the labels table beyond one per (image, sample); asserts none is missing."""
    keys = set(zip(df["uri"], df["sample"], strict=True))
    assert keys == {(u, s) for u in uris for s in range(SAMPLES)}, "an image x sample is missing"
    return len(df) - len(keys)


def _quiet(ann: AnnotatorServer, seconds: float = 2.0) -> int:
    """Wait until the annotator has received no request for ``seconds``; returns its request count."""
    before, since = ann.stats()["requests"], time.monotonic()
    while time.monotonic() - since < seconds:
        time.sleep(0.25)
        now = ann.stats()["requests"]
        if now != before:
            before, since = now, time.monotonic()
    return before


# ------------------------------------------------------------------------------------------ killed driver
def test_killed_label_driver_resubmitted_labels_every_image_once(ray_cluster, bench, tmp_path, repo_root,
                                                                 fault_figures):
    import ray

    uris = _images(bench)
    total = len(uris) * SAMPLES
    workdir = str(tmp_path / "run")
    with AnnotatorServer(bench, profile="strong", seed=0, faults={"latency_s": 0.3}) as ann:
        overrides = _overrides(workdir, ann.base_url, _domains(bench), "label.backend.concurrency=2",
                               "label.batch_size=4", "label.part_rows=4", "label.flush_interval_s=1")
        cfg = load_config(None, overrides)
        cmd = [sys.executable, "-m", "near_ray.cli", "label"] + [a for o in overrides for a in ("--set", o)]
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                done = read_labels_table(cfg.artifact("labels"), Storage())
                if done is not None and done.num_rows >= total // 4:
                    break
                time.sleep(0.2)
        finally:
            proc.kill()  # SIGKILL: no clean-up, no flush
            proc.wait(timeout=30)
        _quiet(ann)  # the dead driver's labeler actors stop asynchronously
        paid_before = ann.stats()["answers_paid"]
        kept = read_labels_table(cfg.artifact("labels"), Storage())
        assert kept is not None and 0 < kept.num_rows < total, "the driver was killed half-way, some parts written"

        summary = run_label(cfg)  # resubmitted with the same config
        stats = ann.stats()
    df = read_labels(cfg)
    extra_rows = _exactly_once(df, uris)
    assert extra_rows == 0
    assert summary["mllm_calls"] == total - kept.num_rows, "the resumed run asks only for what is not on storage"
    lost = paid_before - kept.num_rows  # paid for the killed run, never written: asked (and paid) again
    duplicates = stats["duplicate_answers"]
    assert duplicates == lost, (duplicates, lost, stats)
    fault_figures.record(
        "label_driver_killed",
        f"SIGKILL after {kept.num_rows}/{total} rows on storage; resumed run asked {summary['mllm_calls']}; "
        f"rows missing or doubled 0; duplicate paid calls {duplicates} (answered in flight, unwritten: {lost})",
        rows_total=total, rows_kept=kept.num_rows, resumed_calls=summary["mllm_calls"], rows_missing=0,
        rows_doubled=extra_rows, duplicate_paid_calls=duplicates, answered_unwritten=lost, duplicate_bound=20,
    )
    # Stated bound: a paid answer is lost only if the labeler actor held it (its batches in flight:
    # label.batches_per_actor = 4 of label.batch_size = 4 rows, returned when a whole batch is answered),
    # it was queued to the driver, or the driver had not flushed it (one part of 4 rows); the annotator
    # aborts requests whose client went away. Zero would need each answer persisted as it is paid.
    assert duplicates <= 4 * 4 + 4, stats


# ------------------------------------------------------------------------------------------ failing annotator
def test_annotator_failing_a_fifth_of_calls_loses_nothing(ray_cluster, bench, tmp_path, fault_figures):
    faults = {"rate_429": 0.04, "retry_after_s": 0.2, "rate_500": 0.04, "rate_hang": 0.03, "hang_s": 5.0,
              "rate_malformed": 0.03, "rate_wrong_shape": 0.03, "rate_truncated": 0.03}  # fmt: skip
    uris = _images(bench)
    with AnnotatorServer(bench, profile="strong", seed=3, faults=faults) as ann:
        cfg = load_config(None, _overrides(str(tmp_path / "run"), ann.base_url, _domains(bench),
                                           "label.backend.timeout_s=1.0", "label.backend.max_retries=4",
                                           "label.backend.concurrency=16"))  # fmt: skip
        t0 = time.monotonic()
        run_label(cfg)
        seconds = time.monotonic() - t0
        stats = ann.stats()
    df = read_labels(cfg)
    assert _exactly_once(df, uris) == 0
    injected = {k: stats["outcomes"][k] for k in ("http_429", "http_500", "hang", "malformed", "wrong_shape", "truncated")}
    assert all(v > 0 for v in injected.values()), injected
    share = sum(injected.values()) / stats["requests"]
    assert 0.12 < share < 0.3, (share, stats)  # about a fifth of all calls failed
    assert set(df["status"]) <= {"ok", "unparsable", "mllm_error"}
    errors = df[df["status"] == "mllm_error"]
    assert all(r.uri in r.error for r in errors.itertuples()), "an error names its image"
    answered = df[df["status"] != "mllm_error"]
    assert answered["raw_answer"].notna().all()
    # With 4 retries, a row ends as mllm_error only if 5 attempts in a row fail (0.2^5 per row).
    assert len(errors) <= 2, errors[["uri", "error"]]
    fault_figures.record(
        "annotator_failing_20pct",
        f"{sum(injected.values())} of {stats['requests']} calls failed ({share:.0%}: {injected}); "
        f"{len(df)} rows, 0 lost, {len(errors)} mllm_error after retries, {seconds:.1f} s",
        calls=stats["requests"], failed_calls=sum(injected.values()), by_fault=injected, rows=len(df),
        rows_lost=0, mllm_error_rows=len(errors), seconds=round(seconds, 2),
        duplicate_paid_calls=stats["duplicate_answers"],
    )
    assert stats["duplicate_answers"] == 0, "a failed attempt is never a paid answer"


# ------------------------------------------------------------------------------------------ corrupt files
def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")  # 81 Mpx claimed (> label.image.max_pixels), a few kB
    return buf.getvalue()


def _tiny() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), (200, 10, 10)).save(buf, format="PNG")  # below label.image.min_side
    return buf.getvalue()


def test_five_percent_corrupt_files_become_bad_image_rows(ray_cluster, bench, bucket, fault_figures):
    storage = Storage()
    good = _images(bench)[:95]
    prefix = f"{bucket}/mixed"
    for i, uri in enumerate(good):
        storage.write_bytes(f"{prefix}/good{i:03d}.png", storage.read_bytes(uri))
    sample = storage.read_bytes(good[0])
    bad = {  # name -> (bytes, what the error must say)
        "empty.png": (b"", "empty file"),
        "truncated.png": (sample[: len(sample) // 3], "truncated or corrupt"),
        "report.png": (b"%PDF-1.7\n" + os.urandom(300), "not an image"),
        "bomb.png": (_bomb(), "too large"),
        "tiny.png": (_tiny(), "too small"),
    }
    for name, (data, _) in bad.items():
        storage.write_bytes(f"{prefix}/{name}", data)
    with AnnotatorServer(bench, profile="strong", seed=0) as ann:
        cfg = load_config(None, _overrides(f"{bucket}/run", ann.base_url,
                                           [{"name": "birds", "uri": prefix, "meta_class": "bird"}]))
        summary = run_label(cfg)
        asked = ann.stats()["requests"]
    df = read_labels(cfg)
    uris = [f"{prefix}/good{i:03d}.png" for i in range(len(good))] + [f"{prefix}/{n}" for n in bad]
    assert _exactly_once(df, uris) == 0
    for name, (_, problem) in bad.items():
        rows = df[df["uri"] == f"{prefix}/{name}"]
        assert set(rows["status"]) == {"bad_image"}, rows
        assert rows["error"].str.contains(f"{prefix}/{name}", regex=False).all(), "the error names the file"
        assert rows["error"].str.contains(problem).all(), (name, rows["error"].tolist())
    labeled = df[df["uri"].str.contains("/good")]
    assert set(labeled["status"]) <= {"ok", "unparsable"}
    assert asked == len(good) * SAMPLES, "bad files cost no MLLM call"
    fault_figures.record(
        "corrupt_files_5pct",
        f"{len(bad)} of {len(uris)} files corrupt (empty, truncated, PDF, bomb, 3x3 px): {len(bad)} named bad_image, "
        f"{len(good)} labeled, 0 MLLM calls for bad files",
        files=len(uris), corrupt=len(bad), bad_image_named=len(bad), labeled=len(good),
        mllm_calls=asked, bad_images_in_summary=summary["bad_images"],
    )
