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
