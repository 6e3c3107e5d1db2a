"""The one pixel path: how a decoded image becomes model input, and how a batch of it becomes embeddings.

Every stage that looks at pixels (train, refine's embedder, classify's tower, the server, evaluation)
goes through here, so one file gives the same pixels and, on one device, the same embedding everywhere::

    PIL image, any mode --to_rgb--> RGB --resize (short side to ``size``)--> centre crop ``size`` x ``size``
        --> uint8 [size, size, 3]                     Preprocessor.pixels (read threads, tasks, the ingress)
        --> float [B, 3, size, size] = (x/255 - mean) / std   normalize (in the batch, on the model's device)
        --> L2-normalized float32 [B, D]              encode_pixels (one precision rule per device)

Geometry and normalization are split so that workers ship uint8 pixels (4x fewer bytes than floats)
and the model's process spends its time on the forward pass. The split reproduces open_clip's eval
transform exactly (``tests/model/test_preprocess.py`` compares them). Training augments on top of these
pixels (``near_ray.train.data``), never on another geometry. The spec belongs to the model: ``Clip.pixels``,
and a bundle's config.json under ``"preprocess"``. Importing this module imports neither torch nor open_clip.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from near_ray.errors import NearRayError
from near_ray.images import to_rgb

if TYPE_CHECKING:
    import torch
    from PIL import Image

# OpenAI CLIP's normalization (open_clip's OPENAI_DATASET_MEAN/STD): the default of a model config
# that names none, and of bundles written before the spec was stored whole.
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)
# "shortest": short side to ``size``, then the centre ``size`` x ``size`` (CLIP's and open_clip's default);
# "squash": both sides to ``size`` (what some open_clip pretrained tags were trained with, e.g. SigLIP).
RESIZE_MODES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")


class PreprocessError(NearRayError):
    """A pixel spec near_ray cannot apply; the message names the field."""


@dataclass(frozen=True)
class PixelSpec:
    """How a model wants its pixels: input size, normalization, interpolation, resize mode, channels."""

    size: int
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    channels: str = "RGB"  # every mode is made RGB by near_ray.images.to_rgb (grey is replicated)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        problems = [
            f"size {self.size} is not a positive integer" if int(self.size) != self.size or self.size < 1 else "",
            f"mean {list(self.mean)} is not 3 values" if len(self.mean) != 3 else "",
            f"std {list(self.std)} is not 3 positive values" if len(self.std) != 3 or min(self.std) <= 0 else "",
            f"interpolation '{self.interpolation}' is not one of {INTERPOLATIONS}"
            if self.interpolation not in INTERPOLATIONS else "",
            f"resize_mode '{self.resize_mode}' is not one of {RESIZE_MODES}" if self.resize_mode not in RESIZE_MODES else "",
            f"channels '{self.channels}' is not RGB" if self.channels != "RGB" else "",
        ]
        if problems := [p for p in problems if p]:
            raise PreprocessError(f"pixel spec: {'; '.join(problems)}")
        object.__setattr__(self, "size", int(self.size))

    @property
    def key(self) -> str:
        """A short text that differs when the pixels would (a server detects a bundle swap mid-request)."""
        floats = ",".join(f"{v:.6f}" for v in (*self.mean, *self.std))
        return f"{self.size}|{floats}|{self.interpolation}|{self.resize_mode}|{self.channels}"

    def to_config(self) -> dict[str, Any]:
        """JSON-able: what a bundle's config.json holds under "preprocess"."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PixelSpec:
        known = {k: config[k] for k in ("size", "mean", "std", "interpolation", "resize_mode", "channels") if k in config}
        return cls(**known)

    @classmethod
    def for_model_config(cls, model_config: dict[str, Any], preprocess_cfg: dict[str, Any] | None = None) -> PixelSpec:
        """The spec of an open_clip model config: its vision tower's input size and its ``preprocess_cfg``
        (open_clip's keys: mean, std, interpolation, resize_mode; a missing key takes the default)."""
        size = model_config["vision_cfg"]["image_size"]
        size = size if isinstance(size, int) else size[0]
        cfg = preprocess_cfg if preprocess_cfg is not None else (model_config.get("preprocess_cfg") or {})
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation == "random":  # open_clip's training-only choice; its eval transform is bicubic
            interpolation = "bicubic"
        return cls(int(size), tuple(cfg.get("mean") or DEFAULT_MEAN), tuple(cfg.get("std") or DEFAULT_STD),
                   interpolation, cfg.get("resize_mode") or "shortest")


def torchvision_preprocess_cfg() -> tuple[int, dict[str, Any]]:
    """A torchvision network's input size and preprocessing as open_clip's ``preprocess_cfg``: ImageNet's
    normalization at 224, bilinear (torchvision's classification presets)."""
    return 224, {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}


def hf_preprocess_cfg(processor: dict[str, Any], default_size: int) -> tuple[int, dict[str, Any]]:
    """A Hugging Face image processor's config (preprocessor_config.json) as an input size and open_clip's
    ``preprocess_cfg``: its image_mean, image_std, size (a centre crop's, else height, shortest_edge or a
    number), resize mode (a height x width resize without a crop squashes) and resample (PIL's codes: 2
    bilinear, else bicubic); ImageNet's normalization where it names none."""
    crop = processor.get("crop_size") if processor.get("do_center_crop", "crop_size" in processor) else None
    size = crop or processor.get("size") or default_size
    # resized to height x width with no crop after (a ViT's processor): both sides to the size, as it does
    squash = not crop and isinstance(size, dict) and "height" in size
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or default_size
    mean = processor.get("image_mean") or [0.485, 0.456, 0.406]
    std = processor.get("image_std") or [0.229, 0.224, 0.225]
    return int(size), {"mean": list(mean), "std": list(std), "resize_mode": "squash" if squash else "shortest",
                       "interpolation": "bilinear" if processor.get("resample") == 2 else "bicubic"}


def timm_preprocess_cfg(pretrained_cfg: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A timm network's input size and its preprocessing as open_clip's ``preprocess_cfg`` (mean, std,
    interpolation; ImageNet's where timm records none). timm's ``crop_pct`` is not applied: the short
    side goes to the input size and the centre square is kept, as for every model here."""
    size = (pretrained_cfg.get("input_size") or (3, 224, 224))[-1]
    return int(size), {"mean": list(pretrained_cfg.get("mean") or (0.485, 0.456, 0.406)),
                       "std": list(pretrained_cfg.get("std") or (0.229, 0.224, 0.225)),
                       "interpolation": pretrained_cfg.get("interpolation") or "bicubic"}


def bundle_pixel_spec(config: dict[str, Any]) -> PixelSpec:
    """A bundle's spec from its config.json: "preprocess", else (bundles written before it was stored
    whole) "image_mean", "image_std" and the vision tower's size, with bicubic, shortest side, RGB:
    exactly what those bundles were served with."""
    try:
        if "preprocess" in config:
            return PixelSpec.from_config(config["preprocess"])
        legacy = {"mean": config.get("image_mean"), "std": config.get("image_std")}
        return PixelSpec.for_model_config(config["model_config"], legacy)
    except (KeyError, TypeError, ValueError) as e:
        raise PreprocessError(f"no usable pixel spec ({type(e).__name__}: {e})") from e


class Preprocessor:
    """A spec's geometry (PIL, on the CPU, where images are decoded) and normalization (in the batch)."""

    def __init__(self, spec: PixelSpec) -> None:
        from torchvision import transforms as T
        from torchvision.transforms import InterpolationMode

        self.spec = spec
        mode = InterpolationMode.BILINEAR if spec.interpolation == "bilinear" else InterpolationMode.BICUBIC
        if spec.resize_mode == "squash":
            self.geometry: Any = T.Resize((spec.size, spec.size), interpolation=mode)
        else:
            self.geometry = T.Compose([T.Resize(spec.size, interpolation=mode), T.CenterCrop(spec.size)])

    def pixels(self, image: Image.Image) -> np.ndarray:
        """Any PIL image -> uint8 [size, size, 3], the model's input before normalization."""
        return np.asarray(self.geometry(to_rgb(image)), dtype=np.uint8)

    def batch(self, pixels: list[np.ndarray] | torch.Tensor, device: Any = "cpu") -> torch.Tensor:
        """uint8 [H, W, 3] arrays (or a [B, H, W, 3] tensor) -> the normalized float batch on ``device``."""
        return normalize(unit_pixels(pixels, device), self.spec)


_PREPROCESSORS: dict[PixelSpec, Preprocessor] = {}


def preprocessor(spec: PixelSpec) -> Preprocessor:
    """The process's one ``Preprocessor`` for ``spec`` (tasks and ingresses meet few specs, many images)."""
    if spec not in _PREPROCESSORS:
        _PREPROCESSORS[spec] = Preprocessor(spec)
    return _PREPROCESSORS[spec]


def unit_pixels(pixels: list[np.ndarray] | torch.Tensor, device: Any = "cpu") -> torch.Tensor:
    """uint8 [B, H, W, 3] (arrays or a tensor, on any device) -> float32 [B, 3, H, W] in [0, 1] on ``device``:
    torchvision's ToTensor, batched. Training augments at this point (``near_ray.train.data.to_pixels``)."""
    import torch

    x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.stack(pixels))
    return x.to(device).permute(0, 3, 1, 2).to(torch.float32).div(255)


def normalize(x: torch.Tensor, spec: PixelSpec) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> (x - mean) / std: torchvision's Normalize, on x's device."""
    import torch

    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub(mean).div(std)


def precision(device: Any) -> str:
    """What ``encode_pixels`` computes in on ``device``: "float32" on a CPU, "float16-autocast" on CUDA.

    On CUDA the image tower runs under fp16 autocast (matmuls and convolutions in fp16; norms, softmax
    and the result in fp32), on every GPU: inference needs no gradient range (bf16's advantage), fp16
    keeps 3 more mantissa bits than bf16 so embeddings stay closer to fp32's, every CUDA GPU runs it
    (T4 and V100 have no bf16), and it is open_clip's own "amp". The model's weights stay fp32.
    Training's forward pass (with gradients) follows ``model.precision`` instead (``train.loop``).
    """
    return "float16-autocast" if _device_type(device) == "cuda" else "float32"


def encode_pixels(model: Any, pixels: torch.Tensor, device: Any) -> np.ndarray:
    """Normalized pixels [B, 3, H, W] -> L2-normalized float32 image embeddings [B, D] (numpy), with the
    image tower of ``model`` (an open_clip CLIP in eval mode, on ``device``) at ``precision(device)``."""
    import torch

    x = pixels.to(device)
    autocast = torch.autocast("cuda", dtype=torch.float16) if precision(device) == "float16-autocast" else nullcontext()
    with torch.no_grad(), autocast:
        features = model.encode_image(x)
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


def _device_type(device: Any) -> str:
    return getattr(device, "type", None) or str(device).split(":")[0]


def autocast_settings(precision: str, device: Any) -> tuple[bool, Any, bool]:
    """Training's precision rule (``model.precision``; inference follows ``precision`` above): (autocast on,
    its dtype, gradient scaling on) on ``device``. bf16 autocast on CUDA for "amp" (Ampere and later); fp16
    autocast with a gradient scaler for "amp_fp16" (GPUs without fast bf16: T4); fp32 on CPU and for "fp32"."""
    import torch

    if _device_type(device) != "cuda" or precision == "fp32":
        return False, torch.float32, False
    if precision == "amp_fp16":
        return True, torch.float16, True
    return True, torch.bfloat16, False
