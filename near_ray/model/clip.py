"""The CLIP model behind every stage: one front door over open_clip.

``ModelConfig.arch`` is an open_clip model name ("ViT-B-16"), the name of a config shipped with
near_ray (``near_ray/model/configs/*.json``, e.g. "near-tiny"), or a URI of such a JSON file.
``ModelConfig.pretrained`` is an open_clip pretrained tag ("openai", "laion2b_s34b_b88k"), a tag of
weights near_ray ships for one of its configs ("synthetic" for near-tiny: ``near_ray/model/pretrained``),
a URI of safetensors weights, or "random" for random init. ``timm:<name>`` makes a timm image network
the image tower, with no text side (``near_ray.model.backbone``). Configs are data; nothing here
downloads unless an open_clip pretrained tag asks for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from near_ray.errors import NearRayError
from near_ray.model.preprocess import PixelSpec
from near_ray.model.tokenizer import SubsetTokenizer

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from near_ray.config import ModelConfig
    from near_ray.storage import Storage


class ModelError(NearRayError):
    pass


@dataclass
class Clip:
    """An open_clip model with the pixel spec and tokenizer that belong to it."""

    model: Any  # open_clip.CLIP
    pixels: PixelSpec  # how images become its input (near_ray.model.preprocess)
    tokenizer: Any
    model_config: dict  # the open_clip config (JSON-able), so a bundle can rebuild the model offline
    text: str = "clip"  # "none": the text side means nothing untrained (a timm backbone: near_ray.model.backbone)

    @property
    def image_size(self) -> int:
        return self.pixels.size


_CONFIGS = resources.files("near_ray.model") / "configs"


def builtin_configs() -> list[str]:
    return sorted(p.name[:-5] for p in _CONFIGS.iterdir() if p.name.endswith(".json"))


def resolve_model_config(arch: str, storage: Storage | None = None, pretrained: str | None = None) -> dict:
    """The open_clip config dict for ``arch`` (a builtin name, an open_clip name, or a JSON URI).

    With an open_clip pretrained tag, the config is the one the tag's weights were trained with: see
    ``resolve_architecture``.
    """
    import open_clip

    from near_ray.model.backbone import backbone_config, is_backbone

    if is_backbone(arch):
        return backbone_config(arch)
    if arch in builtin_configs():
        return json.loads(_CONFIGS.joinpath(f"{arch}.json").read_text())
    if arch.endswith(".json"):
        from near_ray.storage import Storage as _Storage

        try:
            return (storage or _Storage()).read_json(arch)
        except NearRayError as e:
            raise ModelError(f"model.arch: cannot read model config {arch}: {e}") from e
    name = resolve_architecture(arch, pretrained)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ModelError(
            f"model.arch: unknown architecture '{arch}': not an open_clip model "
            f"(open_clip.list_models()), not one of near_ray's ({', '.join(builtin_configs())}), not a .json URI"
        )
    if name == arch and _tag_wants_quick_gelu(arch, pretrained):
        cfg = dict(cfg, quick_gelu=True)  # no "-quickgelu" twin: open_clip's force_quick_gelu does the same
    return cfg


def shipped_weights(arch: str, tag: str | None) -> str | None:
    """The file of weights near_ray ships for ``arch`` under pretrained tag ``tag``
    (``near_ray/model/pretrained/<arch>.<tag>.safetensors``, e.g. near-tiny + "synthetic"), else None."""
    if not tag or _is_weights_uri(tag) or arch not in builtin_configs():
        return None
    path = resources.files("near_ray.model") / "pretrained" / f"{arch}.{tag}.safetensors"
    return str(path) if path.is_file() else None


def _tag_wants_quick_gelu(arch: str, pretrained: str | None) -> bool:
    from open_clip.pretrained import get_pretrained_cfg

    return bool(pretrained and get_pretrained_cfg(arch, pretrained).get("quick_gelu"))


def resolve_architecture(arch: str, pretrained: str | None) -> str:
    """The open_clip model name whose activation matches a pretrained tag's weights.

    OpenAI's CLIP weights (and a few others: laion400m ViT-B-32, metaclip, dfn) were trained with
    QuickGELU, but ``ViT-B-16`` builds nn.GELU; open_clip only warns, and every embedding, zero-shot
    score and fine-tuned model is then quietly worse. open_clip's registry records the activation per
    tag (``quick_gelu``), so the tag picks the ``-quickgelu`` twin where there is one.
    """
    import open_clip

    if not _tag_wants_quick_gelu(arch, pretrained):
        return arch
    twin = f"{arch}-quickgelu"
    cfg = open_clip.get_model_config(arch) or {}
    if cfg.get("quick_gelu") or twin not in open_clip.list_models():
        return arch
    return twin


def _is_weights_uri(pretrained: str) -> bool:
    return pretrained.endswith(".safetensors") or pretrained.startswith("s3://") or "/" in pretrained


def load_state_dict_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    return st_load(data)


def create_clip(model_cfg: ModelConfig, storage: Storage | None = None) -> Clip:
    """Build the model a run config names: an open_clip name + pretrained tag, or a config + safetensors weights."""
    import open_clip

    from near_ray.model.backbone import is_backbone

    pretrained = shipped_weights(model_cfg.arch, model_cfg.weights) or model_cfg.weights  # None: random init
    if pretrained and not _is_weights_uri(pretrained) and is_backbone(model_cfg.arch):
        raise ModelError(f"model.pretrained: '{pretrained}' is not a weights file; an image network ({model_cfg.arch}) "
                         "reads its weights from a safetensors file (local or s3://; a Hugging Face model from its "
                         "folder), or starts from 'random'")
    if pretrained and not _is_weights_uri(pretrained) and model_cfg.arch in builtin_configs():
        folder = resources.files("near_ray.model") / "pretrained"
        shipped = sorted(p.name for p in (folder.iterdir() if folder.is_dir() else [])
                         if p.name.startswith(f"{model_cfg.arch}.") and p.name.endswith(".safetensors"))
        raise ModelError(f"model.pretrained: '{pretrained}' is not a tag of {model_cfg.arch} (shipped weights: "
                         f"{', '.join(shipped) or 'none'}), nor a weights URI")
    tag = pretrained if pretrained and not _is_weights_uri(pretrained) else None
    cfg = resolve_model_config(model_cfg.arch, storage, pretrained=tag)
    if tag:
        # An open_clip pretrained tag: production path, open_clip fetches the weights. The config (and so
        # the bundle's) carries the tag's activation, and the model is built with it; the pixel spec is
        # the one open_clip records for the tag (its size, normalization, interpolation, resize mode).
        name = resolve_architecture(model_cfg.arch, tag)
        model = open_clip.create_model(name, pretrained=tag, force_quick_gelu=bool(cfg.get("quick_gelu")))
        tokenizer = open_clip.get_tokenizer(name)
        config = {k: v for k, v in cfg.items() if k != "preprocess_cfg"}
        tag_cfg = getattr(model.visual, "preprocess_cfg", None) or cfg.get("preprocess_cfg") or {}
        return Clip(model, PixelSpec.for_model_config(config, tag_cfg), tokenizer, config)
    clip = clip_from_config(cfg, model_cfg.init_seed)
    folder = model_cfg.arch[len("hf:"):] if model_cfg.arch.startswith("hf:") else None
    if pretrained and folder and Path(pretrained).resolve() == Path(folder).resolve():
        from near_ray.model.backbone import load_hf_weights

        load_hf_weights(clip.model, folder)  # the folder's own weights, through transformers
        return clip
    if pretrained:
        from near_ray.model.weights import read_weights
        from near_ray.storage import Storage as _Storage

        try:  # an s3:// file once per node (near_ray.model.weights)
            state = load_state_dict_bytes(read_weights(pretrained, storage or _Storage()))
        except NearRayError as e:
            raise ModelError(f"model.pretrained: {e}") from e
        if is_backbone(model_cfg.arch):  # the image network's own weights, into the image tower
            from near_ray.model.backbone import load_backbone_weights

            load_backbone_weights(clip.model, state, pretrained)
            return clip
        missing, unexpected = clip.model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("text.")]:
            raise ModelError(
                f"model.pretrained: weights {pretrained} do not fit arch '{model_cfg.arch}' "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    return clip


def clip_from_config(model_config: dict, init_seed: int = 0, pixels: PixelSpec | None = None) -> Clip:
    """A model from an open_clip config dict, initialized from ``init_seed``: what a bundle's
    config.json holds, so a bundle rebuilds its model offline. The pixel spec is ``pixels``, else the
    config's own (``preprocess_cfg``, open_clip's convention). The seed is its own (the global RNG is
    left as it was), so every process that builds the same untrained model gets the same weights:
    refine's embedder, the trainers and a bundle before its weights load."""
    import open_clip
    import torch

    cfg = dict(model_config)
    spec = pixels or PixelSpec.for_model_config(cfg)
    cfg.pop("preprocess_cfg", None)
    text = cfg.pop("text", "clip")
    tower = {k: cfg.pop(k) for k in ("torchvision_model", "hf_vision") if k in cfg}  # near_ray.model.backbone
    tokenizer_cfg = cfg.pop("tokenizer", None) or {}
    context_length = cfg.get("text_cfg", {}).get("context_length", 77)
    if "bpe_subset" in tokenizer_cfg:  # a small text tower: its own token embedding rows
        tokenizer: Any = SubsetTokenizer(tokenizer_cfg["bpe_subset"], context_length)
        cfg["text_cfg"] = dict(cfg["text_cfg"], vocab_size=tokenizer.vocab_size)
    else:
        tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = open_clip.CLIP(**cfg)
        if tower:
            from near_ray.model.backbone import build_tower

            build_tower(model, tower, spec.size)
    full_cfg = dict(cfg, tokenizer=tokenizer_cfg) if tokenizer_cfg else cfg
    if text != "clip":
        full_cfg["text"] = text
    full_cfg.update(tower)
    return Clip(model, spec, tokenizer, full_cfg, text)


def save_weights(model: Any) -> bytes:
    """The model's state dict as safetensors bytes (no pickle)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save(state)


def encode_texts(clip: Clip, names: list[str], template: str, batch_size: int = 256) -> np.ndarray:
    """L2-normalized text embeddings of ``template.format(name)`` for each name (float32, [N, D])."""
    import torch

    clip.model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(names), batch_size):
            tokens = clip.tokenizer([template.format(n) for n in names[i : i + batch_size]])
            emb = clip.model.encode_text(tokens.to(next(clip.model.parameters()).device))
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())
    dim = clip.model.text_projection.shape[-1] if hasattr(clip.model, "text_projection") else 0
    return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)


def encode_images(clip: Clip, images: list[Image.Image], batch_size: int = 64) -> np.ndarray:
    """L2-normalized image embeddings (float32, [N, D]) through the one pixel path
    (``near_ray.model.preprocess``: the model's preprocessor, then ``encode_pixels``)."""
    from near_ray.model.preprocess import encode_pixels, preprocessor

    clip.model.eval()
    device = next(clip.model.parameters()).device
    prep = preprocessor(clip.pixels)
    out = []
    for i in range(0, len(images), batch_size):
        x = prep.batch([prep.pixels(im) for im in images[i : i + batch_size]], device)
        out.append(encode_pixels(clip.model, x, device))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
