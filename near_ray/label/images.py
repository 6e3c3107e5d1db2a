"""Shrink one image before it is sent to an MLLM: the project's decoder, then resize and re-encode.

Runs inside Ray Data tasks, never in the driver. Decoding (and its guards against decompression
bombs, odd modes and corrupt files) is ``near_ray.images.decode_image``, the same for every stage.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from near_ray.config import ImageConfig
from near_ray.images import decode_image, image_id

__all__ = ["PreparedImage", "image_id", "prepare_image"]

MIME = {"JPEG": "image/jpeg", "PNG": "image/png"}


@dataclass(frozen=True)
class PreparedImage:
    data: bytes  # re-encoded, at most max_side on the longer side
    mime: str
    width: int
    height: int


def prepare_image(data: bytes, cfg: ImageConfig, what: str = "image") -> PreparedImage:
    """Decode (validated, EXIF-oriented, RGB), shrink and re-encode; ``ImageError`` names ``what``."""
    im = decode_image(data, what, cfg.max_pixels, cfg.min_side, draft_side=cfg.max_side, setting="label.image")
    im.thumbnail((cfg.max_side, cfg.max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if cfg.format == "JPEG":
        im.save(buf, format="JPEG", quality=90)
    else:
        im.save(buf, format="PNG", optimize=False)
    return PreparedImage(buf.getvalue(), MIME[cfg.format], im.width, im.height)
