from pathlib import Path

import pytest

from near_ray.cli import main
from near_ray.config import ConfigError, RunConfig, dump_config, load_config


def test_defaults_live_in_the_models():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.label.samples == 3
    assert cfg.artifact("labels").endswith("labels")


def test_yaml_and_overrides(tmp_path: Path):
    f = tmp_path / "run.yaml"
    f.write_text(
        "storage: {workdir: s3://bucket/run}\n"
        "data:\n  domains:\n    - {name: birds, uri: s3://bucket/birds, meta_class: bird}\n"
        "label: {samples: 5}\n"
    )
    cfg = load_config(f, ["label.samples=2", "train.lr=0.001", "label.openai.concurrency=4", "data.max_images=null"])
    assert cfg.label.samples == 2
    assert cfg.train.lr == pytest.approx(0.001)
    assert cfg.label.openai.concurrency == 4
    assert cfg.data.domains[0].meta_class == "bird"
    assert cfg.artifact("labels") == "s3://bucket/run/labels"
    # A dumped config loads back to the same run.
    g = tmp_path / "dumped.yaml"
    g.write_text(dump_config(cfg))
    assert load_config(g) == cfg


def test_bad_field_names_file_and_path(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("label:\n  samples: zero\n  openai: {timeout_s: -1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert str(f) in msg and "label.samples" in msg and "label.openai.timeout_s" in msg


def test_unknown_field_and_bad_yaml(tmp_path: Path):
    f = tmp_path / "typo.yaml"
    f.write_text("train: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        load_config(f)
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["label.samples"])


def test_duplicate_domains_rejected():
    with pytest.raises(ConfigError, match="duplicate domain"):
        load_config(None, ["data.domains=[{name: a, uri: x}, {name: a, uri: y}]"])


def test_domains_whose_folders_nest_are_refused():
    """An image belongs to one domain: nested folders would label it twice and refine it under one."""
    with pytest.raises(ConfigError, match="'birds' and 'warblers' list overlapping folders"):
        load_config(None, ["data.domains=[{name: birds, uri: 's3://b/images'}, {name: warblers, uri: 's3://b/images/warblers/'}]"])
    with pytest.raises(ConfigError, match="overlapping folders"):
        load_config(None, ["data.domains=[{name: a, uri: data/birds/}, {name: b, uri: ./data/birds}]"])
    ok = load_config(None, ["data.domains=[{name: a, uri: 's3://b/images'}, {name: b, uri: 's3://b/images2'}, "
                            "{name: c, uri: 's3://b/images', manifest: 's3://b/c.csv'}]"])  # fmt: skip
    assert [d.name for d in ok.data.domains] == ["a", "b", "c"]


def test_cli_reports_config_error_on_one_line(tmp_path: Path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("refine: {k: 0}\n")
    rc = main(["refine", "--config", str(f)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "refine.k" in err[0] and str(f) in err[0]


def test_config_reference_is_current_and_describes_every_field():
    """docs/config-reference.md is what the models say (regenerate it when a field changes), and no field of any
    section is left without a description."""
    from near_ray.config.reference import reference_markdown, sections

    doc = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"
    text = reference_markdown()
    assert doc.read_text() == text, "stale: python -m near_ray.config.reference > docs/config-reference.md"
    undescribed = [f"{path}.{name}" for path, model in [("", RunConfig), *sections()]
                   for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert undescribed == []
    # The rows read as a user writes YAML: choices joined by |, optional fields "or null", required ones named.
    assert '| `index` | "auto" \\| "flat" \\| "ivf" \\| "hnsw" | `"auto"` |' in text
    assert "| `max_model_len` | int or null | `4096` |" in text
    assert "| `name` | str | required |" in text
    assert "| `openai` | section | [label.openai](#labelopenai) |" in text
    assert [p for p, _ in sections()][:3] == ["storage", "data", "data.domains[]"]


@pytest.mark.parametrize("workdir", ["s3://bucket/run/", "/data/run"])
def test_run_paths_keep_the_layout_on_disk(workdir):
    """``cfg.paths`` names the files existing workdirs hold: a renamed member must not move one."""
    cfg = RunConfig(storage={"workdir": workdir})
    p = cfg.paths
    layout = {
        p.labels: "labels", p.label_summary: "labels/_summary.json", p.label_selection: "labels/_selection.json",
        p.manifest("birds-0001"): "manifests/birds-0001.parquet", p.refine: "refine",
        p.refine_file("merges.json"): "refine/merges.json", p.vocabulary: "refine/vocabulary.json",
        p.merges: "refine/merges.json", p.candidates: "refine/candidates.parquet",
        p.neighbors: "refine/neighbors.parquet", p.embeddings: "refine/embeddings.parquet",
        p.embeddings_record: "refine/_embeddings.json", p.neighbors_record: "refine/_neighbors.json",
        p.refine_summary: "refine/_summary.json", p.pretrained: "pretrained/model.safetensors", p.train: "train",
        p.checkpoints("near-abc"): "train/near-abc", p.tensorboard: "tensorboard", p.bundles: "bundles",
        p.bundle("zero_shot"): "bundles/zero_shot", p.select: "select", p.choice: "select/choice.json",
        p.predictions: "predictions", p.calibration("v1"): "classify/calibration/v1.json",
        p.cascade: "classify/mllm", p.cascade_labels: "classify/mllm/labels", p.direct_mllm: "eval/direct_mllm",
        p.benchmark_manifest("cub"): "benchmark/cub/discovery.parquet",
        p.benchmark_truth("cub"): "benchmark/cub/truth.parquet", p.report: "report",
        p.report_json: "report/report.json", p.report_md: "report/report.md", p.review: "review/index.html",
        p.run_summary: "run_summary.json",
    }  # fmt: skip
    assert {uri: cfg.artifact(rel) for uri, rel in layout.items()} == {uri: uri for uri in layout}
    assert p.vocabulary.startswith(workdir.rstrip("/") + "/refine/")
    cfg.storage.workdir = "/elsewhere"
    assert cfg.paths.labels == "/elsewhere/labels"  # the paths follow the config's workdir
