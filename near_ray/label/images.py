"""Decode, validate and shrink one image before it is sent to an MLLM.

Runs inside Ray Data tasks, never in the driver. The guards come before any pixel is decoded: the
header's size is checked against ``max_pixels`` so that a decompression bomb (a tiny file that
claims a gigapixel canvas) is rejected without allocating it.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from near_ray.config import ImageConfig
from near_ray.errors import NearRayError

IMAGE_ID_CHARS = 20  # hex characters of the content hash: 80 bits, no collisions at billions of images
MIME = {"JPEG": "image/jpeg", "PNG": "image/png"}


class BadImageError(NearRayError):
    """An image that cannot be used; the message says what is wrong with it (the caller adds the URI)."""


@dataclass(frozen=True)
class PreparedImage:
    data: bytes  # re-encoded, at most max_side on the longer side
    mime: str
    width: int
    height: int


def image_id(data: bytes) -> str:
    """Identity of an image = hash of its bytes, so identical files at two URIs are asked about once."""
    return hashlib.sha256(data).hexdigest()[:IMAGE_ID_CHARS]


def prepare_image(data: bytes, cfg: ImageConfig) -> PreparedImage:
    """Validate, EXIF-orient, convert to RGB, shrink and re-encode; BadImageError names the problem."""
    if not data:
        raise BadImageError("empty file (0 bytes)")
    im = _open_checked(data, cfg)
    try:
        # JPEG can decode at 1/2, 1/4, 1/8 scale directly: far less work for large photos.
        im.draft("RGB", (cfg.max_side, cfg.max_side))
        im.load()
        im = ImageOps.exif_transpose(im)
        im = to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"truncated or corrupt {im.format or 'image'} data: {e}") from None
    except Exception as e:  # hostile files make decoders raise almost anything; one bad file must not stop a run
        raise BadImageError(f"cannot decode {im.format or 'image'} data: {type(e).__name__}: {e}") from None
    im.thumbnail((cfg.max_side, cfg.max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if cfg.format == "JPEG":
        im.save(buf, format="JPEG", quality=90)
    else:
        im.save(buf, format="PNG", optimize=False)
    return PreparedImage(buf.getvalue(), MIME[cfg.format], im.width, im.height)


def _open_checked(data: bytes, cfg: ImageConfig) -> Image.Image:
    """Open (header only) and check dimensions before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImageError(f"not an image (unrecognized format, {len(data)} bytes)") from None
    except Image.DecompressionBombError as e:
        raise BadImageError(f"image too large: {e}") from None
    except Exception as e:  # OSError, SyntaxError, struct.error …: a header no decoder accepts
        raise BadImageError(f"unreadable image header: {type(e).__name__}: {e}") from None
    w, h = im.size
    if w * h > cfg.max_pixels:
        raise BadImageError(f"image too large: {w}x{h} = {w * h} pixels > label.image.max_pixels={cfg.max_pixels}")
    if min(w, h) < cfg.min_side:
        raise BadImageError(f"image too small: {w}x{h}, shorter side < label.image.min_side={cfg.min_side}")
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is flattened onto white, 16-bit/float gray is rescaled to 8 bits."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")
