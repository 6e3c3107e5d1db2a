"""The NeaR loss and its per-sample state updates (pure torch + a scikit-learn GMM).

Notation: N samples, V vocabulary entries. ``candidates`` is a boolean [B, V] mask of each sample's
candidate label set S_i; ``confidences`` (W) a [B, V] row-stochastic matrix supported on S_i.

- partial-label loss   L_pll = -sum_c w_ic log p_ic                       (all methods before warm-up)
- PRODEN update        w_ic <- p_ic 1[c in S_i] / sum_c' p_ic' 1[c' in S_i]; with ``confidence_prior``,
                       p_ic is first multiplied by w0_ic ** prior_power / mean_j(p_jc) ** balance
- clean / noisy split  2-component GMM on per-sample losses; clean = P(low-mean component) > threshold
- clean samples        L_pll on their confidences ("soft", default) or cross-entropy on argmax_c w_ic ("hard")
- noisy samples        soft cross-entropy on a refined target: the PRODEN update (with the prior) of
                       alpha * own prediction + (1 - alpha) * mean of the K neighbours' predictions
- total                L = L_clean + lambda * L_noisy  (per-sample sums; the caller normalizes)
- neighbours           refine's kNN over the pretrained embeddings, or (``logit_space_neighbours``) found
                       again each epoch in the fine-tuned classifier's view of the images
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_EPS = 1e-12


def clip_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: float, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """z_ic = s * cos(img_i, txt_c); entries outside ``allowed`` (e.g. another domain) get -inf."""
    z = scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    if allowed is not None:
        z = z.masked_fill(~allowed, float("-inf"))
    return z


def restrict(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Probabilities renormalized inside each row's candidate set (uniform over S_i if all mass is outside)."""
    masked = probs * candidates
    total = masked.sum(dim=1, keepdim=True)
    uniform = candidates.float() / candidates.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.where(total > _EPS, masked / total.clamp_min(_EPS), uniform)


def proden_update(probs: torch.Tensor, candidates: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """PRODEN: new confidences proportional to the model's probabilities inside the candidate set,
    times ``prior`` when given (see ``confidence_prior``)."""
    return restrict(probs.detach() if prior is None else probs.detach() * prior, candidates)


def confidence_prior(
    initial: torch.Tensor, mean_prediction: torch.Tensor | None, prior_power: float, balance: float
) -> torch.Tensor | None:
    """The factor PRODEN updates multiply the model's probabilities by, per sample and name.

    ``initial ** prior_power``: the label evidence the sets were built from (the MLLM's own answers,
    neighbours' votes) stays in the confidences, so self-training cannot move a sample wholly to a
    name the evidence barely supports. ``mean_prediction ** -balance``: names the model predicts for
    many samples are discounted (distribution alignment), against collapse onto a few popular names.
    None when both powers are 0 (plain PRODEN).
    """
    factor = None
    if prior_power:
        factor = initial.clamp_min(_EPS) ** prior_power
    if balance and mean_prediction is not None:
        adjust = mean_prediction.clamp_min(1e-6) ** -balance
        factor = adjust.expand_as(initial) if factor is None else factor * adjust
    return factor


def soft_cross_entropy(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-sum_c t_ic log p_ic per sample; zero-target entries never touch -inf logits."""
    return -(target * torch.where(target > 0, log_probs, torch.zeros_like(log_probs))).sum(dim=1)


def partial_label_loss(log_probs: torch.Tensor, confidences: torch.Tensor) -> torch.Tensor:
    """Per-sample PRODEN loss -sum_c w_ic log p_ic."""
    return soft_cross_entropy(log_probs, confidences)


def hard_cross_entropy(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy on integer labels."""
    return -log_probs.gather(1, labels.view(-1, 1)).squeeze(1)


def refined_targets(
    own_probs: torch.Tensor,
    neighbour_probs: torch.Tensor | None,
    candidates: torch.Tensor,
    alpha: float,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Label refinement for noisy samples: own prediction blended with the neighbours', inside S_i.

    The blend takes the place of the model's probabilities in the PRODEN update (with ``prior``, so
    the label evidence and the balance against popular names apply to the neighbours' votes too).
    ``neighbour_probs`` is the mean of the K neighbours' predicted distributions ([B, V]); None means
    no neighbour term (the no-kNN ablation), i.e. the target is the own prediction restricted to S_i.
    """
    blend = own_probs if neighbour_probs is None else alpha * own_probs + (1.0 - alpha) * neighbour_probs
    return proden_update(blend, candidates, prior)


def neighbour_mean(neighbour_sums: torch.Tensor, counts: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Mean of each sample's neighbours' predictions on its candidate set: ``neighbour_sums`` [N, S] are
    their sums at S_i, ``counts`` [N] how many neighbours it has; a sample without neighbours gets its
    own prediction ``own`` [N, S] (so the blend degrades to the own term)."""
    has = counts.unsqueeze(1) > 0
    return torch.where(has, neighbour_sums / counts.clamp_min(1).unsqueeze(1), own)


def fit_clean_split(losses: np.ndarray, threshold: float, seed: int = 0) -> np.ndarray:
    """Clean flags from a 2-component GMM on per-sample losses (DivideMix-style).

    Clean = posterior of the lower-mean component above ``threshold``. With too few samples or
    (near-)constant losses there is nothing to separate: every sample counts as clean.
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(losses, dtype=np.float64).reshape(-1, 1)
    if len(x) < 4 or float(x.std()) < 1e-6:
        return np.ones(len(x), dtype=bool)
    # Min-max scaling keeps the GMM's covariance regularizer meaningful whatever the loss range.
    x = (x - x.min()) / (x.max() - x.min())
    gmm = GaussianMixture(n_components=2, max_iter=50, tol=1e-3, reg_covar=5e-4, random_state=seed).fit(x)
    clean_component = int(np.argmin(gmm.means_.ravel()))
    return gmm.predict_proba(x)[:, clean_component] > threshold


def near_batch_loss(
    log_probs: torch.Tensor,
    confidences: torch.Tensor,
    candidates: torch.Tensor,
    clean: torch.Tensor,
    neighbour_probs: torch.Tensor | None,
    alpha: float,
    lambda_noisy: float,
    prior: torch.Tensor | None = None,
    clean_loss: str = "soft",
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeaR after warm-up: (per-sample loss [B], new confidences [B, V]).

    Clean samples keep PRODEN confidences and are trained on them (``clean_loss`` "soft", the partial-
    label loss) or on their current label ("hard", cross-entropy on argmax W); noisy samples get the
    refined target as both their training target and their new confidences (the refinement step).
    """
    probs = log_probs.exp()
    target = refined_targets(probs, neighbour_probs, candidates, alpha, prior)
    if clean_loss == "hard":
        clean_part = hard_cross_entropy(log_probs, confidences.argmax(dim=1))
    else:
        clean_part = partial_label_loss(log_probs, confidences)
    loss = torch.where(clean, clean_part, lambda_noisy * soft_cross_entropy(log_probs, target))
    new_conf = torch.where(clean.unsqueeze(1), proden_update(probs, candidates, prior), target)
    return loss, new_conf


def logit_space_neighbours(
    features: torch.Tensor, text: torch.Tensor, domain_of: torch.Tensor, domain_mask: torch.Tensor, k: int,
) -> torch.Tensor:
    """[N, k] each sample's nearest samples of its own domain (-1 pads) in the classifier's view of them.

    A sample is represented by its logits over its domain's vocabulary, centred over the names (what
    every name shares drops out) and compared by cosine. As the text tower learns which directions of
    the image embedding tell the discovered names apart, this metric weights them, where the
    pretrained embedding's cosine weights every direction alike. With more names than dimensions the
    same inner products come from the D x D factor R of the centred name matrix (T = QR), so the cost
    is that of a kNN over the image embeddings, O(N_d² · D) per domain (refine's exact search).
    """
    from near_ray.refine.knn import exact_knn

    n = len(features)
    out = torch.full((n, k), -1, dtype=torch.long, device=features.device)
    if k == 0:
        return out
    f = F.normalize(features.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    for d in range(domain_mask.shape[0]):
        rows = torch.nonzero(domain_of == d).squeeze(1)
        kd = min(k, len(rows) - 1)
        if kd < 1:
            continue
        names = t[domain_mask[d]]
        names = names - names.mean(dim=0, keepdim=True)
        if names.shape[0] > names.shape[1]:
            names = torch.linalg.qr(names, mode="r").R
        g = F.normalize(f[rows] @ names.T, dim=-1)
        ids, _ = exact_knn(g.cpu().numpy(), kd, features.device.type)  # refine's blocked exact search
        out[rows, :kd] = rows[torch.from_numpy(ids).to(rows.device)]
    return out


# ------------------------------------------------------------------------------------------ the phases' losses
@dataclass
class BatchContext:
    """What a phase's loss may read of a batch besides its log-probabilities, confidences and candidate sets:
    the PRODEN prior (None in the "ce" phase), the clean flags [B], the neighbours' mean prediction [B, V]
    (asked for only by the losses that use it; None when the method has no neighbour refinement) and the
    train settings of the loss."""

    prior: torch.Tensor | None
    clean: torch.Tensor
    neighbours: Callable[[], torch.Tensor] | None
    alpha: float  # train.neighbour_alpha
    lambda_noisy: float
    clean_loss: str


PhaseLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, BatchContext], tuple[torch.Tensor, torch.Tensor]]


def _ce(log_probs: torch.Tensor, w: torch.Tensor, candidates: torch.Tensor, b: BatchContext):
    """Cross-entropy on each sample's most confident name; the confidences stay as they are."""
    return hard_cross_entropy(log_probs, w.argmax(dim=1)), w


def _pll(log_probs: torch.Tensor, w: torch.Tensor, candidates: torch.Tensor, b: BatchContext):
    """The partial-label loss on the confidences, then their PRODEN update (warm-up, or PRODEN throughout)."""
    return partial_label_loss(log_probs, w), proden_update(log_probs.exp(), candidates, b.prior)


def _near(log_probs: torch.Tensor, w: torch.Tensor, candidates: torch.Tensor, b: BatchContext):
    """NeaR after warm-up: clean samples as PRODEN, noisy ones on their neighbour-refined target."""
    neighbours = b.neighbours() if b.neighbours is not None else None
    return near_batch_loss(log_probs, w, candidates, b.clean, neighbours, b.alpha, b.lambda_noisy, b.prior,
                           b.clean_loss)


# The loss of each phase (near_ray.train.methods.Method.phase): (log p [B, V], confidences W [B, V], candidate
# sets [B, V] bool, BatchContext) -> (per-sample loss [B], new confidences [B, V]). A new phase is one entry.
LOSSES: dict[str, PhaseLoss] = {"ce": _ce, "pll": _pll, "near": _near}
