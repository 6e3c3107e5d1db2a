"""The train stage's sections: the fine-tuning run (NeaR, its ablations, the baselines) and its tracking."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator

from near_ray.config.base import WHERE_IT_RUNS, Section
from near_ray.train.methods import TRAINED, needs_text

# --------------------------------------------------------------------------------------------- train
# Fields renamed, by their former names: a config (or --set) with the former name still loads, and what hashes
# train settings for a name (near_ray.train.runner.run_name, the method benchmark's frozen configuration)
# keeps the former keys, so existing checkpoints and frozen configurations still match.
RENAMED = {"neighbour_alpha": "refine_alpha", "neighbour_k": "refine_k"}


class TrackingConfig(Section):
    """Where the driver also sends each epoch's training metrics (besides Ray Train's reported metrics).

    tensorboard: event files below ``uri`` (local folder or s3://; default ``{workdir}/tensorboard``),
    one run folder per method. mlflow: runs in experiment ``experiment`` of the tracking server at
    ``uri`` (None = MLFLOW_TRACKING_URI or MLflow's local ./mlruns).
    """

    backend: Literal["none", "tensorboard", "mlflow"] = Field("none", description="where epoch metrics also go")
    uri: str | None = Field(None, description="tensorboard: a folder below which event files go; mlflow: the "
                            "tracking server; null = each backend's default (above)")
    experiment: str = Field("near_ray", description="the MLflow experiment")


class TrainConfig(Section):
    """Fine-tuning CLIP on the refined candidate labels (NeaR, its ablations, the baselines) with Ray Train."""

    method: str = Field(
        "naive_prototypes", description="the training method: one of near_ray.train.methods.TRAINED. The default, "
        "chosen on dev draws, trains on the MLLM's majority labels with NeaR's neighbour-voted prototype "
        "classifier; `near` trains on NeaR's refined candidate sets (docs/method.md)")
    select: list[str] = Field(
        default_factory=list, description="candidate methods the run chooses among without labels: each trained "
        "on most of the discovery set and scored by agreement with the MLLM on the rest, the best then trained on "
        "all of it (docs/train.md); empty: train.method as set")
    select_holdout: float = Field(
        0.2, gt=0, lt=1, description="with select: the share of the discovery set held out to score the "
        "candidates, stratified by the MLLM's majority name")
    select_rule: Literal["names", "grouping"] = Field(
        "names", description="with select: what the candidates are scored by: agreement with the MLLM's names "
        "(consistency-weighted), or how well their predictions group the held-out images as the MLLM's majority "
        "answers do, whatever the names (docs/train.md)")
    num_workers: int = Field(2, ge=1, json_schema_extra=WHERE_IT_RUNS, description="Ray Train workers")
    use_gpu: bool = Field(False, json_schema_extra=WHERE_IT_RUNS, description="one GPU per worker")
    accelerator_type: str | None = Field(
        None, json_schema_extra=WHERE_IT_RUNS,
        description='with use_gpu: workers only on nodes with this GPU ("A10G", "H100")')
    cpus_per_worker: float = Field(1.0, gt=0, json_schema_extra=WHERE_IT_RUNS, description="CPUs each worker reserves")
    epochs: int = Field(10, ge=1, description="training epochs, warm-up included")
    warmup_epochs: int = Field(2, ge=0, description="epochs of warm-up before NeaR's clean/noisy split")
    batch_size: int = Field(64, ge=1, description="global batch size, split across workers")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    lambda_noisy: float = Field(1.0, ge=0, description="weight of the noisy samples' loss on their refined target")
    # the neighbours' share and count in a noisy sample's refined target: training options (refine.k builds the
    # graph); the old names still load (RENAMED)
    neighbour_alpha: float = Field(
        0.5, ge=0, le=1, validation_alias=AliasChoices("neighbour_alpha", "refine_alpha"),
        description="own prediction vs neighbours' in the refined target (formerly refine_alpha)")
    neighbour_k: int | None = Field(
        None, ge=1, validation_alias=AliasChoices("neighbour_k", "refine_k"),
        description="nearest neighbours in the refined target (null = refine.k; formerly refine_k)")
    neighbour_space: Literal["pretrained", "fine_tuned"] = Field(
        "pretrained", description="(experimental) where the refined target's neighbours come from: refine's graph "
        "over the pretrained image embeddings (the method as published), or found again after every epoch from "
        "warm-up on, in the fine-tuned classifier's view of each image (its centred logits over its domain's "
        "vocabulary)")
    gmm_clean_threshold: float = Field(
        0.5, ge=0, le=1, description="a sample is clean when the low-loss GMM component's posterior is above this")
    min_label_support: int = Field(
        1, ge=0, description="the bundle keeps the names at least this many training images are finally labelled "
        "with (0 = all)")
    prototype_weight: float = Field(
        1.0, ge=0, le=1, description="the classifier: each name's text mixed with this share of its image "
        "prototype, the mean of its training images weighted by confidence (docs/train.md)")
    prototype_vote: Literal["confidence", "neighbours"] = Field(
        "neighbours", description="prototype weights: confidence alone, or times the neighbours' share in the name")
    prototype_clusters: bool = Field(
        False, description="(experimental) prototypes moved to the centres of the image clusters they seed")
    clean_loss: Literal["hard", "soft"] = Field(
        "soft", description="clean samples after warm-up: the PLL loss on their confidences W (soft), or CE on "
        "argmax W (hard)")
    # against self-training collapsing onto a few popular names
    prior_power: float = Field(
        1.0, ge=0, description="PRODEN updates: new confidence ∝ p * initial_confidence ** prior_power / "
        "mean_prediction ** balance (0 and 0 = plain PRODEN)")
    balance: float = Field(0.5, ge=0, description="the exponent of the mean prediction in the update (above)")
    # text: fine-tuning the image tower on a few noisy labels per class collapses onto a few names in small
    # discovery sets, while the name embeddings can adapt to the images
    train_towers: Literal["image", "text", "both"] = Field("text", description="which CLIP towers are fine-tuned")
    # every step sends the whole vocabulary through the text tower, whose kept activations grow with it
    grad_checkpointing: bool | None = Field(
        None, json_schema_extra=WHERE_IT_RUNS, description="gradient checkpointing (both towers' blocks); null: on "
        "when the text tower trains and the vocabulary has more than 512 names")
    augment: bool = Field(True, description="random training augmentations of the images")
    materialize_gib: float = Field(
        4.0, ge=0, json_schema_extra=WHERE_IT_RUNS, description="the decoded training images are kept in the object "
        "store (decoded once) when they take at most this many GiB; above, each epoch decodes them again as it "
        "streams")
    shuffle_buffer: int = Field(
        4096, ge=0, description="rows each worker shuffles per epoch (Ray Data's local shuffle buffer; a new seeded "
        "order every epoch); 0 = the dataset's order; above N, a full shuffle of the worker's shard")
    seed: int = Field(0, description="seed of initialization, shuffling and augmentation")
    max_failures: int = Field(
        2, ge=0, json_schema_extra=WHERE_IT_RUNS,
        description="worker failures Ray Train recovers from (from a checkpoint)")
    torch_threads: int | None = Field(
        None, ge=1, json_schema_extra=WHERE_IT_RUNS,
        description="intra-op threads per worker; null = Ray's (the worker's CPUs)")
    prefetch_batches: int | None = Field(
        None, ge=0, description="Ray Data's batches ahead; null: one on a GPU or a one-thread CPU worker, else none")
    checkpoint_keep: int = Field(2, ge=1, json_schema_extra=WHERE_IT_RUNS, description="checkpoints Ray Train keeps")
    pretrain_epochs: int = Field(12, ge=1, description="epochs of contrastive pretraining (`near-ray pretrain`)")
    pretrain_lr: float = Field(2e-3, gt=0, description="pretraining's peak of a warm-up + cosine schedule")
    pretrain_batch_size: int = Field(128, ge=2, description="pretraining's global batch; InfoNCE negatives are "
                                     "per worker")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, json_schema_extra=WHERE_IT_RUNS,
                                     description="where epoch metrics also go")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in TRAINED:
            raise ValueError(f"unknown training method '{v}' (one of {', '.join(TRAINED)})")
        return v

    @field_validator("select")
    @classmethod
    def _known_candidates(cls, v: list[str]) -> list[str]:
        if unknown := [m for m in v if m not in TRAINED]:
            raise ValueError(f"unknown training method(s) {', '.join(map(repr, unknown))} (one of {', '.join(TRAINED)})")
        return v


def text_side_rule(cfg: Any) -> Any:
    """A run config whose model has no text side (a timm backbone: near_ray.model.backbone) serves
    image-prototype classifiers only: a choice that reads the names' text embeddings is refused at load,
    before any work; eval.methods' default just leaves such methods out."""
    if cfg.model.has_text:
        return cfg
    weight = cfg.train.prototype_weight
    why = f"model.arch {cfg.model.arch} has no text side (image-prototype classifiers only): "
    if weight < 1:
        raise ValueError(why + f"train.prototype_weight {weight} mixes in the names' text embeddings; set it to 1")
    if cfg.refine.merge_encoder == "clip":
        raise ValueError(why + "refine.merge_encoder 'clip' needs CLIP's text tower; use 'sbert' or 'none'")
    for field, chosen in (("train.method", [cfg.train.method]), ("train.select", cfg.train.select)):
        if bad := [m for m in chosen if needs_text(m, weight)]:
            raise ValueError(why + f"{field} {', '.join(bad)} classifies with text embeddings; choose a prototype "
                             "classifier (e.g. naive_prototypes, near)")
    text_methods = [m for m in cfg.eval.methods if needs_text(m, weight)]
    if text_methods and "methods" in cfg.eval.model_fields_set:
        raise ValueError(why + f"eval.methods {', '.join(text_methods)} classify with text embeddings")
    if text_methods:  # the default list, on a copy (an EvalConfig given by the caller is left as it was)
        kept = [m for m in cfg.eval.methods if m not in text_methods]
        object.__setattr__(cfg, "eval", cfg.eval.model_copy(update={"methods": kept}))
        cfg.eval.model_fields_set.discard("methods")
    return cfg
