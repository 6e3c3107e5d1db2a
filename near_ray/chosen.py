"""Which method's bundle a run serves: the label-free choice (``train.select``, near_ray.train.select) once
made, else ``train.method``. Kept apart from the trainer: classify, serve and the review page read it."""

from __future__ import annotations

from near_ray.config import RunConfig
from near_ray.storage import Storage, storage_for


def served_method(cfg: RunConfig, st: Storage | None = None) -> str:
    """The method whose bundle a run serves and names the collection with: the label-free choice when
    ``train.select`` is set and a choice was made, else ``train.method``."""
    if not cfg.train.select:
        return cfg.train.method
    st = st or storage_for(cfg)
    uri = cfg.paths.choice
    return st.read_json(uri).get("chosen", cfg.train.method) if st.exists(uri) else cfg.train.method
