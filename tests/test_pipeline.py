"""`near-ray run` end to end: synthetic benchmark on moto S3, the simulated annotator over HTTP,
refine, 2 Ray Train workers, evaluation with baselines; a second run pays for nothing again."""

from __future__ import annotations

import json

import pytest
import yaml

from near_ray.cli import main
from near_ray.sim.annotator import AnnotatorServer
from near_ray.sim.synth import generate
from near_ray.storage import Storage

pytestmark = pytest.mark.slow


def test_run_end_to_end_on_s3_and_rerun_reuses_everything(bucket, ray_cluster, tmp_path, capsys):
    st = Storage()
    root = f"{bucket}/bench"
    generate(out=root, domains=["birds", "flowers"], species=3, images_per_species=6, image_size=64, seed=0,
             test_fraction=0.5, storage=st)
    workdir = f"{bucket}/run"
    with AnnotatorServer(root, profile="strong", seed=0) as annotator:
        run_cfg = {
            "storage": {"workdir": workdir},
            "data": {"domains": [
                {"name": d, "uri": f"{root}/images/{d}/train", "meta_class": m, "truth": f"{root}/truth.parquet"}
                for d, m in (("birds", "bird"), ("flowers", "flower"))
            ]},
            "label": {"samples": 2, "openai": {"base_url": annotator.base_url, "api_key_env": None}},
            "model": {"arch": "near-tiny", "pretrained": "random"},
            "refine": {"k": 3, "merge_encoder": "none"},
            "train": {"num_workers": 2, "cpus_per_worker": 0.5, "epochs": 2, "warmup_epochs": 1, "batch_size": 8},
            "eval": {"methods": ["direct_mllm", "zero_shot", "naive", "near"], "plots": True},
        }
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(run_cfg))
        assert main(["run", "--config", str(path)]) == 0
        first = annotator.stats()["answers_paid"]
        # Discovery (train) and direct-MLLM (test) images, S=2 each: 2 domains x 3 species x 6 images; and the
        # preflight's one probe request (an image the annotator does not know) before anything else.
        assert first == 2 * 3 * 6 * 2
        assert annotator.stats()["outcomes"]["unknown_image"] == 1

        report = st.read_json(f"{workdir}/report/report.json")
        assert set(report["methods"]) == {"direct_mllm", "zero_shot", "naive", "near"}
        for method, m in report["methods"].items():
            for key in ("cacc", "sacc", "nmi", "ari", "cost_per_1k", "latency_ms"):
                assert isinstance(m[key], (int, float)), (method, key)
            assert 0.0 <= m["cacc"] <= 1.0
        assert report["simulated_annotator"] is True
        assert report["methods"]["near"]["cost_per_1k"] < report["methods"]["direct_mllm"]["cost_per_1k"]
        assert st.exists(f"{workdir}/report/report.md")
        for method in ("near", "naive", "zero_shot"):
            assert st.exists(f"{workdir}/bundles/{method}/model.safetensors")
        metrics = st.read_json(f"{workdir}/bundles/near/metrics.json")
        assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]

        # The same run again: no MLLM call is paid twice and no model is retrained.
        capsys.readouterr()
        assert main(["run", "--config", str(path)]) == 0
        assert annotator.stats()["answers_paid"] == first
        assert annotator.stats()["outcomes"]["unknown_image"] == 2  # only the second run's probe
        out = capsys.readouterr().out
        summary = json.JSONDecoder().raw_decode(out[out.index("{\n"):])[0]
        assert summary["train"]["near"]["skipped"] is True
