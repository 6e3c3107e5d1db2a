"""``near-ray stage-weights``: a tag's weights fetched once and written as one safetensors file
(near_ray.model.weights reads such a file once per node)."""

from __future__ import annotations

import logging
from typing import Any

from near_ray.storage import Storage

log = logging.getLogger(__name__)


def stage_weights(model_cfg: Any, out: str, storage: Storage) -> dict[str, Any]:
    """Build the starting CLIP ``model_cfg`` names (fetching a tag's weights once, here) and write its weights
    to ``out`` as safetensors; returns the ``model`` settings that read them back."""
    from near_ray.model.clip import create_clip, resolve_architecture, save_weights

    clip = create_clip(model_cfg, storage)
    storage.write_bytes(out, save_weights(clip.model))
    arch = model_cfg.arch
    if model_cfg.weights and not model_cfg.weights.endswith(".safetensors") and "/" not in model_cfg.weights:
        arch = resolve_architecture(model_cfg.arch, model_cfg.weights)  # a tag's activation (QuickGELU) kept
    staged = create_clip(model_cfg.model_copy(update={"arch": arch, "pretrained": out}), storage)
    if staged.pixels != clip.pixels:  # the tag's preprocessing is not the architecture's default
        log.warning("stage-weights: %s's pixels under '%s' are %s, but read back from %s they are %s (the "
                    "architecture's default)", model_cfg.arch, model_cfg.pretrained, clip.pixels, out, staged.pixels)
    return {"arch": arch, "pretrained": out, "pixels_match": staged.pixels == clip.pixels,
            "bytes": sum(p.numel() * p.element_size() for p in clip.model.state_dict().values())}
