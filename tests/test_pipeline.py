"""`near-ray run` end to end: synthetic benchmark on moto S3, the simulated annotator over HTTP,
refine, 2 Ray Train workers, evaluation with baselines; a second run pays for nothing again."""

from __future__ import annotations

import json

import pytest
import yaml

from near_ray.cli import main
from near_ray.sim.annotator import AnnotatorServer
from near_ray.storage import Storage

pytestmark = pytest.mark.slow


def test_run_end_to_end_on_s3_and_rerun_reuses_everything(bucket, ray_cluster, tmp_path, capsys, synth_bench):
    st = Storage()
    root = synth_bench(images_per_species=6, image_size=64, s3=True)
    workdir = f"{bucket}/run"
    with AnnotatorServer(root, profile="strong", seed=0) as annotator:
        run_cfg = {
            "storage": {"workdir": workdir},
            "data": {"domains": [
                {"name": d, "uri": f"{root}/images/{d}/train", "meta_class": m, "truth": f"{root}/truth.parquet"}
                for d, m in (("birds", "bird"), ("flowers", "flower"))
            ]},
            "label": {"samples": 2, "backend": {"type": "openai", "base_url": annotator.base_url, "api_key_env": None}},
            "model": {"arch": "near-tiny", "pretrained": "random"},
            "refine": {"k": 3, "merge_encoder": "none"},
            "train": {"num_workers": 2, "cpus_per_worker": 0.5, "epochs": 2, "warmup_epochs": 1, "batch_size": 8},
            "eval": {"methods": ["direct_mllm", "zero_shot", "naive_prototypes", "near"], "plots": True},
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
        assert set(report["methods"]) == {"direct_mllm", "zero_shot", "naive_prototypes", "near"}
        assert report["served"] == "naive_prototypes"  # train.method's default
        for method, m in report["methods"].items():
            for key in ("cacc", "sacc", "nmi", "ari", "cost_per_1k", "latency_ms"):
                assert isinstance(m[key], (int, float)), (method, key)
            assert 0.0 <= m["cacc"] <= 1.0
        assert report["simulated_annotator"] is True
        assert report["methods"]["naive_prototypes"]["cost_per_1k"] < report["methods"]["direct_mllm"]["cost_per_1k"]
        assert st.exists(f"{workdir}/report/report.md")
        for method in ("naive_prototypes", "near", "zero_shot"):
            assert st.exists(f"{workdir}/bundles/{method}/model.safetensors")
        metrics = st.read_json(f"{workdir}/bundles/near/metrics.json")
        assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]

        # With truth it is a benchmark run: the baselines trained, evaluated, the collection not named.
        summary = st.read_json(f"{workdir}/run_summary.json")
        assert set(summary["train"]) == {"naive_prototypes", "near", "zero_shot"} and "classify" not in summary

        # The same run again: no MLLM call is paid twice and no model is retrained.
        capsys.readouterr()
        assert main(["run", "--config", str(path)]) == 0
        assert annotator.stats()["answers_paid"] == first
        assert annotator.stats()["outcomes"]["unknown_image"] == 2  # only the second run's probe
        out = capsys.readouterr().out
        assert "evaluated (cACC): " in out and "near_ray run done" in out
        summary = st.read_json(f"{workdir}/run_summary.json")
        assert summary["train"]["naive_prototypes"]["skipped"] is True and summary["train"]["near"]["skipped"] is True


def _count_lines(text: str, start: str) -> list[str]:
    """The lines of the closing block's section that starts with ``start`` (up to the next blank line)."""
    block = text[text.index(start):].split("\n\n")[0]
    return block.splitlines()[1:]


def test_run_without_truth_trains_one_method_names_the_collection_and_reads_edits_back(bucket, ray_cluster,
                                                                                        tmp_path, capsys, synth_bench):
    """A user's run: images, no truth table. One training (train.method), the whole collection named, a
    closing summary for a person. Then the review's edits: refine and train again, no MLLM call."""
    st = Storage()
    root = synth_bench(["birds"], images_per_species=8, image_size=64, test_fraction=0.25, s3=True)
    workdir = f"{bucket}/run"
    collection = f"{root}/images/birds/train"
    images = len(list(st.list(collection)))
    with AnnotatorServer(root, profile="strong", seed=0) as annotator:
        run_cfg = {
            "storage": {"workdir": workdir},
            "data": {"domains": [{"name": "birds", "uri": collection, "meta_class": "bird"}]},  # no truth
            "label": {"samples": 2, "backend": {"type": "openai", "base_url": annotator.base_url, "api_key_env": None}},
            "model": {"arch": "near-tiny", "pretrained": "random"},
            "refine": {"k": 3, "merge_encoder": "none"},
            "train": {"num_workers": 2, "cpus_per_worker": 0.5, "epochs": 2, "warmup_epochs": 1, "batch_size": 8},
            "classify": {"batch_size": 8},
        }  # eval.methods stays the default: it names five trained methods and zero-shot
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(run_cfg))
        assert main(["run", "--config", str(path)]) == 0
        out = capsys.readouterr().out
        requests = annotator.stats()["requests"]
        # the discovery set only (no direct-MLLM baseline without truth), and preflight's one-token probe
        assert requests == images * 2 + 1

        summary = st.read_json(f"{workdir}/run_summary.json")
        assert list(summary["train"]) == ["naive_prototypes"] and "evaluate" not in summary
        assert [o.uri.split("/bundles/")[1].split("/")[0] for o in st.list(f"{workdir}/bundles")
                if o.uri.endswith("/config.json")] == ["naive_prototypes"]  # one bundle written
        from near_ray.classify.table import read_predictions

        predictions = read_predictions(summary["classify"]["predictions"], st)
        assert len(predictions) == images and predictions["uri"].is_unique  # every image once
        vocabulary = {v["name"] for v in st.read_json(f"{workdir}/bundles/naive_prototypes/vocabulary.json")}
        assert set(predictions["name"].dropna()) <= vocabulary

        # The closing block, not a JSON dump: names with counts, images, spend, where the outputs are.
        assert not out.lstrip().startswith("{") and "\n{" not in out
        (birds,) = _count_lines(out, "named (predictions table):")
        assert birds.split()[0] == "birds" and f"over {images} images" in birds
        assert f"MLLM this run: {images * 2} calls" in out and "trainings: 1 (naive_prototypes)" in out
        for where in (summary["classify"]["predictions"], f"{workdir}/bundles/naive_prototypes", f"{workdir}/run_summary.json"):
            assert where in out

        # The review's edits, written against the names the run found.
        names = [v["name"] for v in st.read_json(f"{workdir}/refine/vocabulary.json")]
        assert len(names) >= 5, names
        edits = tmp_path / "edits.yaml"
        q = json.dumps  # a JSON string is a YAML scalar: any name, quoted; the lines below are the edits' lines
        edits.write_text("\n".join([
            f"- rename: {q(names[0])}", "  to: Renamed Grosbeak",
            f"- merge: [{q(names[1])}]", f"  into: {q(names[2])}",
            f"- drop: {q(names[3])}",
            f"- ban: {q(names[4])}",
            f"- keep_apart: [Renamed Grosbeak, {q(names[2])}]",
        ]) + "\n")
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"- rename: {json.dumps(names[0])}\n  to: Another Name\n- drop: No Such Grosbeak\n")
        assert main(["run", "--config", str(path), "--edits", str(bad)]) == 2
        assert f"{bad}:3: drop: no name 'No Such Grosbeak'" in capsys.readouterr().err

        assert main(["run", "--config", str(path), "--edits", str(edits)]) == 0
        assert annotator.stats()["requests"] == requests  # no MLLM call for an edit
        refine = st.read_json(f"{workdir}/refine/_summary.json")
        assert refine["embeddings_reused"] is True and refine["knn_reused"] is True
        assert [(a["line"], a["kind"]) for a in refine["edits"]["applied"]][:4] == [
            (1, "rename"), (3, "merge"), (5, "drop"), (6, "ban")]
        after = {v["name"] for v in st.read_json(f"{workdir}/refine/vocabulary.json")}
        assert "Renamed Grosbeak" in after and names[2] in after and not after & {names[0], names[1], names[3]}
        metrics = st.read_json(f"{workdir}/bundles/naive_prototypes/metrics.json")
        assert metrics["edits"]["fingerprint"] == refine["edits"]["fingerprint"]  # the bundle records its edits
        assert metrics["refine_fingerprint"] == refine["fingerprint"]
        summary = st.read_json(f"{workdir}/run_summary.json")
        assert not summary["train"]["naive_prototypes"].get("skipped")  # retrained on the edited candidates
        bundle = {v["name"] for v in st.read_json(f"{workdir}/bundles/naive_prototypes/vocabulary.json")}
        assert {"Renamed Grosbeak", names[2]} <= bundle  # edited names are never pruned
        predictions = read_predictions(summary["classify"]["predictions"], st)
        assert len(predictions) == images and set(predictions["name"].dropna()) <= bundle
        assert "vocabulary edits applied: " in capsys.readouterr().out
