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
