"""MLLM backends behind one seam: ``label_dataset(ds, cfg, stop) -> ds``.

A backend module exposes ``label_dataset(ds: ray.data.Dataset, cfg: LabelConfig, stop: StopSignal | None)
-> ray.data.Dataset``. Once ``stop`` is set (the job is stopping) it asks nothing new: rows it has not
sent yet are dropped, not answered, so a resumed run asks them.

Input rows (one per image x sample), built by the label stage:
    image_id, uri, domain, sample, seed, temperature, system_prompt, user_prompt,
    json_schema (JSON string, "" = free text), image (bytes, re-encoded), mime ("image/jpeg" | "image/png")

Output rows keep every input column except ``image`` and add:
    raw_answer (str | None), status ("ok" | "mllm_error"), error (str | None),
    input_tokens (int), output_tokens (int), latency_s (float), model (str)
and may add ``system_fingerprint`` (str | None: the endpoint's own; the simulated annotator says
"simulated", which the run summary and reports pass on).

``status`` here is about the request only; the stage turns answers that name nothing into
``unparsable``. Backends are imported lazily: the vLLM one needs vLLM, the OpenAI one only aiohttp. Which
module a backend runs in is its config class's ``dataset_module`` (near_ray.config.backends: ``BACKENDS``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import pyarrow as pa

from near_ray.errors import NearRayError

if TYPE_CHECKING:
    import ray.data

    from near_ray.config import LabelConfig
    from near_ray.config.backends import BackendConfig
    from near_ray.stopping import StopSignal

# The request row contract (the label stage builds these rows, every backend reads them).
REQUEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("domain", pa.string()),
        ("sample", pa.int32()),
        ("seed", pa.int64()),
        ("temperature", pa.float64()),
        ("system_prompt", pa.string()),
        ("user_prompt", pa.string()),
        ("json_schema", pa.string()),
        ("image", pa.binary()),
        ("mime", pa.string()),
    ]
)
INPUT_COLUMNS = tuple(REQUEST_SCHEMA.names)

LabelDataset = Callable[["ray.data.Dataset", "LabelConfig", "StopSignal | None"], "ray.data.Dataset"]


class BackendError(NearRayError):
    """An unknown backend, or one whose dependencies are not installed."""


def get_backend(backend: str | BackendConfig) -> LabelDataset:
    """The ``label_dataset`` function of a backend (``label.backend``, or its type), from the module its
    registered class names (near_ray.config.backends)."""
    from near_ray.config.backends import BACKENDS

    kind = backend if isinstance(backend, str) else backend.type
    if kind not in BACKENDS:
        raise BackendError(f"label.backend.type: unknown backend '{kind}' (known: {', '.join(sorted(BACKENDS))})")
    module_name = BACKENDS[kind].dataset_module
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BackendError(f"label.backend.type={kind}: cannot import {module_name}: {e}") from e
    return module.label_dataset


def model_name(cfg: LabelConfig) -> str:
    """The model recorded in the labels table, part of each label's identity for resuming."""
    return cfg.backend.model_name


def stop_gate(batch: pa.Table, stop: StopSignal) -> pa.Table:
    """Ray Data map: the batch, or no rows once the job is stopping (for backends that cannot check
    the stop inside their own workers)."""
    return batch.slice(0, 0) if stop.is_set() else batch
