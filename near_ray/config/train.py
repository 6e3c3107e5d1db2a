"""The train stage's sections: the fine-tuning run (NeaR, its ablations, the baselines) and its tracking."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from near_ray.config.base import Section
from near_ray.train.methods import TRAINED


# --------------------------------------------------------------------------------------------- train
class TrackingConfig(Section):
    """Where the driver also sends each epoch's training metrics (besides Ray Train's reported metrics).

    tensorboard: event files below ``uri`` (local folder or s3://; default ``{workdir}/tensorboard``),
    one run folder per method. mlflow: runs in experiment ``experiment`` of the tracking server at
    ``uri`` (None = MLFLOW_TRACKING_URI or MLflow's local ./mlruns).
    """

    backend: Literal["none", "tensorboard", "mlflow"] = "none"
    uri: str | None = None
    experiment: str = "near_ray"


class TrainConfig(Section):
    method: str = "near"  # one of near_ray.train.methods.TRAINED
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    accelerator_type: str | None = None  # with use_gpu: workers only on nodes with this GPU ("A10G", "H100")
    cpus_per_worker: float = Field(1.0, gt=0)
    epochs: int = Field(10, ge=1)
    warmup_epochs: int = Field(2, ge=0)
    batch_size: int = Field(64, ge=1)  # global batch size, split across workers
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    lambda_noisy: float = Field(1.0, ge=0)
    refine_alpha: float = Field(0.5, ge=0, le=1)  # own prediction vs neighbours' in the refined target
    refine_k: int | None = Field(None, ge=1)  # nearest neighbours in the refined target (None = refine.k)
    # where the refined target's neighbours come from: refine's graph over the pretrained image
    # embeddings (the method as published), or found again after every epoch from warm-up on, in the
    # fine-tuned classifier's view of each image (its centred logits over its domain's vocabulary)
    neighbour_space: Literal["pretrained", "fine_tuned"] = "pretrained"
    gmm_clean_threshold: float = Field(0.5, ge=0, le=1)
    # the bundle keeps the names at least this many training images are finally labelled with (0 = all)
    min_label_support: int = Field(1, ge=0)
    # the classifier: each name's text mixed with this share of its image prototype, the mean of its training
    # images weighted by confidence, times (neighbours) their neighbours' share in the name. docs/train.md
    prototype_weight: float = Field(1.0, ge=0, le=1)
    prototype_vote: Literal["confidence", "neighbours"] = "neighbours"
    prototype_clusters: bool = False  # prototypes moved to the centres of the image clusters they seed
    # clean samples after warm-up: the PLL loss on their confidences W (soft), or CE on argmax W (hard)
    clean_loss: Literal["hard", "soft"] = "soft"
    # PRODEN updates: new confidence ∝ p * initial_confidence ** prior_power / mean_prediction ** balance
    # (0 and 0 = plain PRODEN); against self-training collapsing onto a few popular names
    prior_power: float = Field(1.0, ge=0)
    balance: float = Field(0.5, ge=0)
    # text: the name embeddings adapt to the images (measured best for small discovery sets, where
    # fine-tuning the image tower on a few noisy labels per class collapses onto a few names)
    train_towers: Literal["image", "text", "both"] = "text"
    # gradient checkpointing (both towers' blocks): every step sends the whole vocabulary through the text
    # tower, whose kept activations grow with it (ViT-B-16: ~17 MiB a name in bf16 without, ~2 with);
    # None: on when the text tower trains and the vocabulary has more than 512 names
    grad_checkpointing: bool | None = None
    augment: bool = True
    # rows each worker shuffles per epoch (Ray Data's local shuffle buffer; a new seeded order every
    # epoch); 0 = the dataset's order. Above N it is a full shuffle of the worker's shard.
    shuffle_buffer: int = Field(4096, ge=0)
    seed: int = 0
    max_failures: int = Field(2, ge=0)
    torch_threads: int | None = Field(None, ge=1)  # intra-op threads per worker; None = Ray's (the worker's CPUs)
    prefetch_batches: int | None = Field(None, ge=0)  # Ray Data's batches ahead; None: runner.prefetch_batches
    checkpoint_keep: int = Field(2, ge=1)
    pretrain_epochs: int = Field(12, ge=1)  # contrastive pretraining (`near-ray pretrain`)
    pretrain_lr: float = Field(2e-3, gt=0)  # peak of a warm-up + cosine schedule
    pretrain_batch_size: int = Field(128, ge=2)  # global; InfoNCE negatives are per worker
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in TRAINED:
            raise ValueError(f"unknown training method '{v}' (one of {', '.join(TRAINED)})")
        return v
