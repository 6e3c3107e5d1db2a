"""Any timm or torchvision image network as the image tower, for users who have one and no CLIP.

``model.arch: timm:<name>`` (a ``timm.list_models()`` name, e.g. ``timm:tf_efficientnet_lite0``) builds an
open_clip CLIP whose image tower is that network (open_clip's ``TimmModel``: the trunk, global average
pooling, no projection, so the embedding is the network's own pooled features). ``torchvision:<name>``
(a ``torchvision.models.list_models()`` name, e.g. ``torchvision:resnet50``) does the same with a
torchvision network whose last linear layer (its classifier) is dropped (``TorchvisionTower``). The text
side is none: a small text tower from random init that stands in for a learned vector per name. Its
names mean nothing before training, so only classifiers of image prototypes can use such a model:
text-only classifiers, zero-shot and CLIP's text for merging names are refused at config load
(``near_ray.config.train.text_side_rule``).

``model.pretrained`` is then the network's weights: a safetensors file (local or ``s3://``) of its state
dict (its own keys, or under ``visual.trunk.``; the classifier head is ignored), or ``random``. The pixel
spec (size, mean, std, interpolation) is the network's own (timm's pretrained config; ImageNet's at 224
for torchvision); every image mode, grey included, is made RGB on the one pixel path. Everything else
(the bundle, serving, classify, the cascade) sees an open_clip CLIP like any other.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from near_ray.errors import NearRayError

PREFIX = "timm:"
TORCHVISION = "torchvision:"
HF = "hf:"
CLS_MODELS = {"vit", "deit", "dinov2", "dinov2_with_registers", "beit", "data2vec-vision", "vit_msn", "vit_mae",
              "ijepa", "dinov3_vit"}  # Hugging Face vision transformers whose first token is a CLS token
# The stand-in text side: small, from random init, over CLIP's tokenizer (real names are any words).
NO_TEXT_CFG = {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 1}
NO_TEXT = "none"  # the model config's "text" entry for a model whose text side means nothing untrained


class BackboneError(NearRayError):
    pass


def is_backbone(arch: str) -> bool:
    return arch.startswith((PREFIX, TORCHVISION, HF))


def backbone_config(arch: str) -> dict[str, Any]:
    """The open_clip config of ``timm:<name>`` or ``torchvision:<name>``: the network as image tower, its
    pooled features as the embedding (no projection), the stand-in text side, the network's preprocessing."""
    if arch.startswith(TORCHVISION):
        return torchvision_config(arch[len(TORCHVISION):])
    if arch.startswith(HF):
        return hf_config(arch[len(HF):])
    import timm
    from timm.models import get_pretrained_cfg

    from near_ray.model.preprocess import timm_preprocess_cfg

    name = arch[len(PREFIX):]
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
        raise BackboneError(f"model.arch: '{name}' is not a timm model (timm.list_models()"
                            + (f"; close: {', '.join(close)}" if close else "") + ")")
    trunk = timm.create_model(name, pretrained=False, num_classes=0)
    pool = trunk.global_pool if isinstance(getattr(trunk, "global_pool", None), str) else getattr(
        getattr(trunk, "global_pool", None), "pool_type", "avg")  # its own: a ViT's CLS token, a CNN's average
    pre = get_pretrained_cfg(name)
    size, preprocess = timm_preprocess_cfg(pre.to_dict() if pre is not None else {})
    return {
        "embed_dim": int(trunk.num_features),
        "vision_cfg": {"timm_model_name": name, "timm_model_pretrained": False, "timm_pool": pool or "avg",
                       "timm_proj": "none", "image_size": size},
        "text_cfg": dict(NO_TEXT_CFG),
        "preprocess_cfg": preprocess,
        "text": NO_TEXT,
    }


# The placeholder open_clip builds before a torchvision network takes the image tower's place.
_PLACEHOLDER = {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 32}


def torchvision_config(name: str) -> dict[str, Any]:
    from torchvision import models

    if name not in models.list_models(module=models):
        raise BackboneError(f"model.arch: '{name}' is not a torchvision classification model "
                            "(torchvision.models.list_models(module=torchvision.models))")
    from near_ray.model.preprocess import torchvision_preprocess_cfg

    size, preprocess = torchvision_preprocess_cfg()
    return _replaced_tower(TorchvisionTower(name, size).dim, size, preprocess, torchvision_model=name)


def _replaced_tower(dim: int, size: int, preprocess: dict[str, Any], **tower: Any) -> dict[str, Any]:
    """The model config of a network that takes the place of open_clip's image tower (``build_tower``)."""
    return {"embed_dim": dim, "vision_cfg": dict(_PLACEHOLDER, image_size=size), "text_cfg": dict(NO_TEXT_CFG),
            "preprocess_cfg": preprocess, "text": NO_TEXT, **tower}


def build_tower(model: Any, spec: dict[str, Any], size: int) -> None:
    """Put the network of a model config's ``torchvision_model`` or ``hf_vision`` in the CLIP's image tower."""
    if spec.get("torchvision_model"):
        model.visual = TorchvisionTower(spec["torchvision_model"], size)
    elif spec.get("hf_vision"):
        model.visual = HFTower(spec["hf_vision"], size)


class TorchvisionTower(torch.nn.Module):
    """A torchvision network as an open_clip image tower: ``trunk`` without its last linear layer."""

    def __init__(self, name: str, size: int) -> None:
        from torchvision import models

        super().__init__()
        self.trunk = models.get_model(name, weights=None)
        self.head_keys: tuple[str, ...] = ()
        last = [(n, m) for n, m in self.trunk.named_modules() if isinstance(m, torch.nn.Linear)]
        if last:  # the classifier: the embedding is what it would read (without the classifier's dropout)
            path = last[-1][0]
            parent = self.trunk.get_submodule(path.rpartition(".")[0]) if "." in path else self.trunk
            setattr(parent, path.rpartition(".")[2], torch.nn.Identity())
            for child, module in list(parent.named_children()):
                if isinstance(module, torch.nn.Dropout):
                    setattr(parent, child, torch.nn.Identity())
            self.head_keys = (f"{path}.weight", f"{path}.bias")
        self.image_size = (size, size)
        with torch.no_grad():
            self.dim = int(self.trunk.eval()(torch.zeros(1, 3, size, size)).reshape(1, -1).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.trunk(x)
        return getattr(out, "logits", out).reshape(len(x), -1)  # googlenet/inception train with aux outputs

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass  # torchvision networks have no checkpointing switch

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        for p in self.trunk.parameters():
            p.requires_grad = False


def hf_config(folder: str) -> dict[str, Any]:
    """``hf:<folder>``: a Hugging Face vision model saved in a local folder (its config.json, and its
    preprocessor_config.json when there is one); the bundle keeps the model's config, so it rebuilds offline."""
    from pathlib import Path

    from transformers import AutoConfig

    from near_ray.model.preprocess import hf_preprocess_cfg

    if not (Path(folder) / "config.json").is_file():
        raise BackboneError(f"model.arch: hf:{folder}: no config.json there (a Hugging Face model folder, local)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True).to_dict()
    prep = Path(folder) / "preprocessor_config.json"
    size, preprocess = hf_preprocess_cfg(json.loads(prep.read_text()) if prep.is_file() else {},
                                         int(config.get("image_size") or 224))
    return _replaced_tower(HFTower(config, size).dim, size, preprocess, hf_vision=config)


class HFTower(torch.nn.Module):
    """A Hugging Face vision model as an open_clip image tower: the CLS token of a transformer's last layer,
    a convolutional network's pooled output (else its spatial mean)."""

    def __init__(self, config: dict[str, Any], size: int) -> None:
        from transformers import AutoConfig, AutoModel

        super().__init__()
        self.trunk = AutoModel.from_config(AutoConfig.for_model(**config))
        self.head_keys: tuple[str, ...] = ()
        self.prefix = f"{self.trunk.base_model_prefix}." if getattr(self.trunk, "base_model_prefix", "") else ""
        # a transformer with a CLS token embeds by it (not by its pooler); others by their pooled output
        self.cls_token = config.get("model_type") in CLS_MODELS
        self.optional_keys = ("pooler.",) if self.cls_token else ()
        self.image_size = (size, size)
        with torch.no_grad():
            self.dim = int(self.eval()(torch.zeros(1, 3, size, size)).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.trunk(pixel_values=x)
        hidden = out.last_hidden_state
        if hidden.dim() == 3 and self.cls_token:
            return hidden[:, 0]
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = hidden.mean(dim=1) if hidden.dim() == 3 else hidden.mean(dim=(2, 3))
        return pooled.reshape(len(x), -1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if getattr(self.trunk, "supports_gradient_checkpointing", False):
            (self.trunk.gradient_checkpointing_enable if enable else self.trunk.gradient_checkpointing_disable)()

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        for p in self.trunk.parameters():
            p.requires_grad = False


def load_hf_weights(model: Any, folder: str) -> None:
    """``hf:<folder>`` with ``model.pretrained: <folder>``: the folder's weights, loaded by transformers
    (which renames the keys of checkpoints saved by other versions), copied into the image tower."""
    from transformers import AutoModel

    source = AutoModel.from_pretrained(folder, local_files_only=True)
    ours, theirs = model.visual.trunk.state_dict(), source.state_dict()
    if set(ours) != set(theirs):
        raise BackboneError(f"model.pretrained: {folder}: transformers built {type(source).__name__}, whose weights "
                            f"do not fit the image tower (e.g. {sorted(set(ours) ^ set(theirs))[:3]})")
    model.visual.trunk.load_state_dict(theirs)


def trunk_state(state: dict[str, torch.Tensor], head: tuple[str, ...] = (),
                extra_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A network's state dict as its trunk holds it: keys under ``visual.trunk.`` (or a Hugging Face base
    model's prefix, ``vit.``) unprefixed, the replaced classifier's keys (``head``) dropped."""
    for prefix in ("visual.trunk.", *extra_prefixes):
        if prefix and any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if k not in head}


HEADS = ("classifier.", "fc.", "head.", "heads.", "last_linear.")  # where networks keep their classifier


def load_backbone_weights(model: Any, state: dict[str, torch.Tensor], uri: str) -> None:
    """Load a network's state dict into the CLIP's image trunk; every trunk weight must come from the file."""
    trunk = model.visual.trunk
    ours = trunk.state_dict()
    theirs = trunk_state(state, getattr(model.visual, "head_keys", ()), (getattr(model.visual, "prefix", ""),))
    theirs = {k: v for k, v in theirs.items() if k in ours or not k.startswith(HEADS)}  # a head the trunk lacks
    optional = getattr(model.visual, "optional_keys", ())  # layers the embedding does not read
    missing = [k for k in ours if k not in theirs and not k.startswith(optional)]
    unexpected = [k for k in theirs if k not in ours]
    wrong = [k for k in theirs if k in ours and tuple(theirs[k].shape) != tuple(ours[k].shape)]
    if missing or unexpected or wrong:
        raise BackboneError(
            f"model.pretrained: weights {uri} do not fit the network '{model.visual.trunk.__class__.__name__}' "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]})")
    trunk.load_state_dict(theirs, strict=not optional)
