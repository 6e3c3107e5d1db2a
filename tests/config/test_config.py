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
    cfg = load_config(f, ["label.samples=2", "train.lr=0.001", "label.backend.concurrency=4", "data.max_images=null"])
    assert cfg.label.samples == 2
    assert cfg.train.lr == pytest.approx(0.001)
    assert cfg.label.backend.concurrency == 4
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
    assert str(f) in msg and "label.samples" in msg and "label.backend.timeout_s" in msg


OLD_FORM = """label:
  backend: {kind}
  samples: 2
  openai: {{base_url: 'http://mllm:8000/v1', model: gpt-4o, concurrency: 4}}
  vllm: {{model_source: /models/qwen, gpus_per_replica: 0.5}}
"""
NEW_FORM = {
    "openai": "label:\n  samples: 2\n  backend: {type: openai, base_url: 'http://mllm:8000/v1', model: gpt-4o, "
              "concurrency: 4}\n",
    "vllm": "label:\n  samples: 2\n  backend: {type: vllm, model_source: /models/qwen, gpus_per_replica: 0.5}\n",
}


@pytest.mark.parametrize("kind", ["openai", "vllm"])
def test_the_old_form_of_the_backend_loads_as_the_new_one(tmp_path: Path, kind: str):
    """Configs and stored runs written as `backend: <type>` beside `openai:`/`vllm:` sections still load: the
    section the type names is the backend, the other is ignored; the labels' model name stays the same."""
    from near_ray.label.backends import model_name

    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(OLD_FORM.format(kind=kind))
    new.write_text(NEW_FORM[kind])
    cfg = load_config(old)
    assert cfg == load_config(new) and cfg.label.backend.type == kind
    assert model_name(cfg.label) == {"openai": "gpt-4o", "vllm": "/models/qwen"}[kind]
    # a run's stored config (the new form) loads back to the same run
    (tmp_path / "dumped.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "dumped.yaml") == cfg


def test_backend_overrides_in_either_spelling(tmp_path: Path):
    """--set picks the type first; a new type starts from its own fields (the old form's section for it)."""
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(OLD_FORM.format(kind="openai"))
    new.write_text(NEW_FORM["openai"])
    for path in (old, new):
        assert load_config(path, ["label.openai.base_url=http://b/v1"]).label.backend.base_url == "http://b/v1"
        assert load_config(path, ["label.backend.base_url=http://b/v1"]).label.backend.concurrency == 4
        for switch in ("label.backend.type=vllm", "label.backend=vllm"):  # after its fields on the command line too
            b = load_config(path, ["label.vllm.max_tokens=8", "label.backend.max_model_len=1024", switch]).label.backend
            assert (b.type, b.max_tokens, b.max_model_len) == ("vllm", 8, 1024)
            assert b.model_source == ("/models/qwen" if path == old else "Qwen/Qwen2.5-VL-7B-Instruct")
        assert load_config(path, ["label.backend=openai"]).label.backend.model == "gpt-4o"
    assert load_config(None, ["label.backend=vllm", "label.vllm.model_source=/m"]).label.backend.model_source == "/m"


def test_backend_sections_are_checked_by_their_type(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"field 'label\.backend': .*unknown label\.backend\.type 'tgi' "
                                          r"\(known: openai, vllm\)"):
        load_config(None, ["label.backend.type=tgi"])
    with pytest.raises(ConfigError, match=r"field 'label\.backend\.base_url': Extra inputs are not permitted"):
        load_config(None, ["label.backend.type=vllm", "label.backend.base_url=http://x/v1"])
    f = tmp_path / "typo.yaml"
    f.write_text("label: {backend: {type: vllm, modle_source: /m}}\n")
    with pytest.raises(ConfigError, match=r"label\.backend\.modle_source'.*did you mean 'model_source'"):
        load_config(f)
    f.write_text("label: {backend: {type: openai, base_url: 'http://a/v1'}, openai: {base_url: 'http://b/v1'}}\n")
    with pytest.raises(ConfigError, match=r"label\.openai\.base_url .* and label\.backend\.base_url .* disagree"):
        load_config(f)
    f.write_text("label: {backend: {type: openai, base_url: 'http://a/v1'}, openai: {concurrency: 2}}\n")
    assert load_config(f).label.backend.concurrency == 2  # a leftover old section that agrees is merged


def test_a_new_backend_is_one_class_and_one_registration(tmp_path: Path, monkeypatch):
    """Config load, the labels' model name, the JSON-schema switch, preflight's checks and the stage's
    label_dataset all come from the registered class."""
    from typing import ClassVar, Literal

    from pydantic import Field

    from near_ray.config import BACKENDS, BackendConfig, register_backend
    from near_ray.label.backends import get_backend, model_name

    (tmp_path / "toy_label_backend.py").write_text("def label_dataset(ds, cfg, stop=None):\n    return ds\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    class ToyBackendConfig(BackendConfig):
        """A backend for this test only."""

        type: Literal["toy"] = Field("toy", description="a toy")
        weights: str = Field("toy-1", description="its model")
        dataset_module: ClassVar[str] = "toy_label_backend"
        not_probed: ClassVar[str | None] = "a toy answers offline"

        @property
        def model_name(self) -> str:
            return self.weights

        @property
        def structured(self) -> bool:
            return False

    register_backend(ToyBackendConfig)
    try:
        cfg = load_config(None, ["label.backend.type=toy", "label.backend.weights=toy-2"])
        assert isinstance(cfg.label.backend, ToyBackendConfig) and model_name(cfg.label) == "toy-2"
        assert load_config(None, ["label.backend=toy"]).label.backend == ToyBackendConfig()
        assert get_backend(cfg.label.backend).__module__ == "toy_label_backend"
        assert cfg.label.backend.check_installed(lambda uri: False) == "toy: importable"
        with pytest.raises(ConfigError, match="field 'label.backend.base_url'"):
            load_config(None, ["label.backend.type=toy", "label.openai.base_url=x", "label.backend.base_url=x"])
    finally:
        BACKENDS.pop("toy")
    with pytest.raises(ConfigError, match=r"unknown label\.backend\.type 'toy'"):
        load_config(None, ["label.backend.type=toy"])


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

    doc = Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"
    text = reference_markdown()
    assert doc.read_text() == text, "stale: python -m near_ray.config.reference > docs/config-reference.md"
    undescribed = [f"{path}.{name}" for path, model in [("", RunConfig), *sections()]
                   for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert undescribed == []
    # The rows read as a user writes YAML: choices joined by |, optional fields "or null", required ones named.
    assert '| `index` | "auto" \\| "flat" \\| "ivf" \\| "hnsw" | `"auto"` |' in text
    assert "| `max_model_len` | int or null | `4096` |" in text
    assert "| `name` | str | required |" in text
    assert "| `backend` | section | [label.backend](#labelbackend) |" in text
    assert "## label.backend (type: vllm)" in text and "[vllm](#labelbackend-type-vllm)" in text
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


def test_the_former_names_of_renamed_fields_still_load(tmp_path: Path, capsys):
    """train.refine_k / refine_alpha are train.neighbour_k / neighbour_alpha: a file or --set with the former
    name loads to the new one; both names at once are refused, naming the field."""
    f = tmp_path / "old.yaml"
    f.write_text("train: {refine_k: 4, refine_alpha: 0.25}\n")
    cfg = load_config(f)
    assert (cfg.train.neighbour_k, cfg.train.neighbour_alpha) == (4, 0.25)
    assert load_config(None, ["train.refine_k=3"]).train.neighbour_k == 3
    assert "neighbour_k: 4" in dump_config(cfg) and "refine_k" not in dump_config(cfg)
    with pytest.raises(ConfigError, match=r"train\.refine_k.*former name of 'neighbour_k'"):
        load_config(f, ["train.neighbour_k=5"])
    assert main(["validate", "--set", "train.refine_k=3", "--set", "train.neighbour_k=2"]) == 2
    assert "former name of 'neighbour_k'" in capsys.readouterr().err


def test_fields_of_where_the_work_runs_are_left_out_of_results_and_marked_in_the_reference():
    from pydantic import Field

    from near_ray.config.base import WHERE_IT_RUNS, Section, affects_results, result_fields
    from near_ray.config.reference import reference_markdown

    class Inner(Section):
        threads: int = Field(1, json_schema_extra=WHERE_IT_RUNS)
        size: int = 2

    class Probe(Section):
        workers: int = Field(1, json_schema_extra=WHERE_IT_RUNS)
        lr: float = 0.1
        inner: Inner = Field(default_factory=Inner)

    assert result_fields(Probe()) == {"lr": 0.1, "inner": {"size": 2}}
    assert not affects_results(Probe.model_fields["workers"]) and affects_results(Probe.model_fields["lr"])
    text = reference_markdown()
    assert "| `embed_actors` | int | `1` | image-embedding actors (does not affect results) |" in text
    assert "| `k` | int | `10` | neighbours per image |" in text
