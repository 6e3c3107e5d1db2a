"""The evaluation's cascade curve: on a constructed case (known confidences, known MLLM answers and
costs), and end to end through `run_evaluate` with the simulated annotator (the cascade asks nothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from near_ray.config import DomainConfig, RunConfig
from near_ray.eval.cascade import evaluate_cascade, render_cascade
from near_ray.eval.metrics import SemanticAccuracy
from near_ray.label.backends import model_name
from near_ray.label.table import labels_table
from near_ray.model.bundle import load_bundle
from near_ray.storage import Storage, join

NAMES = ["Red Finch", "Blue Finch", "Grey Finch"]


def test_curve_routes_the_least_confident_and_prices_what_the_mllm_was_paid(tmp_path: Path, write_bundle) -> None:
    import pandas as pd

    st = Storage()
    workdir = str(tmp_path / "run")
    vocab = [{"name": n, "domain": "birds", "synonyms": [n, f"{n.split()[0]} Fringilla"], "support": 3} for n in NAMES]
    write_bundle(join(workdir, "bundles/near"), vocab, np.eye(3, 256), logit_scale=10.0, storage=st)
    bundle = load_bundle(join(workdir, "bundles/near"), st)
    truth = ["Red Finch"] * 4 + ["Blue Finch"] * 3 + ["Grey Finch"] * 3
    uris = [str(tmp_path / f"img{i}.png") for i in range(10)]
    # The CLIP is right except on the two least confident images (Grey Finches it calls Red Finches).
    clip_pred = [0, 0, 0, 0, 1, 1, 1, 2, 0, 0]
    conf = [0.9, 0.85, 0.8, 0.8, 0.9, 0.7, 0.75, 0.9, 0.4, 0.45]
    probs = []
    for k, c in zip(clip_pred, conf, strict=True):
        row = np.full(3, (1 - c) / 2)
        row[k] = c
        probs.append(row)
    test = pd.DataFrame({"uri": uris, "domain": "birds", "species": truth})

    # The direct MLLM's labels: the right species (sometimes by a synonym) for every image, 2 samples,
    # from the configured MLLM (another model's rows would not vote).
    model, version = model_name(RunConfig().label), RunConfig().label.prompt_version
    labels_uri = join(workdir, "eval/direct_mllm/labels")
    writer = labels_table(labels_uri, st, part_rows=100, flush_interval_s=60)
    for i, (uri, species) in enumerate(zip(uris, truth, strict=True)):
        for s, label in enumerate([species, f"{species.split()[0]} Fringilla"]):
            writer.add([{"image_id": f"id{i}", "uri": uri, "domain": "birds", "sample": s, "label": label,
                         "status": "ok", "model": model, "prompt_version": version, "input_tokens": 100 * (i + 1),
                         "output_tokens": 10, "latency_s": 0.1}])  # fmt: skip
    writer.flush()
    cfg = RunConfig()
    cfg.storage.workdir = workdir
    cfg.data.domains = [DomainConfig(name="birds", uri=str(tmp_path))]
    cfg.eval.cascade_fractions = [0.0, 0.1, 0.2, 0.5, 1.0]
    cfg.label.prices.per_request = 0.001
    prices = cfg.label.prices
    cost = [prices.mllm_usd(2 * 100 * (i + 1), 20, 2) for i in range(10)]
    direct = {"labels": labels_uri, "cacc": 1.0, "cost_per_1k": 1000 * sum(cost) / 10}

    result = evaluate_cascade(cfg, st, test, bundle, probs, direct, SemanticAccuracy(), out=str(tmp_path / "report"))

    curve = {c["routed_fraction"]: c for c in result["cascade"]}
    clip_cost = prices.clip_per_1k_images
    assert curve[0.0]["cacc"] == pytest.approx(0.8) and curve[0.0]["cost_per_1k"] == pytest.approx(clip_cost)
    assert curve[0.1]["routed"] == 1 and curve[0.1]["cost_per_1k"] == pytest.approx(clip_cost + 1000 * cost[8] / 10)
    assert curve[0.1]["cacc"] == pytest.approx(0.9)
    assert curve[0.2]["cacc"] == pytest.approx(1.0) and curve[0.2]["sacc"] == pytest.approx(1.0, abs=1e-5)
    assert curve[1.0]["cacc"] == pytest.approx(1.0)  # synonyms mapped onto the vocabulary: one cluster per species
    assert curve[1.0]["cost_per_1k"] == pytest.approx(clip_cost + direct["cost_per_1k"])
    best = result["cascade_best"]
    assert best["routed_fraction"] == 0.2
    assert best["cost_ratio"] == pytest.approx((clip_cost + 100 * (cost[8] + cost[9])) / direct["cost_per_1k"])
    cal = result["cascade_calibration"]
    assert cal["temperature"] == 1.0 and cal["fitted"] is False and "no discovery set" in cal["reason"]
    assert 0 <= cal["test_ece_before"] <= 1
    assert Path(result["cascade_plot"]).read_bytes()[:4] == b"\x89PNG"
    md = "\n".join(render_cascade(result))
    assert "| 20% | 100.0 |" in md and "20% routed" in md


@pytest.mark.slow
def test_run_evaluate_reports_the_cascade_and_asks_nothing_more(tmp_path: Path, ray_cluster, synth_bench,
                                                                write_bundle) -> None:
    import pyarrow as pa
    from conftest import species_prototypes

    from near_ray.eval.stage import run_evaluate
    from near_ray.sim.annotator import AnnotatorServer

    st = Storage()
    bench = synth_bench(images_per_species=6)
    truth = st.read_parquet(join(bench, "truth.parquet")).to_pandas()
    truth["uri"] = [join(bench, p) for p in truth["path"]]
    workdir = str(tmp_path / "run")
    entries, images = species_prototypes(truth, st.read_json(join(bench, "taxonomy.json")), ["birds", "flowers"])
    write_bundle(join(workdir, "bundles/near"), entries, "images", images=images, logit_scale=60.0)
    train = truth[truth["split"] == "train"]
    st.write_parquet(join(workdir, "refine/candidates.parquet"), pa.table(
        {"uri": train["uri"].tolist(), "domain": train["domain"].tolist(), "majority_label": train["species"].tolist(),
         "candidates": [[s] for s in train["species"]]}))  # fmt: skip
    profile = yaml.safe_load((Path(__file__).parents[2] / "near_ray/sim/profiles/strong.yaml").read_text())
    profile.update(outcomes={"exact": 1.0, "synonym": 0, "coarse": 0, "sibling": 0, "unrelated": 0,
                             "hallucinated": 0, "refusal": 0}, hard_fraction=0.0)  # fmt: skip
    (tmp_path / "perfect.yaml").write_text(yaml.safe_dump(profile))
    cfg = RunConfig()
    cfg.storage.workdir = workdir
    cfg.data.domains = [DomainConfig(name=d, uri=f"{bench}/images/{d}/train", meta_class=d[:-1],
                                     truth=f"{bench}/truth.parquet") for d in ("birds", "flowers")]  # fmt: skip
    cfg.eval.methods = ["direct_mllm", "near"]
    cfg.train.method = "near"  # the run's classifier, whose least confident images the cascade routes
    cfg.label.samples = 2
    with AnnotatorServer(bench, profile=str(tmp_path / "perfect.yaml"), seed=0) as ann:
        cfg.label.backend.base_url = ann.base_url
        cfg.label.backend.api_key_env = None
        report = run_evaluate(cfg)
        n_test = int((truth["split"] == "test").sum())
        assert ann.stats()["requests"] == n_test * 2, "the cascade reuses the direct MLLM's answers"

    curve = report["cascade"]
    assert [c["routed_fraction"] for c in curve] == cfg.eval.cascade_fractions
    assert curve[0]["cost_per_1k"] == pytest.approx(cfg.label.prices.clip_per_1k_images)
    assert curve[0]["cacc"] == pytest.approx(report["methods"]["near"]["cacc"])
    assert all(a["cost_per_1k"] <= b["cost_per_1k"] for a, b in zip(curve, curve[1:], strict=False))
    direct = report["methods"]["direct_mllm"]
    assert curve[-1]["cacc"] == pytest.approx(direct["cacc"]) == 1.0
    assert curve[-1]["cost_per_1k"] == pytest.approx(direct["cost_per_1k"] + cfg.label.prices.clip_per_1k_images)
    best = report["cascade_best"]
    reaching = [c for c in curve if c["cacc"] >= direct["cacc"]]
    assert best is not None and best["cost_per_1k"] == min(c["cost_per_1k"] for c in reaching)
    assert best["cost_ratio"] == pytest.approx(best["cost_per_1k"] / direct["cost_per_1k"])
    assert report["cascade_calibration"]["fitted"] is True
    out = Path(workdir, "report")
    md = (out / "report.md").read_text()
    assert "## CLIP → MLLM cascade" in md and "![cascade](cascade.png)" in md
    assert (out / "cascade.png").read_bytes()[:4] == b"\x89PNG"
    assert [c["routed_fraction"] for c in st.read_json(str(out / "report.json"))["cascade"]] == cfg.eval.cascade_fractions
