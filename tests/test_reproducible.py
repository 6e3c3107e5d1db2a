"""The same commit and config give the same results: pretraining, labeling, refine, training with 2 Ray
Train workers and evaluation, run twice from scratch, agree exactly (weights bit for bit, reports to
the last digit), while another seed does not."""

from __future__ import annotations

import pytest

from near_ray.storage import Storage, join

pytestmark = pytest.mark.slow

TIMING_KEYS = {"latency_ms", "throughput_img_s", "created", "label_summary", "labeling", "files", "plots",
               "labels", "bundle", "model_version", "latency_conditions"}


def _weights(uri: str) -> dict:
    from safetensors.torch import load

    return load(Storage().read_bytes(uri))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def _strip(obj):
    """A report without what measures time or names paths (which differ between the two work folders)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _demo_config(workdir: str, seed: int = 0):
    from near_ray.config import load_config
    from near_ray.demo import default_config
    from near_ray.sim.config import DemoConfig

    return load_config(default_config(), [
        f"storage.workdir={workdir}", f"train.seed={seed}", "train.num_workers=2", "train.cpus_per_worker=0.5",
        "train.pretrain_epochs=2", "train.pretrain_batch_size=32", "train.epochs=2", "train.warmup_epochs=1",
        "synth.pretrain_domains=[birds, flowers]", "synth.pretrain_species=3", "synth.pretrain_images_per_species=8",
        "refine.k=3", "eval.methods=[zero_shot, naive_prototypes, near]", "eval.plots=false", "eval.latency_probes=1",
    ], schema=DemoConfig)


def test_pretraining_twice_with_two_workers_gives_identical_weights(ray_cluster, tmp_path):
    """Through the path that makes the shipped starting CLIP (synthetic corpus -> `near-ray pretrain`)."""
    from near_ray.sim.corpus import pretrain_on_synthetic_corpus

    weights = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = _demo_config(str(tmp_path / name / "work"), seed)
        uri = pretrain_on_synthetic_corpus(cfg, corpus=str(tmp_path / name / "corpus"))
        weights[name] = _weights(uri)
    assert _same_weights(weights["a"], weights["b"])
    assert not _same_weights(weights["a"], weights["c"])


def test_the_whole_pipeline_twice_gives_identical_bundles_and_report(ray_cluster, tmp_path, synth_bench):
    from near_ray.config import DomainConfig
    from near_ray.pipeline import run_pipeline
    from near_ray.sim.annotator import AnnotatorServer

    st = Storage()
    root = synth_bench(images_per_species=8, image_size=64)
    taxonomy = st.read_json(join(root, "taxonomy.json"))
    runs = []
    for name in ("a", "b"):
        cfg = _demo_config(str(tmp_path / name))
        cfg.data.domains = [DomainConfig(name=d, uri=join(root, "images", d, "train"), truth=join(root, "truth.parquet"),
                                         meta_class=taxonomy["domains"][d]["meta_class"]) for d in ("birds", "flowers")]
        with AnnotatorServer(root, profile="strong", seed=0) as annotator:
            cfg.label.backend.base_url = annotator.base_url
            run_pipeline(cfg)
        runs.append(cfg)
    a, b = runs
    assert st.read_json(a.artifact("refine/vocabulary.json")) == st.read_json(b.artifact("refine/vocabulary.json"))
    for method in ("naive_prototypes", "near", "zero_shot"):
        assert _same_weights(_weights(a.artifact(f"bundles/{method}/model.safetensors")),
                             _weights(b.artifact(f"bundles/{method}/model.safetensors"))), method
        assert (st.read_bytes(a.artifact(f"bundles/{method}/text_embeddings.safetensors"))
                == st.read_bytes(b.artifact(f"bundles/{method}/text_embeddings.safetensors"))), method
    report_a = st.read_json(a.artifact("report/report.json"))
    report_b = st.read_json(b.artifact("report/report.json"))
    assert _strip(report_a) == _strip(report_b)
    assert report_a["methods"]["near"]["cacc"] == report_b["methods"]["near"]["cacc"]
