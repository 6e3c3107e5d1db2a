"""The label stage's sections: the MLLM backend (near_ray.config.backends), images, prices."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, SerializeAsAny, ValidatorFunctionWrapHandler, field_validator, model_validator

from near_ray.config.backends import (
    BACKENDS,
    DEFAULT_BACKEND,
    BackendConfig,
    OpenAIBackendConfig,
    VLLMBackendConfig,
    backend_class,
    register_backend,
)
from near_ray.config.base import Section

__all__ = ["BACKENDS", "BackendConfig", "ImageConfig", "LabelConfig", "OpenAIBackendConfig", "PriceConfig",
           "VLLMBackendConfig", "migrate_label", "register_backend"]

# The old form's sections: `backend: openai` beside `openai: {…}` and `vllm: {…}` (configs and stored runs
# written before label.backend was one section)
OLD_SECTIONS = ("openai", "vllm")


# --------------------------------------------------------------------------------------------- label
class ImageConfig(Section):
    """How images are checked and re-encoded before they are sent to the MLLM."""

    max_pixels: int = Field(64_000_000, ge=1, description="larger images are refused (decompression-bomb guard)")
    min_side: int = Field(8, ge=1, description="images with a shorter side are refused")
    max_side: int = Field(448, ge=8, description="resized so the longer side fits the backend's budget")
    format: Literal["PNG", "JPEG"] = Field("JPEG", description="encoding of the image sent in each request")


class PriceConfig(Section):
    """Costs used for the run summary and the evaluation's cost-per-1k column (USD)."""

    input_per_1m_tokens: float = Field(2.5, description="USD per million MLLM input tokens")
    output_per_1m_tokens: float = Field(10.0, description="USD per million MLLM output tokens")
    per_request: float = Field(0.0, description="USD per MLLM request")
    # a ViT-B/16 classifies ~1,000 img/s on one ~$1/h inference GPU (≈ $0.0003 per 1k); 0.002 leaves a margin
    # for pre/post-processing and idle
    clip_per_1k_images: float = Field(0.002, description="amortized USD of the fine-tuned CLIP per 1,000 images")

    def mllm_usd(self, input_tokens: float, output_tokens: float, requests: float) -> float:
        """What MLLM calls cost: the one formula for the label summary, evaluation and the cascade."""
        return (input_tokens * self.input_per_1m_tokens + output_tokens * self.output_per_1m_tokens) / 1e6 + (
            requests * self.per_request
        )


class LabelConfig(Section):
    """Naming each image with an MLLM: S answers per image, from an OpenAI-compatible endpoint or vLLM."""

    # SerializeAsAny: a dump holds the chosen backend's own fields, not only the base's `type`
    backend: SerializeAsAny[BackendConfig] = Field(
        default_factory=OpenAIBackendConfig, description="the MLLM backend that answers: one section, whose `type` "
        "picks its fields (the old form, `backend: openai` beside `openai:`/`vllm:` sections, still loads)")
    samples: int = Field(3, ge=1, description="S: answers per image")
    temperature: float = Field(0.7, ge=0, description="sampling temperature of the answers")
    seed: int = Field(0, description="seed of the sampled answers")
    prompt_version: str = Field("v1", description="the labeling prompt's version (part of each label's identity)")
    # data.max_images caps the images asked about; which ones is this rule's (near_ray.label.select)
    select: Literal["random", "first", "diversity"] = Field(
        "random", description="which images a capped run (data.max_images) asks about: random (a seeded uniform "
        "sample, the cap split across domains by size), first (the listing's first, as runs before this option), "
        "diversity (k-center greedy in the model's image-embedding space, per domain); without a cap: every image")
    select_seed: int = Field(0, description="seed of the random sample (random; diversity's candidates)")
    select_pool: int = Field(
        10, ge=1, description="diversity: candidates embedded per chosen image (a seeded random sample of this × the "
        "domain's share, or the whole domain when smaller)")
    image: ImageConfig = Field(default_factory=ImageConfig, description="image checks and re-encoding")
    prices: PriceConfig = Field(default_factory=PriceConfig, description="costs for the summaries (USD)")
    pool_size: int = Field(1, ge=1, description="labeler actors")
    # whole-CPU actors starve read tasks on small nodes
    actor_cpus: float = Field(0.25, gt=0, description="CPUs per labeler actor (fractional)")
    batch_size: int = Field(
        32, ge=1, description="requests per labeler batch (and images per request-building task)")
    batches_per_actor: int = Field(
        4, ge=1, description="batches in flight per labeler actor: keeps its request slots full")
    prepare_cpus: float = Field(0.25, gt=0, description="CPUs per read/decode/resize task")
    # the driver never holds a whole listing (100k URIs ~ 10-20 MB): it lists a chunk at a time into the
    # object store; one labeler pipeline serves every chunk
    listing_chunk: int = Field(100_000, ge=1, description="image URIs the driver lists at a time (its memory bound)")
    part_rows: int = Field(2000, ge=1, description="rows per labels part file (per domain)")
    flush_interval_s: float = Field(
        30.0, gt=0, description="write a part at least this often: a killed job keeps its work")
    ledger_partitions: int | None = Field(None, ge=1, description="resume-ledger actors (near_ray.parts.ledger); "
                                          "null = one per 10M rows the labels table may hold")
    bad_rows_every_batches: int = Field(
        20, ge=1, validation_alias=AliasChoices("bad_rows_every_batches", "log_every_batches"),
        description="write the bad-image rows the resume ledger collected every this many labeler batches (and at "
        "the end); formerly log_every_batches")

    @model_validator(mode="before")
    @classmethod
    def _old_form(cls, data: Any) -> Any:
        return migrate_label(data)

    @field_validator("backend", mode="wrap")
    @classmethod
    def _by_type(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> BackendConfig:
        """The registered class of the section's ``type`` (``BACKENDS``): an open discriminated union."""
        if isinstance(value, dict):
            value = backend_class(value.get("type", DEFAULT_BACKEND)).model_validate(value)
        return handler(value)


def migrate_label(data: Any, keep_unused: bool = False) -> Any:
    """The label section in the current form, ``backend: {type: …, <its fields>}``.

    The old form, a ``backend`` string (default openai) with ``openai:``/``vllm:`` sections, takes the
    section the type names; the other is ignored, as it always was (``keep_unused``: left in place, for
    ``--set`` overrides that switch the type: near_ray.config.overrides). A section of the old form beside
    the new one is merged into it; a field both set differently is refused, naming both.
    """
    if not isinstance(data, dict):
        return data
    data = dict(data)
    old = {name: data.pop(name) for name in OLD_SECTIONS if name in data}
    backend = data.get("backend")
    if backend is None or isinstance(backend, str):
        fields: dict[str, Any] = {"type": backend or DEFAULT_BACKEND}
    elif isinstance(backend, dict):
        fields = {"type": DEFAULT_BACKEND, **backend}
    elif isinstance(backend, BackendConfig):
        fields = {"type": backend.type, **backend.model_dump(exclude_unset=True)}
    else:
        return data  # not a section: validation says so
    kind = fields["type"]
    section = old.pop(kind, None) if isinstance(kind, str) else None
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"label.{kind} (the old form of label.backend) must be a section, not {section!r}")
    for key, value in (section or {}).items():
        if key in fields and fields[key] != value:
            raise ValueError(f"label.{kind}.{key} ({value!r}, the old form) and label.backend.{key} "
                             f"({fields[key]!r}) disagree: keep label.backend.{key}")
        fields[key] = value
    if keep_unused:
        data.update(old)
    data["backend"] = fields if section is not None or not isinstance(backend, BackendConfig) else backend
    return data
