"""Starting weights read once per node, and staged once for a cluster.

Every process that builds the starting CLIP (the driver, each embed and classify actor, each train
worker and its restarts) needs its weights. From an open_clip tag, open_clip fetches them from the
model hub in each of those processes: ~600 MB each for ViT-B-16, and a stage fails where the hub is slow,
rate-limited or unreachable. ``near-ray stage-weights --out s3://…/vit-b-16.safetensors`` fetches them
once and writes them as a safetensors file; ``model.pretrained: s3://…`` then reads that file, and
``read_weights`` keeps one copy per node on local disk (``NEAR_RAY_WEIGHTS_CACHE``, default
``~/.cache/near_ray/weights``), keyed by the object's URI, size and ETag, so the processes of a node
read S3 once and a replaced file is read again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from near_ray.storage import Storage, is_s3

log = logging.getLogger(__name__)

CACHE_ENV = "NEAR_RAY_WEIGHTS_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "near_ray" / "weights")


def read_weights(uri: str, storage: Storage) -> bytes:
    """The bytes of a weights file; an ``s3://`` one through this node's cache (a local file is read as is)."""
    if not is_s3(uri):
        return storage.read_bytes(uri)
    info = storage.info(uri)
    if info is None:
        return storage.read_bytes(uri)  # the storage's own "no such file" error, naming the URI
    key = hashlib.sha256(f"{uri}|{info.size}|{info.etag}".encode()).hexdigest()[:24]
    path = cache_dir() / f"{key}.safetensors"
    if path.is_file() and path.stat().st_size == info.size:
        return path.read_bytes()
    data = storage.read_bytes(uri)
    try:  # written beside and renamed: a process on the node never reads a half-written copy
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".part") as f:
            f.write(data)
        os.replace(f.name, path)
    except OSError as e:  # a read-only or full disk: the weights still load, each process from S3
        log.warning("weights cache %s not written (%s): each process reads %s itself", path.parent, e, uri)
    return data


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
