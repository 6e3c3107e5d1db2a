"""Shared fixtures: a real S3 server (moto, over HTTP on 127.0.0.1) and one local Ray cluster per session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray's node IP = 127.0.0.1 (see near_ray/ray_session.py)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The raylet waits this long for its dashboard agent's ports; on a loaded 2-core machine the agent's
# imports alone took 40 s, past the default, and the node never came up.
os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server process on 127.0.0.1; AWS env vars point every client at it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout=120)  # importing moto takes long on a loaded machine
        endpoint = f"http://127.0.0.1:{port}"
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield endpoint
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh, empty bucket; yields its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


RAY_METRICS_PORT = free_port()  # the session cluster's Prometheus export (127.0.0.1:PORT/metrics)


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray cluster for the whole test session, bound to 127.0.0.1.

    Started after the S3 server so that its workers inherit the AWS_* variables pointing at it. Its
    metrics agent exports Prometheus text on 127.0.0.1:RAY_METRICS_PORT (see ``ray_metrics_url``).
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # a new cluster, never one another process on the machine is running
            num_cpus=4,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _metrics_export_port=RAY_METRICS_PORT,
            log_to_driver=False,
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_metrics_url(ray_cluster) -> str:
    return f"http://127.0.0.1:{RAY_METRICS_PORT}/metrics"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ shared data
@pytest.fixture(scope="session")
def synth_bench(tmp_path_factory, request):
    """Writes a synthetic benchmark (near_ray.sim.synth: images, truth.parquet, taxonomy.json) and returns its
    root: ``synth_bench(domains=..., species=..., images_per_species=..., image_size=..., seed=..., test_fraction=...,
    s3=False)``. Every test asking for the same settings shares one copy (the session's), so a test that writes
    into its benchmark (extra images, a corrupt file) asks for ``own=True``: a copy of its own."""
    from near_ray.sim.synth import generate
    from near_ray.storage import Storage

    made: dict[tuple, str] = {}

    def make(domains=("birds", "flowers"), species=3, images_per_species=4, image_size=32, seed=0,
             test_fraction=0.5, s3=False, own=False) -> str:
        key = (tuple(domains), species, images_per_species, image_size, seed, test_fraction, s3)
        if key in made and not own:
            return made[key]
        if s3:
            import boto3

            request.getfixturevalue("s3_endpoint")
            name = f"bench-{uuid.uuid4().hex[:12]}"
            boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=name)
            root = f"s3://{name}/bench"
        else:
            root = str(tmp_path_factory.mktemp("bench") / "bench")
        generate(out=root, domains=list(domains), species=species, images_per_species=images_per_species,
                 image_size=image_size, seed=seed, test_fraction=test_fraction, storage=Storage())
        if not own:
            made[key] = root
        return root

    return make


def write_test_bundle(uri: str, vocabulary, vectors="text", *, clip=None, seed: int = 0, arch: str = "near-tiny",
                      images=None, **save) -> str:
    """Saves a model bundle of a small random-init CLIP and returns its URI (the ``write_bundle`` fixture).

    ``vocabulary`` is entries ({name, domain, synonyms, support}) or (name, domain) pairs; ``vectors`` the class
    embeddings: "text" (the model's own text embeddings of the names, a zero-shot classifier), "images" with
    ``images`` a list of image lists, one per entry (each name's mean image embedding: a prototype classifier),
    or an array, one row per entry. The rest goes to ``save_bundle`` (``prompt_template``, ``logit_scale``,
    ``metrics``, ``storage``); ``clip`` reuses a model, ``seed`` draws another."""
    import numpy as np

    from near_ray.config import ModelConfig
    from near_ray.model.bundle import save_bundle
    from near_ray.model.clip import create_clip, encode_images, encode_texts

    entries = [v if isinstance(v, dict) else {"name": v[0], "domain": v[1], "synonyms": [], "support": 1}
               for v in vocabulary]
    clip = clip or create_clip(ModelConfig(arch=arch, pretrained="random", init_seed=seed))
    template = save.setdefault("prompt_template", "a photo of a {}.")
    save.setdefault("logit_scale", 50.0)
    if isinstance(vectors, str) and vectors == "images":
        means = [encode_images(clip, list(ims)).mean(axis=0) for ims in images]
        vectors = np.stack([m / np.linalg.norm(m) for m in means])
    elif isinstance(vectors, str):
        assert vectors == "text", vectors
        vectors = encode_texts(clip, [e["name"] for e in entries], template)
    save_bundle(uri, clip, entries, np.asarray(vectors, dtype=np.float32), **save)
    return uri


@pytest.fixture(scope="session")
def write_bundle():
    """The one way tests make a model bundle: ``write_test_bundle``."""
    return write_test_bundle


def species_prototypes(truth, taxonomy: dict, domains: list[str], per_species: int = 4) -> tuple[list, list]:
    """A synthetic benchmark's species as bundle entries (their synonyms from the taxonomy) and, per species, up
    to ``per_species`` of its train images: ``write_bundle(uri, entries, "images", images=images)`` is then a
    nearest-centroid classifier. ``truth`` is the benchmark's truth table with a ``uri`` column."""
    from near_ray.images import decode_image
    from near_ray.storage import Storage

    st, entries, images = Storage(), [], []
    for d in domains:
        for species, rows in truth[(truth["domain"] == d) & (truth["split"] == "train")].groupby("species"):
            images.append([decode_image(st.read_bytes(u)) for u in rows["uri"].iloc[:per_species]])
            synonyms = [species, *taxonomy["domains"][d]["species"][species]["synonyms"]]
            entries.append({"name": species, "domain": d, "synonyms": synonyms, "support": len(rows)})
    return entries, images
