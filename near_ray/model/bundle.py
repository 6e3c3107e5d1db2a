"""The model bundle: everything serving and evaluation need, and nothing that can run code.

A bundle is a folder on storage:
  model.safetensors            open_clip weights (safetensors, no pickle)
  config.json                  open_clip model config, the pixel spec ("preprocess": size, mean, std,
                               interpolation, resize_mode, channels), prompt template, logit scale,
                               abstain threshold, model_version, domains
  vocabulary.json              [{"name", "domain", "synonyms", "support"}, ...]
  text_embeddings.safetensors  {"text_embeddings": [V, D] float32, L2-normalized}
  metrics.json                 training/evaluation metrics

Serving imports this module, never the trainer.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from near_ray.errors import NearRayError
from near_ray.model.preprocess import PixelSpec, bundle_pixel_spec
from near_ray.storage import Storage, join

if TYPE_CHECKING:
    from PIL import Image

    from near_ray.model.clip import Clip

FORMAT_VERSION = 1


class BundleError(NearRayError):
    pass


def save_bundle(
    uri: str,
    clip: Clip,
    vocabulary: list[dict[str, Any]],
    text_embeddings: np.ndarray,
    *,
    prompt_template: str,
    logit_scale: float,
    abstain_threshold: float = 0.0,
    metrics: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
    storage: Storage | None = None,
) -> dict[str, Any]:
    """Write a bundle; config.json is written last, so a bundle without it is incomplete."""
    from safetensors.numpy import save as np_save

    from near_ray.model.clip import save_weights

    st = storage or Storage()
    if len(vocabulary) != len(text_embeddings):
        raise BundleError(f"{uri}: {len(vocabulary)} vocabulary entries but {len(text_embeddings)} text embeddings")
    weights = save_weights(clip.model)
    classifier = np_save({"text_embeddings": np.ascontiguousarray(text_embeddings, dtype=np.float32)})
    st.write_bytes(join(uri, "model.safetensors"), weights)
    st.write_bytes(join(uri, "text_embeddings.safetensors"), classifier)
    st.write_json(join(uri, "vocabulary.json"), vocabulary)
    st.write_json(join(uri, "metrics.json"), metrics or {})
    config = {
        "format_version": FORMAT_VERSION,
        "model_config": clip.model_config,
        "preprocess": clip.pixels.to_config(),
        "prompt_template": prompt_template,
        "logit_scale": float(logit_scale),
        "abstain_threshold": float(abstain_threshold),
        "domains": sorted({v.get("domain") or "" for v in vocabulary}),
        # What the bundle answers: its weights, class embeddings and names (two bundles of one
        # checkpoint with other class embeddings, e.g. text-only and text+image prototypes, differ).
        "model_version": _version(weights, classifier, vocabulary),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra_config or {}),
    }
    st.write_json(join(uri, "config.json"), config)
    return config


def _version(weights: bytes, classifier: bytes, vocabulary: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256(weights)
    digest.update(classifier)
    digest.update(json.dumps(vocabulary, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:12]


def domain_in_bundle(domain: str, bundle_domains: list[str], uri: str) -> str | None:
    """The domain inside bundle ``uri`` that answers for a collection or request domain ``domain``: one rule
    for classify and serve. The domain itself when the bundle has it; a one-domain bundle's only domain
    (None when it is unnamed) whatever ``domain`` is called; otherwise an error naming both, never the
    whole vocabulary of several domains."""
    inner = sorted({d or "" for d in bundle_domains})
    if domain in inner:
        return domain
    if len(inner) == 1:
        return inner[0] or None
    raise BundleError(f"domain '{domain}' is not one of the domains of bundle {uri} ({inner}); map it to a bundle "
                      "that has it (classify.bundles, serve.bundles)")


@dataclass
class Prediction:
    names: list[str]
    scores: list[float]
    abstained: bool
    domain: str | None


class Bundle:
    """A loaded bundle: image tower + cached text embeddings = a classifier over the vocabulary."""

    def __init__(self, uri: str, clip: Clip, config: dict, vocabulary: list[dict], text_embeddings: np.ndarray):
        self.uri = uri
        self.clip = clip
        self.config = config
        self.vocabulary = vocabulary
        self.names = [v["name"] for v in vocabulary]
        self.domains = [v.get("domain") or "" for v in vocabulary]
        self.text_embeddings = text_embeddings.astype(np.float32)
        self.logit_scale = float(config["logit_scale"])
        self.abstain_threshold = float(config.get("abstain_threshold", 0.0))
        self.model_version = str(config.get("model_version", "unknown"))

    @property
    def pixels(self) -> PixelSpec:
        """How images become this bundle's input (``near_ray.model.preprocess``)."""
        return self.clip.pixels

    def domain_mask(self, domain: str | None) -> np.ndarray:
        if domain is None:
            return np.ones(len(self.names), dtype=bool)
        mask = np.array([d == domain for d in self.domains], dtype=bool)
        if not mask.any():
            raise BundleError(f"unknown domain '{domain}': this bundle serves {sorted(set(self.domains))}")
        return mask

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        from near_ray.model.clip import encode_images

        return encode_images(self.clip, images)

    def probabilities(self, embeddings: np.ndarray, domain: str | None = None) -> np.ndarray:
        """Softmax over the (domain's) vocabulary; entries outside the domain get probability 0."""
        logits = self.logit_scale * embeddings @ self.text_embeddings.T
        logits[:, ~self.domain_mask(domain)] = -np.inf
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, images: list[Image.Image], domain: str | None = None) -> np.ndarray:
        """Index of the predicted vocabulary entry for each image."""
        return self.probabilities(self.embed(images), domain).argmax(axis=1)

    def rank(self, probs: np.ndarray, domain: str | None, top_k: int, threshold: float | None = None) -> Prediction:
        """The top-k names of one row of ``probabilities`` (ties to the lower vocabulary index) and whether
        the top one falls below the abstain threshold (the bundle's own unless ``threshold`` is given)."""
        k = min(top_k, int(self.domain_mask(domain).sum()))
        idx = np.argsort(-probs, kind="stable")[:k]
        limit = self.abstain_threshold if threshold is None else threshold
        return Prediction(
            names=[self.names[i] for i in idx],
            scores=[float(probs[i]) for i in idx],
            abstained=bool(probs[idx[0]] < limit),
            domain=self.domains[idx[0]] or None,
        )

    def classify(self, images: list[Image.Image], top_k: int = 5, domain: str | None = None) -> list[Prediction]:
        return [self.rank(row, domain, top_k) for row in self.probabilities(self.embed(images), domain)]


def load_bundle(uri: str, storage: Storage | None = None, device: str = "cpu") -> Bundle:
    """Load a bundle written by ``save_bundle``; errors name the bundle and the missing/bad file."""
    from safetensors.numpy import load as np_load

    from near_ray.model.clip import clip_from_config, load_state_dict_bytes

    st = storage or Storage()
    try:
        config = st.read_json(join(uri, "config.json"))
    except NearRayError as e:
        raise BundleError(f"{uri}: not a model bundle (config.json: {e})") from e
    if config.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{uri}: bundle format {config.get('format_version')} is not {FORMAT_VERSION}")
    try:
        vocabulary = st.read_json(join(uri, "vocabulary.json"))
        text_embeddings = np_load(st.read_bytes(join(uri, "text_embeddings.safetensors")))["text_embeddings"]
        state = load_state_dict_bytes(st.read_bytes(join(uri, "model.safetensors")))
    except NearRayError as e:
        raise BundleError(f"{uri}: incomplete bundle: {e}") from e
    try:
        pixels = bundle_pixel_spec(config)
    except NearRayError as e:
        raise BundleError(f"{uri}: config.json: {e}") from e
    clip = clip_from_config(config["model_config"], pixels=pixels)
    clip.model.load_state_dict(state)
    clip.model.to(device).eval()
    return Bundle(uri, clip, config, vocabulary, text_embeddings)
