"""Bytes -> RGB pixels: the one image decoder every stage calls (label, refine, train, classify, serve, eval).

The checks come before any pixel is decoded: the header's size is compared with ``max_pixels``, so a
decompression bomb (a small file claiming a gigapixel canvas) is refused without allocating it. Then
EXIF orientation is applied and every mode becomes 8-bit RGB the same way: transparency (RGBA, LA, a
palette with a transparent index) is flattened onto white, 16-bit and float grey is rescaled to its
own range, CMYK and the rest are converted by PIL. So the MLLM, the trainer and the server see the
same pixels for the same file. Failures are ``ImageError``s that name the image and carry a ``kind``
(which HTTP status a server answers with, for instance). PIL only: the label stage imports this
without torch.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from near_ray.errors import NearRayError

if TYPE_CHECKING:
    from near_ray.storage import Storage

IMAGE_ID_CHARS = 20  # hex characters of the content hash: 80 bits, no collisions at billions of images
DEFAULT_MAX_PIXELS = 64_000_000

ErrorKind = Literal["empty", "not_an_image", "unsupported_format", "too_large", "too_small", "corrupt"]


class ImageError(NearRayError):
    """An image that cannot be used. ``what`` names it (a URI, "file 'a.png'"), ``kind`` says why."""

    def __init__(self, what: str, kind: ErrorKind, problem: str) -> None:
        super().__init__(f"{what}: {problem}")
        self.what, self.kind, self.problem = what, kind, problem


def image_id(data: bytes) -> str:
    """Identity of an image = hash of its bytes, so identical files at two URIs are processed once."""
    return hashlib.sha256(data).hexdigest()[:IMAGE_ID_CHARS]


def open_image(
    data: bytes,
    what: str = "image",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    formats: tuple[str, ...] | None = None,
    setting: str | None = None,
) -> Image.Image:
    """Open an image's header and check it (format, size) without decoding its pixels. ``setting`` names
    the config section the limits come from ("label.image"), for the messages."""
    if not data:
        raise ImageError(what, "empty", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(what, "not_an_image", f"not an image (unrecognized format, {len(data)} bytes)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(what, "too_large", f"image too large: {e}") from None
    except Exception as e:  # OSError, SyntaxError, struct.error …: a header no decoder accepts
        raise ImageError(what, "not_an_image", f"unreadable image header: {type(e).__name__}: {e}") from None
    if formats is not None and im.format not in formats:
        raise ImageError(what, "unsupported_format", f"format {im.format} is not one of {', '.join(formats)}")
    w, h = im.size
    if w * h > max_pixels:
        limit = f"{setting}.max_pixels={max_pixels}" if setting else f"the limit of {max_pixels}"
        raise ImageError(what, "too_large", f"image too large: {w}x{h} = {w * h} pixels exceeds {limit}")
    if min(w, h) < min_side:
        limit = f"{setting}.min_side={min_side}" if setting else str(min_side)
        raise ImageError(what, "too_small", f"image too small: {w}x{h}, shorter side < {limit}")
    return im


def decode_image(
    data: bytes,
    what: str = "image",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    formats: tuple[str, ...] | None = None,
    draft_side: int | None = None,
    setting: str | None = None,
) -> Image.Image:
    """Bytes -> an RGB PIL image, EXIF-oriented. ``draft_side``: a JPEG may be decoded at 1/2, 1/4 or
    1/8 scale when it stays at least that large (far less work for a photo that is shrunk anyway)."""
    im = open_image(data, what, max_pixels, min_side, formats, setting)
    try:
        if draft_side:
            im.draft("RGB", (draft_side, draft_side))
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(what, "corrupt", f"truncated or corrupt {im.format or 'image'} data: {e}") from None
    except Exception as e:  # hostile files make decoders raise almost anything; one bad file must not stop a run
        raise ImageError(what, "corrupt", f"cannot decode {im.format or 'image'} data: {type(e).__name__}: {e}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is flattened onto white, 16-bit/float grey is rescaled to 8 bits."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.rint(scaled).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


READ_THREADS = 16  # concurrent object reads inside one task: storage latency, not CPU, bounds reading


def fetch(storage: Storage, uris: list[str]) -> list[tuple[bytes | str, str]]:
    """Each object's bytes (or a message saying why it cannot be read) and its image id, read concurrently.
    An unreadable object gets an id of its URI, so that it is recorded once and retried on a re-run."""
    from concurrent.futures import ThreadPoolExecutor

    def one(uri: str) -> tuple[bytes | str, str]:
        try:
            data = storage.read_bytes(uri)
        except NearRayError as e:
            return f"cannot read: {e}", image_id(f"unreadable:{uri}".encode())
        return data, image_id(data)

    with ThreadPoolExecutor(min(READ_THREADS, len(uris) or 1)) as pool:
        return list(pool.map(one, uris))
