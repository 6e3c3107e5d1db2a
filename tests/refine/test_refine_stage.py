"""The refine stage end to end: a labels table and real PNGs on moto S3, a real Ray cluster, near-tiny CLIP."""

import hashlib
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from near_ray.config import load_config
from near_ray.errors import NearRayError
from near_ray.label.backends import model_name
from near_ray.label.table import SCHEMA, labels_table
from near_ray.refine.stage import OUTPUTS, run_refine
from near_ray.storage import Storage

pytestmark = pytest.mark.slow


def _png(rgb, seed):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb) + rng.normal(0, 20, (48, 48, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_run(bucket, st, cfg):
    """Images and a labels table as the label stage writes them; returns {name: uri}."""
    images = {f"red{i}": (_png((200, 30, 40), i), "birds", "red") for i in range(4)}
    images |= {f"blue{i}": (_png((40, 110, 220), 10 + i), "birds", "blue") for i in range(4)}
    images |= {f"lotus{i}": (_png((235, 115, 160), 20 + i), "flowers", "lotus") for i in range(2)}
    images["red0_copy"] = (images["red0"][0], "birds", "red")  # same bytes at a second URI: one image
    images["broken"] = (b"\x89PNG\r\n\x1a\n not really a png", "birds", None)
    answers = {  # three samples per image; red3's samples are all unparsable
        "red": ["Crimson-barred Warbler", "crimson barred warbler", "Crimson-barred Warblers"],
        "blue": ["Azure-capped Warbler", "Azure-capped Warbler", "Crimson-barred Warbler"],
        "lotus": ["Rosy Lotus", "rosy lotus", "Rosy Lotus"],
    }
    rows, uris = [], {}
    for name, (data, domain, kind) in images.items():
        uri = f"{bucket}/images/{domain}/{name}.png"
        uris[name] = uri
        st.write_bytes(uri, data)
        image_id = hashlib.sha256(data).hexdigest()[:16]
        for sample in range(3):
            label = answers[kind][sample] if kind else None
            status = "ok"
            if name == "broken":
                status, label = "bad_image", None
            elif name == "red3":
                status, label = "unparsable", None
            rows.append({"image_id": image_id, "uri": uri, "domain": domain, "sample": sample, "seed": sample,
                         "raw_answer": label, "label": label, "status": status, "error": None,
                         "model": model_name(cfg.label), "prompt_version": cfg.label.prompt_version,
                         "input_tokens": 10, "output_tokens": 5, "latency_s": 0.1})
    for domain in ("birds", "flowers"):
        part = pa.Table.from_pylist([r for r in rows if r["domain"] == domain], schema=SCHEMA)
        labels_table(cfg.artifact("labels"), st).write(domain, part)
    return uris


def _cfg(bucket, *extra):
    return load_config(None, [f"storage.workdir={bucket}/run", "model.arch=near-tiny", "model.pretrained=random", "refine.k=3",
                              "refine.embed_batch_size=4", "refine.embed_actor_cpus=0.5",
                              "refine.merge_encoder=none", *extra])  # Sentence-BERT merging: test_vocabulary.py


def test_run_refine_end_to_end(bucket, ray_cluster):
    st = Storage()
    cfg = _cfg(bucket)
    uris = _write_run(bucket, st, cfg)
    summary = run_refine(cfg)
    for name in (*OUTPUTS, "_summary.json"):
        assert st.exists(cfg.artifact(f"refine/{name}")), name

    vocab = st.read_json(cfg.artifact("refine/vocabulary.json"))
    assert {(v["domain"], v["name"]) for v in vocab} == {
        ("birds", "Crimson-barred Warbler"), ("birds", "Azure-capped Warbler"), ("flowers", "Rosy Lotus")}
    crimson = next(v for v in vocab if v["name"] == "Crimson-barred Warbler")
    assert crimson["support"] == 7  # red0..red2 and blue0..blue3, counted once per image
    assert "crimson barred warbler" in crimson["synonyms"]
    assert "birds" in st.read_json(cfg.artifact("refine/merges.json"))

    emb = st.read_parquet(cfg.artifact("refine/embeddings.parquet"))
    assert emb.column_names == ["image_id", "uri", "domain", "embedding"]
    assert emb.num_rows == 10  # 11 objects, one duplicate, one broken
    vectors = np.array(emb.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert uris["broken"] not in emb.column("uri").to_pylist()
    assert summary["bad_image_count"] == 1 and summary["bad_images"][0]["uri"] == uris["broken"]
    # the actor pool's start-up is reported, and it is part of the embedding time
    assert 0 < summary["embed_first_batch_s"] <= summary["timings_s"]["embeddings_s"]

    nb = st.read_parquet(cfg.artifact("refine/neighbors.parquet")).to_pylist()
    domain_of = dict(zip(emb.column("image_id").to_pylist(), emb.column("domain").to_pylist(), strict=True))
    for row in nb:
        assert row["image_id"] not in row["neighbors"]
        assert len(row["neighbors"]) == (3 if row["domain"] == "birds" else 1)
        assert {domain_of[n] for n in row["neighbors"]} == {row["domain"]}
        assert row["similarities"] == sorted(row["similarities"], reverse=True)

    cand = st.read_parquet(cfg.artifact("refine/candidates.parquet"))
    assert cand.column_names == ["image_id", "uri", "domain", "own_labels", "majority_label", "candidates",
                                 "confidences"]
    by_uri = {r["uri"]: r for r in cand.to_pylist()}
    names = {v["name"] for v in vocab}
    for r in by_uri.values():
        assert set(r["candidates"]) <= names and set(r["own_labels"]) <= set(r["candidates"])
        assert sum(r["confidences"]) == pytest.approx(1.0, abs=1e-5)
    assert by_uri[uris["red0"]]["own_labels"] == ["Crimson-barred Warbler"] * 6  # both URIs' samples
    assert by_uri[uris["blue0"]]["majority_label"] == "Azure-capped Warbler"
    unparsable = by_uri[uris["red3"]]
    assert unparsable["own_labels"] == [] and unparsable["majority_label"] is None and unparsable["candidates"]
    assert uris["broken"] not in by_uri
    assert summary["domains"]["birds"]["vocabulary_size"] == 2 and summary["vocabulary_size"] == 3

    # Unchanged inputs: nothing is recomputed.
    again = run_refine(cfg)
    assert again["skipped"] is True and again["fingerprint"] == summary["fingerprint"]
    # A kNN setting changed: embeddings are reused, neighbours and candidates recomputed.
    cfg2 = _cfg(bucket, "refine.k=1")
    third = run_refine(cfg2)
    assert third["skipped"] is False and third["embeddings_reused"] is True
    assert third["embed_first_batch_s"] is None  # nothing was embedded
    assert third["bad_image_count"] == 1
    nb = st.read_parquet(cfg.artifact("refine/neighbors.parquet")).to_pylist()
    assert {len(r["neighbors"]) for r in nb} == {1}


def test_missing_labels_table_is_a_clear_error(bucket):
    with pytest.raises(NearRayError, match="no labels table"):
        run_refine(_cfg(bucket))


@pytest.mark.timeout(240)
def test_embedding_actors_holding_nearly_every_cpu_still_finish(ray_cluster, tmp_path):
    """One embedding actor sized to all but half a CPU of what the cluster has free (a whole node per
    actor, as on a GPU machine): nothing else the stage runs may need a CPU of its own, or it waits
    for ever. Every image comes back, in the stage's order."""
    import pandas as pd

    from near_ray.refine.embed import embed_images

    st = Storage()
    uris = []
    for i in range(10):
        uri = str(tmp_path / f"img{i}.png")
        st.write_bytes(uri, _png((30 * i, 100, 200 - 15 * i), i))
        uris.append(uri)
    free = ray_cluster.available_resources().get("CPU", 0.0)
    if free < 1.0:
        pytest.skip(f"the session cluster has {free} CPUs free")
    cfg = _cfg(str(tmp_path), f"refine.embed_actor_cpus={free - 0.5}", "refine.embed_batch_size=2")
    df = pd.DataFrame({"image_id": [f"{i:02d}" for i in range(10)], "uri": uris, "domain": "birds"})
    emb = embed_images(df, cfg, st)
    assert list(emb.meta["image_id"]) == [f"{i:02d}" for i in range(10)] and not emb.failures
    assert emb.first_batch_s > 0 and 1 <= emb.first_batch_images <= 10
    assert emb.vectors.shape[0] == 10 and np.allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, atol=1e-4)


def test_gpu_embeddings_are_not_reused_as_cpu_ones():
    """Embedders on GPUs encode in float16, on CPUs in float32: a workdir refined on one must not hand its
    embeddings (and neighbours, candidates) to a config that computes the other. Resources alone that
    do not change the numbers (actors, CPUs per actor) keep the fingerprint."""
    import pandas as pd

    from near_ray.refine.stage import fingerprints

    labels = pd.DataFrame({"image_id": ["a", "b"], "uri": ["s3://x/a.png", "s3://x/b.png"], "domain": ["d", "d"],
                           "sample": [0, 0], "label": ["Tennessee Warbler", "warbler"], "status": ["ok", "ok"]})  # fmt: skip
    cpu = fingerprints(labels, load_config(None, []))
    gpu = fingerprints(labels, load_config(None, ["refine.embed_gpus=1"]))
    more = fingerprints(labels, load_config(None, ["refine.embed_actors=4", "refine.embed_actor_cpus=2"]))
    assert gpu["embeddings"] != cpu["embeddings"] and gpu["all"] != cpu["all"]
    assert more == cpu and gpu["labels"] == cpu["labels"]


def test_the_outputs_fingerprint_leaves_out_the_fields_marked_as_not_affecting_results():
    """The mark on the field decides (WHERE_IT_RUNS), not a list kept beside the fingerprint: a refine setting
    added with the mark keeps the outputs, one added without it makes them anew."""
    import pandas as pd
    from pydantic import Field

    from near_ray.config import RefineConfig
    from near_ray.config.base import WHERE_IT_RUNS
    from near_ray.refine.stage import fingerprints

    class Probe(RefineConfig):
        probe_actors: int = Field(1, json_schema_extra=WHERE_IT_RUNS)
        probe_setting: int = 1

    labels = pd.DataFrame({"image_id": ["a"], "uri": ["s3://x/a.png"], "domain": ["d"], "sample": [0],
                           "label": ["warbler"], "status": ["ok"]})
    cfg = load_config(None, [])

    def fp(**refine):
        return fingerprints(labels, cfg.model_copy(update={"refine": Probe(**refine)}))

    assert fp(probe_actors=6) == fp()
    assert fp(probe_setting=2)["all"] != fp()["all"]
    plain = fingerprints(labels, cfg)
    assert fingerprints(labels, load_config(None, ["refine.knn_cpus=4", "refine.knn_gpus=0.5"])) == plain
    assert fingerprints(labels, load_config(None, ["refine.neighbour_weight=0.9"]))["all"] != plain["all"]
