"""Uploaded bytes -> validated RGB image (``near_ray.images``, as every stage decodes), or the HTTP error.

This runs in the ingress (in worker threads), which then makes the model's input pixels with the
bundle's preprocessor (``near_ray.model.preprocess``), so the model replica only ever receives
fixed-size uint8 arrays and spends its time on the forward pass. Each failure carries the HTTP status
a client should see and a message naming the image.
"""

from __future__ import annotations

from typing import Any

from near_ray.errors import NearRayError

# Formats a browser, phone or pipeline realistically sends; anything else PIL might open (EPS, PSD, ...)
# widens the decoder attack surface for no benefit.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")


class ApiError(NearRayError):
    """A request the server refuses: the HTTP status, a stable machine-readable code and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


_STATUS = {"empty": (400, "empty_image"), "not_an_image": (415, "unsupported_media"),
           "unsupported_format": (415, "unsupported_media"), "too_large": (413, "too_many_pixels"),
           "too_small": (422, "bad_image"), "corrupt": (422, "bad_image")}


def decode_upload(data: bytes, max_pixels: int, what: str = "image") -> Any:
    """Bytes -> RGB PIL image with the project's decoder; its refusals as the HTTP errors clients see."""
    from near_ray.images import ImageError, decode_image

    try:
        return decode_image(data, what, max_pixels, formats=ACCEPTED_FORMATS, setting="serve")
    except ImageError as e:
        status, code = _STATUS[e.kind]
        raise ApiError(status, code, str(e)) from None
