"""The S3 endpoint unavailable for a few seconds while the label stage writes its parts.

The test runs its own moto S3 server on its own port, in this process (``ThreadedMotoServer``).
Stopping it closes the listening socket: every client sees connections refused, as during an outage.
Restarting it on the same port brings the same objects back: moto keeps its state in the process
(it has no on-disk persistence; its recorder replays requests, which is not the same thing), so a
restarted server in the same process is the honest way to model "S3 was unreachable for 4 s".
"""

from __future__ import annotations

import io
import json
import threading
import time

import boto3
import pyarrow.parquet as pq
import pytest
from conftest import free_port, wait_for_port

from near_ray.config import load_config
from near_ray.errors import NearRayError
from near_ray.label.stage import run_label
from near_ray.label.table import FINAL_STATUSES, read_labels, read_labels_table
from near_ray.sim.annotator import AnnotatorServer
from near_ray.sim.synth import generate
from near_ray.storage import Storage

pytestmark = pytest.mark.slow  # real runs of a stage each, with a fault

SAMPLES = 2
OUTAGE_S = 4.0


class Endpoint:
    """A moto S3 server on 127.0.0.1:port that can go away and come back with its data."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        wait_for_port(self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture
def endpoint():
    ep = Endpoint()
    ep.start()
    yield ep
    ep.stop()


def test_s3_unavailable_during_a_write_never_leaves_a_partial_object_and_a_rerun_completes(
        ray_cluster, tmp_path, endpoint, fault_figures):
    bench = str(tmp_path / "bench")  # images on local disk: only the workdir's writes meet the outage
    generate(bench, ["birds"], species=4, images_per_species=10, image_size=32, seed=0, test_fraction=0.2,
             storage=Storage())  # fmt: skip
    s3 = boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1")
    s3.create_bucket(Bucket="outage")
    uris = sorted(o.uri for o in Storage().list(f"{bench}/images/birds", suffixes=[".png"]))
    total = len(uris) * SAMPLES
    with AnnotatorServer(bench, profile="strong", seed=0, faults={"latency_s": 0.25}) as ann:
        cfg = load_config(None, [
            "storage.workdir=s3://outage/run", f"storage.endpoint_url={endpoint.url}",
            f"label.backend.base_url={ann.base_url}", f"label.samples={SAMPLES}", "label.backend.concurrency=2",
            "label.batch_size=4", "label.part_rows=4", "label.flush_interval_s=0.5",
            f"data.domains={json.dumps([{'name': 'birds', 'uri': f'{bench}/images/birds'}])}",
        ])  # fmt: skip
        st = Storage.from_config(cfg.storage)
        outcome: dict = {}

        def label() -> None:
            try:
                outcome["summary"] = run_label(cfg)
            except NearRayError as e:
                outcome["error"] = e

        runner = threading.Thread(target=label, daemon=True)
        runner.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and runner.is_alive():
            table = read_labels_table(cfg.artifact("labels"), st)
            if table is not None and table.num_rows >= 4:
                break
            time.sleep(0.1)
        endpoint.stop()
        time.sleep(OUTAGE_S)
        endpoint.start()
        runner.join(timeout=300)
        first = "completed" if "summary" in outcome else "failed"
        if "error" in outcome:  # a clear error: which object, which endpoint
            message = str(outcome["error"])
            assert "s3://outage/run/labels" in message and endpoint.url in message, message
        else:
            assert "summary" in outcome, "the run neither finished nor failed"

        # Nothing half-written under a final name: every object parses whole.
        objects = [o["Key"] for o in s3.list_objects_v2(Bucket="outage").get("Contents", [])]
        for key in objects:
            body = s3.get_object(Bucket="outage", Key=key)["Body"].read()
            if key.endswith(".parquet"):
                pq.read_table(io.BytesIO(body))
            elif key.endswith(".json"):
                json.loads(body)
        kept = read_labels_table(cfg.artifact("labels"), st)
        rerun = run_label(cfg)
    df = read_labels(cfg)
    assert set(zip(df["uri"], df["sample"], strict=True)) == {(u, s) for u in uris for s in range(SAMPLES)}
    assert len(df) == total
    kept_rows = 0 if kept is None else kept.num_rows
    final = set() if kept is None else {(r["uri"], r["sample"]) for r in kept.to_pylist() if r["status"] in FINAL_STATUSES}
    assert rerun["mllm_calls"] == total - len(final), "the re-run asks for exactly what is not on storage"
    fault_figures.record(
        "s3_unavailable_during_write",
        f"endpoint down {OUTAGE_S:.0f} s mid-run: first run {first}"
        + (f" ({str(outcome['error'])[:90]}…)" if "error" in outcome else " (boto3 retried the writes)")
        + f"; {len(objects)} objects, 0 partial; re-run asked {rerun['mllm_calls']} and completed {total} rows",
        outage_s=OUTAGE_S, first_run=first, objects=len(objects), partial_objects=0, rows_kept=kept_rows,
        rerun_calls=rerun["mllm_calls"], rows=total,
    )
