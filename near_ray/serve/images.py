"""Uploaded bytes -> validated RGB image (``near_ray.images``, as every stage decodes) -> the model's input pixels.

Everything here runs in the ingress (in worker threads), so the model replica only ever receives
fixed-size uint8 arrays and spends its time on the forward pass. Each failure carries the HTTP status
a client should see and a message naming the image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


class Preprocessor:
    """The bundle's eval transform, split in two: geometry (PIL, here) and normalization (in the batch).

    Sending uint8 pixels instead of float tensors moves 4x fewer bytes to the model replica; the
    split reproduces open_clip's transform exactly (the serve tests compare against ``Bundle.classify``).
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        import open_clip
        from torchvision import transforms as T

        self.spec = spec
        full = open_clip.image_transform(spec["image_size"], is_train=False, mean=spec["mean"], std=spec["std"])
        steps = list(full.transforms)
        if not (isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize)):
            raise NearRayError(f"unexpected open_clip eval transform {full}: cannot split it for serving")
        self.geometry = T.Compose(steps[:-2])

    def pixels(self, image: Any) -> np.ndarray:
        """RGB PIL image -> uint8 [H, W, 3] at the model's input size."""
        return np.asarray(self.geometry(image), dtype=np.uint8)


def pixel_spec(clip: Any) -> dict[str, Any]:
    """A CLIP model's input size and normalization: what ``Preprocessor`` and ``normalize`` need."""
    return {"image_size": clip.image_size, "mean": list(clip.image_mean), "std": list(clip.image_std)}


def preprocess_spec(bundle: Any) -> dict[str, Any]:
    """What the ingress needs to prepare pixels for a bundle; ``key`` detects a mismatch after a swap."""
    spec = pixel_spec(bundle.clip)
    spec["key"] = f"{spec['image_size']}|{','.join(f'{m:.6f}' for m in spec['mean'])}|{','.join(f'{s:.6f}' for s in spec['std'])}"
    return spec


def normalize(pixels: list[np.ndarray], spec: dict[str, Any]) -> Any:
    """uint8 [H, W, 3] arrays -> the float tensor batch open_clip's ToTensor + Normalize would produce."""
    import torch

    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub(mean).div(std)
