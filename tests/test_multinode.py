"""The pipeline on a Ray cluster of several nodes (a head and two workers on 127.0.0.1, tests/support/multinode.py):
every stage's actors spread over both worker nodes, every image asked about and named once, over S3."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from near_ray.classify.table import read_predictions
from near_ray.sim.annotator import AnnotatorServer
from near_ray.storage import Storage

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent / "support" / "multinode.py"
# the actors of each stage, by the class name Ray records for them
STAGE_ACTORS = {"label": "OpenAILabeler", "refine": "ImageEmbedder", "train": "RayTrainWorker", "classify": "ImageTower",
                "serve": "ServeReplica:near_ray:Classifier"}


@pytest.mark.timeout(1800)
def test_every_stage_runs_on_two_nodes_and_nothing_is_asked_or_named_twice(synth_bench, bucket, tmp_path):
    root = synth_bench(images_per_species=4, s3=True)
    images = [o.uri for o in Storage().list(f"{root}/images")]
    assert "/images/birds/" in images[0]
    workdir, out = f"{bucket}/run", tmp_path / "multinode.json"
    with AnnotatorServer(root, profile="strong", seed=0) as annotator:
        done = subprocess.run([sys.executable, str(SCRIPT), root, workdir, annotator.base_url, str(out), images[0], "birds"],
                              capture_output=True, text=True, timeout=1500)
        assert done.returncode == 0, done.stderr[-4000:]
        paid = annotator.stats()["answers_paid"]
    result = json.loads(out.read_text())
    workers = set(result["nodes"]["workers"])
    for stage, name in STAGE_ACTORS.items():
        nodes = {n for cls, ns in result["actors"].items() if name in cls for n in ns}
        assert nodes == workers, (stage, name, sorted(result["actors"]))  # both workers; the head had no room
    assert paid == len(images) * 2  # every image x sample answered once, across two labelers on two nodes
    summary = result["summary"]
    assert summary["label"]["images_labeled"] == len(images)
    assert summary["classify"]["images_computed"] + summary["classify"]["images_copied"] == len(images)
    named = read_predictions(summary["classify"]["predictions"])
    assert sorted(named["uri"]) == sorted(images)  # the whole collection, each image once
    answers = result["answers"]  # over HTTP from two model replicas on two nodes: one answer, as classify's
    assert len(answers) == 20 and all(a["predictions"] == answers[0]["predictions"] for a in answers)
    first = named.set_index("uri").loc[images[0], "name"]  # null where classify abstained
    assert first is None or answers[0]["predictions"][0]["name"] == first


@pytest.mark.timeout(1800)
def test_a_worker_node_lost_mid_labeling_loses_nothing_and_pays_little_twice(synth_bench, tmp_path):
    """The node running a labeler (and the resume ledger's partition, when it is there) is removed a third of the
    way through: the stage finishes on the nodes left, or stops naming the lost ledger and a second run finishes.
    Either way every image x sample is in the labels table once, and only answers in flight were paid twice."""
    from near_ray.label.table import read_labels_table

    root = synth_bench(images_per_species=4, own=True)
    images = [o.uri for o in Storage().list(f"{root}/images")]
    workdir, out = str(tmp_path / "run"), tmp_path / "lost.json"
    # slow answers, two in flight per labeler: the labeling lasts long enough to lose a node in the middle of it
    with AnnotatorServer(root, profile="strong", seed=0, faults={"latency_s": 1.5}) as annotator:
        done = subprocess.run([sys.executable, str(SCRIPT), "lose-a-node", root, workdir, annotator.base_url, str(out)],
                              capture_output=True, text=True, timeout=1500)
        assert done.returncode == 0, done.stderr[-4000:]
        stats = annotator.stats()
    result = json.loads(out.read_text())
    assert result["lost"] in result["labeler_nodes"] and result["lost"] != result["head"]
    assert 0 < result["paid_at_loss"] < len(images) * 2
    first, *again = result["runs"]
    if result["lost"] in result["ledger_nodes"]:  # the ledger cannot outlive its node: a clear stop, then a rerun
        assert first["outcome"] == "failed" and first["error"].startswith("LedgerLostError: the resume ledger lost")
        assert [r["outcome"] for r in again] == ["finished"]
    else:  # the labeler is restarted on a node left; nothing else was on the lost node
        assert first["outcome"] == "finished" and not again
    labels = read_labels_table(f"{workdir}/labels", Storage()).to_pandas()  # every row written, parts as they are
    assert sorted(zip(labels["uri"], labels["sample"], strict=True)) == sorted((u, s) for u in images for s in range(2))
    # paid twice: at most what a lost labeler held (4 batches of 2 in flight) and what a stopped run had not written
    assert stats["duplicate_answers"] <= 8 + 8
