"""The NeaR loss on constructed cases: refinement, the clean/noisy split, confidences inside S_i."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from near_ray.train import loss as L


def _probs(rows: list[list[float]]) -> torch.Tensor:
    p = torch.tensor(rows, dtype=torch.float32)
    return p / p.sum(1, keepdim=True)


def test_mislabeled_sample_whose_neighbours_agree_is_corrected():
    # Sample 0 carries the wrong label 0 and the model (trained on it) agrees with the label; its
    # four neighbours all predict class 1. Candidate set {0, 1} (1 came from the neighbours).
    preds = _probs([[0.7, 0.25, 0.05]] + [[0.1, 0.85, 0.05]] * 4)
    neighbours = torch.tensor([[1, 2, 3, 4]] + [[0, -1, -1, -1]] * 4)
    candidates = torch.tensor([[True, True, False]] * 5)
    # The neighbours' predictions summed on each sample's candidate set ({0, 1}), as training gathers them.
    valid = neighbours >= 0
    sums = (preds[neighbours.clamp_min(0)] * valid.unsqueeze(-1)).sum(1)[:, :2]
    nb_on_set = L.neighbour_mean(sums, valid.sum(1).float(), preds[:, :2])
    nb = torch.cat([nb_on_set, torch.zeros(5, 1)], dim=1)  # outside S_i nothing counts
    target = L.refined_targets(preds[:1], nb[:1], candidates[:1], alpha=0.3)
    assert target[0].argmax() == 1  # corrected by its neighbours
    # Without the neighbour term (the no-kNN ablation) the wrong label stays.
    assert L.refined_targets(preds[:1], None, candidates[:1], alpha=0.3)[0].argmax() == 0
    # The same refinement inside near_batch_loss: a noisy sample's new confidences move to class 1.
    logp = preds[:1].log()
    conf = torch.tensor([[1.0, 0.0, 0.0]])
    _, new_conf = L.near_batch_loss(logp, conf, candidates[:1], torch.tensor([False]), nb[:1], 0.3, 1.0)
    assert new_conf[0].argmax() == 1
    _, kept = L.near_batch_loss(logp, conf, candidates[:1], torch.tensor([True]), nb[:1], 0.3, 1.0)
    assert kept[0].argmax() == 0  # a clean sample keeps its own (PRODEN) label


def test_gmm_separates_bimodal_losses():
    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.normal(0.3, 0.05, 80), rng.normal(2.5, 0.3, 20)])
    clean = L.fit_clean_split(losses, threshold=0.5)
    assert clean[:80].all() and not clean[80:].any()
    # Nothing to separate: everyone is clean rather than an arbitrary half.
    assert L.fit_clean_split(np.full(50, 0.7), threshold=0.5).all()


def test_confidences_stay_inside_candidate_set_and_sum_to_one():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(64, 10), dim=1)
    candidates = torch.rand(64, 10) < 0.3
    candidates[:, 0] |= ~candidates.any(1)  # every sample has at least one candidate
    probs[5] = 0.0  # a sample putting all mass outside its candidate set
    probs[5, ~candidates[5]] = 1.0 / (~candidates[5]).sum()
    for w in (L.proden_update(probs, candidates),
              L.refined_targets(probs, probs.flip(0), candidates, alpha=0.5)):
        assert torch.allclose(w.sum(1), torch.ones(64))
        assert (w[~candidates] == 0).all()
    w5 = L.proden_update(probs, candidates)[5]
    assert torch.allclose(w5[candidates[5]], torch.full_like(w5[candidates[5]], 1 / candidates[5].sum()))


def test_partial_label_loss_is_cross_entropy_for_a_single_candidate_and_ignores_other_domains():
    torch.manual_seed(1)
    img, txt = torch.randn(4, 8), torch.randn(5, 8)
    allowed = torch.tensor([[True, True, True, False, False]] * 4)
    logits = L.clip_logits(img, txt, 10.0, allowed)
    logp = F.log_softmax(logits, 1)
    assert torch.isinf(logits[:, 3:]).all() and torch.allclose(logp[:, :3].exp().sum(1), torch.ones(4))
    labels = torch.tensor([0, 2, 1, 1])
    one_hot = F.one_hot(labels, 5).float()
    assert torch.allclose(L.partial_label_loss(logp, one_hot), L.hard_cross_entropy(logp, labels))
    # gradients stay finite although other-domain logits are -inf
    img.requires_grad_(True)
    L.partial_label_loss(F.log_softmax(L.clip_logits(img, txt, 10.0, allowed), 1), one_hot).sum().backward()
    assert torch.isfinite(img.grad).all()


def test_noisy_term_is_weighted_by_lambda():
    logp = F.log_softmax(torch.tensor([[2.0, 0.0, -1.0]]), 1)
    cand = torch.tensor([[True, True, False]])
    conf = torch.tensor([[0.5, 0.5, 0.0]])
    nb = _probs([[0.1, 0.9, 0.0]])
    noisy = torch.tensor([False])
    l1, _ = L.near_batch_loss(logp, conf, cand, noisy, nb, 0.5, 1.0)
    l3, _ = L.near_batch_loss(logp, conf, cand, noisy, nb, 0.5, 3.0)
    assert float(l3) == pytest.approx(3 * float(l1))


def test_confidence_prior_keeps_the_label_evidence_and_discounts_popular_names():
    # Two names; the MLLM said name 0 for this sample three times out of four, the model leans to 1.
    candidates = torch.tensor([[True, True]])
    initial = torch.tensor([[0.75, 0.25]])
    probs = _probs([[0.4, 0.6]])
    assert L.proden_update(probs, candidates)[0].argmax() == 1  # plain PRODEN follows the model
    prior = L.confidence_prior(initial, None, prior_power=1.0, balance=0.0)
    kept = L.proden_update(probs, candidates, prior)[0]
    assert kept.argmax() == 0 and kept.sum() == pytest.approx(1.0)  # 0.75*0.4 vs 0.25*0.6
    assert L.confidence_prior(initial, None, prior_power=0.0, balance=0.0) is None
    # Balance: name 1 is what the model predicts for most samples; a sample torn between the two
    # (0.45 / 0.55) goes to the rarer name 0 once predictions are divided by the mean prediction.
    mean = torch.tensor([[0.2, 0.8]])
    balanced = L.proden_update(_probs([[0.45, 0.55]]), candidates, L.confidence_prior(initial, mean, 0.0, 1.0))[0]
    assert balanced.argmax() == 0
    # ...and the refined target of a noisy sample uses the same factor.
    target = L.refined_targets(_probs([[0.45, 0.55]]), None, candidates, 0.5, L.confidence_prior(initial, mean, 0.0, 1.0))
    assert target[0].argmax() == 0


def test_clean_samples_train_on_their_label_or_on_their_confidences():
    # A clean sample torn between two candidates (0.6 / 0.4): "hard" trains on the argmax, "soft" on W.
    logp = F.log_softmax(torch.tensor([[1.0, 0.5, -1.0]]), 1)
    cand = torch.tensor([[True, True, False]])
    conf = torch.tensor([[0.6, 0.4, 0.0]])
    clean = torch.tensor([True])
    hard, _ = L.near_batch_loss(logp, conf, cand, clean, None, 0.5, 1.0, clean_loss="hard")
    soft, _ = L.near_batch_loss(logp, conf, cand, clean, None, 0.5, 1.0, clean_loss="soft")
    assert float(hard) == pytest.approx(float(-logp[0, 0]))
    assert float(soft) == pytest.approx(float(-(0.6 * logp[0, 0] + 0.4 * logp[0, 1])))


def _purity(neighbours: torch.Tensor, labels: torch.Tensor) -> float:
    valid = neighbours >= 0
    return float((labels[neighbours.clamp_min(0)] == labels[:, None])[valid].float().mean())


def test_neighbours_in_the_fine_tuned_logit_space_are_purer_than_in_the_embedding():
    """Images whose embeddings are dominated by a nuisance (background) direction: their raw cosine
    neighbours are mostly of other classes. Once the name embeddings point along the class directions
    (what fine-tuning the text tower does), neighbours in the logit space are (nearly) all of the same class;
    they never cross domains and a sample is never its own neighbour."""
    g = torch.Generator().manual_seed(0)
    n_per, classes, dim = 20, 8, 24
    labels = torch.arange(classes).repeat_interleave(n_per)
    signal = F.one_hot(labels, dim).float()
    nuisance = torch.zeros(len(labels), dim)
    nuisance[:, classes:] = 3.0 * torch.randn(len(labels), dim - classes, generator=g)
    feats = signal + nuisance
    domain_of = (labels >= 4).long()  # classes 0-3 in domain 0, 4-7 in domain 1
    text = F.one_hot(torch.arange(classes), dim).float() + 0.02 * torch.randn(classes, dim, generator=g)
    domain_mask = torch.stack([torch.arange(classes) < 4, torch.arange(classes) >= 4])
    raw = F.normalize(feats, dim=-1) @ F.normalize(feats, dim=-1).T
    raw.fill_diagonal_(float("-inf"))
    raw = raw.masked_fill(domain_of[:, None] != domain_of[None, :], float("-inf"))
    before = raw.topk(5, dim=1).indices
    after = L.logit_space_neighbours(feats, text, domain_of, domain_mask, k=5)
    assert _purity(before, labels) < 0.5 and _purity(after, labels) > 0.95, (_purity(before, labels), _purity(after, labels))
    assert bool((domain_of[after] == domain_of[:, None]).all())
    assert not bool((after == torch.arange(len(labels))[:, None]).any())


def test_logit_space_neighbours_with_more_names_than_dimensions_match_the_explicit_logits():
    """V > D: the neighbours come from the D x D factor of the centred name matrix; they are the
    neighbours of the explicit centred logit vectors. A domain smaller than k pads with -1."""
    g = torch.Generator().manual_seed(1)
    feats, text = torch.randn(60, 6, generator=g), torch.randn(14, 6, generator=g)
    domain_of = torch.cat([torch.zeros(57, dtype=torch.long), torch.ones(3, dtype=torch.long)])
    domain_mask = torch.zeros(2, 14, dtype=torch.bool)
    domain_mask[0, :12], domain_mask[1, 12:] = True, True
    got = L.logit_space_neighbours(feats, text, domain_of, domain_mask, k=4)
    names = F.normalize(text[:12], dim=-1)
    z = F.normalize(feats[:57], dim=-1) @ (names - names.mean(0)).T
    z = F.normalize(z, dim=-1)
    sim = z @ z.T
    sim.fill_diagonal_(float("-inf"))
    assert torch.equal(got[:57], sim.topk(4, dim=1).indices)
    assert bool((got[57:, 2:] == -1).all()) and bool((got[57:, :2] >= 57).all())
