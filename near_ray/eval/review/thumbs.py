"""Thumbnails for the review page: small JPEGs embedded as data URIs, so the page needs no side files."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from near_ray.errors import NearRayError
from near_ray.images import decode_image
from near_ray.storage import Storage

THUMB_SIDE = 80  # pixels, the longer side: enough to recognize an image, ~2-4 KB each
JPEG_QUALITY = 72
READ_THREADS = 8  # object storage is I/O: reads overlap


def thumbnail(data: bytes, uri: str, side: int = THUMB_SIDE) -> str:
    """``data:image/jpeg;base64,…`` of the image shrunk to ``side`` pixels on its longer side."""
    im = decode_image(data, uri, draft_side=side)  # a JPEG decodes at a fraction of its size
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnails(uris: Iterable[str], storage: Storage, side: int = THUMB_SIDE) -> dict[str, str | None]:
    """Per URI its data URI, or None when the image cannot be read (the page shows a placeholder)."""

    def one(uri: str) -> str | None:
        try:
            return thumbnail(storage.read_bytes(uri), uri, side)
        except NearRayError:
            return None

    todo = sorted(set(uris))
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return dict(zip(todo, pool.map(one, todo), strict=True))
