"""`near-ray export`: the predictions (or labels) table as an ImageFolder tree, Label Studio tasks and a
FiftyOne dataset, each checked the way its tool reads it (torchvision's ImageFolder; Label Studio's
documented task format and labeling config; FiftyOne's importer where fiftyone is installed, its
documented layout always). The tables are written with the project's own part writers; no truth anywhere.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from near_ray.classify.table import predictions_table, read_predictions
from near_ray.cli import main
from near_ray.config import load_config
from near_ray.export import edits_from_label_studio, reviewed_names
from near_ray.images import image_id
from near_ray.label.backends import model_name
from near_ray.label.table import labels_table
from near_ray.storage import Storage, join

NAMES = ["Crimson Warbler", "Sooty Grosbeak", "Azure Jay"]


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)).save(buf, format="PNG")
    return buf.getvalue()


def write_predictions(uri: str, rows: list[dict]) -> None:
    """The classify stage's writer: parts per domain under ``uri``, as a real run leaves them."""
    writer = predictions_table(uri, Storage(), part_rows=4, flush_interval_s=60)
    writer.add(rows)
    writer.flush()


def collection(root: str, st: Storage) -> list[dict]:
    """Prediction rows over real image files under ``root``: named, abstained and bad images in two domains,
    and two different images with one basename in one class folder (a name clash the export must resolve)."""
    rows = []
    for i in range(14):
        domain = "birds" if i < 10 else "flowers"
        uri = join(root, domain, f"cam{i % 2}", "a.png" if i in (0, 9) else f"img_{i:02d}.png")
        st.write_bytes(uri, png(i))
        name = None if i in (3, 12) else ("Tulip" if domain == "flowers" else NAMES[i % 3])
        ranking = NAMES if domain == "birds" else ["Tulip", "Rose"]
        rows.append({
            "image_id": image_id(png(i)), "uri": uri, "domain": domain, "name": name,
            "score": None if name is None else 0.5 + i / 100, "confidence": 0.4,
            "top_k_names": ranking, "top_k_scores": [0.5, 0.3, 0.2][: len(ranking)],
            "abstained": name is None, "source": "clip" if name else "none", "model_version": "bundle-v1",
            "status": "ok" if name else "abstained",
        })  # fmt: skip
    bad = join(root, "birds", "cam0", "broken.png")
    st.write_bytes(bad, b"not an image")
    rows.append({"image_id": image_id(b"not an image"), "uri": bad, "domain": "birds", "source": "none",
                 "status": "bad_image", "error": f"{bad}: cannot identify image file"})  # fmt: skip
    return rows


@pytest.fixture
def run(tmp_path):
    """A workdir with a predictions table over local images, and its config file."""
    st = Storage()
    workdir = tmp_path / "work"
    write_predictions(str(workdir / "predictions"), collection(str(tmp_path / "images"), st))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"storage:\n  workdir: {workdir}\n")
    return {"config": str(cfg), "workdir": str(workdir), "table": read_predictions(str(workdir / "predictions"), st)}


def export(config: str, *args: str) -> int:
    return main(["export", "-c", config, *args])


def files_under(folder: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(d.iterdir()) for d in sorted(folder.iterdir()) if d.is_dir()}


# ------------------------------------------------------------------------------------------ imagefolder
def test_imagefolder_counts_equal_the_predictions_per_name_and_torchvision_loads_it(run, tmp_path, capsys):
    from torchvision.datasets import ImageFolder

    out = tmp_path / "folder"
    assert export(run["config"], "--format", "imagefolder", "--out", str(out)) == 0
    summary = json.loads(capsys.readouterr().out)
    table = run["table"]
    for domain, rows in table.groupby("domain"):
        expected = Counter(rows["name"].dropna())
        found = {name: len(files) for name, files in files_under(out / domain).items()}
        assert found == dict(expected)
        assert summary["domains"][domain]["by_name"] == dict(sorted(expected.items()))
        loaded = ImageFolder(str(out / domain))  # the class folders, nothing else
        assert sorted(loaded.classes) == sorted(expected) and len(loaded) == sum(expected.values())
        unnamed = sorted(p.name for p in (out / "_abstained" / domain).iterdir())
        assert len(unnamed) == rows["name"].isna().sum() - (rows["status"] == "bad_image").sum()
    # local images are linked to the originals; the two "a.png" of one class are both there, told apart
    crimson = sorted((out / "birds" / "Crimson Warbler").iterdir())
    assert all(p.is_symlink() and Path(os.readlink(p)).is_absolute() for p in crimson)
    clashing = [p.name for p in crimson if p.name.endswith("_a.png")]
    assert len(clashing) == 2 and len(set(clashing)) == 2
    assert summary["linked"] == len(table) - 1 and summary["copied"] == 0
    assert summary["domains"]["birds"]["bad_images"] == 1  # left out: no loader opens it
    assert json.loads((out / "export.json").read_text())["domains"] == summary["domains"]
    # --copy copies; --domain exports one domain
    out2 = tmp_path / "copied"
    assert export(run["config"], "--format", "imagefolder", "--out", str(out2), "--copy", "--domain", "flowers") == 0
    assert sorted(p.name for p in out2.iterdir() if p.is_dir()) == ["_abstained", "flowers"]
    tulips = list((out2 / "flowers" / "Tulip").iterdir())
    assert len(tulips) == 3 and not any(p.is_symlink() for p in tulips)


def test_imagefolder_of_images_on_s3_is_copied_to_s3_or_a_folder(bucket, tmp_path):
    st = Storage()
    workdir = f"{bucket}/work"
    rows = collection(f"{bucket}/images", st)
    write_predictions(f"{workdir}/predictions", rows)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"storage:\n  workdir: {workdir}\n")
    assert export(str(cfg), "--format", "imagefolder", "--out", str(tmp_path / "local")) == 0
    local = list((tmp_path / "local" / "flowers" / "Tulip").iterdir())
    assert len(local) == 3 and not any(p.is_symlink() for p in local)
    assert sorted(p.read_bytes() for p in local) == sorted(png(i) for i in (10, 11, 13))
    gone = next(r["uri"] for r in rows if r.get("name") == "Tulip")
    st.delete(gone)  # deleted since it was classified: counted, left out, the rest exported
    assert export(str(cfg), "--format", "imagefolder", "--out", f"{bucket}/exported") == 0
    on_s3 = [o.uri for o in st.list(f"{bucket}/exported/birds")]
    assert len(on_s3) == sum(1 for r in rows if r["domain"] == "birds" and r.get("name"))
    assert len(list(st.list(f"{bucket}/exported/flowers/Tulip"))) == 2
    summary = st.read_json(f"{bucket}/exported/export.json")
    assert summary["copied"] == len(rows) - 2 and summary["missing"] == 1


# ------------------------------------------------------------------------------------------ label studio
def check_label_studio(tasks: list[dict], config_xml: str) -> set[str]:
    """Label Studio's documented import format for pre-annotations (Import pre-annotated data: the basic
    JSON format with `predictions`), against the project's labeling config; returns the config's choices."""
    view = ET.fromstring(config_xml)
    assert view.tag == "View"
    objects = {e.get("name"): e for e in view.iter() if e.tag == "Image"}
    controls = {e.get("name"): e for e in view.iter() if e.tag in ("Choices", "TextArea")}
    assert objects and all(c.get("toName") in objects for c in controls.values())
    image_var = next(iter(objects.values())).get("value")
    assert image_var.startswith("$")
    choices = {c.get("value") for e in view.iter() if e.tag == "Choices" for c in e if c.tag == "Choice"}
    for task in tasks:
        assert set(task) <= {"data", "predictions", "annotations", "id", "meta"}
        assert isinstance(task["data"][image_var[1:]], str)
        for p in task["predictions"]:
            assert isinstance(p["model_version"], str) and isinstance(p.get("score", 0.0), float)
            for item in p["result"]:
                assert {"from_name", "to_name", "type", "value"} <= set(item)
                control = controls[item["from_name"]]
                assert item["to_name"] == control.get("toName") and item["type"] == control.tag.lower()
                assert len(item["value"]["choices"]) == 1 and set(item["value"]["choices"]) <= choices
    return choices


def test_label_studio_tasks_follow_the_documented_format_and_a_review_round_trips(run, tmp_path, bucket):
    out = tmp_path / "ls"
    assert export(run["config"], "--format", "labelstudio", "--out", str(out)) == 0
    table = run["table"]
    summary = json.loads((out / "export.json").read_text())
    root = summary["local_files_document_root"]
    for domain, rows in table.groupby("domain"):
        tasks = json.loads((out / domain / "tasks.json").read_text())
        choices = check_label_studio(tasks, (out / domain / "labeling_config.xml").read_text())
        assert choices >= set(rows["name"].dropna())  # every answer can be chosen, the runners-up too
        assert len(tasks) == (rows["status"] != "bad_image").sum()
        by_uri = {t["data"]["uri"]: t for t in tasks}
        for r in rows[rows["status"] != "bad_image"].itertuples():
            task = by_uri[r.uri]
            # a local file as Label Studio's local-files URL below the document root the summary names
            assert task["data"]["image"] == "/data/local-files/?d=" + os.path.relpath(r.uri, root)
            if pd.isna(r.name):
                assert task["predictions"] == []
            else:
                assert task["predictions"][0]["score"] == pytest.approx(r.score)
                assert task["predictions"][0]["model_version"] == "bundle-v1"
        # the round trip: reviewers accept every pre-annotation (Label Studio copies a prediction into the
        # annotation), the project is exported as JSON, and the review reads back as the same names
        exported = [{**t, "id": i, "annotations": [{"id": i, "was_cancelled": False, "result": p["result"]}
                                                   for p in t["predictions"]]} for i, t in enumerate(tasks)]  # fmt: skip
        named = rows.dropna(subset=["name"])
        assert reviewed_names(exported) == dict(zip(named["uri"], named["name"], strict=True))
        assert edits_from_label_studio(exported) == []  # nothing changed: nothing to edit
    # images on S3 keep their s3:// URI (an S3 source storage on the bucket signs them)
    st = Storage()
    s3_rows = collection(f"{bucket}/images", st)
    write_predictions(f"{bucket}/work/predictions", s3_rows)
    cfg = tmp_path / "s3.yaml"
    cfg.write_text(f"storage:\n  workdir: {bucket}/work\n")
    assert export(str(cfg), "--format", "labelstudio", "--out", str(tmp_path / "ls3"), "--domain", "flowers") == 0
    tasks = json.loads((tmp_path / "ls3" / "flowers" / "tasks.json").read_text())
    assert sorted(t["data"]["image"] for t in tasks) == sorted(r["uri"] for r in s3_rows if r["domain"] == "flowers")


def review(predicted: str, reviewed: str | None, typed: str | None = None, domain: str = "birds") -> dict:
    """A task of a Label Studio JSON export: its prediction and one reviewer's annotation."""
    result = [{"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": [predicted]}}]
    answer = [] if reviewed is None else [{"from_name": "choice", "to_name": "image", "type": "choices",
                                          "value": {"choices": [reviewed]}}]  # fmt: skip
    if typed:
        answer.append({"from_name": "other", "to_name": "image", "type": "textarea", "value": {"text": [typed]}})
    return {"data": {"image": "s3://b/x.png", "uri": f"s3://b/{id(result)}.png", "domain": domain},
            "predictions": [{"model_version": "v", "result": result}],
            "annotations": [{"was_cancelled": False, "result": answer}] if answer else []}  # fmt: skip


def test_a_review_that_changes_a_name_consistently_suggests_edits_in_the_edits_files_form():
    exported = (
        [review("Sooty Grosbeak", "Azure Jay") for _ in range(4)] + [review("Sooty Grosbeak", "Sooty Grosbeak")]
        + [review("Azure Jay", "Azure Jay") for _ in range(3)]
        + [review("Crimson Warbler", None, typed="Crimson-barred Warbler") for _ in range(3)]
        + [review("Tulip", "Rose", domain="flowers"), review("Tulip", "Iris", domain="flowers"),
           review("Tulip", "Rose", domain="flowers")]  # 2 of 3: not consistent enough
        + [review("Rose", "Rose", domain="flowers")]
    )  # fmt: skip
    edits = edits_from_label_studio(exported)
    assert [{k: v for k, v in e.items() if k != "note"} for e in edits] == [
        {"rename": "Crimson Warbler", "to": "Crimson-barred Warbler", "domain": "birds"},
        {"merge": ["Sooty Grosbeak", "Azure Jay"], "into": "Azure Jay", "domain": "birds"},
    ]
    assert "4 of 5" in edits[1]["note"]
    assert reviewed_names([review("Crimson Warbler", None, typed="Crimson-barred Warbler")]).popitem()[1] == (
        "Crimson-barred Warbler")


# ------------------------------------------------------------------------------------------ fiftyone
def test_fiftyone_dataset_has_the_documented_layout(run, tmp_path):
    out = tmp_path / "fo"
    assert export(run["config"], "--format", "fiftyone", "--out", str(out)) == 0
    for domain, rows in run["table"].groupby("domain"):
        labels = json.loads((out / domain / "labels.json").read_text())
        stems = {p.stem for p in (out / domain / "data").iterdir()}
        assert set(labels["labels"]) == stems  # FiftyOneImageClassificationDataset: keys are data/ file stems
        named = [v for v in labels["labels"].values() if v is not None]
        assert Counter(labels["classes"][v["label"]] for v in named) == Counter(rows["name"].dropna())
        assert sorted(v["confidence"] for v in named) == pytest.approx(sorted(rows["score"].dropna()))
        assert sum(v is None for v in labels["labels"].values()) == (rows["status"] == "abstained").sum()


def fiftyone_python() -> str | None:
    """A Python with fiftyone (it runs its own MongoDB): this one, or NEAR_RAY_FIFTYONE_PYTHON."""
    try:
        import fiftyone  # noqa: F401

        return sys.executable
    except ImportError:
        return os.environ.get("NEAR_RAY_FIFTYONE_PYTHON")


@pytest.mark.skipif(fiftyone_python() is None, reason="fiftyone not installed (NEAR_RAY_FIFTYONE_PYTHON unset)")
def test_fiftyone_loads_the_export(run, tmp_path):
    out = tmp_path / "fo"
    assert export(run["config"], "--format", "fiftyone", "--out", str(out)) == 0
    code = textwrap.dedent(f"""
        import json, fiftyone as fo
        ds = fo.Dataset.from_dir(dataset_dir={str(out / 'birds')!r},
                                 dataset_type=fo.types.FiftyOneImageClassificationDataset)
        names = [s.ground_truth.label if s.ground_truth else None for s in ds]
        confidences = [s.ground_truth.confidence for s in ds if s.ground_truth]
        print(json.dumps({{"names": names, "confidences": confidences}}))
        ds.delete()
    """)
    env = {**os.environ, "FIFTYONE_DO_NOT_TRACK": "true", "FIFTYONE_DATABASE_DIR": str(tmp_path / "fodb")}
    done = subprocess.run([fiftyone_python(), "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    birds = run["table"][(run["table"]["domain"] == "birds") & (run["table"]["status"] != "bad_image")]
    assert Counter(loaded["names"]) == Counter(None if pd.isna(n) else n for n in birds["name"])
    assert sorted(loaded["confidences"]) == pytest.approx(sorted(birds["score"].dropna()))


# ------------------------------------------------------------------------------------------ labels, errors
def test_the_labels_table_exports_each_images_majority_answer(tmp_path):
    workdir = tmp_path / "work"
    cfg = load_config(None, [f"storage.workdir={workdir}"])
    st = Storage()
    answers = {"a": ["Azure Jay", "Azure Jay", "Sooty Grosbeak"], "b": ["Sooty Grosbeak", None, "Sooty Grosbeak"],
               "c": [None, None, None]}  # fmt: skip
    rows = []
    for i, (key, labels) in enumerate(answers.items()):
        uri = str(tmp_path / "images" / f"{key}.png")
        st.write_bytes(uri, png(i))
        for sample, label in enumerate(labels):
            rows.append({"image_id": image_id(png(i)), "uri": uri, "domain": "birds", "sample": sample, "seed": sample,
                         "raw_answer": label or "I cannot tell", "label": label,
                         "status": "ok" if label else "unparsable", "model": model_name(cfg.label),
                         "prompt_version": cfg.label.prompt_version})  # fmt: skip
    writer = labels_table(cfg.artifact("labels"), st, part_rows=100, flush_interval_s=60)
    writer.add(rows)
    writer.flush()
    (tmp_path / "run.yaml").write_text(f"storage:\n  workdir: {workdir}\n")
    out = tmp_path / "folder"
    assert export(str(tmp_path / "run.yaml"), "--format", "imagefolder", "--source", "labels", "--out", str(out)) == 0
    assert {k: [p.name for p in v] for k, v in files_under(out / "birds").items()} == {
        "Azure Jay": ["a.png"], "Sooty Grosbeak": ["b.png"]}
    assert [p.name for p in (out / "_abstained" / "birds").iterdir()] == ["c.png"]
    out = tmp_path / "ls"
    assert export(str(tmp_path / "run.yaml"), "--format", "labelstudio", "--source", "labels", "--out", str(out)) == 0
    tasks = {Path(t["data"]["uri"]).name: t for t in json.loads((out / "birds" / "tasks.json").read_text())}
    assert tasks["a.png"]["predictions"][0]["score"] == pytest.approx(2 / 3)
    assert tasks["b.png"]["predictions"][0]["score"] == 1.0 and tasks["c.png"]["predictions"] == []


def test_each_bad_export_is_one_line_before_anything_is_written(run, tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text(f"storage:\n  workdir: {tmp_path / 'nothing'}\n")
    cases = [
        ((str(empty), "--format", "imagefolder", "--out", str(tmp_path / "o1")), "no predictions table"),
        ((run["config"], "--format", "imagefolder", "--out", str(tmp_path / "o2"), "--domain", "bird"),
         "did you mean 'birds'"),
        ((run["config"], "--format", "fiftyone", "--out", run["workdir"]), "not empty"),
        ((str(empty), "--format", "labelstudio", "--source", "labels", "--out", str(tmp_path / "o3")),
         "no labels table"),
        ((run["config"], "--format", "labelstudio", "--out", str(tmp_path / "o4"), "--local-root", str(tmp_path / "x")),
         "not below the Label Studio document root"),
    ]  # fmt: skip
    for args, message in cases:
        assert export(*args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4"))
