"""Any timm image backbone as the image tower, for users who have an image network and no CLIP.

``model.arch: timm:<name>`` (a ``timm.list_models()`` name, e.g. ``timm:tf_efficientnet_lite0``) builds an
open_clip CLIP whose image tower is that network (open_clip's ``TimmModel``: the trunk, global average
pooling, no projection, so the embedding is the network's own pooled features) and whose text side is
none: a small text tower from random init that stands in for a learned vector per name. Its names mean
nothing before training, so only classifiers of image prototypes can use such a model: text-only
classifiers, zero-shot and CLIP's text for merging names are refused at config load
(``near_ray.config``: ``model.text``).

``model.pretrained`` is then the backbone's weights: a safetensors file (local or ``s3://``) of the timm
network's state dict (its own keys, or under ``visual.trunk.``; a classifier head is ignored), or
``random``. The pixel spec (size, mean, std, interpolation) is the network's own, from timm's
pretrained config; every image mode, grey included, is made RGB on the one pixel path. Everything
else (the bundle, serving, classify, the cascade) sees an open_clip CLIP like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from near_ray.errors import NearRayError

if TYPE_CHECKING:
    import torch

PREFIX = "timm:"
# The stand-in text side: small, from random init, over CLIP's tokenizer (real names are any words).
NO_TEXT_CFG = {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 1}
NO_TEXT = "none"  # the model config's "text" entry for a model whose text side means nothing untrained


class BackboneError(NearRayError):
    pass


def is_backbone(arch: str) -> bool:
    return arch.startswith(PREFIX)


def backbone_config(arch: str) -> dict[str, Any]:
    """The open_clip config of ``timm:<name>``: the network as image tower, its pooled features as the
    embedding (no projection), the stand-in text side, and the network's preprocessing."""
    import timm
    from timm.models import get_pretrained_cfg

    from near_ray.model.preprocess import timm_preprocess_cfg

    name = arch[len(PREFIX):]
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
        raise BackboneError(f"model.arch: '{name}' is not a timm model (timm.list_models()"
                            + (f"; close: {', '.join(close)}" if close else "") + ")")
    trunk = timm.create_model(name, pretrained=False, num_classes=0)
    pre = get_pretrained_cfg(name)
    size, preprocess = timm_preprocess_cfg(pre.to_dict() if pre is not None else {})
    return {
        "embed_dim": int(trunk.num_features),
        "vision_cfg": {"timm_model_name": name, "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "none", "image_size": size},
        "text_cfg": dict(NO_TEXT_CFG),
        "preprocess_cfg": preprocess,
        "text": NO_TEXT,
    }


def trunk_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm network's state dict as its trunk holds it: keys under ``visual.trunk.`` unprefixed, the
    classifier head dropped (the embedding is the pooled features)."""
    prefix = "visual.trunk."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith(("classifier.", "fc.", "head.fc."))}


def load_backbone_weights(model: Any, state: dict[str, torch.Tensor], uri: str) -> None:
    """Load a timm state dict into the CLIP's image trunk; every trunk weight must come from the file."""
    trunk = model.visual.trunk
    ours = trunk.state_dict()
    theirs = trunk_state(state)
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    wrong = [k for k in theirs if k in ours and tuple(theirs[k].shape) != tuple(ours[k].shape)]
    if missing or unexpected or wrong:
        raise BackboneError(
            f"model.pretrained: weights {uri} do not fit timm model '{model.visual.trunk.__class__.__name__}' "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]})")
    trunk.load_state_dict(theirs)
