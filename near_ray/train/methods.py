"""Every way near_ray turns the MLLM's names into a classifier, defined once.

A method says what each training image starts from (``targets``: one rule each in
``near_ray.train.data.TARGET_RULES``), which loss it trains with after warm-up (``loss``; each epoch's phase
has its loss in ``near_ray.train.loss.LOSSES``), and whether the NeaR machinery is on: the GMM clean/noisy
split (``gmm``) and the neighbours' predictions in the refined target (``neighbour_refinement``). The
config's allowed values, the CLI's choices, the pipeline's list of bundles to train and the report's labels
all come from ``METHODS``: an ablation is one more entry here. The experimental ones (``EXPERIMENTAL``) were
measured and not adopted: trained when named, never by default. Plain data, no torch: the config imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

Targets = Literal["candidates", "own_labels", "majority", "none"]
Loss = Literal["ce", "pll", "near", "none"]


@dataclass(frozen=True)
class Method:
    name: str
    title: str  # how reports name it
    targets: Targets  # initial confidences: kNN candidate sets, own MLLM answers, the majority label
    loss: Loss  # after warm-up: cross-entropy, partial-label (PRODEN), or NeaR's clean/noisy loss
    gmm: bool = False  # fit the clean/noisy split on per-sample losses each epoch after warm-up
    neighbour_refinement: bool = False  # noisy samples' targets blend in their neighbours' predictions
    # its image prototypes count refine's neighbour votes although its targets use no graph: the same
    # classifier as NeaR's on other labels, so a comparison measures the labels, not the classifier
    graph_votes: bool = False
    # train.* settings this method fixes whatever the run config says (an ablation of one option)
    overrides: tuple[tuple[str, Any], ...] = ()
    # a candidate under measurement, measured and not adopted (docs/method.md): trained and reported when
    # eval.methods names it (the method benchmark does), not part of every pipeline run
    experimental: bool = False

    @property
    def trained(self) -> bool:
        return self.loss != "none"

    def phase(self, epoch: int, warmup_epochs: int) -> str:
        """The loss of one epoch: "ce", "pll" (warm-up, or PRODEN all the way) or "near"."""
        if self.loss == "ce":
            return "ce"
        if self.loss == "near" and epoch >= warmup_epochs:
            return "near"
        return "pll"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("zero_shot", "zero-shot CLIP over the MLLM vocabulary", targets="none", loss="none"),
        Method("naive", "naive fine-tuning (majority labels)", targets="majority", loss="ce"),
        # the product default (train.method), chosen on dev draws (docs/method.md, "The dev screen"): the
        # MLLM's majority labels, and NeaR's classifier of image prototypes voted by refine's neighbours
        Method("naive_prototypes", "majority labels, neighbour-voted prototypes (NeaR's classifier)",
               targets="majority", loss="ce", graph_votes=True, overrides=(("prototype_vote", "neighbours"),)),
        # NeaR, named for what it computes: training on kNN candidate sets, and a classifier of image
        # prototypes (frozen image tower by default) voted by refine's neighbours
        Method("near", "NeaR labels, neighbour-voted prototypes", targets="candidates", loss="near",
               gmm=True, neighbour_refinement=True),
        # the paper's configuration as far as it is known: the fine-tuned CLIP (both towers) classifying with
        # its text embeddings of the vocabulary, no prototypes; its candidate sets follow refine.neighbour_votes
        Method("near_paper", "NeaR as published: fine-tuned CLIP, text classifier (both towers trained)",
               targets="candidates", loss="near", gmm=True, neighbour_refinement=True,
               overrides=(("prototype_weight", 0.0), ("train_towers", "both")), experimental=True),
        # the default's classifier from a fine-tuned image tower: both towers trained, the prototypes recomputed
        # with the fine-tuned image tower (and test images embedded by it)
        Method("near_both_towers", "NeaR labels, neighbour-voted prototypes of the fine-tuned image tower (both towers)",
               targets="candidates", loss="near", gmm=True, neighbour_refinement=True,
               overrides=(("train_towers", "both"),), experimental=True),
        Method("near_no_knn", "NeaR without kNN candidates", targets="own_labels", loss="near", gmm=True),
        Method("near_no_gmm", "NeaR without GMM clean/noisy split", targets="candidates", loss="pll"),
        Method("near_text_only", "NeaR classifying with text embeddings only (no image prototypes)",
               targets="candidates", loss="near", gmm=True, neighbour_refinement=True,
               overrides=(("prototype_weight", 0.0),)),
        Method("near_refreshed_knn", "NeaR with neighbours re-found in the fine-tuned model's logit space",
               targets="candidates", loss="near", gmm=True, neighbour_refinement=True,
               overrides=(("neighbour_space", "fine_tuned"),), experimental=True),
        # the classifier (train.prototype_weight 1 and prototype_vote "neighbours" by default): its image
        # prototypes without the neighbours' votes, and the mixes measured before (all confidence votes):
        # equal text/image shares (the default until neighbour votes), FineR's mix (0.3), and the
        # prototypes moved to the clusters they seed
        Method("near_confidence_prototypes", "NeaR with image prototypes of confidence votes (no neighbour votes)",
               targets="candidates", loss="near", gmm=True, neighbour_refinement=True,
               overrides=(("prototype_weight", 1.0), ("prototype_vote", "confidence"))),
        Method("near_equal_mix", "NeaR classifying with equal text and image shares (confidence votes)",
               targets="candidates", loss="near", gmm=True, neighbour_refinement=True,
               overrides=(("prototype_weight", 0.5), ("prototype_vote", "confidence")), experimental=True),
        Method("near_finer_mix", "NeaR classifying with FineR's mix (0.7 text, 0.3 image prototypes)",
               targets="candidates", loss="near", gmm=True, neighbour_refinement=True,
               overrides=(("prototype_weight", 0.3), ("prototype_vote", "confidence")), experimental=True),
        Method("near_clustered_prototypes", "NeaR with equal shares, its prototypes moved to the clusters they seed",
               targets="candidates", loss="near", gmm=True, neighbour_refinement=True,
               overrides=(("prototype_clusters", True), ("prototype_weight", 0.5), ("prototype_vote", "confidence")),
               experimental=True),
    )
}
TRAINED = tuple(name for name, m in METHODS.items() if m.trained)
DIRECT_MLLM = "direct_mllm"  # not a bundle: the MLLM asked about every test image (evaluation only)
EVALUATED = (DIRECT_MLLM, *METHODS)  # what eval.methods may name
DEFAULT_EVALUATED = (DIRECT_MLLM, *(name for name, m in METHODS.items() if not m.experimental))  # eval.methods' default
EXPERIMENTAL = tuple(name for name, m in METHODS.items() if m.experimental)
TITLES = {DIRECT_MLLM: "direct MLLM (per test image)", **{name: m.title for name, m in METHODS.items()}}


def needs_text(name: str, prototype_weight: float) -> bool:
    """Whether a method's classifier reads the text tower's embeddings of the names: zero-shot, and every
    method whose class vectors keep a text share (``train.prototype_weight`` below 1, its own or the
    run's). A model whose text side means nothing untrained (a timm backbone) cannot serve them."""
    if name == DIRECT_MLLM:
        return False
    m = get_method(name)
    if m.targets == "none":
        return True
    return float(dict(m.overrides).get("prototype_weight", prototype_weight)) < 1


def method_list() -> str:
    """Every method by name, the experimental ones marked (the CLI's help)."""
    return ", ".join(f"{name} (experimental)" if m.experimental else name for name, m in METHODS.items())


def warn_experimental(names: Iterable[str]) -> None:
    """One line on stderr for each experimental method among ``names`` (`near-ray train --method`): it runs."""
    for name in names:
        if name in EXPERIMENTAL:
            print(f"near-ray: method {name} is experimental: measured, not adopted (see docs/method.md); "
                  "training it anyway", file=sys.stderr)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method '{name}' (known: {', '.join(METHODS)})")
    return METHODS[name]
